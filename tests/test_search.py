"""The signature search: every backend returns exactly what the numpy reference returns, ties included."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from infinitekv import codec, cpu_scan, search as S, threads
from infinitekv.search import score_ids, search, search_many

CSRC = Path(__file__).resolve().parent.parent / "csrc"
MODES = ("weighted", "hamming")


@pytest.fixture(params=["vector", "numba"])
def scan_kernel(request):
    """The weighted scores from cpu_scan's vector kernel (where it runs) or from numba's loop in its place."""
    if request.param == "numba":
        with cpu_scan.switched_off():
            yield request.param
        return
    if cpu_scan.unavailable() is not None:
        pytest.skip(f"the vector kernel does not run here: {cpu_scan.unavailable()}")
    yield request.param


def random_archive(n, n_heads=3, n_bytes=8, seed=0, duplicates=False, weight_dtype=np.float32):
    rng = np.random.default_rng(seed)
    sigs = rng.integers(0, 256, (n, n_heads, n_bytes), dtype=np.uint8)
    weights = rng.random((n, n_heads), dtype=np.float32).astype(weight_dtype)
    if duplicates:  # equal tokens have identical pre-RoPE keys at layer 0: whole runs of identical records
        source = rng.integers(0, max(1, n // 50), n)
        sigs, weights = sigs[source].copy(), weights[source].copy()
    queries = rng.standard_normal((n_heads, 8 * n_bytes)).astype(np.float32)
    return sigs, weights, queries


def assert_same(got, want):
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0].view(np.uint32), want[0].view(np.uint32))  # bit for bit
    assert got[0].dtype == np.float32 and got[1].dtype == np.int64


def assert_rows_best_first(scores, ids):
    # higher score first; equal scores -> lower token index first
    first, then = (scores[..., :-1], ids[..., :-1]), (scores[..., 1:], ids[..., 1:])
    assert ((first[0] > then[0]) | ((first[0] == then[0]) & (first[1] < then[1]))).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("duplicates", [False, True], ids=["random", "many_ties"])
@pytest.mark.parametrize("n_bytes", [8, 5, 16, 24])
def test_numba_equals_numpy_reference_including_ties(mode, duplicates, n_bytes):
    sigs, weights, queries = random_archive(3000, n_bytes=n_bytes, duplicates=duplicates)
    want = search(sigs, weights, queries, 100, mode=mode, backend="numpy")
    assert_same(search(sigs, weights, queries, 100, mode=mode, backend="numba"), want)
    assert_rows_best_first(*want)


@pytest.mark.parametrize("duplicates", [False, True], ids=["random", "many_ties"])
@pytest.mark.parametrize("n_bytes", [8, 5])
def test_numba_equals_numpy_with_float16_weights_as_the_archive_holds_them(duplicates, n_bytes, scan_kernel):
    sigs, weights, queries = random_archive(3000, n_bytes=n_bytes, duplicates=duplicates, seed=16,
                                            weight_dtype=np.float16)
    weights[::11] = 0
    weights[1::11] = np.float16(6e-6)  # subnormal float16s widen exactly too
    weights[2::11] = np.float16(3e-3)  # one weight on many rows: equal isums give equal scores
    weights.setflags(write=False)  # like archive.key_weights
    want = search(sigs, weights, queries, 200, backend="numpy", exclude_before=3)
    assert_same(search(sigs, weights, queries, 200, backend="numba", exclude_before=3), want)
    assert_same(S._search_numba(sigs, weights, queries, 200, "weighted", 3, chunk=97, dense=False), want)  # ties across chunks
    assert_same(S._search_numba(sigs, weights, queries, 200, "weighted", 3, dense=True), want)
    # the score uses the exact widening of each float16: float32 weights of the same values score the same
    assert_same(search(sigs, weights.astype(np.float32), queries, 200, backend="numba", exclude_before=3), want)
    assert_rows_best_first(*want)
    if duplicates:
        assert (want[0][:, 1:] == want[0][:, :-1]).any()  # ties were there to break


def test_float16_weights_widen_exactly_for_every_bit_pattern():
    import numba as nb

    @nb.njit
    def widen(w, out):
        for i in range(w.shape[0]):
            out[i] = S._weight_as_float32(w[i])

    bits = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(1 << 16, np.float32)
    widen(bits, out)
    np.testing.assert_array_equal(out.view(np.uint32), bits.view(np.float16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("mode", MODES)
def test_numba_merge_across_many_chunks_keeps_index_tie_break(mode):
    sigs, weights, queries = random_archive(5000, duplicates=True, seed=1)
    want = search(sigs, weights, queries, 300, mode=mode, backend="numpy", exclude_before=7)
    got = S._search_numba(sigs, weights, queries, 300, mode, 7, chunk=333, dense=False)  # 15 chunks, ties at edges
    assert_same(got, want)


@pytest.mark.parametrize("mode", MODES)
def test_numba_all_scores_path_keeps_index_tie_break(mode):
    sigs, weights, queries = random_archive(5000, duplicates=True, seed=3)
    want = search(sigs, weights, queries, 300, mode=mode, backend="numpy", exclude_before=7)
    assert_same(S._search_numba(sigs, weights, queries, 300, mode, 7, dense=True), want)


@pytest.mark.parametrize("mode", MODES)
def test_numba_parallel_scan_equals_numpy(mode, monkeypatch):
    monkeypatch.setattr(threads, "SERIAL_CELLS", 0)
    sigs, weights, queries = random_archive(20000, seed=2, duplicates=True)
    assert_same(search(sigs, weights, queries, 64, mode=mode, backend="numba"),
                search(sigs, weights, queries, 64, mode=mode, backend="numpy"))


def test_all_identical_tokens_come_back_in_index_order():
    sigs, weights, queries = random_archive(1, n_heads=2)
    sigs, weights = np.repeat(sigs, 1000, axis=0), np.repeat(weights, 1000, axis=0)
    for backend, mode in [("numpy", "weighted"), ("numba", "weighted"), ("numba", "hamming"), ("faiss", "hamming")]:
        _, ids = search(sigs, weights, queries, 10, mode=mode, backend=backend, exclude_before=3)
        np.testing.assert_array_equal(ids, np.tile(np.arange(3, 13), (2, 1)), err_msg=backend)


@pytest.mark.parametrize("duplicates", [False, True], ids=["random", "many_ties"])
def test_faiss_equals_numpy_for_hamming(duplicates):
    sigs, weights, queries = random_archive(4000, duplicates=duplicates, seed=3)
    for k in (1, 50, 4000):
        want = search(sigs, weights, queries, k, mode="hamming", backend="numpy", exclude_before=11)
        assert_same(search(sigs, None, queries, k, mode="hamming", backend="faiss", exclude_before=11), want)


def test_faiss_backend_refuses_weighted_mode():
    sigs, weights, queries = random_archive(10)
    with pytest.raises(ValueError, match="hamming"):
        search(sigs, weights, queries, 5, mode="weighted", backend="faiss")


@pytest.mark.parametrize("backend,mode", [("numpy", "weighted"), ("numba", "weighted"), ("numba", "hamming"),
                                          ("faiss", "hamming")])
def test_k_larger_than_n_returns_every_row_sorted(backend, mode):
    sigs, weights, queries = random_archive(40, seed=4)
    scores, ids = search(sigs, weights, queries, 1000, mode=mode, backend=backend)
    assert ids.shape == (3, 40)
    np.testing.assert_array_equal(np.sort(ids, axis=1), np.tile(np.arange(40), (3, 1)))
    assert_rows_best_first(scores, ids)


@pytest.mark.parametrize("backend,mode", [("numpy", "weighted"), ("numba", "weighted"), ("numba", "hamming"),
                                          ("faiss", "hamming")])
def test_empty_archive_and_everything_excluded_give_empty_rows(backend, mode):
    sigs, weights, queries = random_archive(0)
    scores, ids = search(sigs, weights, queries, 5, mode=mode, backend=backend)
    assert scores.shape == ids.shape == (3, 0) and scores.dtype == np.float32 and ids.dtype == np.int64
    sigs, weights, queries = random_archive(10)
    scores, ids = search(sigs, weights, queries, 5, mode=mode, backend=backend, exclude_before=10)
    assert scores.shape == ids.shape == (3, 0)
    scores, ids = search_many(sigs, weights, queries[None].repeat(2, 0), 5, mode=mode, backend=backend,
                              exclude_before=99)
    assert scores.shape == ids.shape == (2, 3, 0)


@pytest.mark.parametrize("backend,mode", [("numpy", "weighted"), ("numba", "weighted"), ("numba", "hamming"),
                                          ("faiss", "hamming")])
def test_exclude_before_skips_leading_rows_and_keeps_row_ids(backend, mode):
    sigs, weights, queries = random_archive(500, seed=5)
    scores, ids = search(sigs, weights, queries, 20, mode=mode, backend=backend, exclude_before=123)
    tail_scores, tail_ids = search(sigs[123:], weights[123:], queries, 20, mode=mode, backend="numpy")
    assert_same((scores, ids), (tail_scores, tail_ids + 123))
    assert search(sigs, weights, queries, 20, mode=mode, backend=backend, exclude_before=490)[1].shape == (3, 10)


@pytest.mark.parametrize("backend,mode", [("numpy", "weighted"), ("numba", "weighted"), ("numba", "hamming"),
                                          ("faiss", "hamming")])
def test_search_many_equals_a_loop_over_search(backend, mode):
    sigs, weights, _ = random_archive(2000, duplicates=True, seed=6)
    queries = np.random.default_rng(7).standard_normal((5, 3, 64)).astype(np.float32)
    scores, ids = search_many(sigs, weights, queries, 40, mode=mode, backend=backend, exclude_before=2)
    assert scores.shape == ids.shape == (5, 3, 40)
    for q in range(5):
        assert_same((scores[q], ids[q]), search(sigs, weights, queries[q], 40, mode=mode, backend="numpy",
                                                exclude_before=2))


def test_weighted_score_is_weight_times_quantised_query_dot_key_signs():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((300, 64)).astype(np.float32)
    q = rng.standard_normal(64).astype(np.float32)
    sigs = np.packbits(x < 0, axis=-1, bitorder="little")[:, None]
    weights = np.abs(x).mean(axis=1, dtype=np.float32)[:, None]
    scores, ids = search(sigs, weights, q[None], 300, backend="numpy")
    qi = np.rint(q.astype(np.float64) * 2**16 / np.abs(q).max())
    isum = (np.sign(x[ids[0]]) @ qi).astype(np.float32)
    np.testing.assert_array_equal(scores[0], weights[ids[0], 0] * isum)
    # up to the 2**-16 query steps, the score is mean|x| * (q . sign(x)) in units of max|q| / 2**16
    np.testing.assert_allclose(scores[0] * np.abs(q).max() / 2**16, weights[ids[0], 0] * (np.sign(x[ids[0]]) @ q),
                               rtol=1e-3, atol=1e-3)


def test_hamming_score_is_minus_the_number_of_differing_sign_bits():
    q = np.ones((1, 16), np.float32)
    q[0, [0, 9]] = -1  # query bits: bit 0 of byte 0 and bit 1 of byte 1
    sigs = np.array([[[0b1, 0b10]], [[0, 0]], [[0xFF, 0xFF]]], np.uint8)
    scores, ids = search(sigs, None, q, 3, mode="hamming", backend="numba")
    np.testing.assert_array_equal(ids, [[0, 1, 2]])
    np.testing.assert_array_equal(scores, [[0, -2, -14]])


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_zero_weight_scores_are_positive_zero_so_they_tie_by_index(backend):
    sigs, weights, queries = random_archive(200, n_heads=1, seed=9)
    weights[::2] = 0  # 0 * negative sum would be -0.0
    scores, ids = search(sigs, weights, queries, 200, backend=backend)
    zeros = scores[0] == 0
    assert not np.signbit(scores[0][zeros]).any()
    assert (np.diff(ids[0][zeros]) > 0).all()


def test_search_reads_read_only_memmapped_signatures(tmp_path):
    sigs, weights, queries = random_archive(3000, seed=10)
    sigs.tofile(tmp_path / "sigs.bin")
    mapped = np.memmap(tmp_path / "sigs.bin", dtype=np.uint8, mode="r", shape=sigs.shape)
    for mode in MODES:
        assert_same(search(mapped, weights, queries, 30, mode=mode, backend="numba"),
                    search(sigs, weights, queries, 30, mode=mode, backend="numpy"))


def test_rejects_queries_that_do_not_match_the_signatures():
    sigs, weights, queries = random_archive(10)
    with pytest.raises(ValueError, match="queries"):
        search(sigs, weights, queries[:, :32], 5)
    with pytest.raises(ValueError, match="weights"):
        search(sigs, weights[:5], queries, 5)
    with pytest.raises(ValueError, match="mode"):
        search(sigs, weights, queries, 5, mode="cosine")


def test_weighted_recall_of_true_top_dot_products_beats_hamming():
    # keys of varying norm: the asymmetric score ranks q . x, hamming only the angle between sign vectors
    rng = np.random.default_rng(0)
    n, d = 4000, 64
    x = rng.standard_normal((n, d)).astype(np.float32) * np.exp(0.5 * rng.standard_normal((n, 1))).astype(np.float32)
    q = rng.standard_normal(d).astype(np.float32)
    records = codec.encode_records(x, rng.standard_normal((n, d)).astype(np.float32))
    sigs = codec.signatures_from_records(records, d)[:, None]
    weights = codec.key_mean_abs(records, d)[:, None]
    true_top = set(np.argsort(-(x @ q))[:32])
    recall = {}
    for mode in MODES:
        _, ids = search(sigs, weights, q[None], 256, mode=mode, backend="numba")
        recall[mode] = len(true_top & set(ids[0])) / 32
    assert recall["weighted"] >= 0.8 and recall["weighted"] >= recall["hamming"] + 0.25, recall


def test_topk_rows_used_by_the_cuda_backend_breaks_ties_like_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    scores = rng.integers(-5, 5, (4, 3000)).astype(np.float32) * np.float32(0.75)  # many ties, negatives, zeros
    scores[scores == 0] = 0.0
    scores[1, 100:200] = -np.float32(3.4e38)
    got = S.topk_rows(torch.from_numpy(scores), 500, offset=17)
    order = np.stack([np.lexsort((np.arange(3000), -row))[:500] for row in scores])
    assert_same(got, (np.take_along_axis(scores, order, axis=1), order + 17))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    result = subprocess.run(["nvcc", "-c", "-arch=sm_80", "-I", str(CSRC), "-o", str(tmp_path / "kernel.o"),
                             str(CSRC / "hamming_topk.cu")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def cuda_available():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not cuda_available(), reason="needs torch with a CUDA device")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n_bytes", [8, 5])  # word and byte paths of the kernel
@pytest.mark.parametrize("weight_dtype", [np.float16, np.float32])
def test_cuda_backend_equals_numpy(mode, n_bytes, weight_dtype):
    for duplicates in (False, True):
        sigs, weights, queries = random_archive(20000, n_bytes=n_bytes, duplicates=duplicates, seed=12,
                                                weight_dtype=weight_dtype)
        weights[::7] = 0
        for k, start in [(256, 0), (100, 19999), (50, 5)]:
            assert_same(search(sigs, weights, queries, k, mode=mode, backend="cuda", exclude_before=start),
                        search(sigs, weights, queries, k, mode=mode, backend="numpy", exclude_before=start))
        many = np.random.default_rng(13).standard_normal((4, 3, 8 * n_bytes)).astype(np.float32)
        assert_same(search_many(sigs, weights, many, 64, mode=mode, backend="cuda"),
                    search_many(sigs, weights, many, 64, mode=mode, backend="numpy"))
    assert search(sigs, weights, queries, 5, mode=mode, backend="auto")[1].shape == (3, 5)


class LutKernelOnCpu:
    """What csrc/hamming_topk.cu computes, in numpy, over a head-major index [H, capacity, B] (tokens < n_tokens)."""

    def __init__(self, torch):
        self.torch = torch

    def weighted_scores(self, sigs, weights, luts, n_tokens, start, row_offset):
        sigs, weights, luts = sigs.numpy()[:, start:n_tokens], weights.numpy()[:, start:n_tokens], luts.numpy()
        heads = (row_offset + np.arange(len(luts))) % sigs.shape[0]
        rows = []
        for lut, h in zip(luts, heads):
            isum = lut[np.arange(sigs.shape[2]), sigs[h]].sum(axis=1)  # [N - start]
            rows.append(weights[h].astype(np.float32) * isum.astype(np.float32))
        scores = np.stack(rows) + np.float32(0)  # -0.0 -> +0.0 as the kernel does
        return self.torch.from_numpy(scores.reshape(len(luts), -1))

    def hamming_scores(self, sigs, qbits, n_tokens, start, row_offset):
        sigs, qbits = sigs.numpy()[:, start:n_tokens], qbits.numpy()
        heads = (row_offset + np.arange(len(qbits))) % sigs.shape[0]
        dist = [np.unpackbits(sigs[h] ^ q, axis=1).sum(axis=1) for q, h in zip(qbits, heads)]
        return self.torch.from_numpy(-np.stack(dist).astype(np.float32).reshape(len(qbits), -1))


@pytest.fixture(params=["numpy_stand_in", "kernel_code_on_host"])
def kernel(request):
    if request.param == "numpy_stand_in":
        return LutKernelOnCpu(pytest.importorskip("torch"))
    return request.getfixturevalue("kernel_on_host")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weight_dtype", [np.float16, np.float32])
@pytest.mark.parametrize("n_bytes", [8, 5])  # word and byte paths of the kernel
def test_cuda_backend_glue_and_kernel_code_equal_numpy_on_the_cpu(mode, weight_dtype, n_bytes, kernel, monkeypatch):
    monkeypatch.setattr(S, "CUDA_PASS_BYTES", 12 * 5000 * 4)  # 4 query rows per pass: passes split a head group
    sigs, weights, _ = random_archive(5011, n_bytes=n_bytes, duplicates=True, seed=14, weight_dtype=weight_dtype)
    weights[::5] = 0
    sigs.setflags(write=False)  # like an archive memmap
    queries = np.random.default_rng(15).standard_normal((3, 3, 8 * n_bytes)).astype(np.float32)
    for k, start in [(1, 11), (70, 11), (2000, 11), (64, 0), (5, 5010)]:
        want = search_many(sigs, weights, queries, k, mode=mode, backend="numpy", exclude_before=start)
        got = S._search_cuda(sigs, weights, queries.reshape(9, -1), min(k, 5011 - start), mode, start,
                             device="cpu", ext=kernel)
        assert_same((got[0].reshape(want[0].shape), got[1].reshape(want[1].shape)), want)


class Rollbacks:
    """The slice of an archive a ResidentIndex reads: its index rows, committed point and rollback count."""

    def __init__(self, sigs, weights):
        self.sigs, self.weights, self.n = sigs, weights, 0
        self.committed_tokens, self.rollbacks = 0, 0

    def signatures(self, layer):
        return self.sigs[: self.n]

    def key_weights(self, layer):
        return self.weights[: self.n]


@pytest.mark.parametrize("mode", MODES)
def test_resident_index_appends_as_tokens_spill_and_searches_like_numpy(mode, kernel):
    sigs, weights, _ = random_archive(6000, duplicates=True, seed=21, weight_dtype=np.float16)
    queries = np.random.default_rng(22).standard_normal((2, 3, 64)).astype(np.float32)
    archive = Rollbacks(sigs, weights)
    index = S.ResidentIndex("cpu", ext=kernel)
    for n in (0, 1, 700, 1024, 1025, 4000, 6000):  # grows past its capacity more than once
        archive.n = n
        index.sync(archive, 0)
        assert index.n_tokens == n
        for start in (0, 300):
            want = search_many(sigs[:n], weights[:n], queries, 128, mode=mode, backend="numpy",
                               exclude_before=start, by_index=True)
            got = index.search_many(queries, 128, mode=mode, exclude_before=start, by_index=True)
            assert_same(got, want)


def test_resident_index_rereads_rows_rewritten_after_a_rollback(kernel):
    sigs, weights, _ = random_archive(3000, seed=23)
    archive = Rollbacks(sigs.copy(), weights.copy())
    index = S.ResidentIndex("cpu", ext=kernel)
    archive.n = 3000
    index.sync(archive, 0)
    # a fork rolls the uncommitted tail back and writes its own: same length, other records
    archive.committed_tokens, archive.rollbacks = 2000, 1
    archive.sigs[2000:] = 255 - archive.sigs[2000:]
    index.sync(archive, 0)
    queries = np.random.default_rng(24).standard_normal((1, 3, 64)).astype(np.float32)
    assert_same(index.search_many(queries, 300), search_many(archive.sigs, archive.weights, queries, 300,
                                                             backend="numpy"))


@pytest.mark.skipif(not cuda_available(), reason="needs torch with a CUDA device")
def test_resident_index_on_the_gpu_equals_numpy():
    sigs, weights, _ = random_archive(50000, duplicates=True, seed=25, weight_dtype=np.float16)
    queries = np.random.default_rng(26).standard_normal((4, 3, 64)).astype(np.float32)
    archive = Rollbacks(sigs, weights)
    index = S.ResidentIndex("cuda")
    for n in (5000, 50000):
        archive.n = n
        index.sync(archive, 0)
        for mode in MODES:
            assert_same(index.search_many(queries, 1024, mode=mode, exclude_before=17, by_index=True),
                        search_many(sigs[:n], weights[:n], queries, 1024, mode=mode, backend="numpy",
                                    exclude_before=17, by_index=True))


def test_top_k_rows_breaks_ties_to_the_lower_index_and_treats_signed_zeros_alike():
    scores = np.array([[1.0, 3.0, 3.0, -0.0, 0.0, 3.0, -2.0]], np.float32)
    best_scores, best = S.top_k_rows(scores, 5)
    assert best.tolist() == [[1, 2, 5, 0, 3]]
    assert best_scores.tolist() == [[3.0, 3.0, 3.0, 1.0, 0.0]]
    rng = np.random.default_rng(0)
    many = rng.integers(-3, 4, size=(4, 2, 300)).astype(np.float32)
    _, got = S.top_k_rows(many, 40)
    want = np.stack([np.lexsort((np.arange(300), -row))[:40] for row in many.reshape(-1, 300)]).reshape(4, 2, 40)
    assert (got == want).all()


def test_faiss_widens_its_radius_until_k_tokens_are_inside(monkeypatch):
    monkeypatch.setattr(S, "FAISS_SAMPLE", 1)  # a radius read off one row is too small for most queries
    sigs, _, _ = random_archive(3000, duplicates=True, seed=17)
    queries = np.random.default_rng(18).standard_normal((4, 3, 64)).astype(np.float32)
    want = search_many(sigs, None, queries, 200, mode="hamming", backend="numpy", exclude_before=5)
    assert_same(search_many(sigs, None, queries, 200, mode="hamming", backend="faiss", exclude_before=5), want)


@pytest.mark.parametrize("backend,mode,dense", [("numpy", "weighted", None), ("numba", "weighted", True),
                                                ("numba", "weighted", False), ("numba", "hamming", True),
                                                ("faiss", "hamming", None)])
def test_by_index_lists_the_same_best_tokens_by_ascending_id(backend, mode, dense, monkeypatch):
    """The rerank's order: the same k tokens (ties to the lower index) as best-first, each with its score."""
    if dense is not None:  # the all-scores path lists them in index order itself; the heap path is sorted after
        numba_search = S._search_numba
        monkeypatch.setattr(S, "_search_numba", lambda *a, **kw: numba_search(*a, dense=dense, **kw))
    sigs, weights, _ = random_archive(2000, duplicates=True, seed=8)
    queries = np.random.default_rng(9).standard_normal((4, 3, 64)).astype(np.float32)
    best_scores, best_ids = search_many(sigs, weights, queries, 60, mode=mode, backend=backend)
    scores, ids = search_many(sigs, weights, queries, 60, mode=mode, backend=backend, by_index=True)
    assert (np.diff(ids, axis=-1) > 0).all()
    order = np.argsort(best_ids, axis=-1)
    np.testing.assert_array_equal(ids, np.take_along_axis(best_ids, order, axis=-1))
    np.testing.assert_array_equal(scores, np.take_along_axis(best_scores, order, axis=-1))


