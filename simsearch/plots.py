"""Pictures that explain answers (matplotlib, written as PNG). Imported only when asked for."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion_matrices(strategies: dict[str, dict], out: str | Path) -> Path:
    """One confusion matrix per strategy (rows: true label, columns: vote), side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(strategies), figsize=(5.5 * len(strategies), 5), squeeze=False)
    for ax, (name, result) in zip(axes[0], strategies.items()):
        labels, matrix = result["confusion"]["labels"], np.array(result["confusion"]["matrix"], dtype=float)
        shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_xlabel("vote")
        ax.set_ylabel("true label")
        ax.set_title(f"{name}: vote {result['vote']:.3f}, top-1 {result['top1']:.3f}", fontsize=9)
        if len(labels) <= 20:
            for i in range(len(labels)):
                for j in range(len(labels)):
                    if matrix[i, j]:
                        ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=6,
                                color="white" if shares[i, j] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def _mel_panel(ax, samples: np.ndarray, sample_rate: int, title: str, *, span: tuple[float, float] | None = None):
    import librosa.display

    from .features import log_mel

    image = librosa.display.specshow(log_mel(samples, sample_rate=sample_rate), sr=sample_rate, hop_length=160,
                                     x_axis="time", y_axis="mel", fmin=50, ax=ax, cmap="magma")
    if span is not None and span[1] - span[0] < len(samples) / sample_rate - 1e-3:
        ax.axvspan(*span, color="cyan", alpha=0.15, lw=0)
        ax.axvline(span[0], color="cyan", lw=1)
        ax.axvline(span[1], color="cyan", lw=1)
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("")
    return image


def query_figure(result: dict, out: str | Path, *, sample_rate: int = 16000, max_neighbours: int = 5) -> Path:
    """The query's mel spectrogram beside its top neighbours' (best segment shaded), with scores and the vote.

    ``result`` is one query answer in the JSON contract (``QueryResult.to_dict()``); the audio
    of the query and of each neighbour is read from disk.
    """
    from . import audio

    plt = _pyplot()
    query = (result["path"], audio.load(result["path"], sample_rate=sample_rate).samples)
    category = result["category"]
    neighbours = [dict(n, samples=audio.load(n["path"], sample_rate=sample_rate).samples)
                  for n in result["neighbours"][:max_neighbours]]
    n = 1 + len(neighbours)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    verdict = f"{category['label']} ({category['confidence']:.2f})" if category else "unknown"
    _mel_panel(axes[0][0], query[1], sample_rate, f"QUERY {Path(query[0]).name}\nvote: {verdict}")
    for i, neighbour in enumerate(neighbours, 1):
        ax = axes[i // cols][i % cols]
        label = f" [{neighbour['label']}]" if neighbour.get("label") else ""
        _mel_panel(ax, neighbour["samples"], sample_rate,
                   f"#{i} score {neighbour['score']:.3f}{label}\n{Path(neighbour['path']).name}",
                   span=(neighbour["start"], neighbour["end"]))
    for j in range(n, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def features_figure(path: str, samples: np.ndarray, out: str | Path, *, sample_rate: int) -> Path:
    """Mel spectrogram, chroma and spectral contrast of one clip: what the handcrafted strategy sees."""
    import librosa.display

    from .features import feature_tracks

    plt = _pyplot()
    tracks = feature_tracks(samples, sample_rate=sample_rate)
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    image = _mel_panel(axes[0], samples, sample_rate, f"{Path(path).name}: log-mel spectrogram (dB)")
    fig.colorbar(image, ax=axes[0], format="%+2.0f dB")
    image = librosa.display.specshow(tracks["chroma"], sr=sample_rate, hop_length=160, x_axis="time",
                                     y_axis="chroma", ax=axes[1], cmap="viridis")
    axes[1].set_title("chroma (energy per pitch class)", fontsize=8)
    fig.colorbar(image, ax=axes[1])
    image = librosa.display.specshow(tracks["contrast"], sr=sample_rate, hop_length=160, x_axis="time", ax=axes[2],
                                     cmap="coolwarm")
    axes[2].set_ylabel("octave band")
    axes[2].set_title("spectral contrast (peak vs valley per band, dB)", fontsize=8)
    fig.colorbar(image, ax=axes[2])
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def few_shot_curve(curves: dict[str, dict[str, float]], out: str | Path) -> Path:
    """Accuracy against labelled examples per class, one line per strategy (``{name: {shots: acc}}``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, curve in curves.items():
        shots = sorted(curve, key=int)
        ax.plot([int(s) for s in shots], [curve[s] for s in shots], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("labelled examples per class")
    ax.set_ylabel("vote accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("few-shot: accuracy by examples per class", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
