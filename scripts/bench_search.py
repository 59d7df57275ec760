"""Time the signature search backends: python scripts/bench_search.py [--sizes 12000 100000 1000000] [--repeat 5].

H = 3 kv-heads, B = 8 signature bytes (head_dim 64), k = 256, random signatures and weights, one query per head.
Prints the best-of-repeat time per call in ms and each backend's speed-up over the numpy reference ("numba-1t" is
the numba backend held to the calling thread); also checks every backend returns exactly what numpy returns.
"""

from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np

from infinitekv.search import search

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[12_000, 100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--k", type=int, default=256)
    args = parser.parse_args()
    n_heads, n_bytes = 3, 8
    rng = np.random.default_rng(0)
    print(f"H={n_heads} B={n_bytes} k={args.k}, numba threads={numba.get_num_threads()}, best of {args.repeat} "
          f"(numpy once at N > 100k), load average {os.getloadavg()[0]:.1f}")
    header = [f"{'N':>9}", f"{'mode':>9}", f"{'numpy ms':>9}"] + [f"{c + ' ms':>11}" for c in COLUMNS]
    print(" ".join(header + [f"{c + ' x':>10}" for c in COLUMNS]))
    for n in args.sizes:
        sigs = rng.integers(0, 256, (n, n_heads, n_bytes), dtype=np.uint8)
        weights = rng.random((n, n_heads), dtype=np.float32)
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
            cells = [f"{ms[b]:11.2f}" if b in ms else f"{'-':>11}" for b in COLUMNS]
            ratios = [f"{ms['numpy'] / ms[b]:9.1f}x" if b in ms else f"{'-':>10}" for b in COLUMNS]
            print(f"{n:>9} {mode:>9} {ms['numpy']:9.2f} {' '.join(cells)} {' '.join(ratios)}")


if __name__ == "__main__":
    main()
