"""Would one conv-trunk pass per long file keep each window's vector? (Measured; not shipped.)

    python bench/shared_trunk.py [--synth-files 4] [--speech-files 4]

A long file is cut into 3 s windows every 1.5 s, so the CNN computes every second twice.
The alternative measured here runs the conv blocks once over the whole file and pools each
window's span of the time axis. That cannot keep what each window gets alone: the quiet-end
trim, the peak normalisation and the per-clip standardisation of the log-mel are per
window, and a window's edges see real audio instead of zero padding. Two whole-file
definitions are tried: standardised over the whole file ("global") and per frame over a
centred 3 s span ("local"). For every window of synthetic long files (``simsearch.synth``,
as ``index_speed.py`` makes them) and of speech (FSDD clips one after another, 60 s), it
prints the cosine between the window's vector today (what a standalone 3 s query clip
gives) and its shared-trunk vector, and how often that standalone clip's nearest neighbour
among all shared-trunk windows is its own window.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import report
from index_speed import FSDD, long_library


def trunk_vectors(fast, samples: np.ndarray, bounds: list[tuple[int, int]], local: bool) -> np.ndarray:
    """``(len(bounds), dim)``: the conv blocks once over ``samples``, each window pooled from its span."""
    import torch
    import torch.nn.functional as F

    from simsearch import cnn

    x = samples.astype(np.float64) - samples.mean()
    x = (x / max(np.abs(x).max(), 1e-12)).astype(np.float32)
    with torch.inference_mode():
        mel = cnn.log_mel(torch.from_numpy(x)[None])  # (1, F, T)
        if local:
            span = 3 * cnn.SAMPLE_RATE // cnn.HOP_LENGTH + 1
            mean = F.avg_pool1d(mel.mean(1, keepdim=True), span, 1, span // 2, count_include_pad=False)
            square = F.avg_pool1d((mel ** 2).mean(1, keepdim=True), span, 1, span // 2, count_include_pad=False)
            h = (mel - mean) / torch.sqrt(square - mean ** 2 + 1e-5)
        else:
            h = (mel - mel.mean()) / torch.sqrt(mel.var(unbiased=False) + 1e-5)
        h = h[:, None]
        for i, conv in enumerate(fast.convs):
            h = conv(h)
            if i % 2 == 1:
                h = cnn._max_pool2(h)
        h = h.mean(2)[0]  # (C, T / 16)
        out = []
        for s, e in bounds:
            first = s // cnn.HOP_LENGTH // 16
            seg = h[:, first:max(first + 1, cnn.n_frames(e) // 16)]
            out.append(fast.proj(torch.cat([seg.mean(1), seg.amax(1)])[None])[0])
        return F.normalize(torch.stack(out), dim=1).numpy()


def speech_files(n: int, seconds: float = 60.0) -> list[np.ndarray]:
    from simsearch import audio

    clips = sorted(FSDD.glob("*.wav"))
    rng, out = np.random.default_rng(0), []
    for _ in range(n):
        parts, total = [], 0
        while total < seconds * 16000:
            y = audio.load(clips[int(rng.integers(len(clips)))], sample_rate=16000).samples
            parts += [y, np.zeros(int(rng.uniform(0.05, 0.5) * 16000), np.float32)]
            total += len(parts[-2]) + len(parts[-1])
        out.append(np.concatenate(parts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synth-files", type=int, default=4)
    parser.add_argument("--speech-files", type=int, default=4)
    args = parser.parse_args()
    import torch

    from simsearch import audio, cnn
    from simsearch.config import SegmentConfig

    torch.set_num_threads(1)
    model = cnn.load_default()
    fast = cnn._inference_copy(model)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "long").mkdir()
        directory = long_library(Path(tmp) / "long", args.synth_files, 120.0)
        files = [("synth", audio.load(p, sample_rate=16000).samples) for p in sorted(directory.iterdir())]
    files += [("speech", y) for y in speech_files(args.speech_files)]
    figures = {"files": f"{args.synth_files} synthetic x 120 s, {args.speech_files} speech x 60 s"}
    for local in (False, True):
        alone, shared, kinds = [], [], []
        for kind, samples in files:
            bounds = audio.segment_bounds(len(samples), 16000, SegmentConfig())
            alone.append(cnn.embed_waveforms(model, [samples[s:e] for s, e in bounds]))
            shared.append(trunk_vectors(fast, samples, bounds, local))
            kinds += [kind] * len(bounds)
        a, t, kinds = np.concatenate(alone), np.concatenate(shared), np.array(kinds)
        cos = (a * t).sum(1)
        own = (a @ t.T).argmax(1) == np.arange(len(a))
        name = "local" if local else "global"
        figures[f"{name}: windows"] = len(a)
        figures[f"{name}: cos(alone, shared) mean / p5 / min"] = (f"{cos.mean():.3f} / {np.percentile(cos, 5):.3f} / "
                                                                 f"{cos.min():.3f}")
        figures[f"{name}: cos mean synth / speech"] = (f"{cos[kinds == 'synth'].mean():.3f} / "
                                                      f"{cos[kinds == 'speech'].mean():.3f}")
        figures[f"{name}: standalone clip finds its own window"] = f"{own.mean():.3f}"
        if not local:
            figures["for scale: cos of adjacent windows today"] = f"{(a[:-1] * a[1:]).sum(1).mean():.3f}"
    report("shared conv trunk for long files (not shipped)", figures)


if __name__ == "__main__":
    main()
