"""The models: a VQ-VAE (encoder, vector quantizer, decoder) for 2D brain slices.

    images (B, S, S, 1) in [0, 1]
      -> Encoder: strided convolutions + residual blocks -> z (B, S/f, S/f, D)
      -> VectorQuantizer: nearest of K codes (optionally by angle), straight-through
         or rotation-trick gradients -> indices (B, S/f, S/f)
      -> Decoder: residual blocks + transposed convolutions -> reconstruction (B, S, S, 1)

The downsampling factor f sets the code grid (f=4 gives 64x64 codes at 256 px,
f=8 gives 32x32). The codebook learns by exponential moving averages by
default (as Sonnet's VectorQuantizerEMA), restarts codes that fall out of use,
and its usage is reported as perplexity and the fraction of codes in use.
The reconstruction loss is whole-image MSE or `brain_loss`, SSIM and L1
aimed inside the brain. Reconstruction quality (SSIM and PSNR, whole image and inside the brain)
comes from `metrics.py`.
"""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import ops  # noqa: E402

import metrics  # noqa: E402

PACKAGE = "brain_vqvae"
GRADIENTS = ("straight_through", "rotation")
LOSSES = ("mse", "ssim_l1")


def _replica_info():
    """(replicas in sync, this replica's id) under a tf.distribute strategy; (1, 0) outside one."""
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context: one logical computation
        return 1, 0
    return context.num_replicas_in_sync, context.replica_id_in_sync_group


