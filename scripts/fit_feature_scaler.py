"""Fit the fixed standardisation of the ``features`` encoder and write it into the package.

The handcrafted statistics (MFCC, chroma, spectral contrast) have wildly different scales,
so each dimension is centred and scaled before the vector is L2-normalised. The centre and
scale are fixed numbers shipped with simsearch (``simsearch/weights/features-v1.npz``) so a
vector never depends on what else is indexed. They are the median and the inter-quartile
range (robust to outliers) over the same pre-training corpus the CNN learns from.

    python scripts/fit_feature_scaler.py ~/.cache/simsearch/corpus/manifest.jsonl --max-clips 6000
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from simsearch import audio
from simsearch.features import handcrafted_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest", type=Path, help="corpus manifest.jsonl (see scripts/build_corpus.py)")
    parser.add_argument("--max-clips", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "simsearch/weights/features-v1.npz")
    args = parser.parse_args()

    entries = [json.loads(line) for line in args.manifest.read_text().splitlines() if line.strip()]
    random.Random(args.seed).shuffle(entries)
    rows = []
    for entry in entries[: args.max_clips]:
        decoded = audio.load(args.manifest.parent / entry["path"], sample_rate=16000)
        rows.append(handcrafted_stats(decoded.samples, sample_rate=16000))
    stats = np.stack(rows)
    median = np.median(stats, axis=0)
    iqr = np.subtract(*np.percentile(stats, [75, 25], axis=0))
    scale = np.where(iqr > 1e-6, iqr, 1.0)
    np.savez(args.out, mean=median.astype(np.float32), scale=scale.astype(np.float32),
             clips=np.int64(len(rows)), source=np.str_(str(args.manifest.name)))
    print(f"wrote {args.out} from {len(rows)} clips")


if __name__ == "__main__":
    main()
