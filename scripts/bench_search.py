"""Time the signature search: python scripts/bench_search.py [--sizes ...] [--index-sizes ...] [--json OUT.json].

Flat scan: H = 3 kv-heads, B = 8 signature bytes (head_dim 64), k = 256, random signatures and weights, one query
per head. Prints the best-of-repeat time per call in ms, each backend's speed-up over the numpy reference
("numba-1t" is the numba backend held to the calling thread), and its scan bandwidth: signature (+ weight, weighted
mode) bytes read per call / time, also as a % of this machine's memcpy bandwidth (bytes copied per second by a numpy
copy of a 256 MiB array, best of several). Checks every backend returns exactly what numpy returns.

Two-level index (infinitekv/index.py): per-step time of one search (Q = 1 query per kv-head, k = --index-k, the
attention's shortlist) for the flat numba scan and for BlockIndex, at each --index-sizes, on random signatures (the
worst case for block summaries) and on clustered ones (keys drawn around a few hundred centres, consecutive tokens
sharing a centre in runs, as in text), with the two-level search's recall of the flat top-k. --json writes it all.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numba
import numpy as np

from infinitekv import index as two_level
from infinitekv.search import search, search_many

BACKENDS = {"weighted": ("numpy", "numba", "numba-1t"), "hamming": ("numpy", "numba", "numba-1t", "faiss")}
COLUMNS = ("numba", "numba-1t", "faiss")


def run_search(sigs, weights, queries, k, mode, backend):
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
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def memcpy_gbs(repeat: int) -> float:
    """Bytes copied per second by numpy, 256 MiB, best of repeat."""
    a = np.ones(1 << 25)
    b = np.empty_like(a)
    times = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    return a.nbytes / min(times) / 1e9


def clustered_archive(rng, n, n_heads, n_bytes, centres=300, stay=0.9):
    """Signatures and weights of keys around `centres` centres; the next token keeps the centre with prob `stay`."""
    d = 8 * n_bytes
    sigs = np.empty((n, n_heads, n_bytes), np.uint8)
    weights = np.empty((n, n_heads), np.float16)
    means = rng.standard_normal((n_heads, centres, d)).astype(np.float32)
    switch = rng.random(n) > stay
    which = rng.integers(0, centres, n)
    centre = which[np.maximum.accumulate(np.where(switch, np.arange(n), 0))]  # runs of one centre
    for lo in range(0, n, 1 << 16):
        hi = min(n, lo + (1 << 16))
        keys = means[:, centre[lo:hi]].transpose(1, 0, 2) + 0.7 * rng.standard_normal((hi - lo, n_heads, d))
        sigs[lo:hi] = np.packbits(keys < 0, axis=-1, bitorder="little")
        weights[lo:hi] = np.abs(keys).mean(axis=-1)
    queries = lambda: (means[:, rng.integers(0, centres)] + 0.7 * rng.standard_normal((n_heads, d)))  # noqa: E731
    return sigs, weights, queries


def random_archive(rng, n, n_heads, n_bytes):
    sigs = rng.integers(0, 256, (n, n_heads, n_bytes), dtype=np.uint8)
    weights = rng.random((n, n_heads), dtype=np.float32).astype(np.float16)
    return sigs, weights, lambda: rng.standard_normal((n_heads, 8 * n_bytes))


def bench_flat(args, memcpy, report) -> None:
    n_heads, n_bytes = 3, 8
    rng = np.random.default_rng(0)
    header = [f"{'N':>9}", f"{'mode':>9}", f"{'numpy ms':>9}"] + [f"{c + ' ms':>11}" for c in COLUMNS]
    print(" ".join(header + [f"{c + ' x':>10}" for c in COLUMNS] + [f"{c + ' GB/s (%)':>20}" for c in COLUMNS]))
    for n in args.sizes:
        sigs = rng.integers(0, 256, (n, n_heads, n_bytes), dtype=np.uint8)
        weights = rng.random((n, n_heads), dtype=np.float32).astype(np.float16)  # as the archive holds them
        queries = rng.standard_normal((n_heads, 8 * n_bytes)).astype(np.float32)
        for mode, backends in BACKENDS.items():
            ms, results = {}, {}
            for backend in backends:
                run = lambda: run_search(sigs, weights, queries, args.k, mode, backend)  # noqa: E731
                ms[backend] = best_ms(run, args.repeat if backend != "numpy" or n <= 100_000 else 1)
                results[backend] = run()
            for backend, (scores, ids) in results.items():
                ref_scores, ref_ids = results["numpy"]
                assert np.array_equal(scores, ref_scores) and np.array_equal(ids, ref_ids), (backend, mode, n)
            read = sigs.nbytes + (weights.nbytes if mode == "weighted" else 0)
            gbs = {b: read / ms[b] / 1e6 for b in ms}
            cells = [f"{ms[b]:11.2f}" if b in ms else f"{'-':>11}" for b in COLUMNS]
            ratios = [f"{ms['numpy'] / ms[b]:9.1f}x" if b in ms else f"{'-':>10}" for b in COLUMNS]
            bw = [f"{gbs[b]:11.2f} ({100 * gbs[b] / memcpy:4.0f}%)" if b in ms else f"{'-':>20}" for b in COLUMNS]
            print(f"{n:>9} {mode:>9} {ms['numpy']:9.2f} {' '.join(cells)} {' '.join(ratios)} {' '.join(bw)}")
            report["flat"].append({"n": n, "mode": mode, "bytes_read": read, "ms": ms, "gb_per_s": gbs,
                                   "pct_of_memcpy": {b: 100 * g / memcpy for b, g in gbs.items()}})


def bench_index(args, report) -> None:
    n_heads, n_bytes, k = 3, 8, args.index_k
    print(f"\ntwo-level index: k={k}, block={two_level.BLOCK}, blocks per query={two_level.BLOCKS_PER_QUERY}, "
          f"switched on from {two_level.TWO_LEVEL_FROM} cold tokens; per-step ms (best of {args.repeat}), "
          f"recall@{k} of the flat top-{k} over {args.queries} queries")
    print(f"{'N':>9} {'data':>10} {'flat ms':>9} {'2-level ms':>11} {'speed-up':>9} {'recall':>7} {'build s':>8}")
    for n in args.index_sizes:
        for kind, make in (("random", random_archive), ("clustered", clustered_archive)):
            rng = np.random.default_rng(1)
            sigs, weights, draw = make(rng, n, n_heads, n_bytes)
            t0 = time.perf_counter()
            index = two_level.BlockIndex(n_heads, n_bytes)
            for lo in range(0, n, 512):  # as tokens spill: one prefill chunk at a time
                index.extend(sigs[lo : lo + 512], weights[lo : lo + 512])
            build = time.perf_counter() - t0
            queries = [np.asarray(draw(), np.float32)[None] for _ in range(args.queries)]
            flat_ms = best_ms(lambda: search_many(sigs, weights, queries[0], k), args.repeat)
            index_ms = best_ms(lambda: index.search_many(sigs, weights, queries[0], k), args.repeat)
            recall = []
            for q in queries:
                _, want = search_many(sigs, weights, q, k)
                _, got = index.search_many(sigs, weights, q, k)
                recall += [len(np.intersect1d(a, b)) / want.shape[-1] for a, b in zip(want[0], got[0])]
            print(f"{n:>9} {kind:>10} {flat_ms:9.2f} {index_ms:11.2f} {flat_ms / index_ms:8.1f}x "
                  f"{np.mean(recall):7.3f} {build:8.1f}")
            report["index"].append({"n": n, "data": kind, "k": k, "flat_ms": flat_ms, "two_level_ms": index_ms,
                                    "recall": float(np.mean(recall)), "build_s": build})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[12_000, 100_000, 1_000_000])
    parser.add_argument("--index-sizes", type=int, nargs="*", default=[12_000, 131_072, 1_000_000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--index-k", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=8, help="queries per recall measurement")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--threads", type=int, default=1, help="numba threads (1: a shared machine's scheduler "
                        "would otherwise time the wait for a second core, not the scan)")
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    memcpy = memcpy_gbs(args.repeat)
    print(f"numba threads={numba.get_num_threads()}, best of {args.repeat} (numpy once at N > 100k), "
          f"load average {os.getloadavg()[0]:.1f}, memcpy {memcpy:.2f} GB/s (bytes copied per second)")
    report = {"command": "python scripts/bench_search.py " + " ".join(os.sys.argv[1:]), "memcpy_gb_per_s": memcpy,
              "numba_threads": numba.get_num_threads(), "load_average": os.getloadavg()[0], "flat": [], "index": []}
    if args.sizes:
        bench_flat(args, memcpy, report)
    if args.index_sizes:
        bench_index(args, report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
