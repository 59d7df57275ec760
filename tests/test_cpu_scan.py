"""The CPU's vector kernel for the weighted scan (csrc/cpu_scan.cpp): the same scores, bit for bit, as the definition
and the numba loop, the same picks as the numpy reference through `search`, and the numba kernels wherever it
cannot run."""

from __future__ import annotations

import numpy as np
import pytest

from infinitekv import cpu_scan, search as S

needs_kernel = pytest.mark.skipif(cpu_scan.unavailable() is not None,
                                  reason=f"the vector kernel does not run here: {cpu_scan.unavailable()}")


def float16_archive(n, n_heads, n_bytes, seed, duplicates=False):
    rng = np.random.default_rng(seed)
    sigs = rng.integers(0, 256, (n, n_heads, n_bytes), dtype=np.uint8)
    weights = rng.random((n, n_heads), dtype=np.float32).astype(np.float16)
    if duplicates:  # runs of identical records, as equal tokens give at layer 0: many equal scores
        source = rng.integers(0, max(1, n // 50), n)
        sigs, weights = sigs[source].copy(), weights[source].copy()
    weights[::13] = 0
    weights[1::13] = np.float16(6e-6)  # subnormal
    weights[2::13] = np.float16(-2.5)  # the API takes any finite weight
    weights[3::13] = np.float16(65504)  # the largest float16
    return sigs, weights


def scores_by_definition(sigs, weights, queries, start):
    """score[g, t] = float32(w[t, h]) * float32(sum_d qi[g, d] * sign[t, h, d]), h = g % H, -0.0 -> +0.0."""
    n, n_heads, n_bytes = sigs.shape
    qi = S.quantise_queries(queries).astype(np.int64)  # [G, D]
    signs = 1 - 2 * np.unpackbits(sigs[start:], axis=-1, bitorder="little").astype(np.int64)  # [N', H, D]
    heads = np.arange(len(queries)) % n_heads
    isum = np.einsum("gd,ngd->gn", qi, signs[:, heads])
    out = weights[start:, heads].T.astype(np.float32) * isum.astype(np.float32)
    return out + np.float32(0.0)


@needs_kernel
@pytest.mark.parametrize("n_heads,n_bytes", [(3, 8), (1, 8), (2, 16), (8, 16), (5, 24), (4, 32), (16, 8)])
@pytest.mark.parametrize("n_queries", [1, 3])
def test_vector_scores_equal_the_definition_bit_for_bit(n_heads, n_bytes, n_queries):
    sigs, weights = float16_archive(1000 + 37, n_heads, n_bytes, seed=n_heads * n_bytes)  # not a multiple of 64
    rng = np.random.default_rng(n_queries)
    queries = rng.standard_normal((n_queries * n_heads, 8 * n_bytes)).astype(np.float32)
    queries[0] = 0  # an all-zero query scores 0 everywhere (+0.0, however signed the weight)
    queries[-1, :: 3] *= 1e4  # one component dominating: most others quantise to small integers
    luts = S.score_luts(queries, "weighted").reshape(len(queries), -1)
    for start in (0, 5, 1000):
        out = np.full((len(queries), len(sigs) - start), np.nan, np.float32)
        assert cpu_scan.weighted_scores(sigs, weights.view(np.uint16), luts, start, 2, out)
        np.testing.assert_array_equal(out.view(np.uint32),
                                      scores_by_definition(sigs, weights, queries, start).view(np.uint32))


@needs_kernel
@pytest.mark.parametrize("duplicates", [False, True], ids=["random", "many_ties"])
@pytest.mark.parametrize("path", ["chunks", "dense"])
def test_search_through_the_vector_kernel_picks_what_numpy_picks(duplicates, path, monkeypatch):
    def not_numba(*args):
        raise AssertionError("the numba scan ran where the vector kernel should have")

    monkeypatch.setattr(S, "_chunk_topk", not_numba)
    monkeypatch.setattr(S, "_dense_scores", not_numba)
    sigs, weights = float16_archive(5000, 3, 8, seed=4, duplicates=duplicates)
    sigs.setflags(write=False)  # as an archive's memmap
    queries = np.random.default_rng(5).standard_normal((2, 3, 64)).astype(np.float32)
    for k in (1, 64, 300):
        want = S.search_many(sigs, weights, queries, k, backend="numpy", exclude_before=7)
        rows = queries.reshape(-1, 64)
        # many chunks, so ties meet at chunk edges, and (k = 1, 64) each chunk's best is cut back many times
        scores, ids = S._search_numba(sigs, weights, rows, k, "weighted", 7,
                                      chunk=333 if path == "chunks" else None, dense=path == "dense")
        np.testing.assert_array_equal(ids.reshape(want[1].shape), want[1])
        np.testing.assert_array_equal(scores.reshape(want[0].shape).view(np.uint32), want[0].view(np.uint32))
    if duplicates:
        assert (want[0][..., 1:] == want[0][..., :-1]).any()  # ties were there to break


@pytest.mark.parametrize("shape,weight_dtype", [((3, 5), np.float16), ((3, 8), np.float32), ((9, 16), np.float16),
                                                ((1, 40), np.float16)])
def test_shapes_the_vector_kernel_does_not_handle_go_to_numba_with_the_same_picks(shape, weight_dtype):
    n_heads, n_bytes = shape
    sigs, weights = float16_archive(3000, n_heads, n_bytes, seed=8)
    weights = weights.astype(weight_dtype)
    assert not cpu_scan.handles(sigs, S.kernel_weights(weights, "weighted"))
    queries = np.random.default_rng(9).standard_normal((n_heads, 8 * n_bytes)).astype(np.float32)
    want = S.search(sigs, weights, queries, 50, backend="numpy")
    got = S.search(sigs, weights, queries, 50, backend="numba")
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0].view(np.uint32), want[0].view(np.uint32))


