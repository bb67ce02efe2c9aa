"""Compact CNN audio encoder: waveform -> log-mel -> CNN -> L2-normalised embedding.

The same :func:`preprocess` and :func:`log_mel` are used to cache training
features (``scripts/train_encoder.py``) and at inference
(:func:`embed_waveforms`), so training and serving see identical features.
Importing this module only defines things; weights load on
:func:`load_default`.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import weakref
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SAMPLE_RATE = 16000  #: Hz, input sample rate expected by everything here.
N_MELS = 64  #: mel bands.
N_FFT = 400  #: STFT size and Hann window length in samples (25 ms).
HOP_LENGTH = 160  #: STFT hop in samples (10 ms), i.e. 100 frames per second.
FMIN = 50.0  #: Hz, lowest mel band edge.
FMAX = 8000.0  #: Hz, highest mel band edge.
LOG_EPS = 1e-6  #: floor added to mel power before the natural log.
EMBEDDING_DIM = 128  #: size of the output embedding.
CHANNELS = (16, 48, 96, 192)  #: conv widths of the four blocks.
MODEL_NAME = "cnn"
MODEL_VERSION = "2"
SHIPPED_VERSIONS = ("1", "2")
"""Versions whose weights ship (``weights/cnn-v<version>.pt``): an index built with an earlier
one keeps using it until ``simsearch reembed --encoder cnn``. Same architecture and front end."""

TRIM_TOP_DB = 40.0  #: frames quieter than (loudest frame - this) are trimmed at the ends.
TRIM_MARGIN = 2 * HOP_LENGTH  #: samples of context kept either side of the trimmed region.
MIN_SAMPLES = 4000  #: clips shorter than this (0.25 s) are zero-padded, centred.
MAX_SEGMENT_SECONDS = 60.0  #: longer audio is embedded in segments (see embed_waveforms).
_MIN_FRAMES = 2 ** len(CHANNELS)  # the network halves time once per block


def preprocess(wave: np.ndarray) -> np.ndarray:
    """Trim quiet ends, peak-normalise and pad a waveform.

    Parameters
    ----------
    wave : np.ndarray, shape (N,)
        Mono audio at :data:`SAMPLE_RATE`, any scale, N >= 1 samples. NaN and infinite
        samples count as silence (files with them are refused earlier, by ``audio.load``).

    Returns
    -------
    np.ndarray, shape (M,), float32
        Peak amplitude 1 (unless silent), M >= :data:`MIN_SAMPLES`. Frames (25 ms,
        10 ms hop) more than :data:`TRIM_TOP_DB` below the loudest one are cut
        from both ends, keeping :data:`TRIM_MARGIN` samples of context.
    """
    x = np.asarray(wave, dtype=np.float64).reshape(-1)
    if not np.isfinite(x).all():  # the check is ~5x cheaper than nan_to_num on every clip
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # broken samples count as silence
    if x.size >= N_FFT:
        x = x - x.mean()  # DC offset would fool the trimmer and the peak
        # A strided view of the frames, not a copy of them (the same sums, 4x less time).
        energy = np.mean(np.lib.stride_tricks.sliding_window_view(x * x, N_FFT)[::HOP_LENGTH], axis=1)
        peak_energy = energy.max()
        if peak_energy > 0:
            loud = np.flatnonzero(energy >= peak_energy * 10 ** (-TRIM_TOP_DB / 10))
            start = max(0, loud[0] * HOP_LENGTH - TRIM_MARGIN)
            stop = min(x.size, loud[-1] * HOP_LENGTH + N_FFT + TRIM_MARGIN)
            x = x[start:stop]
    peak = np.abs(x).max() if x.size else 0.0
    if peak > 0:
        x = x / peak
    if x.size < MIN_SAMPLES:
        left = (MIN_SAMPLES - x.size) // 2
        x = np.pad(x, (left, MIN_SAMPLES - x.size - left))
    return x.astype(np.float32)


def n_frames(n_samples: int | torch.Tensor) -> int | torch.Tensor:
    """Number of :func:`log_mel` frames for a clip of ``n_samples`` samples."""
    return n_samples // HOP_LENGTH + 1


_MEL_SP, _MEL_LOG_HZ, _MEL_LOG_STEP = 200.0 / 3, 1000.0, np.log(6.4) / 27.0  # Slaney's mel scale


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above (as ``librosa.hz_to_mel``)."""
    hz = np.asanyarray(hz, dtype=np.float64)
    log_part = _MEL_LOG_HZ / _MEL_SP + np.log(np.maximum(hz, 1e-10) / _MEL_LOG_HZ) / _MEL_LOG_STEP
    return np.where(hz >= _MEL_LOG_HZ, log_part, hz / _MEL_SP)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asanyarray(mel, dtype=np.float64)
    log_part = _MEL_LOG_HZ * np.exp(_MEL_LOG_STEP * (mel - _MEL_LOG_HZ / _MEL_SP))
    return np.where(mel >= _MEL_LOG_HZ / _MEL_SP, log_part, _MEL_SP * mel)


