"""FSDD leave-one-speaker-out through the real command line (what a user would type).

Indexes all 3000 FSDD clips with the digit as label (timed), then for each speaker queries
that speaker's clips with ``--exclude '*_SPEAKER_*'`` so only the other five speakers can
answer, and scores the nearest neighbour (top-1) and the vote.

    python bench/fsdd_loso_cli.py --encoder features
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fsdd", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/fsdd/recordings")
    parser.add_argument("--encoder", default="cnn")
    args = parser.parse_args()
    simsearch = [sys.executable, "-m", "simsearch.cli"]
    with tempfile.TemporaryDirectory() as index:
        started = time.perf_counter()
        subprocess.run(simsearch + ["index", str(args.fsdd), "--label-regex", r"^(\d)_", "--encoder", args.encoder,
                                    "--index", index, "--quiet"], check=True)
        index_seconds = time.perf_counter() - started
        total = top1 = voted = 0
        rows = []
        for speaker in SPEAKERS:
            clips = sorted(str(p) for p in args.fsdd.glob(f"*_{speaker}_*.wav"))
            out = subprocess.run(simsearch + ["query", *clips, "-k", "10", "--json", "--exclude", f"*_{speaker}_*",
                                              "--unknown-threshold", "-1", "--index", index],
                                 check=True, capture_output=True, text=True).stdout
            results = [json.loads(line) for line in out.splitlines()]
            truth = [Path(r["path"]).name[0] for r in results]
            t1 = sum(r["neighbours"][0]["label"] == t for r, t in zip(results, truth))
            vt = sum((r["category"] or {}).get("label") == t for r, t in zip(results, truth))
            rows.append((speaker, len(results), t1 / len(results), vt / len(results)))
            total, top1, voted = total + len(results), top1 + t1, voted + vt
    print(f"encoder {args.encoder}: indexed 3000 clips in {index_seconds:.1f} s")
    for speaker, n, t1, vt in rows:
        print(f"  {speaker:<10}{n:>5}  top-1 {t1:.3f}  vote {vt:.3f}")
    print(f"  {'mean':<10}{total:>5}  top-1 {top1 / total:.3f}  vote {voted / total:.3f}")


if __name__ == "__main__":
    main()
