"""Cold command line: `simsearch query clip.wav` wall time against bare `import torch, librosa`.

    python bench/cold_cli.py [--fsdd DIR] [--files 3000] [--runs 7]

Indexes ``--files`` FSDD clips (once, in a temp dir), then alternates, ``--runs`` times each,
``python -c "import torch, librosa"`` (the baseline) and ``python -m simsearch.cli query
CLIP --index DIR`` (a new process each time: interpreter start, imports, model load,
catalog, FAISS cache, decode, embed, search, vote, print). Also checks what the query
imported (``-X importtime``) and that ``simsearch --help`` does not import torch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import report

FSDD = Path(__file__).resolve().parents[2] / "shared/data/fsdd/recordings"


def wall(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def slowest_imports(command: list[str], n: int = 6) -> str:
    """The ``n`` top-level packages that took longest to import in ``command``."""
    out = subprocess.run([sys.executable, "-X", "importtime", *command[1:]], capture_output=True, text=True,
                         check=True).stderr
    totals = {}
    for line in out.splitlines():
        if line.startswith("import time:") and "|" in line:
            _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
            if cumulative.isdigit() and "." not in name:
                totals[name] = max(totals.get(name, 0), int(cumulative))
    top = sorted(totals.items(), key=lambda item: -item[1])[:n]
    return ", ".join(f"{name} {us / 1e6:.2f}s" for name, us in top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fsdd", type=Path, default=FSDD)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        library = tmp / "library"
        library.mkdir()
        clips = sorted(args.fsdd.glob("*.wav"))[:args.files]
        for clip in clips:  # symlinks: FSDD stays where it is, read-only
            (library / clip.name).symlink_to(clip)
        simsearch = [sys.executable, "-m", "simsearch.cli"]
        subprocess.run([*simsearch, "index", str(library), "--index", str(tmp / "index"), "--quiet"], check=True)
        query = [*simsearch, "query", str(clips[0]), "--index", str(tmp / "index")]
        baseline = [sys.executable, "-c", "import torch, librosa"]
        wall(query), wall(baseline)  # the first of each fills the page cache
        ours, theirs = [], []
        for _ in range(args.runs):
            theirs.append(wall(baseline))
            ours.append(wall(query))
        probe = ("import sys; from simsearch.cli import app; import typer.main as m; "
                 "m.get_command(app); print('torch' in sys.modules)")
        help_imports_torch = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                            check=True).stdout.strip()
        figures = {
            "index": f"{len(clips)} FSDD clips",
            "baseline: python -c 'import torch, librosa'": f"median {statistics.median(theirs):.2f} s "
                                                           f"(min {min(theirs):.2f})",
            "simsearch query clip.wav": f"median {statistics.median(ours):.2f} s (min {min(ours):.2f})",
            "ratio (median)": f"{statistics.median(ours) / statistics.median(theirs):.2f}x",
            "slowest imports of the query": slowest_imports(query),
            "slowest imports of the baseline": slowest_imports(baseline),
            "simsearch --help imports torch": help_imports_torch,
        }
        report("cold CLI", figures)


if __name__ == "__main__":
    main()
