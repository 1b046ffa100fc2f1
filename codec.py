"""The .bvq codec: VQ-VAE code grids entropy-coded with the run's PixelCNN prior.

A VQ-VAE with an autoregressive prior is a complete learned codec: the prior
gives the probability of each code given the codes before it, and an entropy
coder (a range coder from `constriction`) turns those probabilities into a
stream of about the prior's cross-entropy in bits.

Decoding is sequential: the code at a position must be decoded before the
prior can give the next position's probabilities. The decoder computes them
with the prior's cached single-position steps (`GatedPixelCNN.step` and
friends, as the fast sampler does), and so does the encoder, through the very
same compiled functions (`PriorSteps`), on the same batch shape: a full
forward pass would give every probability at once but rounds differently in
float32, and one flipped fixed-point probability desynchronises the stream.
Slices are coded in chunks of `chunk` grids, one range-coded stream per
chunk; the last chunk is padded with all-zero grids that are not coded.

The file (integers little-endian):

    8 bytes   MAGIC
    4 bytes   header length n, uint32
    n bytes   the header: zlib-compressed UTF-8 JSON (`predict.compress` writes its keys)
    32 bytes  SHA-256 of the header bytes
    the rest  the payload: each chunk's stream of uint32 words, one after another

The header names the VQ-VAE and prior checkpoints by digest, so a file is
never decoded with other models; SHA-256 digests of the header and the
payload catch a damaged or truncated file before decoding, and one of the
decoded code grids
catches a decoder whose probabilities differ from the encoder's (another CPU
family or library version), instead of writing wrong images.

    codes = vqvae.encode(images)  # (N, h, w)
    payload, words, ideal_bits = encode_grids(prior, codes, slices, labels)
    decoded = decode_grids(prior, payload, words, len(codes), codes.shape[1:], slices, labels)
    assert np.array_equal(decoded, codes)
"""

import hashlib
import json
import os
import platform
import struct
import zlib
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

MAGIC = b"\x89BVQ\r\n\x1a\n"  # PNG-style: a non-ASCII byte and line endings that text-mode copies would break
FORMAT_VERSION = 1
CHUNK = 32


class CodecError(ValueError):
    """A .bvq file that cannot be decoded as asked, said in one line with the fix."""


def _constriction():
    try:
        import constriction
    except ImportError:
        raise CodecError("the codec needs the constriction package: pip install -r requirements.txt") from None
    return constriction


class PriorSteps:
    """The prior's cached single-position steps, compiled once for a chunk shape.

    Encoder and decoder both walk a chunk of grids through `run`, so both see
    probabilities from the same compiled functions on the same shapes, bit
    for bit.

    Args:
        prior: a built `modules.GatedPixelCNN`.
        batch: grids per chunk.
        height: grid rows.
        width: grid columns.
        jit_compile: XLA-compile the steps (faster on a CPU; both sides must agree).

    Example:
    >>> steps = PriorSteps(prior, batch=32, height=32, width=32)
    >>> grids = steps.run(slices, labels, lambda position, p: known[:, position])
    """

    def __init__(self, prior, batch, height, width, jit_compile=True):
        self.prior, self.batch, self.height, self.width = prior, batch, height, width

        def first(slices, labels):
            state = prior.start_state(batch, height, width, slices, labels)
            return prior.step(state, 0, 0)

        def next_in_row(state, i, j, code):
            return prior.step(prior.push_code(state, code), i, j)

        def next_row(state, i, row):
            return prior.step(prior.finish_row(state, i, row), i + 1, 0)

        self._first = tf.function(first, jit_compile=jit_compile)
        self._next_in_row = tf.function(next_in_row, jit_compile=jit_compile)
        self._next_row = tf.function(next_row, jit_compile=jit_compile)

    def run(self, slices, labels, choose, progress=None):
        """Walks the grids in raster order, asking `choose` for each position's codes.

        Args:
            slices: slice indices to condition on, int (batch,); -1 for none.
            labels: class labels to condition on, int (batch,); -1 for none.
            choose: `choose(position, probabilities) -> codes`: the raster
                position (i * width + j), the prior's unnormalised
                probabilities there, float64 (batch, num_codes), and the
                codes at that position, int (batch,).
            progress: called with no argument after every row, or None.

        Returns:
            The chosen grids, int32 (batch, height, width).
        """
        grids = np.zeros((self.batch, self.height, self.width), np.int32)
        logits, state = self._first(tf.constant(np.asarray(slices, np.int32)),
                                    tf.constant(np.asarray(labels, np.int32)))
        for i in range(self.height):
            for j in range(self.width):
                grids[:, i, j] = choose(i * self.width + j, probabilities(logits))
                if j + 1 < self.width:
                    logits, state = self._next_in_row(state, tf.constant(i), tf.constant(j + 1),
                                                      tf.constant(grids[:, i, j]))
                elif i + 1 < self.height:
                    logits, state = self._next_row(state, tf.constant(i), tf.constant(grids[:, i]))
            if progress is not None:
                progress()
        return grids


