"""Spectral features: the log-mel spectrogram and the handcrafted descriptor statistics.

Pure functions over arrays. The handcrafted statistics are the classic alternative to a
learned encoder: MFCC (timbre / vocal tract), chroma (pitch class) and spectral contrast
(peaks vs valleys per band), each summarised by its mean and standard deviation over time.
"""

from __future__ import annotations

import numpy as np

N_MFCC = 20
N_CHROMA = 12
N_CONTRAST_BANDS = 5  # 200 Hz * 2**5 = 6.4 kHz stays under the 8 kHz Nyquist of 16 kHz audio
HANDCRAFTED_DIM = 2 * (N_MFCC + N_CHROMA + N_CONTRAST_BANDS + 1)


def _spectrum(y: np.ndarray, *, n_fft: int, hop_length: int) -> np.ndarray:
    import librosa

    if len(y) < n_fft:
        y = np.pad(y, (0, n_fft - len(y)))
    return np.abs(librosa.stft(y, n_fft=n_fft, hop_length=hop_length, center=True))


def log_mel(y: np.ndarray, *, sample_rate: int, n_mels: int = 64, n_fft: int = 400,
            hop_length: int = 160, fmin: float = 50.0, fmax: float | None = None) -> np.ndarray:
    """Log-mel spectrogram in dB.

    Parameters
    ----------
    y : np.ndarray, shape (n,)
        Mono signal.
    sample_rate : int
        Hz.

    Returns
    -------
    np.ndarray, shape (n_mels, frames)
        Power in dB relative to the loudest bin (max 0 dB, floor -80 dB).
    """
    import librosa

    power = _spectrum(y, n_fft=n_fft, hop_length=hop_length) ** 2
    mel = librosa.feature.melspectrogram(S=power, sr=sample_rate, n_mels=n_mels, fmin=fmin,
                                         fmax=fmax or sample_rate / 2)
    return librosa.power_to_db(mel, ref=np.max, top_db=80.0)


def feature_tracks(y: np.ndarray, *, sample_rate: int, n_fft: int = 512,
                   hop_length: int = 160) -> dict[str, np.ndarray]:
    """The handcrafted descriptors over time, from one shared STFT.

    Returns
    -------
    dict
        ``mfcc`` (20, frames), ``chroma`` (12, frames) in [0, 1],
        ``contrast`` (6, frames) in dB.
    """
    import librosa

    magnitude = _spectrum(y, n_fft=n_fft, hop_length=hop_length)
    mel = librosa.feature.melspectrogram(S=magnitude**2, sr=sample_rate, n_mels=64)
    mfcc = librosa.feature.mfcc(S=librosa.power_to_db(mel), n_mfcc=N_MFCC)
    chroma = librosa.feature.chroma_stft(S=magnitude**2, sr=sample_rate, n_fft=n_fft, tuning=0.0)
    contrast = librosa.feature.spectral_contrast(S=magnitude, sr=sample_rate, n_fft=n_fft,
                                                 n_bands=N_CONTRAST_BANDS)
    return {"mfcc": mfcc, "chroma": chroma, "contrast": contrast}


def trim_silence(y: np.ndarray, *, top_db: float = 40.0) -> np.ndarray:
    """Drop leading and trailing frames quieter than ``top_db`` below the peak (keeps >= 1 sample)."""
    import librosa

    if len(y) < 2048 or not np.any(y):
        return y
    trimmed, _ = librosa.effects.trim(y, top_db=top_db, frame_length=1024, hop_length=256)
    return trimmed if len(trimmed) else y


def handcrafted_stats(y: np.ndarray, *, sample_rate: int, trim_db: float | None = 40.0) -> np.ndarray:
    """Mean and standard deviation over time of MFCC, chroma and spectral contrast.

    Parameters
    ----------
    y : np.ndarray, shape (n,)
        Mono signal, any length >= 1 sample.
    sample_rate : int
        Hz.
    trim_db : float or None
        Leading/trailing silence quieter than this many dB below the peak is dropped first,
        so padding does not dilute the statistics; ``None`` keeps everything.

    Returns
    -------
    np.ndarray, shape (HANDCRAFTED_DIM,) = (76,), float32
        ``[mfcc mean, mfcc std, chroma mean, chroma std, contrast mean, contrast std]``;
        not standardised (see :class:`simsearch.encoders.FeaturesEncoder`).
    """
    y = np.asarray(y, dtype=np.float32)
    if trim_db is not None:
        y = trim_silence(y, top_db=trim_db)
    tracks = feature_tracks(y, sample_rate=sample_rate)
    parts = []
    for name in ("mfcc", "chroma", "contrast"):
        track = tracks[name]
        parts += [track.mean(axis=1), track.std(axis=1)]
    return np.nan_to_num(np.concatenate(parts)).astype(np.float32)