def test_top_k_rows_by_index_keeps_the_same_ties():
    scores = np.array([[1.0, 3.0, 3.0, -0.0, 0.0, 3.0, -2.0]], np.float32)
    best_scores, best = S.top_k_rows(scores, 5, by_index=True)
    assert best.tolist() == [[0, 1, 2, 3, 5]]
    assert best_scores.tolist() == [[1.0, 3.0, 3.0, 0.0, 3.0]]


def test_score_ids_gives_the_weighted_scans_score_of_each_chosen_token():
    rng = np.random.default_rng(11)
    sigs = rng.integers(0, 256, (500, 3, 8), dtype=np.uint8)
    weights = rng.random((500, 3), dtype=np.float32).astype(np.float16)
    queries = rng.standard_normal((2, 3, 64)).astype(np.float32)
    scores, ids = search_many(sigs, weights, queries, 500, backend="numpy")  # every token, with its score
    chosen = np.stack([rng.choice(500, 40, replace=False) for _ in range(6)]).reshape(2, 3, 40)
    got = score_ids(sigs, weights, queries, chosen)
    for q in range(2):
        for h in range(3):
            by_id = dict(zip(ids[q, h].tolist(), scores[q, h].tolist()))
            assert got[q, h].tolist() == [by_id[i] for i in chosen[q, h].tolist()]


