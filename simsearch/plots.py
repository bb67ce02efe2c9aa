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
