"""Adapting the CNN to a user's own labels (metric learning on top of the shipped encoder).

The shipped CNN is fine-tuned on the labelled clips of an index with an additive-margin
softmax over the user's labels — it pulls each label's clips together and pushes labels
apart on the unit sphere, the same geometry the cosine search and the vote use. Training
always starts from the shipped weights, is seeded and deterministic on CPU, and the
classifier weights are thrown away afterwards: only the embedding is kept, so new categories
still work by nearest-neighbour vote.

Augmentation is *light* by default: random crops with speed (±15 %) and pitch (±2 mel
bands) jitter. The pre-training augmentations (noise, mixing, reverb, band-limiting,
SpecAugment; ``augmentation="full"``) simulate recording conditions a user's own labelled
clips may not show; in our measurements they made no difference to held-out accuracy or
"unknown" rejection during adaptation (see ``AdaptConfig``), so the default stays light.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AdaptConfig:
    """Settings of :func:`adapt_model`."""

    epochs: int = 6
    batch_size: int = 64
    learning_rate: float = 1e-3
    crop_frames: int = 96
    margin: float = 0.4
    scale: float = 16.0
    """A wide margin at a low scale: each label's clips must beat every other label by 0.4 in
    cosine, with a softmax soft enough that already-separated clips keep contributing. Chosen on
    the FSDD development split (george never used; train on four of the other five speakers,
    validate on the fifth; nicolas, theo and yweweler each validated, two seeds, plus runs with
    two digits hidden), 24 recipes x 12 runs each: held-out 1-NN accuracy 0.926 with the earlier
    margin 0.2 / scale 30, 0.936 with margin 0.4, 0.942 with margin 0.4 / scale 16 (margin 0.5 /
    scale 16: 0.941); the hardest speaker, nicolas, 0.864 -> 0.907. "Unknown" AUROC 0.851 ->
    0.862. Same training time. ``scripts/sweep_adapt.py`` reruns both sweeps. On all six FSDD
    speakers (five in training) the gain is smaller: top-1 0.955 -> 0.957, "unknown" AUROC
    0.816 -> 0.824 (the same six rounds)."""
    seed: int = 0
    threads: int = 2
    augmentation: str = "light"
    """``"light"`` (crop, speed, pitch) or ``"full"`` (also the pre-training augmentations).
    In the first development sweep (46 recipes x 8 runs, margin 0.2 / scale 30) "full" scored
    0.903 against 0.900 for "light", within the noise of about 1 point, and the same "unknown"
    AUROC (0.868); SpecAugment masks, vocal-tract-length warping, mixup, supervised-
    contrastive terms, weight averaging, frozen or slower early blocks, 10-15 epochs and other
    learning rates or batch sizes gained no more than that noise either; margin and scale did."""

    def __post_init__(self):
        if self.augmentation not in ("light", "full"):
            raise ValueError(f"augmentation must be 'light' or 'full', not {self.augmentation!r}")


def mel_bank(waves: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Preprocess and log-mel every clip once (the encoder's own front end).

    Returns ``(mels (N_MELS, total_frames) float32, offsets (n,), lengths (n,))``.
    """
    import torch

    from . import cnn

    chunks = []
    with torch.inference_mode():
        for wave in waves:
            chunks.append(cnn.log_mel(torch.from_numpy(cnn.preprocess(wave))[None])[0].numpy())
    lengths = np.array([c.shape[1] for c in chunks], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return np.concatenate(chunks, axis=1), offsets, lengths


def adapt_model(base, waves: Sequence[np.ndarray], labels: Sequence[str], *, config: AdaptConfig = AdaptConfig(),
                progress: Callable[[int, int], None] | None = None):
    """Fine-tune a copy of ``base`` (an :class:`simsearch.cnn.AudioCNN`) on labelled clips.

    Parameters
    ----------
    base : AudioCNN
        Starting weights (left untouched).
    waves : sequence of np.ndarray, each (n_i,)
        Mono float32 clips at 16 kHz.
    labels : sequence of str
        One label per clip; at least two distinct labels.
    config : AdaptConfig
    progress : callable, optional
        ``progress(step, total_steps)``.

    Returns
    -------
    AudioCNN
        The adapted encoder in eval mode.
    """
    import torch

    from . import training

    names = sorted(set(labels))
    if len(names) < 2:
        raise ValueError("adaptation needs at least two labels")
    y_all = np.array([names.index(label) for label in labels], dtype=np.int64)
    mels, offsets, lengths = mel_bank(waves)

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = copy.deepcopy(base).train().requires_grad_(True)
    head = training.AMSoftmax(model.proj.out_features, len(names), config.scale, config.margin)
    head.w.data = _class_means(base, mels, offsets, lengths, y_all, len(names))  # start from the prototypes
    parameters = list(model.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(y_all) / config.batch_size)
    total = steps_per_epoch * config.epochs
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.learning_rate, total_steps=total,
                                                   pct_start=0.15)
    step = 0
    try:
        for _ in range(config.epochs):
            for ids in training.make_batches(lengths, np.arange(len(y_all)), config.batch_size, rng):
                x, x_lengths = training.crop_batch(mels, offsets, lengths, ids, config.crop_frames, rng, augment=True)
                if config.augmentation == "full":
                    x = training.augment(x, x_lengths, generator)
                loss, _ = head(model(x, x_lengths), torch.from_numpy(y_all[ids]))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                if progress:
                    progress(step, total)
    finally:
        torch.set_num_threads(previous_threads)
    return model.eval().requires_grad_(False)


