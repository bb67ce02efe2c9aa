"""Development sweep behind ``AdaptConfig``: adaptation recipes compared on an FSDD split
that never involves george (train on four of jackson, lucas, nicolas, theo, yweweler;
validate on the fifth), with and without two hidden digits.

Each run adapts cnn-v2 with a variant of the shipped recipe (margin, scale, epochs, learning
rate, batch, crop, speed / pitch / vocal-tract warping, SpecAugment masks, the pre-training
augmentations, mixup, a supervised-contrastive or distillation term, weight averaging, frozen
or slower early blocks) and scores the held-out speaker by cosine 1-NN, the k-NN vote and,
with hidden digits, the "unknown" AUROC of the vote's score. Runs go to worker processes
that share a GPU when there is one (it ran on one H200: 368 runs of stage 1 in 6 minutes),
else the CPU.

    python scripts/sweep_adapt.py prepare ../shared/data/fsdd/recordings   # log-mel cache, once
    python scripts/sweep_adapt.py run OUT_DIR --stage 1 [--workers 12] [--only ref,m0.4]
    python scripts/sweep_adapt.py summary OUT_DIR/results.jsonl

Stage 1: 46 recipes around the old default (margin 0.2, scale 30), 8 runs each (validate on
yweweler and nicolas; two seeds; digits 6+7 or 4+8 hidden). Stage 2: 24 recipes around
margin / scale, 12 runs each (also validating on theo). The cache lives outside the project
(``~/.cache/simsearch/fsdd_mels.npz``): FSDD is never copied into it.
"""
import json
import math
import os
import sys
import time
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "simsearch", "fsdd_mels.npz")


def _load_pkg():
    # Only simsearch.cnn and simsearch.training, not the package: a GPU machine's image has torch
    # but not faiss or sqlite-utils, which the package __init__ imports. The mel centres are
    # set here so that the "full" augmentation does not import librosa either.
    pkg = types.ModuleType("simsearch")
    pkg.__path__ = [os.path.join(ROOT, "simsearch")]
    sys.modules.setdefault("simsearch", pkg)
    import torch  # noqa
    from simsearch import cnn, training
    edges = cnn._mel_to_hz(np.linspace(cnn._hz_to_mel(cnn.FMIN), cnn._hz_to_mel(cnn.FMAX), cnn.N_MELS + 2))
    training._CENTRES = torch.tensor(edges[1:-1], dtype=torch.float32)
    return cnn, training


DEFAULT = dict(epochs=6, lr=1e-3, bs=64, margin=0.2, scale=30.0, speed=0.15, pitch=2.0, pitch_p=0.7, warp=0.0,
               crop=96, tmask=0, tmask_w=0.15, fmask=0, fmask_w=8, full=False, ema=0.0, freeze=0, lld=1.0,
               supcon=0.0, distill=0.0, base="2", wd=1e-4, pct=0.15, mix=0.0, mix_alpha=0.4)

VALS = ["yweweler", "nicolas"]
TRAIN_POOL = ["jackson", "lucas", "nicolas", "theo", "yweweler"]
HIDES = [("6", "7"), ("4", "8"), ("1", "9")]


