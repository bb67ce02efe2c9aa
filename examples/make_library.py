"""Generate the demo library: several clearly different kinds of synthetic sound, seeded.

    python examples/make_library.py examples/generated

writes ``library/<kind>/<kind>_NN.wav`` (labelled by folder), ``queries/`` (fresh clips of
known kinds, other seeds), ``siren/siren_1..3.wav`` (a new kind to teach) with
``queries/siren_query.wav``, and ``long/field_recording.wav`` (a long file mixing kinds,
to show time ranges).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import soundfile as sf

from simsearch import synth


def write(path: Path, samples: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, samples, synth.SAMPLE_RATE, subtype="PCM_16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-kind", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    for k, kind in enumerate(synth.KINDS):
        for i in range(args.per_kind):
            write(args.out / "library" / kind / f"{kind}_{i:02d}.wav", synth.make(kind, args.seed * 1000 + k * 100 + i))
        write(args.out / "queries" / f"{kind}_query.wav", synth.make(kind, args.seed * 1000 + k * 100 + 99))
    for i in range(1, 4):
        write(args.out / "siren" / f"siren_{i}.wav", synth.make("siren", args.seed * 1000 + 900 + i))
    write(args.out / "queries" / "siren_query.wav", synth.make("siren", args.seed * 1000 + 999))
    # A long "field recording": hum, then rain, then a bell, 4 s each.
    parts = [synth.make(kind, args.seed * 1000 + 500 + j, seconds=4.0) for j, kind in enumerate(("hum", "rain", "bell"))]
    write(args.out / "long" / "field_recording.wav", np.concatenate(parts) * 0.8)
    print(f"wrote the demo library under {args.out}")


if __name__ == "__main__":
    main()
