#!/usr/bin/env python3
"""Build the pre-training corpus for the simsearch audio CNN encoder.

What it builds
--------------
A folder of short clips (mono, 16 kHz, PCM16 WAV, 0.3-4.0 s) plus
``OUT/manifest.jsonl`` with one JSON object per clip::

    {"path": "<relative to OUT>", "source": "<package or synth tool>",
     "group": "<hold-out unit>", "label": "<weak label>",
     "licence": "<licence string>", "duration": <seconds>}

Sources (all Debian main packages, see /work/shared/data/README.md)
-------------------------------------------------------------------
* ``game``   - recorded sound effects of free games: megaglest-data, 0ad-data,
  warzone2100-data, redeclipse-data, openarena-data, freedroidrpg-data,
  lincity-ng-data, supertux-data, teeworlds-data, supertuxkart-data,
  sound-theme-freedesktop, frozen-bubble-data, freeciv-data, pingus-data.
  Fetched with ``apt-get download`` + ``dpkg -x`` (zip archives such as
  0ad public.zip, warzone base.wz and openarena *.pk3 are opened).  Label =
  ``PKG/folder/stem`` with trailing digits / variant suffixes stripped;
  group = package.  Files longer than 4 s are cut into up to 3 non-overlapping
  4 s pieces (near-silent pieces skipped).  Licence: the first ``License:``
  line of each package's /usr/share/doc/PKG/copyright (recorded per clip).
* ``espeak`` - espeak-ng (GPL-3+) reading English dictionary words
  (wamerican word list, 3-9 lowercase letters) in many English accents and
  other languages' voices, voice variants, speeds, pitches and amplitudes.
  Label = ``speech:<word>``; group = ``espeak-ng:<language>``.
  Recorded voice lines that say numbers (warzone2100 countdown/ and
  cmndrvoc/<digit>, redeclipse oneminute/firstblood) are skipped.
* ``flite``  - flite (CMU, X11-style) voices kal, kal16, awb, rms, slt reading the
  same words with random duration stretch / pitch.  Group = ``flite:<voice>``.
* ``festival`` - festival (X11-style) with festvox-kallpc16k, -kdlpc16k
  (permissive), -us-slt-hts (EST-2003/BSD), -italp16k, -itapc16k (GPL-2+)
  reading the same words (2 voices per word, random duration stretch).
  Group = ``festival:<voice>``.
* ``fluid``  - fluidsynth (LGPL-2.1+) with fluid-soundfont-gm (FluidR3_GM.sf2,
  MIT) and musescore-general-soundfont-small (MuseScore_General_Lite.sf3, MIT,
  parts PD/CC0): single notes of all 128 GM programs (3 pitches x 2
  velocities in each of 4 octave bands, 0.5-2 s held) and GM drum notes
  (channel 10, 8 kits), rendered from hand-written MIDI files.
  Label = ``gm:<program>:oct<octave>`` / ``gm-drum:<note>``;
  group = ``fluidsynth:<soundfont>:<GM family>`` / ``fluidsynth:<soundfont>:drums``.
* ``sox``    - sox (GPL-2+) noises, tones, sweeps with effects.
  Label = ``sox:<kind>``; group = ``sox``.

NO number words: every word that is, contains, or sounds like a number word
(English, and common German/French/Spanish/Italian number words) is removed
from the word list before sampling.  Nothing is read from the FSDD data.

The build is deterministic for a given ``--seed`` (same list of renderings)
and incremental: clips already on disk are not rendered again, a game package
whose clip list is recorded in ``OUT/_parts/`` is skipped.  The manifest is
rewritten atomically at the end.

Rebuild (needs: apt-get install espeak-ng flite fluidsynth fluid-soundfont-gm
musescore-general-soundfont-small festival festvox-kallpc16k festvox-kdlpc16k
festvox-us-slt-hts festvox-italp16k festvox-itapc16k sox ffmpeg wamerican;
python with numpy, soundfile, soxr; the game packages are fetched by the
script with apt-get download)::

    .venv/bin/python scripts/build_corpus.py --out ~/.cache/simsearch/corpus --seed 0 --jobs 2

``--only game,fluid,sox,espeak,flite,festival`` restricts the stages (the manifest
still lists every clip already built for all stages).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SR = 16000
MAX_S = 4.0
MIN_S = 0.3
DROP_S = 0.15

GAME_PKGS = [
    "megaglest-data", "0ad-data", "warzone2100-data", "redeclipse-data",
    "openarena-data", "freedroidrpg-data", "lincity-ng-data", "supertux-data",
    "teeworlds-data", "supertuxkart-data", "sound-theme-freedesktop",
    "frozen-bubble-data", "freeciv-data", "pingus-data",
]
AUDIO_EXT = {".ogg", ".oga", ".wav", ".wv", ".flac"}
ZIP_EXT = {".zip", ".wz", ".pk3"}
STAGES = ["game", "fluid", "sox", "espeak", "flite", "festival"]

# ---------------------------------------------------------------- helpers


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def to_mono16k(x: np.ndarray, sr: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if sr != SR:
        x = soxr.resample(x, sr, SR).astype(np.float32)
    return x


def trim(x: np.ndarray, rel_db: float = -45.0, win: int = 160) -> np.ndarray:
    """Trim leading/trailing parts quieter than rel_db below the peak frame."""
    if len(x) < win:
        return x
    n = len(x) // win
    fr = x[: n * win].reshape(n, win)
    e = np.sqrt((fr ** 2).mean(axis=1) + 1e-12)
    thr = e.max() * 10 ** (rel_db / 20)
    idx = np.nonzero(e > thr)[0]
    if len(idx) == 0:
        return x[:0]
    a = max(0, (idx[0] - 1) * win)
    b = min(len(x), (idx[-1] + 2) * win)
    return x[a:b]


def finish_clip(x: np.ndarray) -> np.ndarray | None:
    """Apply length / silence rules; return clip ready to write or None."""
    if len(x) < DROP_S * SR:
        return None
    peak = float(np.abs(x).max()) if len(x) else 0.0
    if peak < 10 ** (-60 / 20):  # silent
        return None
    if peak < 10 ** (-20 / 20):  # very quiet: normalise to -1 dBFS
        x = x * (10 ** (-1 / 20) / peak)
    elif peak > 1.0:
        x = x / peak * 10 ** (-1 / 20)
    x = x[: int(MAX_S * SR)]
    if len(x) < MIN_S * SR:
        x = np.concatenate([x, np.zeros(int(MIN_S * SR) - len(x), np.float32)])
    return x.astype(np.float32)


def write_wav(path: Path, x: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.wav")
    sf.write(str(tmp), x, SR, subtype="PCM_16")
    os.replace(tmp, path)


def duration_of(path: Path) -> float:
    i = sf.info(str(path))
    return round(i.frames / i.samplerate, 4)


def run(cmd, **kw):
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          check=True, **kw)


def _classify_licence(txt: str) -> str | None:
    m = re.search(r"GNU (Lesser |Library )?General Public Licen[cs]e.{0,200}?version (\d(\.\d)?)"
                  r"(.{0,80}?any later)?", txt, re.S)
    p = re.search(r"Permission is hereby granted|Redistribution and use in source and binary", txt)
    if p and (not m or p.start() < m.start()):
        return "permissive BSD/MIT-style"
    if m:
        return "%sGPL-%s%s" % ("L" if m.group(1) else "", m.group(2), "+" if m.group(4) else "")
    m = re.search(r"(Creative Commons[^\n.]*|CC[- ]BY[^\n.]*|public domain)", txt, re.I)
    return m.group(1).strip() if m else None


def pkg_licence(root: Path, pkg: str) -> str:
    """Licence of PKG: the first non-empty short `License:` field of its copyright file,
    else the licence described right after the first `License:` line, else a guess."""
    cp = root / "usr/share/doc" / pkg / "copyright"
    if not cp.exists():
        return "unknown (see Debian package " + pkg + ")"
    txt = cp.read_text(errors="replace")
    ref = " (see /usr/share/doc/%s/copyright)" % pkg
    for m in re.finditer(r"^License:[ \t]*(.*)$", txt, re.M):
        val = m.group(1).strip()
        if val and len(val) <= 40:
            return val
        c = _classify_licence(txt[m.start(): m.start() + 2500])
        if c:
            return c + ref
        break
    c = _classify_licence(txt)
    return (c + ref) if c else "see /usr/share/doc/%s/copyright" % pkg


# hand-checked against /usr/share/doc/PKG/copyright where its layout defeats the parser
LICENCE_OVERRIDES = {
    "espeak-ng": "GPL-3+",
    "espeak-ng-data": "GPL-3+",
    "flite": "BSD-like CMU Flite licence (X11-style); build helpers GPL-2",
    "festival": "X11-style permissive (CSTR Edinburgh / CMU)",
}


def sys_licence(pkg: str) -> str:
    return LICENCE_OVERRIDES.get(pkg) or pkg_licence(Path("/"), pkg)


# ---------------------------------------------------------------- game sfx

def apt_fetch(pkg: str, src: Path) -> Path:
    """Download + extract PKG into src/pkgs/PKG; return that dir."""
    dest = src / "pkgs" / pkg
    if dest.exists():
        return dest
    debs = src / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob(pkg + "_*.deb")):
        run(["apt-get", "download", pkg], cwd=debs)
    deb = sorted(debs.glob(pkg + "_*.deb"))[-1]
    tmp = dest.with_name(pkg + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    run(["dpkg", "-x", str(deb), str(tmp)])
    os.replace(tmp, dest)
    return dest


def unzip_audio(root: Path):
    """Extract audio members of zip-like archives into ROOT/_unzipped/<name>/."""
    out_root = root / "_unzipped"
    for z in sorted(root.rglob("*")):
        if z.suffix.lower() not in ZIP_EXT or not z.is_file() or out_root in z.parents:
            continue
        dest = out_root / z.name
        if (dest / ".done").exists():
            continue
        try:
            with zipfile.ZipFile(z) as zf:
                for m in zf.infolist():
                    if Path(m.filename).suffix.lower() in AUDIO_EXT and not m.is_dir():
                        zf.extract(m, dest)
        except zipfile.BadZipFile:
            continue
        dest.mkdir(parents=True, exist_ok=True)
        (dest / ".done").touch()


# recorded voice lines that say numbers (countdowns, numbered commanders): skipped
SKIP_GAME = re.compile(r"/countdown/|/cmndrvoc/\d+\.|oneminute|firstblood|minutes?\b|"
                       r"(^|/)(zero|one|two|three|four|five|six|seven|eight|nine|ten)[._]", re.I)

_VARIANT = re.compile(r"(?:[_\-. ]?\d+|[_\-. ][a-z]|[_\-. ](?:var|alt|v)\d*)+$", re.I)


def game_label(pkg: str, rel: str) -> str:
    p = Path(rel)
    parts = list(p.parent.parts)
    # drop generic filesystem prefixes
    if parts[:2] == ["usr", "share"]:
        parts = parts[2:]
        if parts and parts[0] == "games":
            parts = parts[1:]
        if parts:
            parts = parts[1:]  # the game's own folder name
    if parts and parts[0] == "_unzipped":
        parts = parts[2:]  # archive name
    stem = _VARIANT.sub("", p.stem)
    lab = "/".join(parts + ([stem] if stem else [])).lower().replace(" ", "_")
    return pkg + "/" + lab


def decode_any(path: Path):
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
        return x, sr
    except Exception:
        pass
    with tempfile.TemporaryDirectory() as td:
        tw = Path(td) / "a.wav"
        r = subprocess.run(["ffmpeg", "-v", "quiet", "-y", "-i", str(path), "-ac", "1",
                            "-ar", str(SR), str(tw)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        if r.returncode != 0 or not tw.exists():
            return None, None
        x, sr = sf.read(str(tw), dtype="float32", always_2d=True)
        return x, sr


def game_task(args):
    """Decode one game file, cut it, write pieces. Returns list of (relpath, dur)."""
    src_path, out_base, out_dir = args
    out = []
    try:
        x, sr = decode_any(Path(src_path))
        if x is None:
            return out
        x = to_mono16k(x, sr)
        x = trim(x, -50.0)
        if len(x) == 0:
            return out
        L = int(MAX_S * SR)
        pieces = [x] if len(x) <= L else [x[i * L:(i + 1) * L] for i in range(min(3, len(x) // L + (1 if len(x) % L else 0)))]
        gpeak = float(np.abs(x).max())
        for k, p in enumerate(pieces):
            if len(pieces) > 1:
                rms = float(np.sqrt((p ** 2).mean() + 1e-12))
                if rms < gpeak * 10 ** (-40 / 20) or rms < 10 ** (-55 / 20):
                    continue  # near-silent piece
                p = trim(p, -50.0) if k == len(pieces) - 1 else p
            y = finish_clip(p)
            if y is None:
                continue
            rel = "%s_%d.wav" % (out_base, k)
            write_wav(Path(out_dir) / rel, y)
            out.append((rel, round(len(y) / SR, 4)))
    except Exception as e:  # noqa: BLE001
        print("  ! failed", src_path, e, file=sys.stderr)
    return out


def stage_game(out: Path, pool, args):
    src = out / "_src"
    parts = out / "_parts"
    parts.mkdir(parents=True, exist_ok=True)
    for pkg in GAME_PKGS:
        part = parts / ("game-%s.jsonl" % pkg)
        if part.exists():
            log("game: %s done already" % pkg)
            continue
        t0 = time.time()
        try:
            root = apt_fetch(pkg, src)
        except Exception as e:  # noqa: BLE001
            log("game: %s FETCH FAILED: %s" % (pkg, e))
            continue
        lic = pkg_licence(root, pkg)
        unzip_audio(root)
        files = sorted(p for p in root.rglob("*")
                       if p.suffix.lower() in AUDIO_EXT and p.is_file())
        tasks = []
        for p in files:
            rel = p.relative_to(root).as_posix()
            if SKIP_GAME.search(rel):
                log("game: skip (number words) " + rel)
                continue
            h = hashlib.sha1(rel.encode()).hexdigest()[:8]
            base = "game/%s/%s_%s" % (pkg, re.sub(r"[^A-Za-z0-9_.-]", "_", p.stem)[:60], h)
            tasks.append((str(p), base, str(out), rel))
        recs = []
        for (sp, base, od, rel), res in zip(tasks, pool.imap(game_task, [t[:3] for t in tasks], chunksize=4)):
            lab = game_label(pkg, rel)
            for r, d in res:
                recs.append({"path": r, "source": pkg, "group": pkg, "label": lab,
                             "licence": lic, "duration": d})
        tmp = part.with_suffix(".tmp")
        with open(tmp, "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, part)
        log("game: %s: %d files -> %d clips (%.0fs) licence=%s"
            % (pkg, len(files), len(recs), time.time() - t0, lic))


# ---------------------------------------------------------------- speech

NUMBER_SUBSTR = [
    # English number words (any word containing one is dropped)
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "eleven", "twelve", "teen", "twenty", "thirty", "forty",
    "fourty", "fifty", "sixty", "seventy", "eighty", "ninety", "hundred",
    "thousand", "million", "billion", "trillion", "first", "second", "third",
    "fifth", "ninth", "twelfth", "dozen", "nought", "naught",
    # other languages (German, French, Spanish, Italian, Dutch), >= 4 letters
    "eins", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun",
    "zehn", "zwoelf", "zwanzig", "hundert", "tausend", "deux", "trois",
    "quatre", "cinq", "sept", "huit", "neuf", "onze", "douze", "cent", "mille",
    "cuatro", "cinco", "seis", "siete", "ocho", "nueve", "diez", "cero", "doce",
    "quattro", "sette", "otto", "nove", "dieci", "cento", "mila", "twee",
    "drie", "acht", "negen", "tien", "honderd", "duizend", "null",
]
NUMBER_EXACT = {
    "oh", "owe", "won", "too", "to", "for", "fore", "ate", "tin", "tree",
    "nil", "none", "once", "twice", "thrice", "pair", "couple", "single",
    "double", "triple", "score", "half", "quarter", "tenth", "zillion",
    "dos", "tres", "uno", "une", "un", "duo", "trio", "due", "tre", "sei",
    "elf", "ein", "eine", "dix", "six", "sex", "sax", "sic", "sis", "sept",
    "set", "cat", "sat", "quad", "solo", "mono", "tri", "uni", "bi", "deca",
    "hex", "oct", "dual", "quint", "nix", "nought", "aught", "naught", "ought",
    "tan", "ton", "tun", "then", "den", "tent", "tense", "hate", "ace",
}
NUMBER_PREFIX = ("for", "four", "fore", "ate", "eigh", "nin", "fiv", "thre",
                 "twen", "twel", "tenn", "seve", "sixt", "zer", "oct", "quad",
                 "quin", "sext", "sept", "dec", "tri", "uni", "mono", "bi",
                 "hundr", "thous")


def is_number_word(w: str) -> bool:
    if w in NUMBER_EXACT or w.startswith(NUMBER_PREFIX):
        return True
    return any(s in w for s in NUMBER_SUBSTR)


def word_list(n: int, seed: int) -> list[str]:
    path = Path("/usr/share/dict/words")
    if not path.exists():
        run(["apt-get", "install", "-y", "wamerican"])
    ws = set()
    for line in path.read_text(errors="replace").split("\n"):
        w = line.strip()
        if re.fullmatch(r"[a-z]{3,9}", w) and not is_number_word(w):
            ws.add(w)
    ws = sorted(ws)
    rng = random.Random(seed * 1000 + 1)
    rng.shuffle(ws)
    return sorted(ws[:n])


ESPEAK_LANGS = (
    # English accents weighted up
    ["en-us"] * 4 + ["en-gb"] * 3 + ["en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
                                     "en-gb-x-gbcwmd", "en-029", "en-us-nyc"] * 2 +
    ["de", "fr-fr", "es", "it", "pt", "nl", "sv", "da", "nb", "fi", "pl", "cs",
     "hu", "ro", "hr", "id", "sw", "af", "tr", "eo", "cy", "is", "lv", "sk"]
)


def espeak_variants() -> list[str]:
    d = Path("/usr/lib/x86_64-linux-gnu/espeak-ng-data/voices/!v")
    if d.exists():
        return sorted(p.name for p in d.iterdir() if p.is_file() and " " not in p.name)
    return ["m1", "m2", "m3", "f1", "f2", "f3", "klatt", "whisper", "croak"]


def synth_task(t):
    """t = dict(kind, cmd, out, rel, gain, tempo). Render, post-process, write."""
    dst = Path(t["out"]) / t["rel"]
    if dst.exists():
        return t["rel"], duration_of(dst)
    with tempfile.TemporaryDirectory() as td:
        tw = Path(td) / "a.wav"
        cmd = [c.replace("{OUT}", str(tw)) for c in t["cmd"]]
        try:
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=60, check=True)
            x, sr = sf.read(str(tw), dtype="float32", always_2d=True)
        except Exception:
            return t["rel"], None
    x = to_mono16k(x, sr)
    x = trim(x, -40.0)
    x = x * t.get("gain", 1.0)
    y = finish_clip(x)
    if y is None:
        return t["rel"], None
    write_wav(dst, y)
    return t["rel"], round(len(y) / SR, 4)


def run_synth(name, tasks, pool, out):
    log("%s: %d renderings" % (name, len(tasks)))
    recs = []
    t0 = time.time()
    for i, (t, (rel, d)) in enumerate(zip(tasks, pool.imap(synth_task, tasks, chunksize=8))):
        if d is not None:
            recs.append({"path": rel, "source": t["source"], "group": t["group"],
                         "label": t["label"], "licence": t["licence"], "duration": d})
        if (i + 1) % 1000 == 0:
            log("  %s %d/%d (%.0fs)" % (name, i + 1, len(tasks), time.time() - t0))
    log("%s: %d clips in %.0fs" % (name, len(recs), time.time() - t0))
    return recs


def espeak_tasks(out, words, per_word, seed):
    lic = sys_licence("espeak-ng-data") if Path("/usr/share/doc/espeak-ng-data/copyright").exists() else sys_licence("espeak-ng")
    variants = espeak_variants()
    tasks = []
    for w in words:
        rng = random.Random("%d:espeak:%s" % (seed, w))  # per word: stable when --words grows
        for k in range(per_word):
            lang = rng.choice(ESPEAK_LANGS)
            var = rng.choice(variants + [None] * 6)
            voice = lang + ("+" + var if var else "")
            speed = rng.randint(110, 230)
            pitch = rng.randint(20, 80)
            amp = rng.randint(60, 160)
            gap = rng.choice([0, 0, 1, 3])
            rel = "speech/espeak/%s/%s_%d.wav" % (w[:2], w, k)
            tasks.append({"source": "espeak-ng", "group": "espeak-ng:" + lang,
                          "label": "speech:" + w, "licence": lic, "out": str(out), "rel": rel,
                          "gain": rng.uniform(0.5, 1.0),
                          "cmd": ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch),
                                  "-a", str(amp), "-g", str(gap), "-w", "{OUT}", w]})
    return tasks


FLITE_VOICES = ["kal", "kal16", "awb", "rms", "slt"]


def flite_tasks(out, words, per_word, seed):
    lic = sys_licence("flite")
    tasks = []
    for w in words:
        rng = random.Random("%d:flite:%s" % (seed, w))
        vs = rng.sample(FLITE_VOICES, per_word) if per_word <= len(FLITE_VOICES) else [rng.choice(FLITE_VOICES) for _ in range(per_word)]
        for k, v in enumerate(vs):
            stretch = rng.uniform(0.75, 1.4)
            f0 = rng.uniform(80, 220) if v in ("slt",) else rng.uniform(70, 160)
            if v == "slt":
                f0 = rng.uniform(140, 260)
            rel = "speech/flite/%s/%s_%d.wav" % (w[:2], w, k)
            tasks.append({"source": "flite", "group": "flite:" + v, "label": "speech:" + w,
                          "licence": lic, "out": str(out), "rel": rel,
                          "gain": rng.uniform(0.5, 1.0),
                          "cmd": ["flite", "-voice", v, "--setf", "duration_stretch=%.2f" % stretch,
                                  "--setf", "int_f0_target_mean=%.0f" % f0,
                                  "-t", w, "-o", "{OUT}"]})
    return tasks


# ---------------------------------------------------------------- fluidsynth

GM_FAMILIES = ["piano", "chromatic-percussion", "organ", "guitar", "bass", "strings",
               "ensemble", "brass", "reed", "pipe", "synth-lead", "synth-pad",
               "synth-effects", "ethnic", "percussive", "sound-effects"]
TAIL_MS = 1500


def _vlq(n):
    b = [n & 0x7F]
    n >>= 7
    while n:
        b.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(reversed(b))


def write_midi(path: Path, events, ppq=1000):
    """events: list of (time_ms, bytes). Tempo set so that 1 tick = 1 ms."""
    events = sorted(events, key=lambda e: (e[0], e[1][0] & 0xF0 != 0x80))
    trk = bytearray(b"\x00\xff\x51\x03" + (1000000).to_bytes(3, "big"))
    t = 0
    for tm, data in events:
        trk += _vlq(tm - t) + data
        t = tm
    trk += b"\x00\xff\x2f\x00"
    path.write_bytes(b"MThd" + struct.pack(">IHHH", 6, 0, 1, ppq) +
                     b"MTrk" + struct.pack(">I", len(trk)) + bytes(trk))


def fluid_job(job):
    """Render one MIDI file containing many notes; cut and write the notes."""
    out = Path(job["out"])
    todo = [n for n in job["notes"] if not (out / n["rel"]).exists()]
    res = []
    if todo:
        with tempfile.TemporaryDirectory() as td:
            mid = Path(td) / "a.mid"
            wav = Path(td) / "a.wav"
            write_midi(mid, job["events"])
            try:
                run(["fluidsynth", "-ni", "-g", "0.6", "-r", str(SR), "-F", str(wav), job["sf"], str(mid)],
                    timeout=600)
                x, sr = sf.read(str(wav), dtype="float32", always_2d=True)
                x = to_mono16k(x, sr)
            except Exception as e:  # noqa: BLE001
                print("  ! fluidsynth failed", job["name"], e, file=sys.stderr)
                x = None
        if x is not None:
            for n in todo:
                a = int(n["t"] * SR / 1000)
                b = int((n["t"] + n["dur"] + TAIL_MS) * SR / 1000)
                seg = x[a:b]
                seg = seg[: _end_trim(seg)]  # trim only the end (keep the attack)
                y = finish_clip(seg)
                if y is not None:
                    write_wav(out / n["rel"], y)
    for n in job["notes"]:
        p = out / n["rel"]
        if p.exists():
            res.append((n, duration_of(p)))
    return res


def _end_trim(x, rel_db=-50.0, win=160):
    n = len(x) // win
    if n == 0:
        return len(x)
    e = np.sqrt((x[: n * win].reshape(n, win) ** 2).mean(axis=1) + 1e-12)
    idx = np.nonzero(e > e.max() * 10 ** (rel_db / 20))[0]
    return len(x) if len(idx) == 0 else min(len(x), (idx[-1] + 2) * win)


SOUNDFONTS = [
    # (tag, path, clip folder, rng offset, licence)
    ("FluidR3_GM", "/usr/share/sounds/sf2/FluidR3_GM.sf2", "gm", 4,
     "MIT (FluidR3_GM.sf2, fluid-soundfont-gm)"),
    ("MuseScore_General_Lite", "/usr/share/sounds/sf3/MuseScore_General_Lite.sf3", "gm-msg", 6,
     "MIT, parts PD/CC0 (MuseScore_General_Lite.sf3, musescore-general-soundfont-small)"),
]


def fluid_jobs(out, seed, sf_tag, sf_path, folder, rng_off, sf_lic):
    lic = sf_lic + "; " + sys_licence("fluidsynth") + " (fluidsynth)"
    rng = random.Random(seed * 1000 + rng_off)
    jobs = []
    # 8 programs (one GM family) per MIDI file so the soundfont is loaded few times
    for fam_i in range(16):
        fam = GM_FAMILIES[fam_i]
        ev = []
        notes = []
        t = 100
        for prog in range(fam_i * 8, fam_i * 8 + 8):
            ev.append((t - 50, bytes([0xC0, prog])))
            for octv in (2, 3, 4, 5):  # MIDI octave number: C4 = 60
                pitches = rng.sample(range(12 * (octv + 1), 12 * (octv + 2)), 3)
                for pitch in pitches:
                    for _ in range(2):
                        vel = rng.randint(50, 127)
                        dur = rng.randint(500, 2000)
                        ev.append((t, bytes([0x90, pitch, vel])))
                        ev.append((t + dur, bytes([0x80, pitch, 0])))
                        notes.append({"t": t, "dur": dur,
                                      "rel": "%s/p%03d/n%03d_v%03d_d%04d.wav" % (folder, prog, pitch, vel, dur),
                                      "label": "gm:%d:oct%d" % (prog, octv),
                                      "group": "fluidsynth:%s:%s" % (sf_tag, fam)})
                        t += dur + TAIL_MS + 300
        jobs.append({"name": "%s-%s" % (sf_tag, fam), "events": ev, "notes": notes,
                     "out": str(out), "sf": sf_path})
    # drums: channel 10 (index 9), several kits, all in one file
    ev = []
    notes = []
    t = 100
    for kit in (0, 8, 16, 24, 25, 32, 40, 48):
        ev.append((t - 50, bytes([0xC9, kit])))
        for note in range(35, 82):
            vel = rng.randint(50, 127)
            dur = 300
            ev.append((t, bytes([0x99, note, vel])))
            ev.append((t + dur, bytes([0x89, note, 0])))
            notes.append({"t": t, "dur": dur,
                          "rel": "%s/drums/k%02d_n%03d_v%03d.wav" % (folder, kit, note, vel),
                          "label": "gm-drum:%d" % note,
                          "group": "fluidsynth:%s:drums" % sf_tag})
            t += dur + TAIL_MS + 1200
    jobs.append({"name": sf_tag + "-drums", "events": ev, "notes": notes, "out": str(out),
                 "sf": sf_path})
    return jobs, lic


def stage_fluid(out, pool, seed):
    recs = []
    for sf_tag, sf_path, folder, off, sf_lic in SOUNDFONTS:
        if not Path(sf_path).exists():
            log("fluid: %s missing, skipped" % sf_path)
            continue
        jobs, lic = fluid_jobs(out, seed, sf_tag, sf_path, folder, off, sf_lic)
        log("fluid: %s: %d midi files, %d notes" % (sf_tag, len(jobs), sum(len(j["notes"]) for j in jobs)))
        t0 = time.time()
        n0 = len(recs)
        for i, res in enumerate(pool.imap_unordered(fluid_job, jobs)):
            for n, d in res:
                recs.append({"path": n["rel"], "source": "fluidsynth", "group": n["group"],
                             "label": n["label"], "licence": lic, "duration": d})
            log("  fluid %s %d/%d files, %d clips (%.0fs)" % (sf_tag, i + 1, len(jobs), len(recs) - n0,
                                                           time.time() - t0))
    return recs


# ---------------------------------------------------------------- festival

FESTIVAL_VOICES = {"kal_diphone": "festvox-kallpc16k", "ked_diphone": "festvox-kdlpc16k",
                   "cmu_us_slt_arctic_hts": "festvox-us-slt-hts", "lp_diphone": "festvox-italp16k",
                   "pc_diphone": "festvox-itapc16k"}


def festival_jobs(out, words, per_word, seed):
    lic = sys_licence("festival")
    voices = [v for v in FESTIVAL_VOICES
              if list(Path("/usr/share/festival/voices").glob("*/" + v))]
    by_voice = {v: [] for v in voices}
    for w in words:
        rng = random.Random("%d:festival:%s" % (seed, w))
        for k, v in enumerate(rng.sample(voices, min(per_word, len(voices)))):
            by_voice[v].append({"word": w, "stretch": round(rng.uniform(0.75, 1.4), 2),
                                "gain": rng.uniform(0.5, 1.0),
                                "rel": "speech/festival/%s/%s_%d.wav" % (w[:2], w, k),
                                "licence": "festival: %s; voice %s: %s" % (
                                    lic, FESTIVAL_VOICES[v], sys_licence(FESTIVAL_VOICES[v])),
                                "label": "speech:" + w, "group": "festival:" + v.split("_")[0]
                                if v != "cmu_us_slt_arctic_hts" else "festival:slt-hts"})
    jobs = []
    for v, items in by_voice.items():
        for i in range(0, len(items), 100):
            jobs.append({"voice": v, "items": items[i:i + 100], "out": str(out)})
    return jobs, lic


def festival_job(job):
    out = Path(job["out"])
    todo = [it for it in job["items"] if not (out / it["rel"]).exists()]
    if todo:
        with tempfile.TemporaryDirectory() as td:
            scm = ["(voice_%s)" % job["voice"]]
            for j, it in enumerate(todo):
                scm.append("(Parameter.set 'Duration_Stretch %s)" % it["stretch"])
                scm.append('(utt.save.wave (utt.synth (Utterance Text "%s")) "%s/%d.wav" \'riff)'
                           % (it["word"], td, j))
            (Path(td) / "a.scm").write_text("\n".join(scm) + "\n")
            try:
                subprocess.run(["festival", "--batch", str(Path(td) / "a.scm")], timeout=600,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            except Exception as e:  # noqa: BLE001
                print("  ! festival failed", e, file=sys.stderr)
            for j, it in enumerate(todo):
                f = Path(td) / ("%d.wav" % j)
                if not f.exists():
                    continue
                x, sr = sf.read(str(f), dtype="float32", always_2d=True)
                x = trim(to_mono16k(x, sr), -40.0) * it["gain"]
                y = finish_clip(x)
                if y is not None:
                    write_wav(out / it["rel"], y)
    res = []
    for it in job["items"]:
        p = out / it["rel"]
        if p.exists():
            res.append((it, duration_of(p)))
    return res


def stage_festival(out, pool, words, per_word, seed):
    jobs, lic = festival_jobs(out, words, per_word, seed)
    log("festival: %d batches, %d renderings" % (len(jobs), sum(len(j["items"]) for j in jobs)))
    t0 = time.time()
    recs = []
    for i, res in enumerate(pool.imap_unordered(festival_job, jobs)):
        for it, d in res:
            recs.append({"path": it["rel"], "source": "festival", "group": it["group"],
                         "label": it["label"], "licence": it["licence"], "duration": d})
        if (i + 1) % 5 == 0:
            log("  festival %d/%d batches, %d clips (%.0fs)" % (i + 1, len(jobs), len(recs), time.time() - t0))
    log("festival: %d clips in %.0fs" % (len(recs), time.time() - t0))
    return recs


# ---------------------------------------------------------------- sox

def sox_tasks(out, n_per_kind, seed):
    lic = sys_licence("sox")
    rng = random.Random(seed * 1000 + 5)
    tasks = []

    def eff():
        e = []
        r = rng.random()
        if r < 0.3:
            e += ["reverb", str(rng.randint(20, 90))]
        elif r < 0.5:
            e += ["echo", "0.8", "0.7", str(rng.randint(40, 300)), "0.4"]
        if rng.random() < 0.3:
            e += ["tremolo", "%.1f" % rng.uniform(2, 15), str(rng.randint(30, 90))]
        return e

    for kind in ["whitenoise", "pinknoise", "brownnoise", "noise-band", "sine", "square",
                 "triangle", "sawtooth", "sweep", "chord", "pluck", "am-tone", "noise-burst"]:
        for k in range(n_per_kind):
            d = round(rng.uniform(0.4, 3.5), 2)
            fa = int(2 ** rng.uniform(np.log2(80), np.log2(4000)))
            if kind in ("whitenoise", "pinknoise", "brownnoise"):
                syn = ["synth", str(d), kind]
            elif kind == "noise-band":
                syn = ["synth", str(d), "whitenoise", "band", str(fa), str(int(fa * rng.uniform(0.05, 0.5)))]
            elif kind in ("sine", "square", "triangle", "sawtooth"):
                syn = ["synth", str(d), kind, str(fa)]
            elif kind == "sweep":
                fb = int(2 ** rng.uniform(np.log2(80), np.log2(6000)))
                syn = ["synth", str(d), rng.choice(["sine", "square", "sawtooth"]), "%d-%d" % (fa, fb)]
            elif kind == "chord":
                syn = ["synth", str(d), "sine", str(fa), "sine", str(int(fa * 1.26)), "sine",
                       str(int(fa * 1.5)), "remix", "-"]
            elif kind == "pluck":
                syn = ["synth", str(d), "pluck", str(fa)]
            elif kind == "am-tone":
                syn = ["synth", str(d), "sine", str(fa), "synth", str(d), "sine", "amod",
                       "%.1f" % rng.uniform(3, 40)]
            else:  # noise-burst
                d = round(rng.uniform(0.15, 0.6), 2)
                syn = ["synth", str(d), rng.choice(["whitenoise", "pinknoise"]), "fade", "q", "0.005",
                       str(d), str(round(d * 0.8, 3))]
            fade = ["fade", "t", "0.01", str(d), "0.05"] if kind != "noise-burst" else []
            rel = "sox/%s/%s_%03d.wav" % (kind, kind, k)
            cmd = ["sox", "-n", "-r", str(SR), "-b", "16", "-c", "1", "{OUT}"] + syn + fade + eff() + \
                  ["gain", "-n", "-%d" % rng.randint(1, 12)]
            tasks.append({"source": "sox", "group": "sox", "label": "sox:" + kind,
                          "licence": lic, "out": str(out), "rel": rel, "gain": 1.0, "cmd": cmd})
    return tasks


# ---------------------------------------------------------------- main

def collect_manifest(out: Path, stage_recs: dict):
    """Merge per-stage records (saved in _parts) into manifest.jsonl."""
    parts = out / "_parts"
    parts.mkdir(parents=True, exist_ok=True)
    for name, recs in stage_recs.items():
        tmp = parts / (name + ".jsonl.tmp%d" % os.getpid())
        with open(tmp, "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, parts / (name + ".jsonl"))
    allrecs = []
    for p in sorted(parts.glob("*.jsonl")):
        for line in p.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if (out / r["path"]).exists():
                    allrecs.append(r)
    tmp = out / ("manifest.jsonl.tmp%d" % os.getpid())
    with open(tmp, "w") as f:
        for r in allrecs:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, out / "manifest.jsonl")
    return allrecs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("SIMSEARCH_CORPUS",
                                                    os.path.expanduser("~/.cache/simsearch/corpus")))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=",".join(STAGES), help="comma list of " + ",".join(STAGES))
    ap.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--words", type=int, default=1500, help="distinct words for speech")
    ap.add_argument("--espeak-per-word", type=int, default=10)
    ap.add_argument("--flite-per-word", type=int, default=3)
    ap.add_argument("--festival-per-word", type=int, default=2)
    ap.add_argument("--sox-per-kind", type=int, default=30)
    a = ap.parse_args()
    out = Path(a.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = set(only) - set(STAGES)
    if bad:
        ap.error("unknown stage(s): %s" % ",".join(sorted(bad)))
    t0 = time.time()
    recs = {}
    words = None
    with mp.Pool(a.jobs) as pool:
        if "game" in only:
            stage_game(out, pool, a)
        if "espeak" in only or "flite" in only or "festival" in only:
            words = word_list(a.words, a.seed)
            (out / "_parts").mkdir(exist_ok=True)
            (out / "_parts" / "words.txt").write_text("\n".join(words) + "\n")
            log("speech: %d words" % len(words))
        if "fluid" in only:
            recs["fluid"] = stage_fluid(out, pool, a.seed)
            collect_manifest(out, recs)
        if "sox" in only:
            recs["sox"] = run_synth("sox", sox_tasks(out, a.sox_per_kind, a.seed), pool, out)
            collect_manifest(out, recs)
        if "espeak" in only:
            recs["espeak"] = run_synth("espeak", espeak_tasks(out, words, a.espeak_per_word, a.seed), pool, out)
            collect_manifest(out, recs)
        if "flite" in only:
            recs["flite"] = run_synth("flite", flite_tasks(out, words, a.flite_per_word, a.seed), pool, out)
            collect_manifest(out, recs)
        if "festival" in only:
            recs["festival"] = stage_festival(out, pool, words, a.festival_per_word, a.seed)
            collect_manifest(out, recs)
    allrecs = collect_manifest(out, recs)
    # summary
    from collections import Counter
    src = Counter(r["source"] for r in allrecs)
    labs = Counter(r["label"] for r in allrecs)
    dur = sum(r["duration"] for r in allrecs)
    log("manifest: %d clips, %.1f h, %d labels (>=2: %d, >=4: %d), %.0fs"
        % (len(allrecs), dur / 3600, len(labs), sum(v >= 2 for v in labs.values()),
           sum(v >= 4 for v in labs.values()), time.time() - t0))
    for k, v in sorted(src.items()):
        log("  %-26s %d" % (k, v))


if __name__ == "__main__":
    main()