def _class_means(model, mels, offsets, lengths, y, n_classes):
    import torch

    from . import training

    embeddings = torch.from_numpy(training.embed_cached(model.eval(), mels, offsets, lengths, np.arange(len(y))))
    means = torch.zeros(n_classes, embeddings.shape[1])
    means.index_add_(0, torch.from_numpy(y), embeddings)
    return torch.nn.functional.normalize(means, dim=1)


def evaluate_adapted(dataset, held_out: list[np.ndarray], *, config: AdaptConfig | None = None, vote_config=None,
                     unknown_rounds: Sequence[tuple[int, set[str]]] = (), progress=None) -> dict:
    """The ``cnn+adapt`` strategy of :func:`simsearch.evaluate.evaluate`: adapt inside each fold.

    For every fold the shipped CNN is adapted on the *other* folds' labelled files only (the
    held-out group is never seen), then every file is re-embedded with it and the fold is
    categorised exactly as the frozen strategies are. Every round of ``unknown_rounds``
    (``(fold, hidden classes)`` from :func:`simsearch.evaluate_openset.unknown_rounds`) adapts
    one more model on the fold's other files without the hidden classes, so they are unknown
    to the *adapted* space too; its "unknown" scores are reported as for the frozen
    strategies, at :data:`ADAPTED_UNKNOWN_THRESHOLD`. That is ``folds + rounds`` trainings.
    """
    import time

    from . import audio, cnn
    from .config import VoteConfig
    from .encoders import CNNEncoder
    from .errors import AudioReadError
    from .evaluate import class_report, confusion, embed_files, score_folds
    from .evaluate_openset import UnknownScores, summarise_unknown

    config = config or AdaptConfig()
    vote_config = vote_config or VoteConfig()
    waves = {}
    for i, path in enumerate(dataset.paths):
        try:
            waves[i] = audio.load(path, sample_rate=cnn.SAMPLE_RATE).samples
        except AudioReadError:
            pass  # reported by embed_files below
    labels = np.array(dataset.labels)
    base = cnn.load_default()
    folds, truth, voted, seconds, open_set_seconds, failures = [], [], [], [], [], []
    open_set = UnknownScores()

    embed_seconds = 0.0

    def adapted_vectors(train: list[int], timings: list[float]):
        nonlocal embed_seconds
        started = time.perf_counter()
        model = adapt_model(base, [waves[i] for i in train], labels[train].tolist(), config=config)
        timings.append(round(time.perf_counter() - started, 1))
        started = time.perf_counter()
        embedded = embed_files(CNNEncoder(model, name=ADAPTED_NAME), dataset.paths)
        embed_seconds += time.perf_counter() - started
        return embedded

    rounds = list(unknown_rounds)
    steps = len(held_out) + len(rounds)

    def training_set(fold: np.ndarray, hidden: set[str] = frozenset()) -> list[int]:
        excluded = set(fold.tolist())
        return [i for i in sorted(waves) if i not in excluded and labels[i] not in hidden]

    for n, fold in enumerate(held_out):
        vectors, owner, failures = adapted_vectors(training_set(fold), seconds)
        scored = score_folds(vectors, owner, dataset, [fold], vote_config=vote_config)
        folds += scored["folds"]
        for i, t in enumerate(scored["confusion"]["labels"]):
            for j, p in enumerate(scored["confusion"]["labels"]):
                truth += [t] * scored["confusion"]["matrix"][i][j]
                voted += [p] * scored["confusion"]["matrix"][i][j]
        if progress:
            progress(n + 1, steps)
    for r, (n, hidden) in enumerate(rounds):
        vectors, owner, _ = adapted_vectors(training_set(held_out[n], hidden), open_set_seconds)
        open_set.add(vectors, owner, dataset, held_out[n], hidden, vote_config=vote_config)
        if progress:
            progress(len(held_out) + r + 1, steps)
    total = sum(f["files"] for f in folds)
    per_class = class_report(truth, voted)
    result = {"encoder": f"cnn-v{cnn.MODEL_VERSION}+adapt", "train_seconds_per_fold": seconds,
              "embed_seconds": round(embed_seconds, 2),
              "top1": sum(f["top1"] * f["files"] for f in folds) / total if total else 0.0,
              "vote": sum(f["vote"] * f["files"] for f in folds) / total if total else 0.0,
              "macro_f1": float(np.mean([c["f1"] for c in per_class.values()])) if per_class else 0.0,
              "folds": folds, "per_class": per_class, "confusion": confusion(truth, voted),
              "failed": [{"path": p, "reason": r} for p, r in failures]}
    if rounds:
        threshold = vote_config.unknown_threshold if vote_config.unknown_threshold is not None \
            else ADAPTED_UNKNOWN_THRESHOLD
        result["unknown"] = {**summarise_unknown(open_set, threshold=threshold, rounds=rounds, n_folds=len(held_out)),
                             "train_seconds_per_round": open_set_seconds}
    return result


