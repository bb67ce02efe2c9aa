"""Scale: the store at N synthetic vectors (default 1M, 128-d, clustered like embeddings).

    python bench/scale.py [--vectors 1000000] [--dir /tmp/simsearch-scale]

Populates an index through the Store API, then reports:

* the index type the store picked (from the sidecar) and how long the first build took;
* in a fresh process (what `simsearch query` would be): loading the cache, resident memory,
  search p50/p99 for one query (k = 10) and recall@10 against exact search, without a
  filter and with a filter (an ID selector allowing 10 % of the files); the same queries
  through exact search (``IndexFlatIP``) in the same process are the baseline ratio;
* adding 10k vectors and deleting 10k: the catch-up time against the full-rebuild time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import clustered_vectors, max_rss_mb, ms, populate, recall_at, report, timed

QUERIES = 300
K = 10


def child(directory: Path, queries_file: Path, filter_file: Path) -> None:
    """The measured process: open the store cold, load the cache, search; print JSON."""
    from simsearch.store import Store

    started = time.perf_counter()
    store = Store(directory)
    index = store.vector_index()
    load_s = time.perf_counter() - started
    queries = np.load(queries_file)
    allowed = np.load(filter_file)
    store.search(queries[:5], K)  # warm-up: page in the lists
    rows, again = iter(queries), iter(queries)
    plain = timed(lambda: store.search(next(rows)[None], K), QUERIES)
    filtered = timed(lambda: store.search(next(again)[None], K, allowed_ids=allowed), QUERIES)
    found = store.search(queries, K)[1]
    found_filtered = store.search(queries, K, allowed_ids=allowed)[1]
    rss = max_rss_mb()
    store.close()

    from simsearch import (
        Engine,  # the whole query path after the embedding: catalog, search by file, vote
    )

    started = time.perf_counter()
    engine = Engine(directory)
    engine.query_vectors(queries[0][None], k=K, unknown_threshold=0.5)
    engine_open_s = time.perf_counter() - started
    rows = iter(queries)
    engine_times = timed(lambda: engine.query_vectors(next(rows)[None], k=K, unknown_threshold=0.5), 100)
    print(json.dumps({"load_s": load_s, "rss_mb": rss, "plain": plain.tolist(), "filtered": filtered.tolist(),
                      "found": found.tolist(), "found_filtered": found_filtered.tolist(),
                      "index_type": type(index).__name__, "engine_open_s": engine_open_s,
                      "engine": engine_times.tolist(), "engine_rss_mb": max_rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/simsearch-scale"))
    parser.add_argument("--keep", action="store_true", help="reuse an index already populated in --dir")
    parser.add_argument("--child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    import faiss

    from simsearch.store import SIDECAR_NAME, Store, vector_cache

    n, directory = args.vectors, args.dir
    vectors = clustered_vectors(n, seed=0)
    queries = clustered_vectors(QUERIES, seed=99)
    figures = {"vectors": n}
    if not args.keep or not (directory / "simsearch.db").exists():
        shutil.rmtree(directory, ignore_errors=True)
        store = Store(directory)
        with store.writing():
            store.set_encoder("bench", "1", vectors.shape[1])
        started = time.perf_counter()
        populate(store, vectors)
        figures["populate_s (Store API)"] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()
        store.vector_index()
        figures["first build + save_s"] = round(time.perf_counter() - started, 1)
        store.close()
    sidecar = json.loads((directory / SIDECAR_NAME).read_text())
    figures["index_type (sidecar)"] = sidecar["index_type"]
    figures["nprobe"] = sidecar.get("nprobe")

    # Ground truth and the exact-search baseline: segment ids are 1..n in insertion order.
    ids = np.arange(1, n + 1, dtype=np.int64)
    files = (ids - 1) // 8
    allowed = ids[files % 10 == 3]  # a filter keeping 10 % of the files
    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
    exact.add_with_ids(vectors, ids)
    truth = exact.search(queries, K)[1]
    selector_params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(allowed))
    truth_filtered = exact.search(queries, K, params=selector_params)[1]
    rows = iter(queries)
    exact_times = timed(lambda: exact.search(next(rows)[None], K), 100)
    exact.reset()  # its 0.5 GB are not needed any more

    work = directory.parent / (directory.name + "-inputs")
    work.mkdir(exist_ok=True)
    np.save(work / "queries.npy", queries)
    np.save(work / "allowed.npy", allowed)
    out = subprocess.run([sys.executable, __file__, "--child", str(directory), str(work / "queries.npy"),
                          str(work / "allowed.npy")], check=True, capture_output=True, text=True)
    measured = json.loads(out.stdout.splitlines()[-1])
    plain, filtered = np.array(measured["plain"]), np.array(measured["filtered"])
    figures.update({
        "cold open + load cache_s": round(measured["load_s"], 2),
        "resident memory (fresh process)": f"{measured['rss_mb']:.0f} MiB",
        "search k=10": ms(plain),
        "search k=10, 10% filter": ms(filtered),
        "exact search (baseline, same run)": ms(exact_times),
        "speed-up p50 vs exact": f"{np.median(exact_times) / np.median(plain):.1f}x",
        "Engine.query_vectors (by file + vote)": ms(np.array(measured["engine"])),
        "  first query incl. catalog load_s": round(measured["engine_open_s"], 2),
        "  resident memory with the catalog": f"{measured['engine_rss_mb']:.0f} MiB",
        "recall@10 vs exact": round(recall_at(np.array(measured["found"]), truth), 4),
        "recall@10 vs exact, 10% filter": round(recall_at(np.array(measured["found_filtered"]), truth_filtered), 4),
    })

    # Catch-up: 10k new vectors, then 10k deleted; neither may rebuild from scratch.
    store = Store(directory)
    store.vector_index()
    rebuilds = []
    original = Store._rebuild
    Store._rebuild = lambda self: rebuilds.append(1) or original(self)
    try:
        fresh = clustered_vectors(10_000, seed=5)
        populate(store, fresh, first=n // 8 + 1, prefix="/bench/new")
        add_s = timed(store.vector_index, 1)[0]
        with store.writing():
            store.delete_files(list(range(1, 10_000 // 8 + 1)))
        delete_s = timed(store.vector_index, 1)[0]
        after = json.loads((directory / SIDECAR_NAME).read_text())
    finally:
        Store._rebuild = original
    rebuild_s = timed(lambda: vector_cache.build(vector_cache.layout_for(n), vectors, ids, vectors.shape[1]), 1)[0]
    figures.update({
        "add 10k: catch up + save_s": round(add_s, 2),
        "delete 10k: catch up + save_s": round(delete_s, 2),
        "full rebuild (baseline, same run)_s": round(rebuild_s, 2),
        "rebuilds during add/delete": len(rebuilds),
        "index_type after": after["index_type"],
        "vectors after": after["vectors"],
    })
    store.close()
    report("scale", figures)


if __name__ == "__main__":
    main()
