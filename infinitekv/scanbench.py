"""The cold tier's index alone, without a model: `ikv bench scan`.

- Bandwidth: this machine's memcpy (bytes copied per second by a numpy copy of 256 MiB, best of several), then each
  search backend's flat scan at each size: H = 3 kv-heads, B = 8 signature bytes (head_dim 64), k = 256, one query
  per head, random signatures and float16 weights as the archive holds them. GB/s counts the signature (+ weight, in
  weighted mode) bytes read per call; every backend's result is checked equal to the numpy reference.
- Long contexts: one retrieval step per layer (the first stage's shortlist of `index_k` per kv-head) for the flat
  numba scan and the two-level BlockIndex (index.py), with the two-level search's recall of the flat top-k, on random
  signatures (the worst case for block summaries) and clustered ones (keys around a few hundred centres, consecutive
  tokens sharing a centre in runs, as in text). The largest size is the path-to-1M figure: per-step time of the index
  alone, per layer.
"""

from __future__ import annotations

import os
import time

import numba
import numpy as np

from infinitekv import index as two_level
from infinitekv import receipts
from infinitekv.search import search, search_many

FLAT_BACKENDS = {"weighted": ("numpy", "numba", "numba-1t"), "hamming": ("numpy", "numba", "numba-1t", "faiss")}
N_HEADS, N_BYTES = 3, 8


def _run_search(sigs, weights, queries, k, mode, backend):
    if backend != "numba-1t":
        return search(sigs, weights, queries, k, mode=mode, backend=backend)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)  # the numba backend on the calling thread only
    try:
        return search(sigs, weights, queries, k, mode=mode, backend="numba")
    finally:
        numba.set_num_threads(threads)


def best_ms(fn, repeat: int) -> float:
    fn()  # warm-up: numba compile or cache load, faiss import
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def memcpy_gbs(repeat: int) -> float:
    source = np.ones(1 << 25)
    target = np.empty_like(source)
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        np.copyto(target, source)
        times.append(time.perf_counter() - start)
    return source.nbytes / min(times) / 1e9


def clustered_archive(rng, n, centres=300, stay=0.9):
    """Signatures and weights of keys around `centres` centres; the next token keeps its centre with prob `stay`."""
    d = 8 * N_BYTES
    sigs = np.empty((n, N_HEADS, N_BYTES), np.uint8)
    weights = np.empty((n, N_HEADS), np.float16)
    means = rng.standard_normal((N_HEADS, centres, d)).astype(np.float32)
    switch = rng.random(n) > stay
    which = rng.integers(0, centres, n)
    centre = which[np.maximum.accumulate(np.where(switch, np.arange(n), 0))]  # runs of one centre
    for lo in range(0, n, 1 << 16):
        hi = min(n, lo + (1 << 16))
        keys = means[:, centre[lo:hi]].transpose(1, 0, 2) + 0.7 * rng.standard_normal((hi - lo, N_HEADS, d))
        sigs[lo:hi] = np.packbits(keys < 0, axis=-1, bitorder="little")
        weights[lo:hi] = np.abs(keys).mean(axis=-1)
    draw = lambda: means[:, rng.integers(0, centres)] + 0.7 * rng.standard_normal((N_HEADS, d))  # noqa: E731
    return sigs, weights, draw


def random_archive(rng, n):
    sigs = rng.integers(0, 256, (n, N_HEADS, N_BYTES), dtype=np.uint8)
    weights = rng.random((n, N_HEADS), dtype=np.float32).astype(np.float16)
    return sigs, weights, lambda: rng.standard_normal((N_HEADS, 8 * N_BYTES))


