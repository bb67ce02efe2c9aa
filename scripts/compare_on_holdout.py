"""Unseen kinds of audio: CNN vs handcrafted features on the corpus groups held out of training.

The pre-training recipe (``scripts/train_encoder.py``) holds out whole groups — whole games'
sound effects, whole synthetic voices, whole instrument families — as its validation split.
This script rebuilds exactly that split and scores 1-NN label retrieval among the held-out
clips for each strategy, per kind of audio: how well each generalises to sounds nobody
trained on (FSDD plays no part here).

    python scripts/compare_on_holdout.py --corpus ~/.cache/simsearch/corpus --encoder cnn,features
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_encoder  # noqa: E402  (the same split and scoring as training's validation)

from simsearch import audio  # noqa: E402
from simsearch.encoders import get_encoder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path.home() / ".cache/simsearch/corpus")
    parser.add_argument("--encoder", default="cnn,features")
    parser.add_argument("--val-frac", type=float, default=0.1)
    parser.add_argument("--split-seed", type=int, default=4)
    args = parser.parse_args()

    entries = train_encoder.load_manifest(args.corpus)
    held = train_encoder.split_groups(entries, args.val_frac, args.split_seed)
    val = [e for e, h in zip(entries, held) if h]
    families = [f for f, h in zip(train_encoder.family_of(entries), held) if h]
    waves = [audio.load(args.corpus / e["path"], sample_rate=16000).samples for e in val]
    table = {}
    for name in args.encoder.split(","):
        encoder = get_encoder(name)
        vectors = np.concatenate([encoder.embed(waves[i:i + 256]) for i in range(0, len(waves), 256)])
        table[name] = train_encoder.retrieval(vectors, [e["label"] for e in val], families)
    print(json.dumps(table))
    kinds = [k for k in next(iter(table.values())) if k != "macro"] + ["macro"]
    print(f"{'held-out kind':<14}{'clips':>7}" + "".join(f"{name:>11}" for name in table))
    for kind in kinds:
        n = next(iter(table.values()))[kind][1]
        print(f"{kind:<14}{n:>7}" + "".join(f"{table[name][kind][0]:>11.3f}" for name in table))


if __name__ == "__main__":
    main()