ADAPTED_NAME = "cnn+adapt"
"""Encoder name recorded in an index whose vectors come from an adapted CNN."""

ADAPTED_UNKNOWN_THRESHOLD = 0.84
"""Default "unknown" threshold of a CNN adapted by this release's recipe. Calibrated on FSDD
(`evaluate --adapt --unknown 2`: 30 rounds, each adapting cnn-v2 without the left-out speaker
and without a different pair of hidden digits): the threshold with the best balanced accuracy
of the known/unknown decision, 0.842.
It is written beside each adapted model (:func:`adapted_recipe_path`), so a model keeps the
threshold of the recipe that made it."""

LEGACY_ADAPTED_UNKNOWN_THRESHOLD = 0.81
"""Threshold of models adapted before the recipe was recorded beside them (margin 0.2, scale
30; calibrated on six rounds, one per left-out speaker, 0.812)."""


def adapted_weights_path(directory, version: str):
    """Where ``simsearch train`` keeps the adapted weights of ``version`` inside an index directory."""
    from pathlib import Path

    return Path(directory) / "models" / f"{ADAPTED_NAME}-{version}.pt"


def adapted_recipe_path(directory, version: str):
    """The JSON beside adapted weights ``version``: the recipe that made them and their
    calibrated "unknown" threshold."""
    path = adapted_weights_path(directory, version)
    return path.with_name(path.stem + ".json")