def configs():
    c = {}

    def add(name, **kw):
        c[name] = {**DEFAULT, **kw}

    add("ref")
    add("frozen", epochs=0)
    add("v1", base="1")
    add("e10", epochs=10)
    add("e15", epochs=15)
    add("lr5e-4", lr=5e-4)
    add("lr2e-3", lr=2e-3)
    add("lr3e-3", lr=3e-3)
    add("e10_lr2e-3", epochs=10, lr=2e-3)
    add("m0.1", margin=0.1)
    add("m0.3", margin=0.3)
    add("m0.4", margin=0.4)
    add("s16", scale=16.0)
    add("s45", scale=45.0)
    add("sp0.25", speed=0.25)
    add("p4", pitch=4.0)
    add("pp1", pitch_p=1.0)
    add("warp0.1", warp=0.1)
    add("warp0.15", warp=0.15)
    add("tm1", tmask=1)
    add("fm1", fmask=1)
    add("tmfm1", tmask=1, fmask=1)
    add("tmfm2", tmask=2, fmask=2)
    add("full", full=True)
    add("e10_ema.99", epochs=10, ema=0.99)
    add("e10_ema.995", epochs=10, ema=0.995)
    add("frz2", freeze=2)
    add("frz4", freeze=4)
    add("lld0.5", lld=0.5)
    add("sc0.5", supcon=0.5)
    add("sc1", supcon=1.0)
    add("bs32", bs=32)
    add("bs128", bs=128)
    add("crop64", crop=64)
    add("crop128", crop=128)
    add("wd1e-2", wd=1e-2)
    add("mix.5", mix=0.5)
    add("mix1", mix=1.0)
    add("e10_tmfm1_warp.1", epochs=10, tmask=1, fmask=1, warp=0.1)
    add("e10_tmfm1_warp.1_ema", epochs=10, tmask=1, fmask=1, warp=0.1, ema=0.995)
    add("e15_tmfm2_warp.15_ema", epochs=15, tmask=2, fmask=2, warp=0.15, ema=0.995)
    add("e10_sc.5_tmfm1", epochs=10, supcon=0.5, tmask=1, fmask=1)
    add("e10_mix.5_tmfm1", epochs=10, mix=0.5, tmask=1, fmask=1)
    add("e15_mix.5_tmfm1_warp.1", epochs=15, mix=0.5, tmask=1, fmask=1, warp=0.1)
    add("e10_m.3_tmfm1", epochs=10, margin=0.3, tmask=1, fmask=1)
    add("e10_lr2e-3_tmfm1_ema", epochs=10, lr=2e-3, tmask=1, fmask=1, ema=0.995)
    if os.environ.get("SWEEP_STAGE") == "2":
        c = {}
        for name in ["ref", "m0.4", "m0.5", "m0.6", "m0.4_s16", "m0.5_s20", "m0.3_s16", "m0.4_tmfm1", "m0.4_e10",
                     "m0.4_bs128", "m0.4_sc0.5", "m0.4_s16_tmfm1", "m0.5_s16", "m0.4_lld0.5",
                     "m0.4_e10_lr2e-3_tmfm1_ema", "m0.4_fm1", "m0.4_crop128", "m0.4_s16_e10", "m0.5_tmfm1", "m0.4_s20",
                     "m0.6_s16", "m0.4_frz4", "m0.4_bs32", "s16"]:
            kw = {}
            for part in name.split("_"):
                if part == "ref": continue
                if part.startswith("m"): kw["margin"] = float(part[1:])
                elif part.startswith("s") and part[1:].isdigit(): kw["scale"] = float(part[1:])
                elif part == "tmfm1": kw.update(tmask=1, fmask=1)
                elif part == "fm1": kw["fmask"] = 1
                elif part.startswith("e") and part[1:].isdigit(): kw["epochs"] = int(part[1:])
                elif part.startswith("bs"): kw["bs"] = int(part[2:])
                elif part.startswith("sc"): kw["supcon"] = float(part[2:])
                elif part.startswith("lld"): kw["lld"] = float(part[3:])
                elif part.startswith("lr"): kw["lr"] = float(part[2:])
                elif part == "ema": kw["ema"] = 0.995
                elif part.startswith("crop"): kw["crop"] = int(part[4:])
                elif part.startswith("frz"): kw["freeze"] = int(part[3:])
                else: raise ValueError(part)
            add(name, **kw)
    return c


ORDER = ["ref", "frozen", "e10", "tmfm1", "tmfm2", "warp0.1", "lld0.5", "e10_tmfm1_warp.1", "e10_tmfm1_warp.1_ema",
         "e15_tmfm2_warp.15_ema", "mix.5", "e10_mix.5_tmfm1", "e15", "lr2e-3", "lr5e-4", "m0.3", "m0.1", "s16", "sc0.5",
         "frz2", "e10_ema.995", "bs32", "crop128", "p4", "sp0.25", "full", "v1"]


