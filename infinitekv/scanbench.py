"""The cold tier's index alone, without a model: `ikv bench scan`.

- Bandwidth: this machine's memcpy (bytes copied per second by a numpy copy of 256 MiB, best of several), then each
  search backend's flat scan at each size: H = 3 kv-heads, B = 8 signature bytes (head_dim 64), k = 256, one query
  per head, random signatures and float16 weights as the archive holds them. GB/s counts the signature (+ weight, in
  weighted mode) bytes read per call; every backend's result is checked equal to the numpy reference. "numba" is
  what backend "auto" runs on this CPU (the weighted scan by cpu_scan's vector kernel where it runs), "numba-1t"
  the same on one thread, "numba-scalar" numba's own loop in its place.
- Long contexts: one decode step's cold selection per layer (first stage with a shortlist of `index_k` per kv-head,
  int8 rerank, top-64), the flat scan against the two-level ClusterIndex (index.py), on real records in a RAM
  archive, with the share of the exact top-64 (int8 keys, every token) each one selects; random keys (no structure
  for clusters to find) and clustered ones (keys around a few hundred centres, consecutive tokens sharing a centre
  in runs, as in text). The largest size is the path-to-1M figure: per-step time of the index alone, per layer.
"""

from __future__ import annotations

import importlib.util
import os
import time

import numba
import numpy as np

from infinitekv import codec, cpu_scan, receipts
from infinitekv.archive import Archive, Layout
from infinitekv.attention import RetrievalConfig, select_cold_blocks
from infinitekv.index import CLUSTER_TOKENS, ClusterIndex
from infinitekv.search import ResidentIndex, cuda_scan_ready, search

FLAT_BACKENDS = {"weighted": ("numpy", "numba", "numba-1t", "numba-scalar"),
                 "hamming": ("numpy", "numba", "numba-1t", "faiss")}
N_HEADS, N_BYTES = 3, 8


def _run_search(sigs, weights, queries, k, mode, backend):
    if backend == "numba-scalar":  # the numba loop where the CPU's vector kernel would run
        with cpu_scan.switched_off():
            return search(sigs, weights, queries, k, mode=mode, backend="numba")
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


