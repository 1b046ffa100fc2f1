"""Devices: the tf.distribute strategy, precision policy, XLA and seeding of a training process.

    strategy, chief, task_id, policy = devices.setup("auto", cpu_replicas=0, batch_size=16)
    with strategy.scope(), devices.dtype_policy(policy):
        model = ...

`auto` here means what the machine has: several GPUs mirror, a TF_CONFIG
naming several workers runs multi-worker, otherwise one device.
"""

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path


@contextlib.contextmanager
def quiet_native_stderr():
    """Sends what is written to the process's stderr inside the block (TensorFlow's native start-up lines,
    which no log level silences) to a temporary file; replays it if the block raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            caught.seek(0)
            os.write(2, caught.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
with quiet_native_stderr():  # the first import of TensorFlow prints its CUDA probe on a machine without a GPU
    import keras
    import tensorflow as tf


class DeviceError(RuntimeError):
    """A device setup that cannot work, said in one line with the fix."""


def configure(seed, jit_compile=False):
    """Seeds every generator; on CPU also makes TensorFlow's kernels deterministic.

    Keras turns XLA off under op determinism, so with `jit_compile` runs are
    seeded but not bit-exact.
    """
    keras.utils.set_random_seed(seed)
    if not tf.config.list_physical_devices("GPU") and not jit_compile:
        tf.config.experimental.enable_op_determinism()




def split_cpu(replicas):
    """Splits the CPU into `replicas` logical devices (for mirrored runs without GPUs).

    Must run before TensorFlow first uses a device; a process that already
    has the same split is left as it is.
    """
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * replicas)
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != replicas:
            raise DeviceError(f"--cpu-replicas {replicas}: TensorFlow already started with {have} CPU device(s) "
                              "in this process. Pass the flag to a fresh process.") from None


def cluster_workers():
    """Number of workers named in TF_CONFIG (0 when it is unset)."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return 0
    try:
        cluster = json.loads(raw)["cluster"]
    except (ValueError, KeyError, TypeError):
        raise DeviceError("TF_CONFIG is not valid JSON with a \"cluster\" entry; see docs/cli.md, \"Several "
                          "machines\", for an example.") from None
    return sum(len(cluster.get(kind, [])) for kind in ("chief", "worker"))


def make_strategy(name="auto", cpu_replicas=0):
    """The tf.distribute strategy for `--strategy` (auto, one-device, mirrored, multi-worker).

    auto: multi-worker when TF_CONFIG names more than one worker, mirrored
    when more than one GPU (or `cpu_replicas` > 1) is visible, else the
    default one-device strategy (GPU 0 if there is one, else the CPU).
    """
    if cpu_replicas > 1:
        split_cpu(cpu_replicas)
    # Physical devices only: listing logical ones would start the runtime,
    # after which a multi-worker strategy can no longer configure itself.
    with quiet_native_stderr():  # the first look for GPUs prints a CUDA error on a machine without one
        gpus = tf.config.list_physical_devices("GPU")
    if name == "auto":
        name = ("multi-worker" if cluster_workers() > 1 else
                "mirrored" if len(gpus) > 1 or cpu_replicas > 1 else "one-device")
    if name == "one-device":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if not cluster_workers():
        raise DeviceError("--strategy multi-worker needs the TF_CONFIG variable naming the cluster and this "
                          "worker's task; see docs/cli.md, \"Several machines\".")
    return tf.distribute.MultiWorkerMirroredStrategy()


def task_of(strategy):
    """(task_type, task_id, is_chief) of this process; ("chief", 0, True) outside a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    cluster = resolver.cluster_spec().as_dict() if resolver is not None else {}
    if not cluster:
        return "chief", 0, True
    task_type, task_id = resolver.task_type, resolver.task_id or 0
    chief = task_type == "chief" or (task_type == "worker" and task_id == 0 and "chief" not in cluster)
    return task_type, task_id, chief


def precision_policy(mixed):
    """The Keras dtype policy: mixed_float16 on GPU, mixed_bfloat16 on CPU, or float32."""
    if not mixed:
        return "float32"
    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"


@contextlib.contextmanager
def dtype_policy(name):
    """Sets Keras's global dtype policy for the models built inside, then restores it."""
    before = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy(before)


def setup(strategy="auto", cpu_replicas=0, batch_size=16, multi_worker_run=True, mixed_precision=False):
    """Strategy, task and precision for a run (the choices checked against each other).

    Args:
        strategy: `auto`, `one-device`, `mirrored` or `multi-worker` (see `make_strategy`).
        cpu_replicas: split the CPU into this many devices (mirrored runs without GPUs).
        batch_size: the global batch, which must split evenly over the replicas.
        multi_worker_run: whether a shared run folder was named (multi-worker runs need one).
        mixed_precision: mixed float16 (GPU) or bfloat16 (CPU) compute.

    Returns:
        (strategy, chief, task_id, policy). Non-chief workers of a
        multi-worker run write their files under `<run>/.worker-<id>`
        instead of the run folder (see `worker_folder`).
    """
    strategy = make_strategy(strategy, cpu_replicas)
    _, task_id, chief = task_of(strategy)
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and not multi_worker_run:
        raise DeviceError("a multi-worker run needs --run, the same folder on every worker.")
    if batch_size % strategy.num_replicas_in_sync:
        raise DeviceError(f"--batch-size {batch_size} (the global batch) does not split evenly over "
                          f"{strategy.num_replicas_in_sync} replicas. Pass a multiple of it.")
    return strategy, chief, task_id, precision_policy(mixed_precision)


def worker_folder(run, chief, task_id):
    """Where this process writes: the run folder for the chief, a private sub-folder for other workers."""
    return Path(run) if chief else Path(run) / f".worker-{task_id}"


def describe_devices(strategy, policy, jit_compile):
    """One line: devices, strategy, replicas, precision, XLA (the first line of every run)."""
    gpus = tf.config.list_physical_devices("GPU")
    kind = ("MultiWorkerMirroredStrategy" if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) else
            "MirroredStrategy" if isinstance(strategy, tf.distribute.MirroredStrategy) else "default (one device)")
    task_type, task_id, chief = task_of(strategy)
    where = f", task {task_type}:{task_id}{' (chief)' if chief else ''}" if cluster_workers() else ""
    return (f"devices: {len(gpus)} GPU(s), {len(tf.config.list_logical_devices('CPU'))} CPU device(s); strategy "
            f"{kind}{where}, {strategy.num_replicas_in_sync} replica(s) in sync; precision {policy}; XLA "
            f"{'on' if jit_compile else 'off'}")


def distribute(strategy, make, global_batch):
    """A training dataset built per input pipeline when the strategy spans workers.

    `make(batch_size, input_context)` builds the pipeline. With several
    workers each builds and decodes only its own shard of files
    (`distribute_datasets_from_function`); otherwise Keras splits each
    global batch over the local replicas itself.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return make(global_batch, None)
    return strategy.distribute_datasets_from_function(lambda context: make(global_batch, context))