def tasks(names):
    out = []
    if os.environ.get("SWEEP_STAGE") == "2":
        for name in names:
            for val in ["yweweler", "nicolas", "theo"]:
                for seed in (0, 1):
                    out.append((name, val, seed, ()))
                for hide in HIDES[:2]:
                    out.append((name, val, 0, hide))
        return out
    for name in names:
        for val in VALS:
            for seed in (0, 1):
                out.append((name, val, seed, ()))
            for hide in HIDES[:2]:
                out.append((name, val, 0, hide))
    return out


_DATA = {}


def _data():
    if not _DATA:
        d = np.load(os.environ.get("SWEEP_CACHE", CACHE))
        _DATA.update({k: d[k] for k in d.files})
    return _DATA


def spec_masks(X, lengths, cfg, g):
    import torch
    B, Fq, T = X.shape
    valid = (torch.arange(T, device=X.device)[None, :] < lengths[:, None]).float()[:, None, :]
    mean = (X * valid).sum((1, 2), keepdim=True) / (valid.sum((1, 2), keepdim=True) * Fq)
    m = torch.zeros(B, Fq, T, dtype=torch.bool, device=X.device)
    fi = torch.arange(Fq, device=X.device)[None, :, None]
    ti = torch.arange(T, device=X.device)[None, None, :]
    U = lambda *s: torch.rand(*s, generator=g).to(X.device)  # noqa: E731
    for _ in range(cfg["fmask"]):
        fw = (U(B, 1, 1) * (cfg["fmask_w"] + 1)).floor()
        f0 = (U(B, 1, 1) * (Fq - fw)).floor()
        m |= (fi >= f0) & (fi < f0 + fw)
    for _ in range(cfg["tmask"]):
        tw = (U(B, 1, 1) * cfg["tmask_w"] * lengths[:, None, None].float()).floor()
        t0 = (U(B, 1, 1) * (lengths[:, None, None].float() - tw)).floor()
        m |= (ti >= t0) & (ti < t0 + tw)
    return torch.where(m, mean, X) * valid + math.log(1e-6) * (1 - valid)