def probabilities(logits):
    """Unnormalised float64 probabilities exp(logits - max) of float32 logits (batch, K).

    Computed in NumPy from the float32 logits, so the same logits give the
    same probabilities bit for bit; `constriction` normalises and quantises
    them to fixed point (every code keeps a nonzero probability).
    """
    logits = np.asarray(logits, np.float64)
    return np.exp(logits - logits.max(axis=1, keepdims=True))


def chunk_spans(n, chunk):
    """The (start, stop) of each chunk of `n` grids coded together, `chunk` at a time."""
    return [(start, min(start + chunk, n)) for start in range(0, n, chunk)]


def _padded(values, chunk, fill):
    out = np.full((chunk, *np.shape(values)[1:]), fill, np.int32)
    out[:len(values)] = values
    return out


def encode_grids(prior, codes, slices, labels, chunk=CHUNK, jit_compile=True, progress=None):
    """Range-codes code grids with the prior.

    Args:
        prior: a built `modules.GatedPixelCNN` over these grids.
        codes: code grids, int (N, height, width).
        slices: per grid, the slice index the prior conditions on (-1 for none).
        labels: per grid, the class label the prior conditions on (-1 for none).
        chunk: grids coded together (the decoder must use the same).
        jit_compile: XLA-compile the prior's steps (the decoder must use the same).
        progress: called with no argument after every grid row of every chunk, or None.

    Returns:
        `(payload, chunk_words, ideal_bits)`: the streams, uint32 words one
        chunk after another; the words of each chunk; the codes'
        cross-entropy under the prior in bits (the rate a perfect coder
        would reach).

    Raises:
        ValueError: no grids.
    """
    constriction = _constriction()
    codes = np.asarray(codes, np.int32)
    n, height, width = codes.shape
    if n == 0:
        raise ValueError("encode_grids needs at least one grid. Received: codes of shape (0, ...)")
    steps = PriorSteps(prior, chunk, height, width, jit_compile)
    model = constriction.stream.model.Categorical(perfect=False)
    streams, words, ideal = [], [], 0.0
    for start, stop in chunk_spans(n, chunk):
        real = stop - start
        grids = _padded(codes[start:stop], chunk, 0)
        encoder, bits = constriction.stream.queue.RangeEncoder(), []

        def known(position, p):  # coded as they come: position by position, grid by grid within a position
            symbols = grids[:real, position // width, position % width]
            encoder.encode(symbols, model, p[:real])
            bits.append(-np.log2(p[np.arange(real), symbols] / p[:real].sum(axis=1)).sum())
            return grids[:, position // width, position % width]

        steps.run(_padded(slices[start:stop], chunk, -1), _padded(labels[start:stop], chunk, -1), known, progress)
        stream = encoder.get_compressed()
        ideal += float(np.sum(bits))
        streams.append(stream)
        words.append(int(stream.size))
    return np.concatenate(streams).astype(np.uint32), words, ideal


def decode_grids(prior, payload, chunk_words, n, grid, slices, labels, chunk=CHUNK, jit_compile=True,
                 progress=None):
    """Decodes the grids `encode_grids` coded, with the same prior, chunk and compile mode.

    Args:
        prior: the `modules.GatedPixelCNN` the grids were coded with.
        payload: the streams, uint32 words.
        chunk_words: the words of each chunk's stream.
        n: the number of grids.
        grid: (height, width).
        slices: per grid, the slice index the encoder conditioned on.
        labels: per grid, the class label the encoder conditioned on.
        chunk: the encoder's chunk.
        jit_compile: the encoder's compile mode.
        progress: called with no argument after every grid row of every chunk, or None.

    Returns:
        The code grids, int32 (n, height, width).

    Raises:
        CodecError: the chunk lengths do not add up to the payload, or a
            stream ends in data the prior's probabilities cannot have coded
            (the decoder's probabilities differ from the encoder's). Other
            differences give wrong grids, which the caller's digest catches.
    """
    constriction = _constriction()
    height, width = grid
    payload = np.asarray(payload, np.uint32)
    spans = chunk_spans(n, chunk)
    if len(chunk_words) != len(spans) or sum(chunk_words) != payload.size:
        raise CodecError(f"the header lists {len(chunk_words)} streams of {sum(chunk_words)} words for {n} grids "
                         f"in chunks of {chunk}, the payload has {payload.size} words")
    steps = PriorSteps(prior, chunk, height, width, jit_compile)
    model = constriction.stream.model.Categorical(perfect=False)
    out, offset = [], 0
    for (start, stop), size in zip(spans, chunk_words):
        real = stop - start
        decoder = constriction.stream.queue.RangeDecoder(payload[offset:offset + size])
        offset += size

        def decoded(position, p):
            codes = np.zeros(chunk, np.int32)
            try:
                codes[:real] = decoder.decode(model, p[:real])
            except (AssertionError, ValueError, RuntimeError) as err:  # constriction's "invalid data"
                raise CodecError(f"the stream of grids {start}..{stop - 1} does not decode with these "
                                 f"probabilities at position {position} ({type(err).__name__}): the decoder's "
                                 "prior or platform differs from the encoder's") from None
            return codes

        grids = steps.run(_padded(slices[start:stop], chunk, -1), _padded(labels[start:stop], chunk, -1), decoded,
                          progress)
        out.append(grids[:real])
    return np.concatenate(out)


def grids_digest(codes):
    """SHA-256 of code grids as little-endian int32 (N, height, width)."""
    codes = np.ascontiguousarray(np.asarray(codes, "<i4"))
    return hashlib.sha256(struct.pack("<3i", *codes.shape) + codes.tobytes()).hexdigest()


SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "amx_tile", "neon", "asimd")


def environment():
    """What decoding bit for bit depends on: library versions, the CPU family and its SIMD extensions."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass  # not Linux: the machine name alone
    return {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
            "constriction": _version("constriction"), "machine": platform.machine(),
            "simd": [flag for flag in SIMD_FLAGS if flag in flags]}


def _version(package):
    from importlib import metadata
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def write(path, header, payload):
    """Writes a .bvq file atomically (a temporary file, then a rename).

    Args:
        path: the file to write.
        header: a JSON-able dict; the format version, the payload's length
            and SHA-256 and the writing environment are added.
        payload: the streams, uint32 words.

    Returns:
        The file's size in bytes.

    Raises:
        CodecError: the file cannot be written (nothing is left behind).
    """
    payload = np.ascontiguousarray(np.asarray(payload, "<u4")).tobytes()
    header = {"format_version": FORMAT_VERSION, **header, "payload_bytes": len(payload),
              "payload_sha256": hashlib.sha256(payload).hexdigest(), "written_by": environment()}
    text = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(text)) + text + hashlib.sha256(text).digest() + payload)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise CodecError(f"cannot write {path} ({err.strerror}). Pass --out in an existing, writable folder.") \
            from None
    return len(MAGIC) + 4 + len(text) + 32 + len(payload)


def read(path):
    """The header (a dict) and payload (uint32 words) of a .bvq file, checked.

    Raises:
        CodecError: one line naming the file: missing, not a .bvq file,
            truncated, corrupted (a SHA-256 of its header or payload
            differs from the stored one), or of another format version.
    """
    path = Path(path)
    fix = "Compress the images again with predict.py --compress."
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CodecError(f"cannot read {path} ({err.strerror}). Pass an existing .bvq file.") from None
    if len(data) < len(MAGIC) + 4 and (MAGIC + b"\0" * 4).startswith(data[:len(MAGIC)]) and data:
        raise CodecError(f"{path} is truncated: it ends inside the header. {fix}")
    if not data.startswith(MAGIC):
        raise CodecError(f"{path} is not a .bvq file (it does not start with the .bvq signature). "
                         "Pass a file written by predict.py --compress.")
    (length,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if len(data) < start + length + 32:
        raise CodecError(f"{path} is truncated: it ends inside the header. {fix}")
    text = data[start:start + length]
    if hashlib.sha256(text).digest() != data[start + length:start + length + 32]:
        raise CodecError(f"{path} is corrupted: its header's SHA-256 differs from the one stored after it. {fix}")
    try:
        header = json.loads(zlib.decompress(text).decode())
        version, size, digest = header["format_version"], header["payload_bytes"], header["payload_sha256"]
    except (ValueError, KeyError, TypeError, zlib.error):
        raise CodecError(f"{path} has a damaged header (not the JSON a .bvq header holds). {fix}") from None
    if version != FORMAT_VERSION:
        raise CodecError(f"{path} is in .bvq format version {version}; this code reads version {FORMAT_VERSION}. "
                         "Decode it with the version of this project that wrote it.")
    payload = data[start + length + 32:]
    if len(payload) != size:
        what = "truncated" if len(payload) < size else "longer than its header says"
        raise CodecError(f"{path} is {what}: the payload has {len(payload)} of {size} bytes. {fix}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CodecError(f"{path} is corrupted: its payload's SHA-256 differs from the one in its header. {fix}")
    if size % 4:
        raise CodecError(f"{path} is corrupted: its payload is not whole 32-bit words. {fix}")
    return header, np.frombuffer(payload, "<u4").astype(np.uint32)
