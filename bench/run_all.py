"""Run every speed benchmark in turn (``make bench``); each prints its figures and ratios.

    python bench/run_all.py [--quick]

``--quick`` uses smaller sizes (minutes instead of tens of minutes; the goals in
``bench/README.md`` are stated for the full sizes).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    runs = [["index_speed.py"], ["query_speed.py"], ["cold_cli.py"], ["reindex.py"], ["scale.py"]]
    if args.quick:
        runs = [["index_speed.py", "--long-files", "3", "--long-seconds", "60"], ["query_speed.py", "--queries", "50"],
                ["cold_cli.py", "--files", "300", "--runs", "3"], ["reindex.py", "--files", "2000", "--runs", "3"],
                ["scale.py", "--vectors", "200000", "--dir", "/tmp/simsearch-scale-quick"]]
    failed = []
    for run in runs:
        print(f"$ python bench/{' '.join(run)}", flush=True)
        if subprocess.run([sys.executable, str(HERE / run[0]), *run[1:]], check=False).returncode:
            failed.append(run[0])
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