def _selection_case(rng, d, duplicates, starts, n=3000, n_heads=3, group=3):
    # an archive's records, signatures and weights and a chunk's queries [H, C, G, D] with its blocks' first-stage
    # queries; duplicated records tie in the scan and in the rerank. Blocks of 6 queries x 3 heads are reranked by
    # the matmul (codec.WIDE_RERANK), blocks of 1-3 by numba's dot per pair
    keys = rng.standard_normal((n, n_heads, d)).astype(np.float32)
    if duplicates:
        keys = keys[rng.integers(0, 60, n)]
    records = codec.encode_records(keys.reshape(-1, d), keys.reshape(-1, d)).reshape(n, n_heads, -1)
    sigs = codec.signatures_from_records(records, d)
    weights = codec.key_mean_abs(records, d).astype(np.float16)
    queries = rng.standard_normal((n_heads, starts[-1], group, d)).astype(np.float32)
    block_queries = np.stack([queries[:, a:b].sum(axis=2).mean(axis=1) for a, b in zip(starts[:-1], starts[1:])])
    return sigs, weights, records, queries, block_queries


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("n_bytes", [8, 6, 16])
@pytest.mark.parametrize("starts", [[0, 3, 4, 7], [0, 6, 7]], ids=["decode_like", "prefill_like"])
def test_search_and_rerank_picks_what_the_scan_the_rerank_and_the_select_pick_composed(mode, duplicates, n_bytes,
                                                                                        starts):
    # the engine's one call per layer against the three calls it replaces, with the numpy reference as first stage:
    # the same ids, ties included (duplicated records tie in the scan and in the rerank)
    rng = np.random.default_rng(n_bytes + duplicates)
    sigs, weights, records, queries, block_queries = _selection_case(rng, 8 * n_bytes, duplicates, starts)
    n, n_heads = records.shape[:2]
    starts = np.array(starts)
    for shortlist, keep in ((256, 32), (40, 64), (5000, 16)):
        got = S.search_and_rerank(sigs, weights, records, block_queries, queries, starts, shortlist, keep, mode)
        _, short = search_many(sigs, weights, block_queries, shortlist, mode=mode, backend="numpy", by_index=True)
        rerank = codec.score_shortlist(records, short, queries, starts)
        _, best = S.top_k_rows(rerank, keep, by_index=True)
        want = np.take_along_axis(short.transpose(1, 0, 2), best, axis=-1)
        assert got.shape == want.shape == (n_heads, len(starts) - 1, min(keep, shortlist, n))
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("duplicates", [False, True])
@pytest.mark.parametrize("starts", [[0, 3, 4, 7], [0, 6, 7]], ids=["decode_like", "prefill_like"])
def test_search_and_rerank_with_clusters_picks_what_the_composed_two_level_selection_picks(mode, duplicates, starts):
    # the two-level step (the best clustered candidates by weighted signature score, joined with the tail's scan,
    # reranked, picked) in one call against the calls the engine composed for it, ties included
    rng = np.random.default_rng(40 + duplicates)
    sigs, weights, records, queries, block_queries = _selection_case(rng, 64, duplicates, starts)
    n_heads = records.shape[1]
    starts = np.array(starts)
    for covered, n_members, tail_k, cluster_k, keep in ((1800, 300, 120, 100, 32), (2048, 40, 900, 64, 64),
                                                         (3000, 500, 0, 200, 16), (1000, 0, 50, 30, 8)):
        members = np.stack([np.sort(rng.choice(covered, n_members, replace=False))
                            for _ in range((len(starts) - 1) * n_heads)])
        members = members.reshape(len(starts) - 1, n_heads, n_members)
        got = S.search_and_rerank(sigs, weights, records, block_queries, queries, starts, tail_k, keep, mode,
                                  S.ClusterCandidates(members, covered, cluster_k))
        _, tail = search_many(sigs, weights, block_queries, tail_k, mode=mode, backend="numpy", by_index=True,
                              exclude_before=covered)
        _, best_members = S.top_k_rows(score_ids(sigs, weights, block_queries, members), cluster_k, by_index=True)
        short = np.concatenate([np.take_along_axis(members, best_members, axis=-1), tail], axis=-1)
        _, best = S.top_k_rows(codec.score_shortlist(records, short, queries, starts), keep, by_index=True)
        want = np.take_along_axis(short.transpose(1, 0, 2), best, axis=-1)
        assert got.shape == want.shape == (n_heads, len(starts) - 1, min(keep, short.shape[-1]))
        np.testing.assert_array_equal(got, want)