def _replica_sum(x):
    """Sum of `x` over the replicas in sync (`x` itself with one replica)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return x
    return context.all_reduce(tf.distribute.ReduceOp.SUM, x)


def _cluster_logs(logs):
    """Per-step logs shaped for Keras's cross-worker reduction.

    Keras 3 reduces the logs of a multi-worker step with
    `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars; as
    (1,) tensors they reduce to the mean over all workers' replicas.
    """
    if isinstance(tf.distribute.get_strategy(), tf.distribute.MultiWorkerMirroredStrategy):
        return {name: ops.reshape(value, (1,)) for name, value in logs.items()}
    return logs


def _replica_gather(x):
    """`x` of every replica in sync, concatenated on axis 0 in replica order."""
    return tf.distribute.get_replica_context().all_gather(x, axis=0)


def l2_normalize(x, epsilon=1e-6):
    """`x` scaled to unit length along its last axis (vectors shorter than `epsilon` stay short)."""
    return x / ops.maximum(ops.norm(x, axis=-1, keepdims=True), epsilon)


def rotate_to(z, q, epsilon=1e-6):
    """The rotation trick (Fifty et al. 2025): `q` in the forward pass, a rotated gradient backward.

    The output equals `q` (to rounding), but is computed as `s R z` with
    the rotation R taking z's direction onto q's and the scale s = |q|/|z|,
    both held constant: the gradient reaching `z` is `s R^T` times the
    output's, so it keeps the angle it makes with the code, where the
    straight-through estimator (`z + sg(q - z)`) copies it unchanged.
    R = I - 2 w w^T + 2 q^ u^T with u = z/|z|, q^ = q/|q|, w = (u + q^)/|u + q^|
    (applied without forming the D x D matrix).

    Args:
        z: (N, D) float32 vectors (the encoder's outputs).
        q: (N, D) float32 their codes.
        epsilon: floor of the norms.

    Returns:
        (N, D) float32, equal to `q` in value.

    Example:
    >>> z, q = keras.ops.array([[1.0, 0.0]]), keras.ops.array([[0.0, 2.0]])
    >>> keras.ops.convert_to_numpy(rotate_to(z, q)).tolist()
    [[0.0, 2.0]]
    """
    sg = ops.stop_gradient
    z_norm = ops.maximum(ops.norm(z, axis=-1, keepdims=True), epsilon)
    q_norm = ops.maximum(ops.norm(q, axis=-1, keepdims=True), epsilon)
    u, q_hat = sg(z / z_norm), sg(q / q_norm)
    w = sg(l2_normalize(u + q_hat, epsilon))
    rotated = (z - 2.0 * ops.sum(z * w, axis=-1, keepdims=True) * w
               + 2.0 * ops.sum(z * u, axis=-1, keepdims=True) * q_hat) * sg(q_norm / z_norm)
    # The value is q exactly (also for z or q shorter than epsilon, where the
    # rotation is not defined); only the gradient comes from the rotation.
    return sg(q) + (rotated - sg(rotated))


@keras.saving.register_keras_serializable(package=PACKAGE)
class VectorQuantizer(keras.layers.Layer):
    """Maps each D-vector to its nearest of K codebook vectors.

    The nearest-code search runs in float32 whatever the dtype policy. The
    output passes gradients straight through to the input (z + sg(q - z)),
    or rotated by the rotation trick (`gradient="rotation"`, `rotate_to`).
    With `return_loss=True` the layer also returns the commitment loss
    `beta * |z - sg(q)|^2` (plus the codebook loss `|sg(z) - q|^2` when the
    codebook is learnt by gradient), against the codes `q` this call used:
    a training call updates the codebook afterwards, and the loss must not
    see that update (on the first step, or for a restarted code, the new
    vector is an unrelated seed). The layer does not `add_loss` it: layer
    losses are Python lists shared by the replica threads of a mirrored
    strategy, which would mix them; the caller adds the returned loss to
    its own.

    With `ema=True` (default) the codebook is not trained by gradient but
    follows exponential moving averages of the vectors assigned to each
    code: counts N_k and sums m_k decay by `decay`, counts are Laplace
    smoothed with `epsilon`, and code k becomes m_k / N_k.

    Codes whose moving share of assignments (decay `usage_decay`) falls below
    `dead_threshold / K` (unused for about 70 steps at the defaults) are
    re-seeded from encoder outputs of the current batch, picked with
    probability proportional to their squared distance to the codebook; on
    the first training batch every code is seeded so (a data-dependent
    initialisation).

    The codebook and its statistics move only in a training call of a
    trainable layer (`training and self.trainable`, as BatchNormalization's
    moving statistics): set `trainable = False` to freeze them.

    Under a `tf.distribute` strategy the counts, sums and restart picks are
    all-reduced over the replicas, so every replica holds the same codebook
    after every step, the one a single device would hold after the same
    global batch.

    Args:
        num_codes: K, the codebook size.
        code_dim: D, the size of each code vector; the input's last axis.
        beta: weight of the commitment loss.
        ema: learn the codebook by moving averages (True) or by gradient.
        decay: decay of the moving averages (counts, sums and usage).
        epsilon: Laplace smoothing of the counts.
        dead_threshold: a code is restarted when its moving share of
            assignments is below `dead_threshold / num_codes`; 0 disables.
        usage_decay: decay of the moving share of assignments per code.
        seed: seed of the restarts' random draws (None: 0), which are
            keyed by (seed, training update) and so reproducible on resume.
        normalize: look codes up on the unit sphere (ViT-VQGAN, Yu et al.
            2022): inputs and codebook are l2-normalised, so the nearest
            code is the one at the smallest angle and no code can drift
            out of reach of the inputs.
        gradient: how the gradient passes the quantizer to the input:
            "straight_through" (copied) or "rotation" (`rotate_to`).

    Call arguments:
        inputs: vectors (..., code_dim), any float dtype.
        training: update the codebook (EMA step, restarts) after the lookup.
        return_loss: also return the quantization loss.

    Returns:
        `(quantized, indices)`: quantized vectors shaped like the input, and
        int32 code indices shaped like the input without its last axis;
        with `return_loss=True`, `(quantized, indices, loss)` with the
        float32 scalar loss of `quantization_loss` against the codes used.

    Example:
    >>> vq = VectorQuantizer(num_codes=8, code_dim=4)
    >>> quantized, indices = vq(keras.random.normal((2, 5, 5, 4)))
    >>> tuple(indices.shape)
    (2, 5, 5)
    >>> _, _, loss = vq(keras.random.normal((2, 5, 5, 4)), return_loss=True)
    """

    def __init__(self, num_codes=512, code_dim=64, beta=0.25, ema=True, decay=0.99, epsilon=1e-5,
                 dead_threshold=0.03, usage_decay=0.95, seed=None, normalize=False, gradient="straight_through",
                 **kwargs):
        super().__init__(**kwargs)
        if gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}. Received: gradient={gradient!r}")
        if num_codes < 2:
            raise ValueError(f"num_codes must be at least 2. Received: num_codes={num_codes}")
        if code_dim < 1:
            raise ValueError(f"code_dim must be positive. Received: code_dim={code_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1). Received: decay={decay}")
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.beta = beta
        self.ema = ema
        self.decay = decay
        self.epsilon = epsilon
        self.dead_threshold = dead_threshold
        self.usage_decay = usage_decay
        self.seed = seed
        self.normalize = normalize
        self.gradient = gradient

    def build(self, input_shape):
        if input_shape[-1] != self.code_dim:
            raise ValueError(
                f"the last axis of the input must be code_dim={self.code_dim}. Received: input_shape={input_shape}")
        k, d = self.num_codes, self.code_dim
        # The moving statistics are computed identically on every replica
        # (from all-reduced inputs), so the first replica's write is everyone's.
        # autocast=False: under mixed precision they are read in float32 too.
        state = {"trainable": False, "dtype": "float32", "autocast": False, "aggregation": "only_first_replica"}
        self.codebook = self.add_weight(
            shape=(k, d), initializer=keras.initializers.RandomUniform(-1.0 / k, 1.0 / k),
            trainable=not self.ema, name="codebook", dtype="float32", autocast=False,
            **({"aggregation": "only_first_replica"} if self.ema else {}))
        self.ema_counts = self.add_weight(shape=(k,), initializer="zeros", name="ema_counts", **state)
        self.ema_sums = self.add_weight(shape=(k, d), initializer="zeros", name="ema_sums", **state)
        self.usage = self.add_weight(shape=(k,), initializer="zeros", name="usage", **state)
        self.initialized = self.add_weight(shape=(), initializer="zeros", name="initialized", **state)
        # Training updates so far: with `seed`, keys the restarts' random draws.
        self.updates = self.add_weight(shape=(), initializer="zeros", name="updates", **state)

    def codes(self):
        """The code vectors (K, D) float32: the codebook, on the unit sphere when `normalize`."""
        return l2_normalize(self.codebook) if self.normalize else ops.convert_to_tensor(self.codebook)

    def nearest(self, flat):
        """Nearest codes of (N, D) float32 vectors: (indices int32 (N,), squared distances (N,))."""
        codes = self.codes()
        distances = (ops.sum(flat**2, axis=1, keepdims=True)
                     - 2.0 * ops.matmul(flat, ops.transpose(codes))
                     + ops.sum(codes**2, axis=1)[None, :])
        return ops.cast(ops.argmin(distances, axis=1), "int32"), ops.maximum(ops.min(distances, axis=1), 0.0)

    def lookup(self, indices):
        """Code vectors (..., D) of integer indices (...)."""
        return ops.take(self.codes(), indices, axis=0)

    def quantization_loss(self, z, quantized):
        """The commitment loss of inputs `z` to their codes `quantized` (plus the codebook loss without EMA).

        `quantized` must be the codes the step used, looked up before any
        codebook update (`call(..., return_loss=True)` returns exactly that).
        """
        z = ops.cast(z, "float32")
        loss = self.beta * ops.mean((z - ops.stop_gradient(quantized)) ** 2)
        if not self.ema:
            loss = loss + ops.mean((ops.stop_gradient(z) - quantized) ** 2)
        return loss

    def call(self, inputs, training=False, return_loss=False):
        z = ops.cast(inputs, "float32")
        if self.normalize:
            z = l2_normalize(z)
        flat = ops.reshape(z, (-1, self.code_dim))
        flat_indices, distances = self.nearest(flat)
        indices = ops.reshape(flat_indices, ops.shape(z)[:-1])
        # The codes of this step, read before the update below moves the codebook:
        # the output and the loss both use these.
        quantized = self.lookup(indices)
        loss = self.quantization_loss(z, quantized) if return_loss else None
        if training and self.trainable:
            self._update_codebook(ops.stop_gradient(flat), flat_indices, ops.stop_gradient(distances))
        if self.gradient == "rotation":
            quantized = ops.reshape(rotate_to(flat, ops.reshape(quantized, (-1, self.code_dim))), ops.shape(z))
        else:
            quantized = z + ops.stop_gradient(quantized - z)
        quantized = ops.cast(quantized, self.compute_dtype)
        return (quantized, indices, loss) if return_loss else (quantized, indices)

    def _update_codebook(self, flat, indices, distances):
        """EMA step, then the restart of dead codes (in place)."""
        k = self.num_codes
        # Per-code counts and sums by segment sums: no (N, K) one-hot in memory.
        counts = _replica_sum(ops.segment_sum(ops.ones_like(indices, dtype="float32"), indices, num_segments=k))
        share = counts / ops.maximum(ops.sum(counts), 1.0)
        codebook = self.codebook
        if self.ema:
            sums = _replica_sum(ops.segment_sum(flat, indices, num_segments=k))
            ema_counts = self.decay * self.ema_counts + (1.0 - self.decay) * counts
            ema_sums = self.decay * self.ema_sums + (1.0 - self.decay) * sums
            total = ops.sum(ema_counts)
            smoothed = (ema_counts + self.epsilon) / (total + k * self.epsilon) * total
            codebook = ema_sums / smoothed[:, None]
        usage = self.usage_decay * self.usage + (1.0 - self.usage_decay) * share
        dead = ops.logical_or(usage < self.dead_threshold / k, self.initialized < 0.5)
        sample = self._restart_samples(flat, distances)
        self.codebook.assign(ops.where(dead[:, None], sample, codebook))
        if self.ema:
            self.ema_sums.assign(ops.where(dead[:, None], sample, ema_sums))
            self.ema_counts.assign(ops.where(dead, 1.0, ema_counts))
        self.usage.assign(ops.where(dead, 1.0 / k, usage))
        self.initialized.assign(1.0)
        self.updates.assign(self.updates + 1.0)

    def _restart_samples(self, flat, distances):
        """K distinct encoder outputs of the (global) batch, drawn with
        probability proportional to the squared distance to their nearest
        code (as k-means++ seeding): vectors the codebook already fits well,
        such as the black background that fills most of a brain slice, are
        not picked again and again. Gumbel top-k samples without replacement
        in O(N log K); across replicas, each proposes its local top K and
        the global top K of those is the same as over the whole batch."""
        n = ops.shape(distances)[0]
        replicas, replica = _replica_info()
        # One uniform per position of the global batch, keyed by (seed, update):
        # a replica takes its own slice, so the draws do not depend on the split.
        seed = tf.stack([tf.constant(self.seed or 0, tf.int64), tf.cast(self.updates, tf.int64)])
        uniform = tf.random.stateless_uniform((n * replicas,), seed=seed, minval=1e-9, maxval=1.0)
        uniform = uniform[replica * n:(replica + 1) * n]
        keys = ops.log(distances + 1e-12) - ops.log(-ops.log(uniform))
        keys, picks = ops.top_k(keys, ops.minimum(self.num_codes, n))
        candidates = ops.take(flat, picks, axis=0)
        if replicas > 1:
            keys, candidates = _replica_gather(keys), _replica_gather(candidates)
        k = ops.minimum(self.num_codes, ops.shape(keys)[0])
        _, best = ops.top_k(keys, k)
        return ops.take(candidates, ops.take(best, ops.arange(self.num_codes) % k), axis=0)

    def compute_output_shape(self, input_shape):
        return input_shape, input_shape[:-1]

    def compute_output_spec(self, inputs, training=False, return_loss=False):
        quantized = keras.KerasTensor(inputs.shape, dtype=self.compute_dtype)
        indices = keras.KerasTensor(inputs.shape[:-1], dtype="int32")
        return (quantized, indices, keras.KerasTensor((), dtype="float32")) if return_loss else (quantized, indices)

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_codes": self.num_codes, "code_dim": self.code_dim, "beta": self.beta, "ema": self.ema,
            "decay": self.decay, "epsilon": self.epsilon, "dead_threshold": self.dead_threshold, "usage_decay": self.usage_decay,
            "seed": self.seed, "normalize": self.normalize, "gradient": self.gradient,
        })
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResidualBlock(keras.layers.Layer):
    """`x + Conv1x1(ReLU(Conv3x3(ReLU(x))))`, as in the VQ-VAE paper.

    Args:
        hidden: channels of the 3x3 convolution.

    Returns:
        A tensor shaped like the input.
    """

    def __init__(self, hidden=32, **kwargs):
        super().__init__(**kwargs)
        self.hidden = hidden

    def build(self, input_shape):
        self.conv3 = keras.layers.Conv2D(self.hidden, 3, padding="same", name="conv3x3")
        self.conv3.build(input_shape)
        self.conv1 = keras.layers.Conv2D(input_shape[-1], 1, name="conv1x1")
        self.conv1.build((*input_shape[:-1], self.hidden))

    def call(self, inputs):
        return inputs + self.conv1(ops.relu(self.conv3(ops.relu(inputs))))

    def get_config(self):
        return {**super().get_config(), "hidden": self.hidden}


def _steps(downsample):
    steps = int(round(math.log2(downsample))) if downsample > 0 else -1
    if steps < 1 or 2**steps != downsample:
        raise ValueError(f"downsample must be a power of two >= 2. Received: downsample={downsample}")
    return steps


def build_encoder(downsample=4, channels=64, res_blocks=2, res_channels=32, code_dim=64):
    """Strided 4x4 convolutions down by `downsample`, residual blocks, 1x1 to `code_dim`."""
    steps = _steps(downsample)
    layers = []
    for i in range(steps):
        width = channels // 2 if i < steps - 1 else channels
        layers.append(keras.layers.Conv2D(width, 4, strides=2, padding="same", activation="relu", name=f"down{i}"))
    layers.append(keras.layers.Conv2D(channels, 3, padding="same", name="mix"))
    layers += [ResidualBlock(res_channels, name=f"res{i}") for i in range(res_blocks)]
    layers += [keras.layers.ReLU(name="relu"), keras.layers.Conv2D(code_dim, 1, name="to_codes")]
    return keras.Sequential(layers, name="encoder")


def build_decoder(downsample=4, channels=64, res_blocks=2, res_channels=32):
    """Mirror of the encoder: residual blocks, then transposed convolutions up to 1 channel."""
    steps = _steps(downsample)
    layers = [keras.layers.Conv2D(channels, 3, padding="same", name="from_codes")]
    layers += [ResidualBlock(res_channels, name=f"res{i}") for i in range(res_blocks)]
    layers.append(keras.layers.ReLU(name="relu"))
    for i in range(steps - 1):
        layers.append(keras.layers.Conv2DTranspose(channels // 2, 4, strides=2, padding="same", activation="relu",
                                                   name=f"up{i}"))
    layers.append(keras.layers.Conv2DTranspose(1, 4, strides=2, padding="same", name=f"up{steps - 1}",
                                               dtype="float32"))
    return keras.Sequential(layers, name="decoder")


def brain_loss(images, reconstructions, alpha=0.84, background=1.0, mask=None):
    """Reconstruction loss aimed inside the brain: `alpha (1 - SSIM) + (1 - alpha) L1`.

    The mix of Zhao et al. (2017) with the terms aimed at the
    brain (`metrics.brain_mask` of the originals): SSIM is averaged over the
    mask, the score `metrics.image_quality` reports, and L1 weights the
    mask by 1 and the rest of the canvas by `background`, which keeps it
    black (at 0.1 a faint haze stays there and costs whole-image SSIM;
    docs/results.md). Reconstructions are
    not clipped, so the gradient does not vanish outside [0, 1].

    Args:
        images: originals (B, H, W, 1) float32 in [0, 1].
        reconstructions: (B, H, W, 1) float32.
        alpha: weight of the SSIM term.
        background: L1 weight of the pixels away from the brain.
        mask: `metrics.brain_mask(images)` if the caller has it (None:
            computed here).

    Returns:
        The float32 scalar loss, averaged over images.
    """
    mask = ops.cast(metrics.brain_mask(images) if mask is None else mask, "float32")
    crop = (metrics.FILTER_SIZE - 1) // 2
    weight = background + (1.0 - background) * mask
    l1 = ops.sum(weight * ops.abs(images - reconstructions), axis=(1, 2, 3)) / ops.sum(weight, axis=(1, 2, 3))
    inside = mask[:, crop:-crop, crop:-crop, 0]
    ssim = ops.sum(metrics.ssim_map(images, reconstructions) * inside, axis=(1, 2))
    ssim = ssim / ops.maximum(ops.sum(inside, axis=(1, 2)), 1.0)
    return ops.mean(alpha * (1.0 - ssim) + (1.0 - alpha) * l1)


@keras.saving.register_keras_serializable(package=PACKAGE)
class CodebookUsage(keras.metrics.Metric):
    """Perplexity and fraction of codes used, over all indices seen since the last reset.

    Perplexity is exp(entropy) of the code histogram: K when every code is
    used equally, 1 when one code takes everything.
    """

    def __init__(self, num_codes, name="codebook_usage", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_codes = num_codes
        self.counts = self.add_variable(shape=(num_codes,), initializer="zeros", name="counts", dtype="float32")

    def update_state(self, indices):
        flat = ops.cast(ops.reshape(indices, (-1,)), "int32")
        self.counts.assign_add(ops.segment_sum(ops.ones_like(flat, dtype="float32"), flat,
                                               num_segments=self.num_codes))

    def result(self):
        total = ops.maximum(ops.sum(self.counts), 1.0)
        p = self.counts / total
        entropy = -ops.sum(ops.where(p > 0, p * ops.log(ops.maximum(p, 1e-12)), 0.0))
        return {"perplexity": ops.exp(entropy),
                "codes_used": ops.mean(ops.cast(self.counts > 0, "float32"))}

    def get_config(self):
        return {**super().get_config(), "num_codes": self.num_codes}


@keras.saving.register_keras_serializable(package=PACKAGE)
class VQVAE(keras.Model):
    """VQ-VAE for single-channel images in [0, 1].

    Tracks total, reconstruction (`loss`) and VQ losses, SSIM and PSNR (whole
    image, and inside the brain as `ssim_brain` / `psnr_brain`; see
    `metrics.image_quality`), perplexity and the fraction of codes used, in
    training and evaluation. SSIM and PSNR are means over images; the brain
    means leave out images whose brain mask is empty.

    Args:
        downsample: encoder stride; the code grid is image_size / downsample.
        channels: convolution channels of encoder and decoder.
        res_blocks: residual blocks in encoder and decoder.
        res_channels: hidden channels of each residual block.
        num_codes: K, the codebook size.
        code_dim: D, the code vector size.
        beta: commitment loss weight.
        codebook: "ema" (moving averages, default) or "loss" (gradient).
        decay: EMA decay.
        dead_threshold: restart threshold of unused codes (see `VectorQuantizer`).
        seed: seed of the quantizer's restarts.
        loss: the reconstruction loss: "mse" over the whole image, or
            "ssim_l1", `brain_loss` (SSIM and L1 inside the brain, mixed
            as Zhao et al. 2017).
        normalize_codes: l2-normalised code lookup (see `VectorQuantizer`).
        gradient: gradient through the quantizer (see `VectorQuantizer`).
        background_weight: with `loss="ssim_l1"`, the L1 weight of the pixels
            outside the brain (`brain_loss`'s `background`).
        decoder_channels: the decoder's channels (None: `channels`).
        decoder_res_blocks: the decoder's residual blocks (None: `res_blocks`).

    Example:
    >>> model = VQVAE(downsample=4, num_codes=16, code_dim=8, channels=16)
    >>> model(keras.ops.zeros((1, 32, 32, 1))).shape
    TensorShape([1, 32, 32, 1])
    """

    def __init__(self, downsample=4, channels=64, res_blocks=2, res_channels=32, num_codes=512, code_dim=64,
                 beta=0.25, codebook="ema", decay=0.99, dead_threshold=0.03, seed=None, loss="mse",
                 normalize_codes=False, gradient="straight_through", background_weight=1.0, decoder_channels=None,
                 decoder_res_blocks=None, **kwargs):
        super().__init__(**kwargs)
        if codebook not in ("ema", "loss"):
            raise ValueError(f"codebook must be 'ema' or 'loss'. Received: codebook={codebook!r}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}. Received: loss={loss!r}")
        self.hyper = {"downsample": downsample, "channels": channels, "res_blocks": res_blocks,
                      "res_channels": res_channels, "num_codes": num_codes, "code_dim": code_dim, "beta": beta,
                      "codebook": codebook, "decay": decay, "dead_threshold": dead_threshold, "seed": seed,
                      "loss": loss, "normalize_codes": normalize_codes, "gradient": gradient,
                      "background_weight": background_weight,
                      "decoder_channels": decoder_channels, "decoder_res_blocks": decoder_res_blocks}
        self.downsample = downsample
        self.num_codes = num_codes
        self.loss_name = loss
        self.encoder = build_encoder(downsample, channels, res_blocks, res_channels, code_dim)
        self.quantizer = VectorQuantizer(num_codes, code_dim, beta=beta, ema=codebook == "ema", decay=decay,
                                         dead_threshold=dead_threshold, seed=seed, normalize=normalize_codes,
                                         gradient=gradient, name="quantizer")
        self.decoder = build_decoder(downsample, decoder_channels or channels,
                                     res_blocks if decoder_res_blocks is None else decoder_res_blocks, res_channels)
        self.trackers = {name: keras.metrics.Mean(name=name)
                         for name in ("loss", "recon_loss", "vq_loss", "ssim", "psnr", "ssim_brain", "psnr_brain")}
        self.usage = CodebookUsage(num_codes, name="codebook_usage")

    def build(self, input_shape):
        self.encoder.build(input_shape)
        z_shape = self.encoder.compute_output_shape(input_shape)
        self.quantizer.build(z_shape)
        self.decoder.build(z_shape)
        self.built = True

    def call(self, images, training=False):
        quantized, _ = self.quantizer(self.encoder(images, training=training), training=training)
        return self.decoder(quantized, training=training)

    @property
    def metrics(self):
        return [*self.trackers.values(), self.usage]

    def _forward(self, images, mask, training):
        """One pass: reconstructions, code indices, and the reconstruction and VQ losses.

        `mask` is `metrics.brain_mask(images)`, computed once per step for
        the loss and the logged brain scores.

        The VQ loss is the quantizer's, against the codes this pass used:
        in training the quantizer moves its codebook within this pass.
        """
        z = self.encoder(images, training=training)
        quantized, indices, vq_loss = self.quantizer(z, training=training, return_loss=True)
        reconstructions = self.decoder(quantized, training=training)
        images, predicted = ops.cast(images, "float32"), ops.cast(reconstructions, "float32")
        if self.loss_name == "ssim_l1":
            recon_loss = brain_loss(images, predicted, background=self.hyper["background_weight"], mask=mask)
        else:
            recon_loss = ops.mean((images - predicted) ** 2)
        return reconstructions, indices, recon_loss, vq_loss

    def _log(self, images, mask, reconstructions, indices, recon_loss, vq_loss):
        quality = metrics.image_quality(images, reconstructions, mask=mask)
        # SSIM and PSNR are averaged per image (not per batch), so a partial
        # last batch counts for what it holds.
        values = {"loss": recon_loss + vq_loss, "recon_loss": recon_loss, "vq_loss": vq_loss, **quality}
        for name, value in values.items():
            if name.endswith("_brain"):  # NaN for an empty brain mask: left out of the mean
                known = ops.logical_not(ops.isnan(value))
                self.trackers[name].update_state(ops.where(known, value, 0.0), sample_weight=ops.cast(known, "float32"))
            else:
                self.trackers[name].update_state(value)
        self.usage.update_state(indices)
        return {**{name: t.result() for name, t in self.trackers.items()}, **self.usage.result()}

    # A custom step, not Keras's stock train_step/test_step with an overridden
    # `compute_loss`: the stock step hands `compute_loss` and `compute_metrics`
    # only `y_pred = self(x, training=True)`, the reconstruction. The VQ loss
    # and the code indices exist only inside that forward pass (the loss is
    # against the codes the step used, and the quantizer moves its codebook
    # later in the same pass, so it cannot be recomputed in `compute_loss`).
    # The stock way to carry them out is `add_loss` / `self.losses` (or any
    # attribute), i.e. Python lists on the layers, which Keras clears when a
    # call enters the model; under a MirroredStrategy the replicas' forward
    # passes run in threads that take turns at the quantizer's all-reduces
    # (merge_call), so a replica would clear or read another replica's loss.
    # Returning them from `call` would change what `model(images)` is.
    # So this step does what the stock one does, with the losses in hand:
    # the per-replica mean loss scaled by 1/replicas (Keras's losses do the
    # same; replicas' gradients are summed) and by the optimizer's loss scale.
    def train_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        mask = metrics.brain_mask(images)
        with tf.GradientTape() as tape:
            reconstructions, indices, recon_loss, vq_loss = self._forward(images, mask, training=True)
            scaled = self.optimizer.scale_loss((recon_loss + vq_loss) / _replica_info()[0])
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(gradients, variables))
        return _cluster_logs(self._log(images, mask, reconstructions, indices, recon_loss, vq_loss))

    def test_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        mask = metrics.brain_mask(images)
        reconstructions, indices, recon_loss, vq_loss = self._forward(images, mask, training=False)
        return _cluster_logs(self._log(images, mask, reconstructions, indices, recon_loss, vq_loss))

    def encode(self, images):
        """Code indices (B, S/f, S/f) int32 of images (B, S, S, 1)."""
        return self.quantizer(self.encoder(images, training=False), training=False)[1]

    def decode(self, indices):
        """Images (B, S, S, 1) float32 in [0, 1] decoded from code indices (B, S/f, S/f)."""
        return ops.clip(ops.cast(self.decoder(self.quantizer.lookup(indices), training=False), "float32"), 0.0, 1.0)

    def reconstruct(self, images):
        """`decode(encode(images))` in one call: the model's reconstruction, clipped to [0, 1]."""
        return ops.clip(ops.cast(self(images, training=False), "float32"), 0.0, 1.0)

    def get_config(self):
        return {**super().get_config(), **self.hyper}


# ---------------------------------------------------------------------------
# The prior: a gated PixelCNN over code grids
# ---------------------------------------------------------------------------


def _gate(x):
    """tanh(a) * sigmoid(b) for x = [a, b] split on the last axis."""
    a, b = ops.split(x, 2, axis=-1)
    return ops.tanh(a) * ops.sigmoid(b)


def _shift_down(x):
    """Moves rows down by one (row 0 becomes zeros)."""
    return ops.pad(x, [[0, 0], [1, 0], [0, 0], [0, 0]])[:, :-1]


def _shift_right(x):
    """Moves columns right by one (column 0 becomes zeros)."""
    return ops.pad(x, [[0, 0], [0, 0], [1, 0], [0, 0]])[:, :, :-1]


@keras.saving.register_keras_serializable(package=PACKAGE)
class GatedPixelCNN(keras.Model):
    """Gated PixelCNN (van den Oord et al. 2016) over a grid of code indices.

    A vertical stack sees the rows above; a horizontal stack sees the codes
    to the left in the current row and, through a 1x1 convolution, the
    vertical stack shifted down by a row, so the receptive field has no
    blind spot. Each layer is gated (tanh * sigmoid); the horizontal stack
    is residual after the first layer; skip connections from every layer
    feed a small head that gives logits over the K codes.

    Causality comes from the kernel shapes and padding, not from masked
    weights: the vertical kernel is (k//2 + 1) x k over zero-padded rows
    above, the horizontal kernel 1 x (k//2 + 1) over columns to the left.
    The first horizontal layer also shifts its input right by one, so it
    never sees the code it predicts ("mask A"); later layers see the
    current position's features, which only hold earlier codes ("mask B").

    Optional conditioning on the axial slice position (OASIS slice index,
    0 .. num_slices - 1) and on a class label adds a learnt bias per layer
    to every gate; unknown values (-1 or out of range) use a learnt
    "unknown" embedding. With `grid_size`, a learnt position embedding (a
    row plus a column vector) is projected into every gate the same way,
    so each layer knows where in the slice it is: the brain outline and
    background are a matter of position that local context alone cannot
    tell. Position is not a code, so causality is untouched.

    Args:
        num_codes: K, the number of codes (the VQ-VAE's codebook size).
        filters: channels of both stacks.
        layers: gated layers.
        kernel_size: k, odd.
        skip_filters: channels of the skip connections and the head.
        num_slices: slice positions to condition on; 0 for none.
        num_classes: class labels to condition on; 0 for none.
        grid_size: (H, W) of the code grid for the position embedding, or
            None for none; inputs must then have exactly this grid.
        dropout: in training, the rate at which each gated layer's
            horizontal output is dropped (before its skip and residual
            paths; 0: none). The masks are stateless, seeded by the layer
            and the optimizer's step, so a resumed run draws the masks an
            uninterrupted one did. Sampling never drops.

    Inputs:
        A dict {"codes": int (B, H, W), "slice": int (B,), "label": int (B,)}
        ("slice"/"label" only when conditioned), or the codes tensor alone.

    Returns:
        Logits (B, H, W, K).

    Sampling one code at a time does not need the whole pass per code:
    `start_state`, `step`, `push_code` and `finish_row` run the same layers
    on cached windows, one position at a time (`make_fast_sampler` loops
    over them).

    Example:
    >>> prior = GatedPixelCNN(num_codes=16, filters=8, layers=2)
    >>> prior(keras.ops.zeros((1, 4, 4), "int32")).shape
    TensorShape([1, 4, 4, 16])
    """

    def __init__(self, num_codes=512, filters=64, layers=8, kernel_size=5, skip_filters=128, num_slices=0,
                 num_classes=0, grid_size=None, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1). Received: dropout={dropout}")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and at least 3. Received: kernel_size={kernel_size}")
        if layers < 1:
            raise ValueError(f"layers must be at least 1. Received: layers={layers}")
        if grid_size is not None and (len(grid_size) != 2 or min(grid_size) < 1):
            raise ValueError(f"grid_size must be (height, width) or None. Received: grid_size={grid_size}")
        self.num_codes, self.filters, self.num_layers = num_codes, filters, layers
        self.kernel_size, self.skip_filters = kernel_size, skip_filters
        self.num_slices, self.num_classes = num_slices, num_classes
        self.grid_size = None if grid_size is None else tuple(int(n) for n in grid_size)
        self.dropout = float(dropout)
        self.conditional = bool(num_slices or num_classes)
        half = kernel_size // 2 + 1
        conv = keras.layers.Conv2D
        self.embed = keras.layers.Embedding(num_codes, filters, name="embed")
        self.v_convs = [conv(2 * filters, (half, kernel_size), name=f"v{i}") for i in range(layers)]
        self.h_convs = [conv(2 * filters, (1, half), name=f"h{i}") for i in range(layers)]
        self.v_to_h = [conv(2 * filters, 1, name=f"v_to_h{i}") for i in range(layers)]
        # The last layer's horizontal output would feed nothing: it only has a skip.
        self.h_outs = [conv(filters, 1, name=f"h_out{i}") for i in range(layers - 1)]
        self.skips = [conv(skip_filters, 1, name=f"skip{i}") for i in range(layers)]
        self.head = [conv(skip_filters, 1, name="head0"), conv(num_codes, 1, name="head1")]
        if self.conditional:
            self.slice_embed = keras.layers.Embedding(num_slices + 1, filters, name="slice_embed")
            self.label_embed = keras.layers.Embedding(num_classes + 1, filters, name="label_embed")
        if self.grid_size is not None:
            self.row_embed = keras.layers.Embedding(self.grid_size[0], filters, name="row_embed")
            self.col_embed = keras.layers.Embedding(self.grid_size[1], filters, name="col_embed")
        if self.conditional or self.grid_size is not None:
            self.cond_v = [keras.layers.Dense(2 * filters, use_bias=False, name=f"cond_v{i}") for i in range(layers)]
            self.cond_h = [keras.layers.Dense(2 * filters, use_bias=False, name=f"cond_h{i}") for i in range(layers)]

    def init_from_codebook(self, codebook):
        """Starts the code embedding (and the output layer) from the VQ-VAE's codebook.

        Codes whose vectors are close decode to similar patches, so they
        should start with similar embeddings; by default the prior starts
        every code at an unrelated random vector and must learn that from
        data, code by code. This sets each code's input embedding (and its
        column of the output layer) to the codebook's principal components,
        scaled to the magnitude of the default random start. It is only a
        start: the weights stay trainable.

        Args:
            codebook: the VQ-VAE's code vectors, (num_codes, code_dim).

        Example:
        >>> prior = GatedPixelCNN(num_codes=16, filters=8, layers=2)
        >>> _ = prior(keras.ops.zeros((1, 4, 4), "int32"))  # builds it
        >>> prior.init_from_codebook(np.random.default_rng(0).normal(size=(16, 3)))
        """
        codebook = np.asarray(codebook, np.float64)
        if codebook.ndim != 2 or codebook.shape[0] != self.num_codes:
            raise ValueError(f"codebook must be (num_codes={self.num_codes}, code_dim). "
                             f"Received: codebook of shape {codebook.shape}")
        if not self.embed.built:
            raise ValueError("call the prior once (to build it) before init_from_codebook.")
        centred = codebook - codebook.mean(axis=0)
        _, _, components = np.linalg.svd(centred, full_matrices=False)

        def features(width, std):
            out = np.zeros((self.num_codes, width))
            used = min(width, components.shape[0])
            out[:, :used] = centred @ components[:used].T
            return out * (std / max(out.std(), 1e-12))

        embed = self.embed.embeddings
        embed.assign(features(embed.shape[1], float(np.std(ops.convert_to_numpy(embed)))).astype(embed.dtype))
        kernel = self.head[1].kernel
        cols = features(kernel.shape[2], float(np.std(ops.convert_to_numpy(kernel))))
        kernel.assign(cols.T.reshape(kernel.shape).astype(kernel.dtype))

    def _unpack(self, inputs):
        if isinstance(inputs, dict):
            codes = inputs["codes"]
            n = ops.shape(codes)[0]
            slices = inputs.get("slice", ops.full((n,), -1, "int32"))
            labels = inputs.get("label", ops.full((n,), -1, "int32"))
            return codes, slices, labels
        n = ops.shape(inputs)[0]
        return inputs, ops.full((n,), -1, "int32"), ops.full((n,), -1, "int32")

    def condition(self, slices, labels):
        """The conditioning vector (B, filters), or None when unconditional."""
        if not self.conditional:
            return None

        def known(values, count):  # -1 and out-of-range values map to the "unknown" row `count`
            values = ops.cast(values, "int32")
            return ops.where(ops.logical_and(values >= 0, values < count), values, count)

        return (self.slice_embed(known(slices, self.num_slices))
                + self.label_embed(known(labels, self.num_classes)))

    def position(self):
        """The position embedding (H, W, filters), or None without `grid_size`."""
        if self.grid_size is None:
            return None
        height, width = self.grid_size
        return (self.row_embed(ops.arange(height))[:, None, :]
                + self.col_embed(ops.arange(width))[None, :, :])

    # The forward pass is written once, in pieces that `call` runs over the
    # whole grid and the cached sampler (`start_state`, `step`, `push_code`,
    # `finish_row`) runs one position or one row at a time, on the same layers
    # with the same operations in the same order.

    def _check_grid(self, height, width, received):
        if self.grid_size is not None and (height, width) != self.grid_size:
            raise ValueError(f"This prior models {self.grid_size[0]}x{self.grid_size[1]} code grids. "
                             f"Received: {received}")

    def _biases(self, cond, pos):
        """The gates' conditioning and position terms, per layer, shaped to broadcast over (B, H, W, 2F).

        Returns a dict with, of "cond_v", "cond_h" ((B, 1, 1, 2F) each) and
        "pos_v", "pos_h" ((1, H, W, 2F) each), the ones this prior has, each
        a tuple over layers.
        """
        biases = {}
        if cond is not None:
            biases["cond_v"] = tuple(layer(cond)[:, None, None, :] for layer in self.cond_v)
            biases["cond_h"] = tuple(layer(cond)[:, None, None, :] for layer in self.cond_h)
        if pos is not None:
            biases["pos_v"] = tuple(layer(pos)[None] for layer in self.cond_v)
            biases["pos_h"] = tuple(layer(pos)[None] for layer in self.cond_h)
        return biases

    @staticmethod
    def _add_biases(x, cond, pos):
        """`x` plus the conditioning term, then the position term (each may be None)."""
        x = x if cond is None else x + cond
        return x if pos is None else x + pos

    def _drop(self, x, index):
        """`x` with a share `dropout` of its values zeroed (the rest scaled up): training only.

        The mask is drawn statelessly from (layer, optimizer step): Keras's
        `Dropout` keeps its random state in a seed variable that
        `save_weights` leaves out, so a resumed run would draw other masks.
        """
        step = self.optimizer.iterations if self.optimizer is not None else 0
        seed = tf.stack([tf.constant(index, tf.int64), tf.cast(step, tf.int64)])
        keep = tf.random.stateless_uniform(tf.shape(x), seed) >= self.dropout
        return ops.where(keep, x / (1.0 - self.dropout), ops.zeros_like(x))

    def _horizontal_out(self, index, h_pre, h, training=False):
        """Gates horizontal layer `index`: (its skip output, the next layer's horizontal input or None).

        `h` is the layer's horizontal input at the same positions (residual
        after the first layer). In training, the gated output is dropped
        out (`dropout`).
        """
        gated = _gate(h_pre)
        if training and self.dropout:
            gated = self._drop(gated, index)
        skip = self.skips[index](gated)
        if index == self.num_layers - 1:  # the last layer's horizontal output would feed nothing
            return skip, None
        return skip, self.h_outs[index](gated) + (h if index > 0 else 0.0)

    def _logits(self, skip):
        # Logits in float32 under mixed precision too: the loss and sampling need them exact.
        return ops.cast(self.head[1](ops.relu(self.head[0](ops.relu(skip)))), "float32")

    def call(self, inputs, training=False):
        codes, slices, labels = self._unpack(inputs)
        self._check_grid(*tuple(codes.shape[1:3]), f"codes of shape {tuple(codes.shape)}")
        biases = self._biases(self.condition(slices, labels), self.position())
        k, half = self.kernel_size, self.kernel_size // 2 + 1
        x = self.embed(ops.cast(codes, "int32"))
        v, h, skip = x, _shift_right(x), 0.0
        for i in range(self.num_layers):
            terms = {name: values[i] for name, values in biases.items()}
            v_pre = self.v_convs[i](ops.pad(v, [[0, 0], [half - 1, 0], [k // 2, k // 2], [0, 0]]))
            v_pre = self._add_biases(v_pre, terms.get("cond_v"), terms.get("pos_v"))
            h_pre = self.h_convs[i](ops.pad(h, [[0, 0], [0, 0], [half - 1, 0], [0, 0]]))
            h_pre = self._add_biases(h_pre, terms.get("cond_h"), terms.get("pos_h"))
            h_pre = h_pre + self.v_to_h[i](_shift_down(v_pre))
            v = _gate(v_pre)
            skip_i, h = self._horizontal_out(i, h_pre, h, training=training)
            skip = skip + skip_i
        return self._logits(skip)

    def start_state(self, batch, height, width, slices=-1, labels=-1):
        """The cached sampling state before the first code of a (batch, height, width) grid.

        Cached sampling (Ramachandran et al. 2017) computes the logits of one
        position at a time from what earlier positions left behind, instead
        of a whole forward pass per code. Drive it in raster order:

            state = prior.start_state(batch, height, width, slices, labels)
            for i in range(height):
                for j in range(width):
                    logits, state = prior.step(state, i, j)
                    code = ...  # drawn from logits, (batch,) int32
                    state = prior.push_code(state, code)
                state = prior.finish_row(state, i, codes_of_row_i)

        The logits are those `call` gives at (i, j) for the codes pushed so
        far (up to float rounding in the order of sums). The state holds, per
        layer: for the vertical stack, a window of its input's last k//2 + 1
        rows and its input to the horizontal stack for the current row; for
        the horizontal stack, a window of its input's last k//2 + 1
        positions in the current row; and the conditioning and position
        terms of the gates. It is a dict of tensors (a loop variable of
        `tf.function` loops); treat it as opaque.

        Args:
            batch: grids sampled at once.
            height: grid rows; the prior's `grid_size` when it has one.
            width: grid columns.
            slices: slice indices to condition on, a scalar or (batch,); -1 for none.
            labels: class labels to condition on, a scalar or (batch,); -1 for none.

        Returns:
            The state (a dict of tensors).
        """
        self._check_grid(height, width, f"height={height}, width={width}")
        slices = ops.broadcast_to(ops.cast(slices, "int32"), (batch,))
        labels = ops.broadcast_to(ops.cast(labels, "int32"), (batch,))
        k, half, f = self.kernel_size, self.kernel_size // 2 + 1, self.filters
        zeros = lambda *shape: ops.zeros(shape, self.compute_dtype)  # noqa: E731
        state = self._biases(self.condition(slices, labels), self.position())
        # Vertical windows, padded left and right by k//2 as `call` pads.
        state["v_windows"] = tuple(zeros(batch, half, width + 2 * (k // 2), f) for _ in range(self.num_layers))
        # Row 0 has zeros above it: its input from the vertical stack is the 1x1 convolution of zeros.
        state["above"] = tuple(layer(zeros(batch, 1, width, 2 * f)) for layer in self.v_to_h)
        state["h_windows"] = tuple(zeros(batch, 1, half, f) for _ in range(self.num_layers))
        return state

    def step(self, state, i, j):
        """The logits of position (i, j), from the codes pushed so far; see `start_state`.

        Args:
            state: the state after the previous position (`push_code`, or
                `finish_row` / `start_state` at the start of a row).
            i: row, an int or int32 scalar tensor.
            j: column, likewise.

        Returns:
            `(logits, state)`: float32 logits (batch, num_codes), as `call`
            gives at (i, j), and the state holding this position's features;
            pass it to `push_code` with the code drawn.
        """
        cond, windows, skip, below = state.get("cond_h"), list(state["h_windows"]), 0.0, None
        for layer in range(self.num_layers):
            window = windows[layer]  # (B, 1, half, F)
            if layer > 0:  # its window ends at this position's features from the layer below
                window = ops.concatenate([window[:, :, 1:], below], axis=2)
                windows[layer] = window
            pos = None
            if "pos_h" in state:  # (1, H, W, 2F) -> (1, 1, 1, 2F) at (i, j)
                pos = ops.take(ops.take(state["pos_h"][layer], i, axis=1), j, axis=1)[:, None, None, :]
            h_pre = self._add_biases(self.h_convs[layer](window), None if cond is None else cond[layer], pos)
            h_pre = h_pre + ops.take(state["above"][layer], j, axis=2)[:, :, None, :]
            skip_l, below = self._horizontal_out(layer, h_pre, window[:, :, -1:])
            skip = skip + skip_l
        return self._logits(skip)[:, 0, 0], {**state, "h_windows": tuple(windows)}

    def push_code(self, state, code):
        """Adds the code drawn at the current position to the state; see `start_state`.

        Args:
            state: the state `step` returned for this position.
            code: the drawn codes, int32 (batch,).

        Returns:
            The state for the next position of the row.
        """
        # The first layer ("mask A") sees the codes strictly left of the position it predicts.
        window = state["h_windows"][0]
        window = ops.concatenate([window[:, :, 1:], self.embed(code)[:, None, None, :]], axis=2)
        return {**state, "h_windows": (window, *state["h_windows"][1:])}

    def finish_row(self, state, i, codes):
        """Advances the state to the start of row i + 1; see `start_state`.

        Args:
            state: the state after the row's last `push_code`.
            i: the finished row, an int or int32 scalar tensor.
            codes: the row's codes, int32 (batch, width).

        Returns:
            The state for position (i + 1, 0).
        """
        k, windows, above = self.kernel_size, [], []
        layer_input = self.embed(ops.cast(codes, "int32"))[:, None]  # (B, 1, W, F)
        for layer in range(self.num_layers):
            padded = ops.pad(layer_input, [[0, 0], [0, 0], [k // 2, k // 2], [0, 0]])
            window = ops.concatenate([state["v_windows"][layer][:, 1:], padded], axis=1)
            v_pre = self.v_convs[layer](window)  # (B, 1, W, 2F): row i of the vertical stack
            cond = state["cond_v"][layer] if "cond_v" in state else None
            pos = ops.take(state["pos_v"][layer], i, axis=1)[:, None] if "pos_v" in state else None
            v_pre = self._add_biases(v_pre, cond, pos)
            above.append(self.v_to_h[layer](v_pre))  # the horizontal stack sees it one row down
            layer_input = _gate(v_pre)
            windows.append(window)
        zeros = tuple(ops.zeros_like(window) for window in state["h_windows"])
        return {**state, "v_windows": tuple(windows), "above": tuple(above), "h_windows": zeros}

    def train_step(self, data):
        return _cluster_logs(super().train_step(data))

    def test_step(self, data):
        return _cluster_logs(super().test_step(data))

    def get_config(self):
        return {**super().get_config(), "num_codes": self.num_codes, "filters": self.filters,
                "layers": self.num_layers, "kernel_size": self.kernel_size, "skip_filters": self.skip_filters,
                "num_slices": self.num_slices, "num_classes": self.num_classes,
                "grid_size": None if self.grid_size is None else list(self.grid_size), "dropout": self.dropout}


@keras.saving.register_keras_serializable(package=PACKAGE)
class BitsPerCode(keras.metrics.Metric):
    """Mean negative log-likelihood per code, in bits, over every code seen."""

    def __init__(self, name="bits_per_code", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total", dtype="float32")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count", dtype="float32")

    def update_state(self, y_true, y_pred, sample_weight=None):
        nll = keras.losses.sparse_categorical_crossentropy(y_true, ops.cast(y_pred, "float32"), from_logits=True)
        self.total.assign_add(ops.sum(nll) / math.log(2.0))
        self.count.assign_add(ops.cast(ops.size(nll), "float32"))

    def result(self):
        return self.total / ops.maximum(self.count, 1.0)


def truncate_logits(logits, top_k=0, top_p=1.0):
    """Logits (B, K) with every code outside the top `top_k` or the nucleus `top_p` set to -inf.

    Top-k keeps the `top_k` most likely codes (0: all; ties with the k-th
    are kept). The nucleus (Holtzman et al. 2020) keeps the fewest most
    likely codes whose probabilities sum to at least `top_p` (1.0: all); the
    most likely code is always kept. Both at once keep what both keep.
    """
    logits = tf.cast(logits, tf.float32)
    if top_k:
        kth = tf.math.top_k(logits, k=tf.minimum(top_k, tf.shape(logits)[-1])).values[:, -1:]
        logits = tf.where(logits < kth, -np.inf, logits)
    if top_p < 1.0:
        probs = tf.nn.softmax(logits, axis=-1)
        ranked = tf.sort(probs, axis=-1, direction="DESCENDING")
        before = tf.cumsum(ranked, axis=-1, exclusive=True)  # the mass of the codes ranked above each one
        kept = tf.reduce_sum(tf.cast(before < top_p, tf.int32), axis=-1)  # at least 1
        smallest = tf.gather(ranked, kept - 1, batch_dims=1)[:, None]
        logits = tf.where(probs < smallest, -np.inf, logits)
    return logits


def sample_codes(logits, uniform, temperature=1.0, top_k=0, top_p=1.0):
    """Draws codes from logits (B, K) by inverse CDF with given uniforms (B,).

    Both samplers use this with the same pre-drawn uniforms, so they draw
    the same codes from the same logits. `top_k` and `top_p` truncate the
    distribution first (`truncate_logits`), after the temperature.
    """
    logits = tf.cast(logits, tf.float32) / temperature
    if top_k or top_p < 1.0:
        logits = truncate_logits(logits, top_k, top_p)
    probs = tf.nn.softmax(logits, axis=-1)
    cdf = tf.cumsum(probs, axis=-1)
    code = tf.reduce_sum(tf.cast(cdf < uniform[:, None] * cdf[:, -1:], tf.int32), axis=-1)
    return tf.minimum(code, tf.shape(logits)[-1] - 1)


def make_naive_sampler(prior, batch, height, width, temperature=1.0, jit_compile=False, top_k=0, top_p=1.0):
    """The reference sampler: one full forward pass of the prior per code position.

    This is the keras.io method (compiled into one graph here, which only
    makes it faster; `jit_compile` XLA-compiles that graph, for comparisons
    with the fast sampler like for like): O(H*W) passes over the whole grid.

    Returns:
        A function `sample(uniform, slice_index=-1, label=-1, positions=None) -> codes (B, H, W)`:
        float32 uniforms (B, H, W) in [0, 1), one per position; conditioning
        as in `make_fast_sampler`; `positions` samples only the first codes
        in raster order (the rest stay 0), for timing large grids.
    """
    rows = tf.range(height)[:, None] * width + tf.range(width)[None, :]

    @tf.function(jit_compile=jit_compile)
    def run(uniform, slices, labels, total):
        codes = tf.zeros((batch, height, width), tf.int32)
        for t in tf.range(total):
            logits = prior({"codes": codes, "slice": slices, "label": labels})
            i, j = t // width, t % width
            code = sample_codes(logits[:, i, j], uniform[:, i, j], temperature, top_k, top_p)
            codes = tf.where((rows == t)[None], code[:, None, None], codes)
        return codes

    def sample(uniform, slice_index=-1, label=-1, positions=None):
        vector = lambda value: tf.broadcast_to(tf.cast(value, tf.int32), (batch,))  # noqa: E731
        total = height * width if positions is None else positions
        return run(tf.convert_to_tensor(uniform, tf.float32), vector(slice_index), vector(label),
                   tf.constant(total, tf.int32))

    return sample


def sample_naive(prior, uniform, temperature=1.0, slice_index=-1, label=-1, positions=None):
    """Samples codes with `make_naive_sampler` (see there) for uniforms (B, H, W)."""
    batch, height, width = uniform.shape
    return make_naive_sampler(prior, batch, height, width, temperature)(uniform, slice_index, label, positions)


def make_fast_sampler(prior, batch, height, width, temperature=1.0, jit_compile=True, top_k=0, top_p=1.0):
    """A compiled cached sampler for `prior` (Ramachandran et al. 2017).

    A thin loop over the prior's own cached steps (`GatedPixelCNN.start_state`,
    `step`, `push_code`, `finish_row`): instead of recomputing the whole grid
    for every code, each step computes only what the new code changes, with
    the prior's own layers, so it draws exactly the codes `sample_naive`
    draws from the same uniforms (up to float rounding in the order of sums).

    Args:
        prior: a built `GatedPixelCNN`.
        batch: grids per call.
        height: grid rows (the prior's `grid_size` when it has one).
        width: grid columns.
        temperature: softmax temperature of the draws.
        jit_compile: compile the loop with XLA (much faster on a CPU).
        top_k: draw only among the `top_k` most likely codes (0: all).
        top_p: draw only from the nucleus of this much probability (1.0: all).

    Returns:
        A function `sample(uniform, slice_index=-1, label=-1) -> codes (B, H, W)`
        taking float32 uniforms (B, H, W) and, for conditioning, a slice index
        and a label, each a scalar for the whole batch or a (B,) vector.
    """

    @tf.function(jit_compile=jit_compile)
    def run(uniform, slices, labels):
        state = prior.start_state(batch, height, width, slices, labels)
        rows = tf.TensorArray(tf.int32, size=height)
        for i in tf.range(height):
            row = tf.TensorArray(tf.int32, size=width)
            for j in tf.range(width):
                logits, state = prior.step(state, i, j)
                code = sample_codes(logits, uniform[:, i, j], temperature, top_k, top_p)
                state = prior.push_code(state, code)
                row = row.write(j, code)
            codes_row = tf.transpose(row.stack())  # (B, W)
            rows = rows.write(i, codes_row)
            state = prior.finish_row(state, i, codes_row)
        return tf.transpose(rows.stack(), (1, 0, 2))

    def sample(uniform, slice_index=-1, label=-1):
        vector = lambda value: tf.broadcast_to(tf.cast(value, tf.int32), (batch,))  # noqa: E731
        return run(tf.convert_to_tensor(uniform, tf.float32), vector(slice_index), vector(label))

    return sample