def load_adapted(directory, version: str):
    """The adapted encoder ``version`` saved in the index ``directory`` (weights only, never pickle)."""
    import json

    import torch

    from . import cnn
    from .encoders import CNNEncoder
    from .errors import CorruptIndexError

    path = adapted_weights_path(directory, version)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = cnn.AudioCNN()
        model.load_state_dict(state)
    except Exception as e:  # missing, truncated or tampered weights
        raise CorruptIndexError(f"{path}: cannot load the adapted encoder ({e}); "
                                f"re-embed with `simsearch reembed --encoder cnn`") from None
    recipe = adapted_recipe_path(directory, version)
    threshold = LEGACY_ADAPTED_UNKNOWN_THRESHOLD
    if recipe.exists():
        try:
            threshold = float(json.loads(recipe.read_text())["unknown_threshold"])
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptIndexError(f"{recipe}: unreadable recipe of the adapted encoder ({e!r}); "
                                    f"re-embed with `simsearch reembed --encoder cnn`") from None
    return CNNEncoder(model.eval().requires_grad_(False), name=ADAPTED_NAME, version=version,
                      unknown_threshold=threshold)


def train_index(engine, *, config: AdaptConfig = AdaptConfig(), progress=None) -> dict:
    """Adapt the CNN to the labelled files of ``engine``'s index and switch the index to it.

    Steps: read the labelled files; fine-tune the shipped CNN (:func:`adapt_model`); save the
    weights under ``models/`` (atomically, named by their hash, so the same seed gives the
    same version); re-embed every indexed file with the new encoder and switch in one
    transaction (:meth:`simsearch.Engine.reembed`). An interruption at any point leaves the
    previous encoder and vectors in use. Returns a summary (plain data).
    """
    import dataclasses
    import hashlib
    import io
    import json

    import torch

    from . import audio, cnn
    from .errors import AudioReadError, UsageError
    from .store import atomic_write

    with engine.store.locked():
        catalog = engine.catalog()
        labelled = sorted((catalog.paths[f], label) for f, label in catalog.labels.items())
        counts = {}
        for _, label in labelled:
            counts[label] = counts.get(label, 0) + 1
        if len(counts) < 2 or min(counts.values()) < 2:
            raise UsageError(f"training needs at least two labels with two files each; the index has {counts}")
        waves, labels, failed = [], [], []
        for path, label in labelled:
            try:
                waves.append(audio.load(path, sample_rate=cnn.SAMPLE_RATE).samples)
                labels.append(label)
            except AudioReadError as e:
                failed.append((path, e.reason))
        model = adapt_model(cnn.load_default(), waves, labels, config=config,
                            progress=(lambda done, total: progress("training", done, total)) if progress else None)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        version = hashlib.sha256(buffer.getvalue()).hexdigest()[:12]
        path = adapted_weights_path(engine.store.directory, version)
        path.parent.mkdir(exist_ok=True)
        recipe = {"base": f"{cnn.MODEL_NAME}-v{cnn.MODEL_VERSION}", "config": dataclasses.asdict(config),
                  "unknown_threshold": ADAPTED_UNKNOWN_THRESHOLD, "labels": counts}
        atomic_write(adapted_recipe_path(engine.store.directory, version),
                     json.dumps(recipe, indent=1, sort_keys=True).encode())
        atomic_write(path, buffer.getvalue())
        report = engine.reembed(load_adapted(engine.store.directory, version),
                                progress=(lambda done, total: progress("re-embedding", done, total)) if progress else None)
        if report.failed:
            raise UsageError(f"{len(report.failed)} indexed files cannot be read any more (first: "
                             f"{report.failed[0][0]}: {report.failed[0][1]}); nothing was switched — run "
                             f"`simsearch index DIR --prune` first")
    return {"encoder": f"{ADAPTED_NAME}-v{version}", "labels": counts, "trained_on": len(waves),
            "epochs": config.epochs, "seed": config.seed, "augmentation": config.augmentation,
            "reembedded": len(report.added),
            "failed": failed}
