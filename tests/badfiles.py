"""A corpus of malformed and awkward audio files, and what indexing each one should give.

:func:`write_corpus` writes every file into a directory and returns one :class:`Expect` per
file: ``indexed``, ``failed`` (with a substring of the reason the user is told) or
``ignored`` (not an audio file by name, hidden, or a symlinked folder that is not followed).

"Good" is decided by what a user would want, not by what is convenient: awkward but valid
audio (one sample, silence, DC, clipping, 8 channels, 384 kHz, names that are not UTF-8 or
255 bytes long) is indexed; audio whose samples are not numbers (NaN/Inf) or whose rate is
not a rate (1 Hz) is refused, as is anything that is not audio at all. A truncated file is
indexed when the decoder recovers the audio before the cut (as players do), refused when
it cannot.

Everything is generated here, seeded, in well under a second.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from simsearch import synth

SR = 16000


@dataclass(frozen=True)
class Expect:
    """What should become of ``path`` (as the indexer will report it: absolute, not resolved)."""

    path: str
    outcome: str  # "indexed", "failed" or "ignored"
    reason: str = ""  # for "failed": a substring of the reported reason
    why: str = ""  # what the file is, for assertion messages


def write_corpus(root: Path, *, permissions_apply: bool | None = None) -> list[Expect]:
    """Write the corpus under ``root`` (created); returns what indexing each file should give.

    ``permissions_apply``: whether the process that will index can be refused a chmod-000
    file. Root is not (default: True unless running as root), so for root that file is
    simply readable and expected to be indexed.
    """
    if permissions_apply is None:
        permissions_apply = os.geteuid() != 0
    root = Path(os.path.abspath(root))
    root.mkdir(parents=True, exist_ok=True)
    out: list[Expect] = []

    def put(name: str | bytes, data: bytes, outcome: str, reason: str = "", why: str = "") -> Path:
        path = os.path.join(os.fsencode(root), name if isinstance(name, bytes) else os.fsencode(name))
        Path(os.fsdecode(path)).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        out.append(Expect(os.fsdecode(path), outcome, reason, why or os.fsdecode(name)))
        return Path(os.fsdecode(path))

    tone = synth.make("bell", 1, seconds=1.0, sample_rate=SR)
    good_wav = _encode(tone, SR, "WAV", "PCM_16")

    # ---- the plain good cases, as a control
    put("good/bell.wav", good_wav, "indexed", why="an ordinary WAV")
    put("good/LOUD.WAV", _encode(synth.make("chirp", 2, sample_rate=SR), SR, "WAV", "PCM_16"), "indexed",
        why="upper-case suffix")
    put("good/hum.flac", _encode(synth.make("hum", 3, sample_rate=SR), SR, "FLAC", "PCM_24"), "indexed")
    put("good/clicks.ogg", _encode(synth.make("clicks", 4, sample_rate=SR), SR, "OGG", "VORBIS"), "indexed")
    put("good/rain.mp3", _encode(synth.make("rain", 5, sample_rate=SR), SR, "MP3", "MPEG_LAYER_III"), "indexed")
    put("good/whoosh.aiff", _encode(synth.make("whoosh", 6, sample_rate=SR), SR, "AIFF", "PCM_16"), "indexed")
    put("good/copy_of_bell.wav", good_wav, "indexed", why="the same bytes as good/bell.wav under another name")

    # ---- awkward but valid audio: indexed
    put("awkward/one_sample.wav", _encode(np.array([0.5], np.float32), SR, "WAV", "PCM_16"), "indexed")
    put("awkward/silence.wav", _encode(np.zeros(SR, np.float32), SR, "WAV", "PCM_16"), "indexed", why="all zeros")
    put("awkward/dc.wav", _encode(np.full(SR, 0.5, np.float32), SR, "WAV", "PCM_16"), "indexed", why="DC only")
    put("awkward/clipped.wav", _encode(np.clip(tone * 20, -1, 1), SR, "WAV", "PCM_16"), "indexed",
        why="hard-clipped at full scale")
    put("awkward/eight_channels.wav", _encode(np.tile(tone[:, None], (1, 8)) * np.linspace(0.1, 1, 8), SR, "WAV",
                                              "PCM_16"), "indexed")
    put("awkward/rate_384k.wav", _encode(synth.make("chirp", 7, sample_rate=384000, seconds=0.5), 384000, "WAV",
                                         "PCM_24"), "indexed", why="384 kHz")
    put("awkward/u8.wav", _encode(tone, 8000, "WAV", "PCM_U8"), "indexed", why="8-bit unsigned at 8 kHz")
    put("awkward/float64.wav", _encode(tone, SR, "WAV", "DOUBLE"), "indexed")
    put("awkward/header_says_an_hour.wav", _wav_header(8000, 1, 16, 8000 * 2 * 3600) + _pcm16(tone[:8000]),
        "indexed", why="the header claims an hour, 1 s is there: the audio present is indexed, nothing allocated "
                       "for the hour")
    wav = _encode(synth.make("hum", 8, seconds=2.0, sample_rate=SR), SR, "WAV", "PCM_16")
    put("truncated/body.wav", wav[:len(wav) // 2], "indexed", why="WAV cut mid-data: the first half is audio")
    mp3 = _encode(synth.make("hum", 9, seconds=2.0, sample_rate=SR), SR, "MP3", "MPEG_LAYER_III")
    put("truncated/body.mp3", mp3[:len(mp3) // 2], "indexed", why="MP3 cut mid-stream: the frames before the cut")
    ogg = _encode(synth.make("hum", 10, seconds=3.0, sample_rate=22050), 22050, "OGG", "VORBIS")
    put("truncated/body.ogg", ogg[:len(ogg) // 2], "indexed", why="Ogg Vorbis cut mid-stream")

    # ---- names: indexed, and every one must survive SQLite and JSON
    put(b"names/caf\xe9-latin1-\xff.wav", good_wav[:-2], "indexed", why="a name that is not UTF-8")
    put("names/" + "n" * 251 + ".wav", good_wav[:-4], "indexed", why="a 255-byte file name")
    put("names/spaces \"double\" 'single' quotes.wav", good_wav[:-6], "indexed")
    put("names/new\nline.wav", good_wav[:-8], "indexed", why="a newline in the name")
    put("names/ünïcødé ✓.wav", good_wav[:-10], "indexed")
    put("x.wav/inner.wav", good_wav[:-12], "indexed", why="inside a directory named like a file")

    # ---- not audio, or audio that cannot be decoded: failed, with the reason
    put("bad/empty.wav", b"", "failed", "empty file")
    put("bad/text.wav", b"These are my notes, not a sound.\n" * 20, "failed", "not a readable audio file",
        why="text renamed .wav")
    put("bad/image.wav", _tiny_png(), "failed", "not a readable audio file", why="a PNG renamed .wav")
    put("bad/zeros.mp3", bytes(5000), "failed", "not a readable audio file")
    put("truncated/header.wav", wav[:10], "failed", "not a readable audio file", why="WAV cut inside the header")
    put("truncated/no_data_chunk.wav", wav[:30], "failed", "not a readable audio file",
        why="WAV cut before the data chunk")
    put("truncated/header_only.wav", wav[:44], "failed", "contains no audio samples", why="zero-length audio")
    flac = _encode(synth.make("bell", 11, seconds=2.0, sample_rate=SR), SR, "FLAC", "PCM_16")
    put("truncated/header.flac", flac[:20], "failed", "not a readable audio file")
    put("truncated/body.flac", flac[:len(flac) // 2], "failed", "damaged or truncated")
    put("truncated/header.ogg", ogg[:20], "failed", "not a readable audio file")
    opus = _encode(synth.make("bell", 12, seconds=2.0, sample_rate=48000), 48000, "OGG", "OPUS")
    put("truncated/body.opus", opus[:len(opus) // 2], "failed", "not a readable audio file")
    put("truncated/header.mp3", mp3[:20], "failed", "not a readable audio file")
    put("bad/nan.wav", _encode(np.where(np.arange(SR) % 100 == 0, np.nan, tone), SR, "WAV", "FLOAT"), "failed",
        "NaN or infinite")
    put("bad/inf.wav", _encode(np.where(np.arange(SR) == 5, np.inf, tone), SR, "WAV", "FLOAT"), "failed",
        "NaN or infinite")
    put("bad/rate_1hz.wav", _wav_header(1, 1, 16, 2 * 100) + _pcm16(tone[:100]), "failed", "too low to be audio")
    put("bad/rate_0hz.wav", _wav_header(0, 1, 16, 2 * 100) + _pcm16(tone[:100]), "failed",
        "not a readable audio file")
    put("bad/65535_channels.wav", _wav_header(SR, 65535, 16, 2000) + bytes(2000), "failed",
        "not a readable audio file")
    put("bad/four_hours.flac", _flac_claiming(flac, seconds=4 * 3600), "failed", "too long",
        why="STREAMINFO claims 4 h, over the 3 h limit: refused before decoding")

    unreadable = put("bad/unreadable.wav", good_wav[:-14], "indexed", why="chmod 000")
    os.chmod(unreadable, 0)
    if permissions_apply:
        out[-1] = Expect(str(unreadable), "failed", "permission denied", "chmod 000")

    # ---- what is not a regular file
    links = root / "links"
    links.mkdir()
    os.symlink("loop_b.wav", links / "loop_a.wav")
    os.symlink("loop_a.wav", links / "loop_b.wav")
    out += [Expect(str(links / n), "failed", "Too many levels of symbolic links", "a symlink loop")
            for n in ("loop_a.wav", "loop_b.wav")]
    os.symlink("nowhere.wav", links / "dangling.wav")
    out.append(Expect(str(links / "dangling.wav"), "failed", "No such file or directory", "a dangling symlink"))
    os.symlink("../good/bell.wav", links / "to_bell.wav")
    out.append(Expect(str(links / "to_bell.wav"), "indexed", why="a symlink to a good file"))
    os.symlink("..", links / "up")  # a folder loop: symlinked folders are not followed
    os.mkfifo(root / "bad" / "pipe.wav")
    out.append(Expect(str(root / "bad" / "pipe.wav"), "failed", "not a regular file", "a named pipe (would block)"))

    # ---- not picked up when walking a folder
    put("notes.txt", b"not audio", "ignored")
    put(".hidden.wav", good_wav, "ignored", why="hidden")
    put(".hidden_dir/inside.wav", good_wav, "ignored", why="inside a hidden folder")
    return out


def _encode(samples: np.ndarray, sample_rate: int, fmt: str, subtype: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def _pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def _wav_header(sample_rate: int, channels: int, bits: int, data_bytes: int) -> bytes:
    """A canonical 44-byte WAV header claiming ``data_bytes`` of PCM (whatever follows)."""
    block = channels * bits // 8
    return (b"RIFF" + struct.pack("<I", min(36 + data_bytes, 2**32 - 1)) + b"WAVE"
            + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, sample_rate, (sample_rate * block) & 0xFFFFFFFF,
                                    block & 0xFFFF, bits)
            + b"data" + struct.pack("<I", data_bytes))


def _flac_claiming(flac: bytes, *, seconds: int) -> bytes:
    """``flac`` with its STREAMINFO total-samples field set to ``seconds`` of audio."""
    data = bytearray(flac)
    at = 8 + 10  # "fLaC", block header, min/max block and frame sizes
    bits = int.from_bytes(data[at:at + 8], "big")
    rate = bits >> 44
    bits = (bits & ~((1 << 36) - 1)) | (rate * seconds)
    data[at:at + 8] = bits.to_bytes(8, "big")
    return bytes(data)


def _tiny_png() -> bytes:
    """A valid 1x1 grey PNG, written by hand."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b""))