def test_search_and_rerank_refuses_clustered_ids_past_the_clustered_tokens():
    rng = np.random.default_rng(5)
    sigs = rng.integers(0, 256, (100, 1, 8), dtype=np.uint8)
    weights = rng.random((100, 1)).astype(np.float16)
    records = np.zeros((100, 1, 104), np.uint8)
    queries = rng.standard_normal((1, 1, 1, 64)).astype(np.float32)
    block_queries = queries.sum(axis=2).mean(axis=1)[None]
    with pytest.raises(ValueError, match="below 50"):
        S.search_and_rerank(sigs, weights, records, block_queries, queries, np.array([0, 1]), 8, 4,
                            clustered=S.ClusterCandidates(np.array([[[3, 60]]]), 50, 2))


def test_search_and_rerank_runs_the_same_in_parallel(monkeypatch):
    # many (block, head) tasks over numba's pool give what one thread gives
    n, n_heads, d = 2000, 2, 64
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((n, n_heads, d)).astype(np.float32)
    records = codec.encode_records(keys.reshape(-1, d), keys.reshape(-1, d)).reshape(n, n_heads, -1)
    sigs, weights = codec.signatures_from_records(records, d), codec.key_mean_abs(records, d).astype(np.float16)
    queries = rng.standard_normal((n_heads, 64, 2, d)).astype(np.float32)
    starts = np.arange(0, 65, 4)
    block_queries = np.stack([queries[:, a:b].sum(axis=2).mean(axis=1) for a, b in zip(starts[:-1], starts[1:])])
    monkeypatch.setattr(threads, "SERIAL_CELLS", 1 << 40)
    serial = S.search_and_rerank(sigs, weights, records, block_queries, queries, starts, 128, 16)
    monkeypatch.setattr(threads, "SERIAL_CELLS", 0)
    parallel = S.search_and_rerank(sigs, weights, records, block_queries, queries, starts, 128, 16)
    np.testing.assert_array_equal(serial, parallel)
    assert (np.diff(serial, axis=-1) > 0).all()  # ascending, distinct
