"""Train the default CNN encoder (simsearch/cnn.py) from the corpus manifest.

Recipe (CPU, 2 threads; see simsearch/weights/MODEL_CARD.md for the figures):

    # cnn-v1: 7 epochs from random init, ~60-75 min incl. the ~1 min mel cache
    .venv/bin/python scripts/train_encoder.py --corpus ~/.cache/simsearch/corpus \
        --out simsearch/weights/cnn-v1.pt --max-minutes 85
    # cnn-v2 (the default): 6 more epochs from cnn-v1, a warm restart of the schedule
    .venv/bin/python scripts/train_encoder.py --corpus ~/.cache/simsearch/corpus \
        --init simsearch/weights/cnn-v1.pt --epochs 6 --lr 2e-3 \
        --out simsearch/weights/cnn-v2.pt --max-minutes 70

1. Reads ``<corpus>/manifest.jsonl`` and caches every clip's log-mel once
   (``simsearch.cnn.preprocess`` + ``simsearch.cnn.log_mel``, float16 memmap under
   ``<corpus>/_cache/``), exactly the features used at inference.
2. Holds out whole ``group``s as validation: ~10 % of each family (a source with
   several groups, e.g. espeak-ng voices or GM instrument families; the
   single-group sources - one per game package, plus sox - form one pool), chosen
   by a seeded hash (``--split-seed``); the rest trains.
3. Trains AudioCNN with a supervised contrastive loss (SupCon, temperature 0.1):
   each batch is 64 pairs = (clip, another clip with the same weak label, or
   the clip itself when its label is unique), each independently augmented, so
   positives are "same word in another voice", "same note on another
   velocity/pitch", "same game sound variant" or "same clip". Additive-margin
   softmax over the labels (``--am``) is available but lost clearly in short
   runs (see the model card). Heavy augmentation in the
   mel-power domain (speed/pitch resampling, gain, noise, mixing, reverb tail,
   telephone band-limit, SpecAugment), one-cycle AdamW.
4. After each epoch embeds the held-out clips (full length) and scores cosine 1-NN
   label retrieval among them (queries: held-out clips whose label occurs at least
   twice in the held-out set); keeps the best epoch by the macro mean over families.

FSDD is never read here.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simsearch import cnn  # noqa: E402
from simsearch.training import AMSoftmax, augment, crop_batch, embed_cached, make_batches, supcon  # noqa: E402


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


# ----------------------------------------------------------------------------- data
def load_manifest(corpus: Path) -> list[dict]:
    with open(corpus / "manifest.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_clip(path: Path) -> np.ndarray:
    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    x = x.mean(1)
    if sr != cnn.SAMPLE_RATE:
        import soxr
        x = soxr.resample(x, sr, cnn.SAMPLE_RATE, quality="HQ").astype(np.float32)
    return x


def cache_mels(corpus: Path, entries: list[dict]):
    """Return (mels float16 (N_MELS, total_frames) memmap, offsets, lengths) for entries."""
    key = hashlib.sha1(json.dumps([[e["path"] for e in entries], cnn.N_MELS, cnn.N_FFT, cnn.HOP_LENGTH,
                                   cnn.FMIN, cnn.FMAX, cnn.LOG_EPS, cnn.TRIM_TOP_DB, cnn.TRIM_MARGIN,
                                   cnn.MIN_SAMPLES]).encode()).hexdigest()[:12]
    cdir = corpus / "_cache"
    cdir.mkdir(exist_ok=True)
    mel_path, idx_path = cdir / f"cnn-mels-{key}.npy", cdir / f"cnn-mels-{key}.index.npz"
    if not idx_path.exists():
        t0 = time.time()
        lengths = np.zeros(len(entries), np.int64)
        chunks = []
        with torch.inference_mode():
            for i, e in enumerate(entries):
                x = cnn.preprocess(read_clip(corpus / e["path"]))
                m = cnn.log_mel(torch.from_numpy(x)[None])[0].numpy().astype(np.float16)
                chunks.append(m)
                lengths[i] = m.shape[1]
                if i % 5000 == 0:
                    log(f"  mel cache {i}/{len(entries)}")
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        mm = np.lib.format.open_memmap(mel_path, "w+", np.float16, (cnn.N_MELS, int(lengths.sum())))
        for o, m in zip(offsets, chunks):
            mm[:, o:o + m.shape[1]] = m
        mm.flush()
        del mm, chunks
        np.savez(idx_path, offsets=offsets, lengths=lengths)
        log(f"cached {len(entries)} clips, {lengths.sum()} frames in {time.time() - t0:.0f} s -> {mel_path}")
    idx = np.load(idx_path)
    return np.load(mel_path, mmap_mode="r"), idx["offsets"], idx["lengths"]


def stable_hash(s: str, seed: int) -> str:
    return hashlib.sha1(f"{seed}:{s}".encode()).hexdigest()


def family_of(entries: list[dict]) -> list[str]:
    """Split/report unit: the source if it has several groups, else the pool of
    single-group sources ("recorded": one group per game package, plus sox)."""
    groups = defaultdict(set)
    for e in entries:
        groups[e["source"]].add(e["group"])
    return [e["source"] if len(groups[e["source"]]) > 1 else "recorded" for e in entries]


def split_groups(entries: list[dict], frac: float, seed: int) -> np.ndarray:
    """Boolean mask of validation clips: whole groups, ~frac of each family."""
    by_family = defaultdict(Counter)
    for e, fam in zip(entries, family_of(entries)):
        by_family[fam][e["group"]] += 1
    held = set()
    for fam, groups in sorted(by_family.items()):
        if len(groups) < 2:
            continue
        target, total = frac * sum(groups.values()), 0
        for g in sorted(groups, key=lambda g: stable_hash(g, seed)):
            if total >= target:
                break
            if total + groups[g] <= 1.5 * target:
                held.add(g)
                total += groups[g]
        if total == 0:
            held.add(min(groups, key=groups.get))
    return np.array([e["group"] in held for e in entries])


# ----------------------------------------------------------------------------- batches


# ----------------------------------------------------------------------------- losses


# ----------------------------------------------------------------------------- validation


def retrieval(emb: np.ndarray, labels: list[str], sources: list[str]) -> dict:
    """1-NN (cosine, self excluded) label accuracy among the given clips, per source + macro."""
    sim = emb @ emb.T
    np.fill_diagonal(sim, -np.inf)
    nn_ = sim.argmax(1)
    counts = Counter(labels)
    hits = defaultdict(list)
    for i, (lab, src) in enumerate(zip(labels, sources)):
        if counts[lab] > 1:
            hits[src].append(labels[nn_[i]] == lab)
    res = {s: (float(np.mean(h)), len(h)) for s, h in sorted(hits.items())}
    ok = [a for a, n in res.values() if n >= 20]
    res["macro"] = (float(np.mean(ok)) if ok else 0.0, sum(n for _, n in res.values()))
    return res


# ----------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path.home() / ".cache/simsearch/corpus")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "simsearch/weights/cnn-v1.pt")
    ap.add_argument("--epochs", type=int, default=7)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--crop", type=int, default=96, help="training crop, frames (10 ms)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--scale", type=float, default=30.0)
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--am", type=float, default=0.0, help="weight of the AM-softmax loss")
    ap.add_argument("--supcon", type=float, default=1.0, help="weight of SupCon loss (2 views per clip if > 0)")
    ap.add_argument("--pairs", action=argparse.BooleanOptionalAction, default=True,
                    help="with --supcon: the second view is another clip of the same label when there is one")
    ap.add_argument("--val-frac", type=float, default=0.1)
    ap.add_argument("--val-max", type=int, default=5000, help="cap on validation clips (seeded subsample)")
    ap.add_argument("--max-train", type=int, default=0, help="debug: subsample training clips")
    ap.add_argument("--max-minutes", type=float, default=0, help="safety stop (keeps best epoch so far)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split-seed", type=int, default=4,
                    help="hash seed of the group hold-out (4: en-gb-x-rp, cy, da, ro voices; GM ethnic+reed;"
                         " freedroidrpg + redeclipse; fixed before any training)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", type=Path, default=None,
                    help="start from these weights (a state_dict of AudioCNN) instead of random init;"
                         " the schedule restarts (warm restart)")
    args = ap.parse_args()
    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    entries = load_manifest(args.corpus)
    log(f"{len(entries)} clips; sources {dict(Counter(e['source'] for e in entries))}")
    mels, offsets, lengths = cache_mels(args.corpus, entries)
    is_val = split_groups(entries, args.val_frac, args.split_seed)
    val_groups = sorted({e["group"] for e, v in zip(entries, is_val) if v})
    log(f"validation: {is_val.sum()} clips from groups {val_groups}")
    val_ids = np.flatnonzero(is_val)
    if len(val_ids) > args.val_max:
        val_ids = np.sort(np.random.default_rng(1).choice(val_ids, args.val_max, replace=False))
    tr_ids = np.flatnonzero(~is_val)
    if args.max_train:
        tr_ids = np.sort(rng.choice(tr_ids, min(args.max_train, len(tr_ids)), replace=False))
    classes = sorted({entries[i]["label"] for i in tr_ids})
    cls_of = {c: k for k, c in enumerate(classes)}
    y_all = np.array([cls_of.get(e["label"], -1) for e in entries])
    val_labels = [entries[i]["label"] for i in val_ids]
    fams = family_of(entries)
    val_sources = [fams[i] for i in val_ids]
    log(f"train {len(tr_ids)} clips / {len(classes)} labels; val {len(val_ids)} clips")

    by_label = defaultdict(list)
    for i in tr_ids:
        by_label[y_all[i]].append(i)

    def partner(i, rng):
        same = by_label[y_all[i]]
        if len(same) < 2:
            return i
        j = same[rng.integers(len(same) - 1)]
        return j if j != i else same[-1]

    model = cnn.AudioCNN()
    if args.init is not None:
        model.load_state_dict(torch.load(args.init, weights_only=True))
        log(f"initialised from {args.init}")
    model = model.to(memory_format=torch.channels_last)
    head = AMSoftmax(cnn.EMBEDDING_DIM, len(classes), args.scale, args.margin)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"AudioCNN {n_params} parameters")
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    views = 2 if args.supcon > 0 else 1
    per_batch = args.batch // views
    steps = args.epochs * len(make_batches(lengths, tr_ids, per_batch, np.random.default_rng(0)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)

    best, history = -1.0, []
    res = retrieval(embed_cached(model, mels, offsets, lengths, val_ids), val_labels, val_sources)
    log(f"epoch 0 (random init) val {res}")
    for epoch in range(1, args.epochs + 1):
        model.train()
        t0, tot, acc, n = time.time(), 0.0, 0.0, 0
        for ids in make_batches(lengths, tr_ids, per_batch, rng):
            if views == 2 and args.pairs:
                ids = np.stack([ids, [partner(i, rng) for i in ids]], 1).reshape(-1)
            else:
                ids = np.repeat(ids, views)
            X, L = crop_batch(mels, offsets, lengths, ids, args.crop, rng, True)
            X = augment(X, L, gen)
            y = torch.from_numpy(y_all[ids])
            emb = model(X, L)
            loss, a = head(emb, y)
            loss = args.am * loss
            if args.supcon > 0:
                loss = loss + args.supcon * supcon(emb, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            sched.step()
            tot, acc, n = tot + loss.item(), acc + a.item(), n + 1
        t_train = time.time() - t0
        res = retrieval(embed_cached(model, mels, offsets, lengths, val_ids), val_labels, val_sources)
        score = res["macro"][0]
        history.append({"epoch": epoch, "loss": tot / n, "train_acc": acc / n, "val": res, "train_s": t_train,
                            "total_s": time.time() - t0})
        flag = ""
        if score > best:
            best, flag = score, " *best*"
            args.out.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, args.out)
        log(f"epoch {epoch}/{args.epochs} loss {tot / n:.3f} acc {acc / n:.3f} train {t_train:.0f}s "
            f"(+val {time.time() - t0 - t_train:.0f}s) val {json.dumps(res)}{flag}")
        if args.max_minutes and time.time() - t_start > args.max_minutes * 60:
            log("time budget reached, stopping")
            break
    log(f"best val macro {best:.4f}; total {(time.time() - t_start) / 60:.1f} min; weights -> {args.out}")
    (args.corpus / "_cache" / f"train_log-{args.out.stem}.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "n_params": n_params, "n_train": len(tr_ids),
             "n_classes": len(classes), "val_groups": val_groups, "n_val": len(val_ids), "history": history,
             "total_min": (time.time() - t_start) / 60}, indent=1))


if __name__ == "__main__":
    main()
