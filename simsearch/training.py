"""Training pieces shared by the pre-training recipe (``scripts/train_encoder.py``) and
``simsearch train`` (:mod:`simsearch.adapt`): batching, cropping with speed/pitch jitter,
augmentation in the mel-power domain, the additive-margin softmax and supervised contrastive
losses, and embedding cached log-mels.

Log-mels here are the output of :func:`simsearch.cnn.log_mel`, stored as one
``(N_MELS, total_frames)`` array with per-clip ``offsets`` and ``lengths``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import cnn


def make_batches(lengths: np.ndarray, idx: np.ndarray, batch: int, rng) -> list[np.ndarray]:
    """Shuffle, then sort by length inside chunks of 32 batches so crops waste little padding."""
    idx = rng.permutation(idx)
    out = []
    for c in range(0, len(idx), 32 * batch):
        chunk = idx[c:c + 32 * batch]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out += [chunk[b:b + batch] for b in range(0, len(chunk), batch)]
    return [out[i] for i in rng.permutation(len(out)) if len(out[i]) > 1]


def crop_batch(mels, offsets, lengths, ids, crop: int, rng, augment: bool, *, speed: float = 0.15,
               pitch: float = 2.0, pitch_probability: float = 0.7, warp: float = 0.0):
    """Random crop with speed (time resampling) and pitch (mel-axis shift) jitter.

    ``speed``: log-rate range (±0.15: ×0.86–1.16); ``pitch``: mel-band shift range, applied to
    a ``pitch_probability`` share of clips, which with ``warp`` > 0 also get their mel axis
    scaled by up to ``exp(±warp)`` (vocal-tract-length style).

    Returns X (B, N_MELS, L) float32 padded with log(LOG_EPS), and valid lengths (B,).
    """
    lens = lengths[ids]
    L = int(min(crop, lens.max()))
    X = np.full((len(ids), cnn.N_MELS, L), math.log(cnn.LOG_EPS), np.float32)
    out_len = np.zeros(len(ids), np.int64)
    fgrid = np.arange(cnn.N_MELS, dtype=np.float64)
    for b, i in enumerate(ids):
        m = np.asarray(mels[:, offsets[i]:offsets[i] + lens[b]], dtype=np.float32)
        r = math.exp(rng.uniform(-speed, speed)) if augment else 1.0
        n = min(L, int((lens[b] - 1) / r) + 1)
        start = rng.uniform(0, lens[b] - 1 - (n - 1) * r) if augment else (lens[b] - n) // 2
        pos = np.clip(start + r * np.arange(n), 0, lens[b] - 1)
        p0 = np.floor(pos).astype(np.int64)
        p1 = np.minimum(p0 + 1, lens[b] - 1)
        w = (pos - p0)[None].astype(np.float32)
        m = m[:, p0] * (1 - w) + m[:, p1] * w
        if augment and rng.random() < pitch_probability:
            stretch = math.exp(rng.uniform(-warp, warp)) if warp else 1.0
            fpos = np.clip(fgrid * stretch - rng.uniform(-pitch, pitch), 0, cnn.N_MELS - 1)
            f0 = np.floor(fpos).astype(np.int64)
            f1 = np.minimum(f0 + 1, cnn.N_MELS - 1)
            fw = (fpos - f0)[:, None].astype(np.float32)
            m = m[f0] * (1 - fw) + m[f1] * fw
        X[b, :, :n] = m
        out_len[b] = n
    return torch.from_numpy(X), torch.from_numpy(out_len)


_CENTRES = None


def mel_centres() -> torch.Tensor:
    global _CENTRES
    if _CENTRES is None:
        import librosa
        hz = librosa.mel_frequencies(cnn.N_MELS + 2, fmin=cnn.FMIN, fmax=cnn.FMAX)[1:-1]
        _CENTRES = torch.tensor(hz, dtype=torch.float32)
    return _CENTRES


def augment(X: torch.Tensor, lengths: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Gain / mix / noise / reverb / band-limit in mel power, then SpecAugment. X: (B, F, T) log-mel."""
    B, Fq, T = X.shape
    eps = cnn.LOG_EPS
    U = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    valid = (torch.arange(T)[None, :] < lengths[:, None]).float()[:, None, :]  # (B,1,T)
    P = (X.exp() - eps).clamp(min=0) * valid
    level = lambda p: (p.sum((1, 2)) / (valid.sum((1, 2)) * Fq)).clamp(min=1e-12)[:, None, None]  # noqa: E731
    P = P * 10 ** (U(B, 1, 1) * 1.6 - 1.0)  # gain -10..+6 dB
    # mix another clip of the batch 6-20 dB below
    lvl = level(P)
    perm = torch.roll(torch.arange(B), 1)
    mix = (U(B, 1, 1) < 0.25).float() * 10 ** (-(6 + 14 * U(B, 1, 1)) / 10)
    P = P + mix * P[perm] * lvl / level(P[perm]) * valid
    # reverb-like exponential tail (RT60 0.15-0.8 s), wet -12..0 dB
    rev = (U(B) < 0.3).nonzero().flatten()
    if len(rev):
        rt = 0.15 + 0.65 * U(len(rev), 1)
        k = torch.arange(1, 81, dtype=torch.float32)[None]
        kern = 10 ** (-6 * k / (rt * 100)) * 10 ** (-12 * U(len(rev), 1) / 10) * 0.1
        kern = torch.cat([torch.ones(len(rev), 1), kern], 1)  # (R, 81), dry tap first
        n = T + 81
        Pr = torch.fft.irfft(torch.fft.rfft(P[rev], n) * torch.fft.rfft(kern, n)[:, None], n)[..., :T]
        P[rev] = Pr.clamp(min=0) * valid[rev]
    # coloured noise at 0-30 dB SNR
    lvl = level(P)
    slope = -2 + 2.5 * U(B, 1, 1)
    shape = (mel_centres()[None, :, None] / 1000) ** slope
    shape = shape / shape.mean(1, keepdim=True)
    noise = shape * torch.exp(0.6 * torch.randn(B, Fq, T, generator=g)) * lvl * 10 ** (-30 * U(B, 1, 1) / 10)
    P = P + (U(B, 1, 1) < 0.5).float() * noise * valid
    # telephone band: half the batch loses everything above 3.2-4 kHz (some also below 100-300 Hz)
    c = mel_centres()[None, :, None]
    tel = (U(B, 1, 1) < 0.5).float()
    hi = 3200 + 800 * U(B, 1, 1)
    att = torch.where(c > hi, 10 ** (-(4 + 5 * U(B, 1, 1))), torch.ones(()))
    lo = (U(B, 1, 1) < 0.5).float()
    att = att * torch.where(c < 100 + 200 * U(B, 1, 1), 1 - lo * (1 - 10 ** (-(1 + 2 * U(B, 1, 1)))), torch.ones(()))
    P = P * (tel * att + (1 - tel))
    X = torch.log(P + eps)
    # SpecAugment: one frequency and one time mask, filled with the clip mean
    mean = (X * valid).sum((1, 2), keepdim=True) / (valid.sum((1, 2), keepdim=True) * Fq)
    fw = (U(B, 1, 1) * 9).floor()
    f0 = (U(B, 1, 1) * (Fq - fw)).floor()
    fi = torch.arange(Fq)[None, :, None]
    tw = (U(B, 1, 1) * 0.15 * lengths[:, None, None]).floor()
    t0 = (U(B, 1, 1) * (lengths[:, None, None] - tw)).floor()
    ti = torch.arange(T)[None, None, :]
    m = ((fi >= f0) & (fi < f0 + fw)) | ((ti >= t0) & (ti < t0 + tw))
    return torch.where(m, mean, X) * valid + math.log(eps) * (1 - valid)