def flat_scans(sizes, k: int, repeat: int, memcpy: float) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        sigs, weights, draw = random_archive(rng, n)
        queries = np.asarray(draw(), np.float32)
        for mode, backends in FLAT_BACKENDS.items():
            ms, results = {}, {}
            for backend in backends:
                run = lambda: _run_search(sigs, weights, queries, k, mode, backend)  # noqa: E731
                ms[backend] = best_ms(run, repeat if backend != "numpy" or n <= 100_000 else 1)
                results[backend] = run()
            reference = results["numpy"]
            for backend, (scores, ids) in results.items():
                if not (np.array_equal(scores, reference[0]) and np.array_equal(ids, reference[1])):
                    raise AssertionError(f"backend {backend} ({mode}, N={n}) differs from the numpy reference")
            read = sigs.nbytes + (weights.nbytes if mode == "weighted" else 0)
            gbs = {backend: read / t / 1e6 for backend, t in ms.items()}
            rows.append({"n": n, "mode": mode, "bytes_read": read, "ms": ms, "gb_per_s": gbs,
                         "pct_of_memcpy": {b: 100 * g / memcpy for b, g in gbs.items()}})
    return rows


def index_steps(sizes, k: int, repeat: int, queries: int) -> list[dict]:
    rows = []
    for n in sizes:
        for kind, make in (("random", random_archive), ("clustered", clustered_archive)):
            rng = np.random.default_rng(1)
            sigs, weights, draw = make(rng, n)
            start = time.perf_counter()
            index = two_level.BlockIndex(N_HEADS, N_BYTES)
            for lo in range(0, n, 512):  # as tokens spill: one prefill chunk at a time
                index.extend(sigs[lo : lo + 512], weights[lo : lo + 512])
            build = time.perf_counter() - start
            drawn = [np.asarray(draw(), np.float32)[None] for _ in range(queries)]
            flat_ms = best_ms(lambda: search_many(sigs, weights, drawn[0], k), repeat)
            index_ms = best_ms(lambda: index.search_many(sigs, weights, drawn[0], k), repeat)
            recall = []
            for q in drawn:
                _, want = search_many(sigs, weights, q, k)
                _, got = index.search_many(sigs, weights, q, k)
                recall += [len(np.intersect1d(a, b)) / want.shape[-1] for a, b in zip(want[0], got[0])]
            rows.append({"n": n, "data": kind, "k": k, "flat_ms": flat_ms, "two_level_ms": index_ms,
                         "recall": float(np.mean(recall)), "build_s": build})
    return rows


def bench_scan(sizes=(12_000, 131_072, 1_000_000), index_sizes=(12_000, 131_072, 1_000_000), repeat: int = 5,
               k: int = 256, index_k: int = 1024, queries: int = 8) -> dict:
    """Receipt parts: memcpy, flat scan bandwidth per backend, flat vs two-level per-step time and recall."""
    memcpy = memcpy_gbs(repeat)
    flat = flat_scans(sizes, k, repeat, memcpy)
    steps = index_steps(index_sizes, index_k, repeat, queries)
    metrics = {"memcpy_gb_per_s": receipts.metric(round(memcpy, 2), "GB/s")}
    for row in flat:
        for backend in ("numba", "numba-1t", "faiss"):
            if backend in row["ms"]:
                name = f"{row['mode']}_{backend.replace('-', '_')}_at_{row['n']}"
                metrics[f"{name}_ms"] = receipts.metric(round(row["ms"][backend], 3), "ms per call")
                metrics[f"{name}_pct_of_memcpy"] = receipts.metric(round(row["pct_of_memcpy"][backend], 1), "%")
    for row in steps:
        name = f"{row['data']}_at_{row['n']}"
        metrics[f"flat_step_ms_{name}"] = receipts.metric(round(row["flat_ms"], 3), "ms per layer")
        metrics[f"two_level_step_ms_{name}"] = receipts.metric(round(row["two_level_ms"], 3), "ms per layer")
        metrics[f"two_level_recall_{name}"] = receipts.metric(round(row["recall"], 3), f"recall@{index_k}")
    config = {"sizes": list(sizes), "index_sizes": list(index_sizes), "repeat": repeat, "k": k, "index_k": index_k,
              "queries": queries, "kv_heads": N_HEADS, "signature_bytes": N_BYTES,
              "numba_threads": numba.get_num_threads(), "block": two_level.BLOCK,
              "blocks_per_query": two_level.BLOCKS_PER_QUERY, "two_level_from": two_level.TWO_LEVEL_FROM,
              "load_average": os.getloadavg()[0]}
    return {"config": config, "outputs": {"flat": flat, "index": steps}, "metrics": metrics}