def device_memcpy_gbs(repeat: int) -> float:
    """Bytes copied per second by one device-to-device copy of 1 GiB on the GPU (best of several), as memcpy_gbs."""
    import torch

    source = torch.ones(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    return source.numel() / gpu_ms(lambda: target.copy_(source), repeat) / 1e6


def gpu_ms(fn, repeat: int) -> float:
    """Best time of fn on the GPU's stream, in ms (CUDA events; one warm-up)."""
    import torch

    fn()
    times = []
    for _ in range(repeat):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return min(times)


def kernel_ms(index: ResidentIndex, queries: np.ndarray, mode: str, repeat: int) -> float:
    """The scan kernel alone over a resident index (no top-k, no copy back): what bandwidth it reaches."""
    import torch

    from infinitekv import search as S

    ext = S._cuda_extension()
    if mode == "weighted":
        luts = torch.from_numpy(S.score_luts(queries, mode)).cuda()
        return gpu_ms(lambda: ext.weighted_scores(index.sigs, index.weights, luts, index.n_tokens, 0, 0), repeat)
    bits = torch.from_numpy(S.query_bits(queries)).cuda()
    return gpu_ms(lambda: ext.hamming_scores(index.sigs, bits, index.n_tokens, 0, 0), repeat)


def random_archive(rng, n):
    sigs = rng.integers(0, 256, (n, N_HEADS, N_BYTES), dtype=np.uint8)
    weights = rng.random((n, N_HEADS), dtype=np.float32).astype(np.float16)
    return sigs, weights, lambda: rng.standard_normal((N_HEADS, 8 * N_BYTES))


def flat_scans(sizes, k: int, repeat: int, memcpy: float, device_memcpy: float | None = None) -> list[dict]:
    """Each backend's flat scan; with device_memcpy (a GPU with the kernel built), also the resident index on the GPU
    ("cuda-resident": the whole call, LUT upload, scan, top-k and the copy back; "cuda-kernel": the scan alone),
    whose shares are of the device's copy bandwidth."""
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        sigs, weights, draw = random_archive(rng, n)
        queries = np.asarray(draw(), np.float32)
        resident = None
        if device_memcpy is not None:
            resident = ResidentIndex("cuda")
            resident.append(sigs, weights)
        for mode, backends in FLAT_BACKENDS.items():
            ms, results = {}, {}
            # faiss-cpu is a dependency, but an environment can lack it (a GPU image with its own packages)
            available = tuple(b for b in backends if b != "faiss" or importlib.util.find_spec("faiss") is not None)
            for backend in available + (("cuda-resident",) if resident else ()):
                if backend == "cuda-resident":
                    run = lambda: tuple(a[0] for a in resident.search_many(queries[None], k, mode=mode))  # noqa: E731
                else:
                    run = lambda: _run_search(sigs, weights, queries, k, mode, backend)  # noqa: E731
                ms[backend] = best_ms(run, repeat if backend != "numpy" or n <= 100_000 else 1)
                results[backend] = run()
            if resident is not None:
                ms["cuda-kernel"] = kernel_ms(resident, queries, mode, repeat)
            reference = results["numpy"]
            for backend, (scores, ids) in results.items():
                if not (np.array_equal(scores, reference[0]) and np.array_equal(ids, reference[1])):
                    raise AssertionError(f"backend {backend} ({mode}, N={n}) differs from the numpy reference")
            read = sigs.nbytes + (weights.nbytes if mode == "weighted" else 0)
            gbs = {backend: read / t / 1e6 for backend, t in ms.items()}
            rows.append({"n": n, "mode": mode, "bytes_read": read, "ms": ms, "gb_per_s": gbs,
                         "pct_of_memcpy": {b: 100 * g / (device_memcpy if b.startswith("cuda") else memcpy)
                                           for b, g in gbs.items()}})
    return rows


def _ram_archive(keys: np.ndarray):
    """A RAM archive of one layer holding keys [n, H, D] (zero values, identity rotation), appended in prefill-chunk
    sized pieces as the engine spills them."""
    n, n_heads, head_dim = keys.shape
    layout = Layout(n_layers=1, n_kv_heads=n_heads, head_dim=head_dim, record_bytes=codec.record_bytes(head_dim))
    archive = Archive.create(None, layout, "scan-bench", mode="ram", rotation=np.eye(head_dim, dtype=np.float32))
    archive.set_key_mean(0, np.zeros((n_heads, head_dim), np.float32))
    zeros = np.zeros((min(n, 1 << 16) * n_heads, head_dim), np.float32)
    for lo in range(0, n, 1 << 16):
        part = keys[lo : lo + (1 << 16)]
        records = codec.encode_records(part.reshape(-1, head_dim), zeros[: part.shape[0] * n_heads])
        archive.append(0, records.reshape(len(part), n_heads, -1))
    return archive


def random_keys(rng, n):
    keys = rng.standard_normal((n, N_HEADS, 8 * N_BYTES), dtype=np.float32)
    return keys, lambda: rng.standard_normal((N_HEADS, 1, 1, 8 * N_BYTES)).astype(np.float32)


def clustered_keys(rng, n, centres=300, stay=0.9):
    """Keys around `centres` centres; the next token keeps its centre with prob `stay` (runs, as topics in text)."""
    d = 8 * N_BYTES
    means = rng.standard_normal((N_HEADS, centres, d)).astype(np.float32)
    switch = rng.random(n) > stay
    centre = rng.integers(0, centres, n)[np.maximum.accumulate(np.where(switch, np.arange(n), 0))]
    keys = np.empty((n, N_HEADS, d), np.float32)
    for lo in range(0, n, 1 << 16):
        hi = min(n, lo + (1 << 16))
        keys[lo:hi] = means[:, centre[lo:hi]].transpose(1, 0, 2) + 0.7 * rng.standard_normal((hi - lo, N_HEADS, d))
    draw = lambda: (means[:, rng.integers(0, centres)] + 0.7 * rng.standard_normal((N_HEADS, d)))[:, None, None]  # noqa: E731
    return keys, lambda: np.asarray(draw(), np.float32)


def index_steps(sizes, shortlist: int, repeat: int, queries: int, segment: int, retrieved: int = 64) -> list[dict]:
    """One decode step's cold selection for one layer (first stage + rerank + top-`retrieved`), flat against
    two-level, and the share of the exact top-`retrieved` (by the int8 keys, over every token) each one picks."""
    rows = []
    config = RetrievalConfig(shortlist=shortlist, select_block=1)
    for n in sizes:
        for kind, make in (("random", random_keys), ("clustered", clustered_keys)):
            keys, draw = make(np.random.default_rng(1), n)
            archive = _ram_archive(keys)
            x = codec.decode_keys_rotated(np.asarray(archive.records(0)), 8 * N_BYTES)
            del keys
            start = time.perf_counter()
            clusters = ClusterIndex(segment)
            clusters.sync(archive, 0)
            build = time.perf_counter() - start
            drawn = [draw() for _ in range(queries)]
            step = lambda q, c: select_cold_blocks(archive, 0, q, [(0, 1)], config, retrieved, c)  # noqa: E731
            flat_ms = best_ms(lambda: step(drawn[0], None), repeat)
            index_ms = best_ms(lambda: step(drawn[0], clusters), repeat)
            recall = {"flat": [], "two_level": []}
            for q in drawn:
                exact = np.einsum("nhd,hd->hn", x, q[:, 0, 0])
                want = np.argpartition(-exact, retrieved, axis=1)[:, :retrieved]
                for name, c in (("flat", None), ("two_level", clusters)):
                    got = step(q, c)[:, 0]
                    recall[name] += [len(np.intersect1d(a, b)) / retrieved for a, b in zip(got, want)]
            rows.append({"n": n, "data": kind, "shortlist": shortlist, "clustered_tokens": clusters.covered,
                         "flat_ms": flat_ms, "two_level_ms": index_ms, "flat_recall": float(np.mean(recall["flat"])),
                         "two_level_recall": float(np.mean(recall["two_level"])), "build_s": build})
            del x, archive, clusters
    return rows


def bench_scan(sizes=(12_000, 131_072, 1_000_000), index_sizes=(12_000, 131_072, 1_000_000), repeat: int = 5,
               k: int = 256, index_k: int = 1024, queries: int = 8, segment: int | None = None) -> dict:
    """Receipt parts: memcpy, flat scan bandwidth per backend, flat vs two-level per-step time and recall.
    segment: tokens clustered together by the two-level index (default: RetrievalConfig's cluster_segment)."""
    segment = RetrievalConfig().cluster_segment if segment is None else segment
    memcpy = memcpy_gbs(repeat)
    gpu = cuda_scan_ready() is None
    device_memcpy = device_memcpy_gbs(repeat) if gpu else None
    flat = flat_scans(sizes, k, repeat, memcpy, device_memcpy)
    steps = index_steps(index_sizes, index_k, repeat, queries, segment)
    metrics = {"memcpy_gb_per_s": receipts.metric(round(memcpy, 2), "GB/s")}
    if gpu:
        metrics["device_memcpy_gb_per_s"] = receipts.metric(round(device_memcpy, 2), "GB/s")
    for row in flat:
        for backend in ("numba", "numba-1t", "numba-scalar", "faiss", "cuda-resident", "cuda-kernel"):
            if backend in row["ms"]:
                name = f"{row['mode']}_{backend.replace('-', '_')}_at_{row['n']}"
                metrics[f"{name}_ms"] = receipts.metric(round(row["ms"][backend], 3), "ms per call")
                metrics[f"{name}_pct_of_memcpy"] = receipts.metric(round(row["pct_of_memcpy"][backend], 1), "%")
    for row in steps:
        name = f"{row['data']}_at_{row['n']}"
        metrics[f"flat_step_ms_{name}"] = receipts.metric(round(row["flat_ms"], 3), "ms per layer")
        metrics[f"two_level_step_ms_{name}"] = receipts.metric(round(row["two_level_ms"], 3), "ms per layer")
        for which in ("flat", "two_level"):
            metrics[f"{which}_recall_{name}"] = receipts.metric(round(row[f"{which}_recall"], 3),
                                                               "share of the exact top-64 selected")
    config = {"sizes": list(sizes), "index_sizes": list(index_sizes), "repeat": repeat, "k": k, "index_k": index_k,
              "queries": queries, "kv_heads": N_HEADS, "signature_bytes": N_BYTES,
              "numba_threads": numba.get_num_threads(), "cluster_segment": segment,
              "cluster_tokens": CLUSTER_TOKENS, "load_average": os.getloadavg()[0],
              "gpu_scan": gpu, "cpu_vector_kernel": cpu_scan.unavailable() or "runs"}
    return {"config": config, "outputs": {"flat": flat, "index": steps}, "metrics": metrics}