class AMSoftmax(torch.nn.Module):
    def __init__(self, dim: int, n_classes: int, scale: float, margin: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        self.s, self.m = scale, margin

    def forward(self, emb, y):
        cos = emb @ F.normalize(self.w, dim=1).T
        logits = self.s * (cos - self.m * F.one_hot(y, cos.shape[1]))
        return F.cross_entropy(logits, y), (cos.argmax(1) == y).float().mean()


def supcon(emb: torch.Tensor, y: torch.Tensor, temp: float = 0.1) -> torch.Tensor:
    sim = emb @ emb.T / temp
    eye = torch.eye(len(y), dtype=torch.bool, device=emb.device)
    sim = sim.masked_fill(eye, -1e9)
    pos = (y[:, None] == y[None, :]) & ~eye
    logp = sim - torch.logsumexp(sim, 1, keepdim=True)
    return -((logp * pos).sum(1) / pos.sum(1).clamp(min=1))[pos.any(1)].mean()


def embed_cached(model, mels, offsets, lengths, ids, batch_frames=24000) -> np.ndarray:
    """Embed cached log-mels ``ids`` on the model's device; returns (len(ids), EMBEDDING_DIM) float32."""
    model.eval()
    device = next(model.parameters()).device
    out = np.zeros((len(ids), cnn.EMBEDDING_DIM), np.float32)
    order = np.argsort(lengths[ids], kind="stable")
    with torch.inference_mode():
        s = 0
        while s < len(order):
            e = s + 1
            while e < len(order) and (e + 1 - s) * lengths[ids[order[e]]] <= batch_frames:
                e += 1
            sel = order[s:e]
            L = int(lengths[ids[sel[-1]]])
            X = torch.zeros(len(sel), cnn.N_MELS, L)
            for r, j in enumerate(sel):
                i = ids[j]
                X[r, :, :lengths[i]] = torch.from_numpy(np.asarray(mels[:, offsets[i]:offsets[i] + lengths[i]], np.float32))
            out[sel] = model(X.to(device), torch.from_numpy(lengths[ids[sel]]).to(device)).cpu().numpy()
            s = e
    return out
