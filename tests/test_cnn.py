"""Tests of the shipped CNN encoder (simsearch/cnn.py). Audio is generated here, seeded."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from simsearch import cnn

SR = cnn.SAMPLE_RATE


def _tone(rng, n=SR):
    t = np.arange(n) / SR
    return 0.5 * np.sin(2 * np.pi * 440 * t) * np.minimum(1, 20 * t) * np.minimum(1, 20 * (t[-1] - t))


def _chirp(rng, n=SR):
    t = np.arange(n) / SR
    return 0.5 * np.sin(2 * np.pi * (200 * t + 0.5 * 3000 * t ** 2))


def _noise_burst(rng, n=SR):
    env = np.exp(-np.arange(n) / (0.15 * SR))
    return 0.5 * rng.standard_normal(n) * env


def _clicks(rng, n=SR):
    x = np.zeros(n)
    x[:: SR // 8] = 1.0
    x[1:: SR // 8] = -0.5
    return x


SOUNDS = [_tone, _chirp, _noise_burst, _clicks]


@pytest.fixture(scope="module")
def model():
    return cnn.load_default()


def _f32(x):
    return np.asarray(x, dtype=np.float32)


def test_shape_norm_and_constants(model):
    rng = np.random.default_rng(0)
    emb = cnn.embed_waveforms(model, [_f32(f(rng)) for f in SOUNDS])
    assert emb.shape == (len(SOUNDS), cnn.EMBEDDING_DIM) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert cnn.SAMPLE_RATE == 16000 and cnn.MODEL_NAME == "cnn" and cnn.EMBEDDING_DIM <= 512
    assert not model.training
    assert cnn.load_default() is model  # cached


def test_edge_lengths_and_silence(model):
    rng = np.random.default_rng(1)
    waves = [_f32([0.3]), np.zeros(50, np.float32), np.zeros(SR, np.float32), _f32(rng.standard_normal(123))]
    emb = cnn.embed_waveforms(model, waves)
    assert np.isfinite(emb).all()
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert cnn.embed_waveforms(model, []).shape == (0, cnn.EMBEDDING_DIM)


def test_deterministic(model):
    rng = np.random.default_rng(2)
    waves = [_f32(f(rng)) for f in SOUNDS]
    a = cnn.embed_waveforms(model, waves)
    torch.manual_seed(123)  # global RNG state must not matter
    b = cnn.embed_waveforms(model, waves)
    assert np.array_equal(a, b)


def test_batch_equals_one_at_a_time(model):
    rng = np.random.default_rng(3)
    waves = [_f32(0.3 * rng.standard_normal(n)) for n in (1, 4001, 9000, 16161)]
    waves += [_f32(f(rng, n)) for f, n in zip(SOUNDS, (5000, 7777, 12345, 20000))]
    batched = cnn.embed_waveforms(model, waves)
    single = np.concatenate([cnn.embed_waveforms(model, [w]) for w in waves])
    assert np.abs(batched - single).max() < 1e-5


def test_log_mel_padding_invariant():
    rng = np.random.default_rng(4)
    x = torch.from_numpy(_f32(rng.standard_normal(5000)))
    alone = cnn.log_mel(x[None])
    padded = cnn.log_mel(torch.cat([x, torch.zeros(3000)])[None])
    t = cnn.n_frames(5000)
    assert alone.shape == (1, cnn.N_MELS, t)
    assert torch.allclose(alone, padded[..., :t], atol=1e-4)


def test_long_audio_is_segmented(model, monkeypatch):
    rng = np.random.default_rng(5)
    long = _f32(np.tile(_noise_burst(rng, SR // 2), 7))  # 3.5 s
    whole = cnn.embed_waveforms(model, [long])
    monkeypatch.setattr(cnn, "MAX_SEGMENT_SECONDS", 1.0)
    emb = cnn.embed_waveforms(model, [long, _f32(_tone(rng))])
    assert emb.shape == (2, cnn.EMBEDDING_DIM)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert float(emb[0] @ whole[0]) > 0.8  # segment average ~ whole-clip embedding for a stationary sound


def test_sounds_apart_and_robust_to_gain_and_noise(model):
    rng = np.random.default_rng(6)
    clean = [_f32(f(rng)) for f in SOUNDS]
    varied = [_f32(0.2 * x + 0.2 * 10 ** (-25 / 20) * np.std(x) * rng.standard_normal(x.size)) for x in clean]
    a = cnn.embed_waveforms(model, clean)
    b = cnn.embed_waveforms(model, varied)
    sim = a @ b.T  # (clean, varied)
    assert (sim.argmax(0) == np.arange(len(SOUNDS))).all()  # each variant is nearest its own clean sound
    others = np.where(np.eye(len(SOUNDS), dtype=bool), -1.0, sim)
    assert (np.diag(sim) > np.maximum(others.max(0), others.max(1)) + 0.2).all()  # by a clear margin
    off = (a @ a.T)[~np.eye(len(SOUNDS), dtype=bool)]
    assert off.max() < 0.9  # different sounds land apart
    # pure gain changes nothing beyond float noise (peak normalisation + per-clip standardisation)
    g = cnn.embed_waveforms(model, [3.0 * x for x in clean])
    assert np.abs(g - a).max() < 1e-4


def test_the_encoder_declares_the_shipped_model_version_dim_and_rate_without_importing_torch():
    from simsearch.encoders import CNNEncoder

    assert CNNEncoder.version == str(cnn.MODEL_VERSION) == CNNEncoder().version
    assert CNNEncoder.versions == cnn.SHIPPED_VERSIONS and cnn.MODEL_VERSION in cnn.SHIPPED_VERSIONS
    assert (CNNEncoder.dim, CNNEncoder.sample_rate) == (cnn.EMBEDDING_DIM, cnn.SAMPLE_RATE) \
        == (CNNEncoder().dim, CNNEncoder().sample_rate)


def test_non_finite_samples_count_as_silence(model):
    rng = np.random.default_rng(3)
    clean = (0.3 * rng.standard_normal(16000)).astype(np.float32)
    with_nan = clean.copy()
    with_nan[[10, 5000]] = np.nan
    zeroed = clean.copy()
    zeroed[[10, 5000]] = 0.0
    with_inf = clean.copy()
    with_inf[[10, 5000]] = [np.inf, -np.inf]
    a, b, c = cnn.embed_waveforms(model, [with_nan, zeroed, with_inf])
    assert np.abs(a - b).max() < 1e-6 and np.abs(c - b).max() < 1e-6  # both count as silence
    assert np.isnan(with_nan[10])  # the caller's array is left as it was