@pytest.fixture
def fresh_load():
    """cpu_scan decides again (its `_load` is cached per process), and the decision is forgotten after the test."""
    cpu_scan._load.cache_clear()
    yield
    cpu_scan._load.cache_clear()


def assert_search_answers_like_numpy(seed):
    sigs, weights = float16_archive(2000, 3, 8, seed=seed)
    queries = np.random.default_rng(seed + 1).standard_normal((3, 64)).astype(np.float32)
    got = S.search(sigs, weights, queries, 20)
    want = S.search(sigs, weights, queries, 20, backend="numpy")
    np.testing.assert_array_equal(got[1], want[1])


def test_without_a_compiler_the_reason_is_one_line_and_search_still_answers(monkeypatch, fresh_load):
    monkeypatch.setattr(cpu_scan, "_compiler", lambda: None)
    reason = cpu_scan.unavailable()
    assert reason is not None and "\n" not in reason and "compiler" in reason
    assert_search_answers_like_numpy(seed=10)


def test_the_environment_can_ask_for_the_numba_kernels(monkeypatch, fresh_load):
    monkeypatch.setenv("IKV_CPU_SCAN", "numba")
    assert "IKV_CPU_SCAN=numba" in cpu_scan.unavailable()


@needs_kernel
def test_a_failed_build_says_why_in_one_line(monkeypatch, tmp_path, fresh_load):
    broken = tmp_path / "cpu_scan.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_scan, "SOURCE", broken)
    monkeypatch.setenv("IKV_CACHE_DIR", str(tmp_path / "cache"))
    reason = cpu_scan.unavailable()
    assert reason.startswith("the build failed (") and "\n" not in reason
    assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-built left to load next time


def test_a_cache_that_cannot_be_written_says_so_in_one_line_and_search_still_answers(monkeypatch, tmp_path,
                                                                                   fresh_load):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory would go\n")
    monkeypatch.setenv("IKV_CACHE_DIR", str(blocker))
    monkeypatch.setattr(cpu_scan, "SOURCE", tmp_path / "cpu_scan.cpp")  # a source never built, so a build is due
    (tmp_path / "cpu_scan.cpp").write_text("// never compiled\n")
    monkeypatch.setattr(cpu_scan, "_compiler", lambda: "/bin/true")
    reason = cpu_scan.unavailable()
    assert reason.startswith("the kernel could not be written to ") and "\n" not in reason
    assert_search_answers_like_numpy(seed=13)
