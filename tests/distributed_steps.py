"""Runs a few training steps under a tf.distribute strategy, for tests/test_distributed.py.

Each mode runs in a fresh process, since the CPU can only be split into
logical devices before TensorFlow first uses it.

    python tests/distributed_steps.py mirrored OUT.json
        Two logical CPU devices: a VQ-VAE and a prior take the same steps on
        the same global batches once on one device and once mirrored over
        both; writes the largest weight differences as JSON.
    python tests/distributed_steps.py worker DATA OUT.npz
        One worker of a MultiWorkerMirroredStrategy cluster of WORKERS workers
        (TF_CONFIG set by the caller): trains a tiny VQ-VAE for a few steps on
        the PNGs in DATA, each worker reading its own shard, and saves its
        weights (and the initial ones, as the chief broadcast them).
    python tests/distributed_steps.py single DATA OUT.npz
        The single-device reference of `worker`, without TF_CONFIG: the same
        model, seed, initialisation, optimizer and number of steps, on the
        same global batches (each the workers' shards of that step,
        concatenated in replica order, so even the quantizer's restart draws
        match). Also saves, as a negative control, the weights of the same
        steps on worker 0's shard alone: what a worker ends with when it
        trains without the all-reduce.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dataset  # noqa: E402
import modules  # noqa: E402
import devices  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

SIZE, BATCH, STEPS = 32, 8, 3
WORKERS = 2  # the cluster tests/test_distributed.py starts


def tiny_vqvae():
    # dead_threshold 1.0 restarts about half the codes every step, so the
    # synchronised restart path runs on every step, not only the first.
    return modules.VQVAE(downsample=4, channels=8, res_blocks=1, res_channels=8, num_codes=16, code_dim=4,
                         dead_threshold=1.0, seed=3)


def tiny_prior():
    return modules.GatedPixelCNN(num_codes=16, filters=8, layers=2, skip_filters=8, num_slices=4, grid_size=(6, 6))


def fit_steps(build, sample, data, strategy=None):
    """Builds with `build` (inside `strategy`), loads `weights`, fits STEPS batches; returns the weights."""
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = build()
        model(sample)
        model.set_weights(fit_steps.initial.setdefault(build.__name__, model.get_weights()))
        loss = None if isinstance(model, modules.VQVAE) else keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, jit_compile=False)
    model.fit(data, epochs=1, steps_per_epoch=STEPS, verbose=0, shuffle=False)
    return model


fit_steps.initial = {}


def largest_differences(a, b):
    return {w.path: float(np.abs(np.asarray(w) - np.asarray(v)).max()) for w, v in zip(a.weights, b.weights)}


def mirrored(out):
    devices.split_cpu(2)
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 1, (BATCH * STEPS, SIZE, SIZE, 1)).astype(np.float32))
    codes = rng.integers(0, 16, (BATCH * STEPS, 6, 6)).astype(np.int32)
    slices = rng.integers(-1, 4, (BATCH * STEPS,)).astype(np.int32)
    image_ds = tf.data.Dataset.from_tensor_slices(images).batch(BATCH)
    code_ds = tf.data.Dataset.from_tensor_slices(({"codes": codes, "slice": slices}, codes)).batch(BATCH)
    strategy = devices.make_strategy("mirrored")
    report = {"replicas": strategy.num_replicas_in_sync}
    for name, build, data, sample in (("vqvae", tiny_vqvae, image_ds, images[:1]),
                                      ("prior", tiny_prior, code_ds, {"codes": codes[:1], "slice": slices[:1]})):
        single = fit_steps(build, sample, data)
        distributed = fit_steps(build, sample, data, strategy)
        report[name] = largest_differences(single, distributed)
        report[name + "_moved"] = max(float(np.abs(np.asarray(w) - v).max())
                                      for w, v in zip(single.weights, fit_steps.initial[build.__name__]))
        if name == "vqvae":
            report["vqvae_updates"] = float(np.asarray(distributed.quantizer.updates))
    Path(out).write_text(json.dumps(report))


def worker_pipeline(split, batch, context):
    """The training pipeline of one worker (`context`: its input pipeline; None for all the data)."""
    return dataset.make_dataset(split, image_size=SIZE, batch_size=batch, shuffle=True, seed=0, repeat=True,
                                drop_remainder=True, input_context=context)


def worker_model(strategy=None):
    scope = strategy.scope() if strategy is not None else tf.distribute.get_strategy().scope()
    with scope:
        model = tiny_vqvae()
        model.build((None, SIZE, SIZE, 1))
        model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    return model


def weights_of(model, prefix):
    return {f"{prefix}{i}": np.asarray(w) for i, w in enumerate(model.weights)}


def worker(data, out):
    strategy = devices.make_strategy("multi-worker")
    keras.utils.set_random_seed(0)
    source = dataset.load_source(data, seed=0)
    split = source.splits["train"]
    train_ds = devices.distribute(strategy, lambda batch, context: worker_pipeline(split, batch, context), BATCH)
    model = worker_model(strategy)
    initial = weights_of(model, "i")
    model.fit(train_ds, epochs=1, steps_per_epoch=STEPS, verbose=0)
    _, task_id, chief = devices.task_of(strategy)
    np.savez(out, chief=chief, replicas=strategy.num_replicas_in_sync, **initial, **weights_of(model, "w"))


def single(data, out):
    keras.utils.set_random_seed(0)
    source = dataset.load_source(data, seed=0)
    split = source.splits["train"]
    # Worker i's per-replica batches, exactly as its own pipeline builds them.
    shards = [worker_pipeline(split, BATCH, tf.distribute.InputContext(
        num_input_pipelines=WORKERS, input_pipeline_id=i, num_replicas_in_sync=WORKERS)) for i in range(WORKERS)]
    global_ds = tf.data.Dataset.zip(tuple(shards)).map(lambda *parts: tf.concat(parts, axis=0))
    model = worker_model()
    initial = model.get_weights()
    first = next(iter(global_ds))
    assert first.shape[0] == BATCH, first.shape
    model.fit(global_ds, epochs=1, steps_per_epoch=STEPS, verbose=0)
    # Negative control: the same start and steps on worker 0's shard only.
    alone = worker_model()
    alone.set_weights(initial)
    alone.fit(shards[0], epochs=1, steps_per_epoch=STEPS, verbose=0)
    np.savez(out, **{f"i{i}": w for i, w in enumerate(initial)}, **weights_of(model, "w"),
             **weights_of(alone, "shard0_w"))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "mirrored":
        mirrored(sys.argv[2])
    elif mode in ("worker", "single"):
        {"worker": worker, "single": single}[mode](sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown mode {mode!r}: mirrored, worker or single")
