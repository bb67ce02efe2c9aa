"""Re-index of an unchanged library: `simsearch index DIR` when nothing changed.

    python bench/reindex.py [--files 10000]

Writes ``--files`` short wav files (0.25 s of 8 kHz noise bursts, in 100 folders), records
them in a new index through the Store API with their real size and mtime (so they count as
indexed, without spending minutes embedding them; vectors are synthetic) under the CNN's
name (so the command loads the default encoder, as it would), then times, as a new process,

* ``simsearch index DIR --index IDX --quiet`` (nothing to do: every file is unchanged);
* the baseline, same run: ``python -c "import torch"`` plus walking and stat-ing the tree
  (what a re-index that loads the encoder must at least do);
* and walking and stat-ing alone (a re-index that finds nothing to embed loads no model,
  so this is the floor it is compared with too).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import clustered_vectors, report


def write_library(root: Path, n: int) -> list[Path]:
    import soundfile as sf

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = root / f"folder_{i % 100:03d}" / f"clip_{i:05d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        y = (rng.standard_normal(2000) * np.exp(-np.linspace(0, 6, 2000)) * 0.3).astype(np.float32)
        sf.write(path, y, 8000, subtype="PCM_16")
        paths.append(path)
    return paths


def record(index: Path, paths: list[Path]) -> None:
    from simsearch import audio, cnn
    from simsearch.store import FileRecord, Store

    store = Store(index)
    vectors = clustered_vectors(len(paths), seed=0)
    with store.writing():
        store.set_encoder(cnn.MODEL_NAME, cnn.MODEL_VERSION, cnn.EMBEDDING_DIM)
        for path, vector in zip(paths, vectors):
            st = os.stat(path)
            data = path.read_bytes()
            store.add_file(FileRecord(str(path), st.st_size, st.st_mtime_ns, audio.content_hash(data), 0.25, 8000),
                           [(0.0, 0.25)], vector[None])
    store.vector_index()
    store.close()


def wall(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = write_library(tmp / "library", args.files)
        record(tmp / "index", paths)
        command = [sys.executable, "-m", "simsearch.cli", "index", str(tmp / "library"), "--index", str(tmp / "index"),
                   "--json"]
        walk = (f"import os, torch; [os.stat(os.path.join(r, f)) for r, _, fs in "
                f"os.walk({str(tmp / 'library')!r}) for f in fs]")
        baseline = [sys.executable, "-c", walk]
        floor = [sys.executable, "-c", walk.replace("import os, torch;", "import os;")]
        _, out = wall(command)  # once to fill the page cache; it must find nothing to do
        assert f'"unchanged": {args.files}' in out and '"added": 0' in out, out
        ours, theirs, walks = [], [], []
        for _ in range(args.runs):
            theirs.append(wall(baseline)[0])
            walks.append(wall(floor)[0])
            ours.append(wall(command)[0])
        report("re-index unchanged", {
            "files": args.files,
            "simsearch index (nothing changed)": f"median {statistics.median(ours):.2f} s (min {min(ours):.2f})",
            "baseline: import torch + walk + stat": f"median {statistics.median(theirs):.2f} s",
            "ratio (median)": f"{statistics.median(ours) / statistics.median(theirs):.2f}x",
            "floor: python + walk + stat (no torch)": f"median {statistics.median(walks):.2f} s",
            "ratio to the floor (median)": f"{statistics.median(ours) / statistics.median(walks):.2f}x",
        })


if __name__ == "__main__":
    main()