def adapt(cfg, train_ids, seed, dev):
    import copy

    import torch
    import torch.nn.functional as F
    cnn, training = _load_pkg()
    D = _data()
    mels, offsets, lengths, labels = D["mels"], D["offsets"], D["lengths"], D["labels"]
    base = cnn.AudioCNN()
    base.load_state_dict(torch.load(os.path.join(ROOT, "simsearch", "weights", f"cnn-v{cfg['base']}.pt"),
                                    map_location="cpu", weights_only=True))
    base = base.to(dev).eval()
    if cfg["epochs"] == 0:
        return base.requires_grad_(False)
    names = sorted(set(labels[train_ids].tolist()))
    y_all = np.array([names.index(v) for v in labels[train_ids]], dtype=np.int64)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base).train().requires_grad_(True)
    head = training.AMSoftmax(model.proj.out_features, len(names), cfg["scale"], cfg["margin"]).to(dev)
    from simsearch import adapt as product  # the shipped recipe starts the head from the class prototypes too
    head.w.data = product._class_means(base, mels, offsets[train_ids], lengths[train_ids], y_all, len(names)).to(dev)
    groups = []
    for bi in range(4):
        ps = []
        for j in (2 * bi, 2 * bi + 1):
            ps += list(model.convs[j].parameters())
        if 2 * bi + 1 < cfg["freeze"]:
            for p in ps:
                p.requires_grad_(False)
            continue
        groups.append({"params": ps, "lr": cfg["lr"] * cfg["lld"] ** (3 - bi)})
    groups.append({"params": list(model.proj.parameters()) + list(head.parameters()), "lr": cfg["lr"]})
    opt = torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["wd"])
    steps = math.ceil(len(y_all) / cfg["bs"]) * cfg["epochs"]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[gr["lr"] for gr in groups], total_steps=steps + 5,
                                                pct_start=cfg["pct"])
    ema = None
    if cfg["ema"]:
        ema = torch.optim.swa_utils.AveragedModel(
            model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg["ema"]), use_buffers=True)
    for _ in range(cfg["epochs"]):
        for ids in training.make_batches(lengths[train_ids], np.arange(len(y_all)), cfg["bs"], rng):
            X, xl = training.crop_batch(mels, offsets, lengths, np.asarray(train_ids)[ids], cfg["crop"], rng, True,
                                        speed=cfg["speed"], pitch=cfg["pitch"], pitch_probability=cfg["pitch_p"],
                                        warp=cfg["warp"])
            if cfg["full"]:
                X = training.augment(X, xl, g)
            X, xl = X.to(dev), xl.to(dev)
            if cfg["tmask"] or cfg["fmask"]:
                X = spec_masks(X, xl, cfg, g)
            y = torch.from_numpy(y_all[ids]).to(dev)
            if cfg["mix"] and rng.random() < cfg["mix"]:
                lam = float(rng.beta(cfg["mix_alpha"], cfg["mix_alpha"]))
                lam = max(lam, 1 - lam)
                perm = torch.randperm(len(y), generator=g).to(dev)
                Xm = torch.logaddexp(X + math.log(lam), X[perm] + math.log(1 - lam))
                xl2 = torch.maximum(xl, xl[perm])
                emb = model(Xm, xl2)
                cos = emb @ F.normalize(head.w, dim=1).T
                l1 = F.cross_entropy(head.s * (cos - head.m * F.one_hot(y, cos.shape[1])), y)
                l2 = F.cross_entropy(head.s * (cos - head.m * F.one_hot(y[perm], cos.shape[1])), y[perm])
                loss = lam * l1 + (1 - lam) * l2
            else:
                emb = model(X, xl)
                loss, _ = head(emb, y)
                if cfg["supcon"]:
                    loss = loss + cfg["supcon"] * training.supcon(emb, y)
                if cfg["distill"]:
                    with torch.no_grad():
                        target = base(X, xl)
                    loss = loss + cfg["distill"] * (1 - (emb * target).sum(1)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update_parameters(model)
    final = ema.module if ema is not None else model
    return final.eval().requires_grad_(False)


def auroc(pos, neg):
    # evaluate_openset.auroc would import the whole package (soundfile, faiss), absent on a GPU image
    s = np.concatenate([pos, neg])
    order = s.argsort(kind="stable")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def run_task(task, cfgs, dev):
    name, val, seed, hide = task
    cfg = cfgs[name]
    D = _data()
    labels, groups = D["labels"], D["groups"]
    train_ids = np.array([i for i in range(len(labels))
                          if groups[i] in TRAIN_POOL and groups[i] != val and labels[i] not in hide])
    t0 = time.perf_counter()
    model = adapt(cfg, train_ids, seed, dev)
    train_s = time.perf_counter() - t0
    q = np.flatnonzero(groups == val)
    _, training = _load_pkg()
    E = training.embed_cached(model, D["mels"], D["offsets"], D["lengths"], np.concatenate([q, train_ids]))
    Eq, Er = E[:len(q)], E[len(q):]
    S = Eq @ Er.T
    rl = labels[train_ids]
    top = np.argsort(-S, 1)[:, :10]
    res = {"name": name, "val": val, "seed": seed, "hide": ",".join(hide), "train_s": round(train_s, 2)}
    nn1 = rl[top[:, 0]]
    voted, best, top3 = [], [], []
    for r in range(len(q)):
        sims, labs = S[r, top[r]], rl[top[r]]
        w = {}
        for s_, l_ in zip(sims, labs):
            w[l_] = w.get(l_, 0.0) + math.exp((s_ - sims[0]) / 0.05)
        win = max(w, key=lambda k: (w[k], k))
        voted.append(win)
        best.append(sims[labs == win].max())
        same = np.sort(S[r, rl == win])[::-1]
        top3.append(same[:3].mean())
    voted, best, top3 = np.array(voted), np.array(best), np.array(top3)
    protos = np.stack([Er[rl == c].mean(0) for c in sorted(set(rl))])
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    pbest = (Eq @ protos.T).max(1)
    known = ~np.isin(labels[q], list(hide))
    res["top1"] = round(float((nn1[known] == labels[q][known]).mean()), 4)
    res["vote"] = round(float((voted[known] == labels[q][known]).mean()), 4)
    if hide:
        res["auroc"] = round(auroc(best[known], best[~known]), 4)
        res["auroc_top3"] = round(auroc(top3[known], top3[~known]), 4)
        res["auroc_proto"] = round(auroc(pbest[known], pbest[~known]), 4)
    return res


def worker(queue, outq, cfgs, dev_name, deadline):
    import torch
    torch.set_num_threads(1)
    dev = torch.device(dev_name)
    while True:
        task = queue.get()
        if task is None:
            return
        if time.time() > deadline:
            outq.put({"name": task[0], "val": task[1], "error": "deadline"})
            continue
        try:
            outq.put(run_task(task, cfgs, dev))
        except Exception as e:  # keep the sweep going
            outq.put({"name": task[0], "val": task[1], "error": repr(e)})


def prepare(fsdd_dir: str, cache: str) -> None:
    """Decode FSDD with the product's reader and front end; keep only log-mels, labels, speakers."""
    import glob

    from simsearch import adapt, audio, cnn
    paths = sorted(glob.glob(os.path.join(fsdd_dir, "*.wav")))
    waves = [audio.load(p, sample_rate=cnn.SAMPLE_RATE).samples for p in paths]
    names = [os.path.basename(p).split("_") for p in paths]
    mels, offsets, lengths = adapt.mel_bank(waves)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    np.savez(cache, mels=mels, offsets=offsets, lengths=lengths, labels=np.array([n[0] for n in names]),
             groups=np.array([n[1] for n in names]))
    print(f"{len(paths)} clips -> {cache}")


def summary(files: list[str]) -> None:
    import collections
    rows = collections.defaultdict(list)
    for path in files:
        with open(path) as f:
            for r in map(json.loads, f):
                if "error" not in r:
                    rows[r["name"]].append(r)
    mean = lambda key, rs: float(np.mean([r[key] for r in rs])) if rs else float("nan")  # noqa: E731
    table = []
    for name, rs in rows.items():
        closed, hidden = [r for r in rs if not r["hide"]], [r for r in rs if r["hide"]]
        table.append((name, mean("top1", closed), mean("vote", closed), mean("top1", hidden), mean("auroc", hidden),
                      len(rs)))
    print(f"{'recipe':28s} 1-NN   vote   1-NN(8 digits)  AUROC  runs")
    for name, top1, vote, known, au, n in sorted(table, key=lambda t: -t[1]):
        print(f"{name:28s} {top1:.3f}  {vote:.3f}  {known:.3f}           {au:.3f}  {n}")


def main():
    import argparse
    import multiprocessing as mp
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("fsdd_dir")
    p.add_argument("--cache", default=CACHE)
    p = sub.add_parser("summary")
    p.add_argument("results", nargs="+")
    p = sub.add_parser("run")
    p.add_argument("out")
    p.add_argument("--stage", choices=["1", "2"], default="1")
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--only", default="")
    p.add_argument("--seconds", type=float, default=1e9, help="stop starting runs after this long")
    a = ap.parse_args()
    if a.command == "prepare":
        return prepare(a.fsdd_dir, a.cache)
    if a.command == "summary":
        return summary(a.results)
    os.environ["SWEEP_STAGE"] = a.stage  # inherited by the spawned workers
    import torch
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfgs = configs()
    names = a.only.split(",") if a.only else [n for n in ORDER if n in cfgs] + [n for n in cfgs if n not in ORDER]
    todo = tasks(names)
    ctx = mp.get_context("spawn")
    queue, outq = ctx.Queue(), ctx.Queue()
    for t in todo:
        queue.put(t)
    procs = [ctx.Process(target=worker, args=(queue, outq, cfgs, dev, time.time() + a.seconds))
             for _ in range(a.workers)]
    for _ in procs:
        queue.put(None)
    for p in procs:
        p.start()
    os.makedirs(a.out, exist_ok=True)
    t0 = time.time()
    with open(os.path.join(a.out, "results.jsonl"), "a") as f:
        for _ in range(len(todo)):
            r = outq.get()
            r["t"] = round(time.time() - t0, 1)
            f.write(json.dumps(r) + "\n")
            f.flush()
            print(json.dumps(r), flush=True)
    for p in procs:
        p.join()


if __name__ == "__main__":
    main()