@functools.cache
def _mel_basis() -> torch.Tensor:
    """The Slaney-normalised mel filter bank, ``(N_MELS, N_FFT // 2 + 1)`` float32.

    The same operations as ``librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS,
    fmin=FMIN, fmax=FMAX)``, bit for bit (``tests/test_batching.py`` compares them), computed
    here because importing librosa (scipy.signal, numba) costs a query about a second.
    """
    fft_hz = np.fft.rfftfreq(n=N_FFT, d=1.0 / SAMPLE_RATE)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(FMIN), _hz_to_mel(FMAX), N_MELS + 2))
    widths = np.diff(edges)
    ramps = np.subtract.outer(edges, fft_hz)
    fb = np.zeros((N_MELS, 1 + N_FFT // 2), dtype=np.float32)
    for i in range(N_MELS):
        fb[i] = np.maximum(0, np.minimum(-ramps[i] / widths[i], ramps[i + 2] / widths[i + 1]))
    fb *= (2.0 / (edges[2:N_MELS + 2] - edges[:N_MELS]))[:, None]
    return torch.from_numpy(fb)


def log_mel(waves: torch.Tensor) -> torch.Tensor:
    """Log-mel spectrogram.

    Parameters
    ----------
    waves : torch.Tensor, shape (B, N), float32
        Audio at :data:`SAMPLE_RATE`. Zero-padding at the end of a row leaves the
        first ``n_frames(true_length)`` frames of that row unchanged.

    Returns
    -------
    torch.Tensor, shape (B, N_MELS, T), float32
        ``log(mel_power + LOG_EPS)`` (natural log of the Slaney-normalised mel
        filter bank applied to the |STFT|^2, Hann window, centred frames with
        zero padding), ``T = N // HOP_LENGTH + 1``.
    """
    window = torch.hann_window(N_FFT, dtype=waves.dtype, device=waves.device)
    spec = torch.stft(waves, N_FFT, HOP_LENGTH, N_FFT, window, center=True,
                      pad_mode="constant", return_complex=True)
    power = spec.real ** 2 + spec.imag ** 2  # (B, N_FFT//2+1, T)
    mel = torch.matmul(_mel_basis().to(waves.device, waves.dtype), power)
    return torch.log(mel + LOG_EPS)


def _max_pool2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` for ``(B, C, F, T)``. Without autograd it is two strided
    maxima: the same values (max is exact), about 7x faster on CPU than the pooling kernel,
    which also computes the indices a backward pass would need, and its output keeps the
    memory format of ``x`` (channels-last in, channels-last out, no copy to convert).
    Training keeps the kernel."""
    if torch.is_grad_enabled():
        return F.max_pool2d(x, 2)
    f, t = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = torch.maximum(x[..., 0:f:2, :t], x[..., 1:f:2, :t])
    return torch.maximum(x[..., 0::2], x[..., 1::2])


def _time_mask(lengths: torch.Tensor, t: int) -> torch.Tensor:
    return torch.arange(t, device=lengths.device)[None, :] < lengths[:, None]  # (B, T)


class AudioCNN(nn.Module):
    """CNN over log-mel, pooled over time, L2-normalised output.

    Four blocks of (conv3x3-BN-ReLU) x 2 + 2x2 max-pool with widths
    :data:`CHANNELS`, frequency averaged, then masked mean+max over time and a
    linear projection to :data:`EMBEDDING_DIM`. Input is standardised per clip
    (mean/std over its valid frames), so a constant gain offset in log-mel
    does not matter. Activations past each clip's true length are zeroed after
    every conv, so a clip in a padded batch gives what it gives alone.

    Parameters
    ----------
    channels : tuple of int
        Widths of the four blocks.
    embedding_dim : int
        Output dimension.
    """

    def __init__(self, channels: Sequence[int] = CHANNELS, embedding_dim: int = EMBEDDING_DIM):
        super().__init__()
        convs, c_in = [], 1
        for c in channels:
            for _ in range(2):
                convs.append(nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                                           nn.BatchNorm2d(c), nn.ReLU(inplace=True)))
                c_in = c
        self.convs = nn.ModuleList(convs)
        self.proj = nn.Linear(2 * c_in, embedding_dim)

    def forward(self, mels: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Embed a (padded) batch of log-mels.

        Parameters
        ----------
        mels : torch.Tensor, shape (B, N_MELS, T), float32
            Output of :func:`log_mel`; rows may be padded past their length.
        lengths : torch.Tensor, shape (B,), int64, optional
            Valid frames per row (default: all T). Each must be >= 16.

        Returns
        -------
        torch.Tensor, shape (B, EMBEDDING_DIM), float32
            Unit-norm embeddings.
        """
        b, _, t = mels.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=mels.device)
        full = bool((lengths == t).all())  # no padding: masks are no-ops, skip them
        mask = _time_mask(lengths, t)[:, None, :].to(mels.dtype)  # (B, 1, T)
        count = lengths.to(mels.dtype)[:, None, None] * mels.shape[1]
        mean = (mels * mask).sum((1, 2), keepdim=True) / count
        var = (((mels - mean) * mask) ** 2).sum((1, 2), keepdim=True) / count
        x = ((mels - mean) / torch.sqrt(var + 1e-5) * mask)[:, None]  # (B, 1, F, T)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if not full:
                x = x * mask[:, :, None, :]
            if i % 2 == 1:
                x = _max_pool2(x)
                lengths = lengths // 2
                mask = _time_mask(lengths, x.shape[-1])[:, None, :].to(x.dtype)
                if not full:  # a pooled frame may straddle the true end
                    x = x * mask[:, :, None, :]
        x = x.mean(2)  # (B, C, T') average over frequency
        mean = x.sum(2) / lengths.clamp(min=1).to(x.dtype)[:, None]
        peak = x.masked_fill(mask == 0, float("-inf")).amax(2)
        return F.normalize(self.proj(torch.cat([mean, peak], 1)), dim=1)


@functools.lru_cache(maxsize=None)  # one model per shipped version, shared
def load_default(*, version: str = MODEL_VERSION) -> AudioCNN:
    """Return the shipped encoder (``simsearch/weights/cnn-v<version>.pt``), eval mode, cached."""
    if version not in SHIPPED_VERSIONS:
        raise ValueError(f"no shipped cnn version {version!r}; this release has {', '.join(SHIPPED_VERSIONS)}")
    ref = importlib.resources.files("simsearch") / "weights" / f"cnn-v{version}.pt"
    with importlib.resources.as_file(ref) as path:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model = AudioCNN()
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


_FOLDED: weakref.WeakKeyDictionary[AudioCNN, tuple[tuple, AudioCNN]] = weakref.WeakKeyDictionary()


def _inference_copy(model: AudioCNN) -> AudioCNN:
    """``model`` with each eval-mode BatchNorm folded into the convolution before it, its
    weights in ``channels_last`` memory format.

    Outputs agree with ``model``'s within float rounding (~2e-7). Folding saves one pass
    over every activation per layer. With channels-last weights oneDNN runs every
    convolution channels-last (the one-channel input already is), which on this CPU makes a
    3 s clip's forward about a quarter faster than the default layout (bench/README.md); the
    layout carries through ReLU, the masks and :func:`_max_pool2`. Cached per model, and
    rebuilt when any of its parameters or buffers changed in place since (training bumps
    their version counters)."""
    # The tensors themselves and their version counters: cheaper than ``state_dict()``
    # (0.2 ms of a 13 ms query), and a tensor replaced rather than changed is noticed too.
    tensors = (*model.parameters(), *model.buffers())
    state = (tensors, tuple(t._version for t in tensors))
    cached = _FOLDED.get(model)
    if cached is not None and len(cached[0][0]) == len(tensors) and cached[0][1] == state[1] \
            and all(a is b for a, b in zip(cached[0][0], tensors)):
        return cached[1]
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for block in folded.convs:
        if isinstance(block, nn.Sequential) and len(block) > 1 and isinstance(block[0], nn.Conv2d) \
                and isinstance(block[1], nn.BatchNorm2d):
            block[0], block[1] = fuse_conv_bn_eval(block[0], block[1]), nn.Identity()
    folded = folded.to(memory_format=torch.channels_last)
    _FOLDED[model] = (state, folded)
    return folded


def _map_batches(run, batches: list) -> None:
    """``run(batch)`` for each batch, as many at once as torch has threads.

    Batches run side by side in threads, each single-threaded inside (torch releases the
    GIL in its kernels), rather than one after another with every layer split across the
    cores. The layers of one clip are too small to split well (a few hundred microseconds
    each), and splitting them puts a barrier after each: when another process holds a core,
    every layer waits for the descheduled thread. On the shared 2-core machine one 3 s clip
    took 12 ms on one thread and 400 ms on two; 3000 clips ran at 210x real time in
    parallel batches and at 16x with layers split (bench/README.md). One thread per batch
    also keeps results independent of the thread count (oneDNN's sums are not), so the
    same clips always give the same bits.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if len(batches) < 2 or threads < 2:
            for batch in batches:
                run(batch)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(threads, len(batches)), thread_name_prefix="simsearch-cnn") as pool:
            for _ in pool.map(run, batches):
                pass
    finally:
        torch.set_num_threads(threads)


def embed_waveforms(model: AudioCNN, waves: Sequence[np.ndarray], batch_frames: int = 1000) -> np.ndarray:
    """Embed raw waveforms.

    Parameters
    ----------
    model : AudioCNN
        Usually :func:`load_default`; switched to eval mode.
    waves : sequence of np.ndarray, each shape (N_i,)
        Mono audio at :data:`SAMPLE_RATE` (any N_i >= 1, any gain); see
        :func:`preprocess` for trimming, normalising and padding. Audio longer
        than :data:`MAX_SEGMENT_SECONDS` after trimming is cut into equal
        segments no longer than that, and the segment embeddings are averaged
        and re-normalised (bounded memory for hour-long files).
    batch_frames : int
        Upper bound on padded frames per internal batch (a speed and memory knob:
        batches whose activations fit the CPU's caches run about twice as fast as
        large ones; results do not depend on it beyond ~1e-7 float noise).

    Returns
    -------
    np.ndarray, shape (len(waves), EMBEDDING_DIM), float32
        Unit-norm embeddings, in input order. Deterministic on CPU.
    """
    model.eval()
    pieces, owner = [], []
    max_len = int(MAX_SEGMENT_SECONDS * SAMPLE_RATE)
    for k, w in enumerate(waves):
        x = preprocess(w)
        n_seg = -(-x.size // max_len)
        for seg in np.array_split(x, n_seg):
            pieces.append(seg)
            owner.append(k)
    emb = np.zeros((len(pieces), EMBEDDING_DIM), dtype=np.float32)
    fast = _inference_copy(model)  # ~7 ms once per model, then cached
    order = sorted(range(len(pieces)), key=lambda i: pieces[i].size)
    batches, start = [], 0
    while start < len(order):
        stop = start + 1  # grow the batch while the padded size fits the budget
        while stop < len(order) and (stop + 1 - start) * n_frames(pieces[order[stop]].size) <= batch_frames:
            stop += 1
        batches.append(order[start:stop])
        start = stop

    def run(idx: list[int]) -> None:
        with torch.inference_mode():
            batch = torch.zeros(len(idx), pieces[idx[-1]].size)
            for row, i in enumerate(idx):
                batch[row, : pieces[i].size] = torch.from_numpy(pieces[i])
            lengths = torch.tensor([n_frames(pieces[i].size) for i in idx])
            emb[idx] = fast(log_mel(batch), lengths).numpy()

    _map_batches(run, batches)
    if len(pieces) == len(waves):
        return emb
    out = np.zeros((len(waves), EMBEDDING_DIM), dtype=np.float32)
    np.add.at(out, np.asarray(owner), emb)
    return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)
