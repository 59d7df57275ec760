"""The model on a GPU: the engine computes there what it computes on the CPU, and the first stage can run on the
device from a resident index. The CPU tests drive the device path with the kernel's own code built for the host;
the CUDA tests run where torch sees a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_model
from infinitekv import attention, device_retrieval, search
from infinitekv.attention import RetrievalConfig
from infinitekv.engine import enable, open_session
from infinitekv.errors import IKVError
from infinitekv.models import resolve_device, resolve_dtype

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs torch with a CUDA device")

RETRIEVING = dict(sinks=4, hot_window=64, evict_batch=16, chunk_size=32, top_k_cold=8, shortlist=32, dense_up_to=0)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def read_and_decode(model, config: RetrievalConfig, ids: list[int], steps: int = 6):
    """The last prefill token's logits, then greedy decode steps' logits [1 + steps, V], from a RAM archive."""
    with open_session(model, config=config, mode="ram") as session:
        out = [session.feed(ids)]
        for _ in range(steps):
            out.append(session.feed([int(out[-1].argmax())]))
        used = session.counters.cold_tokens_per_step()
    return torch.stack(out).float().cpu(), used


def test_luts_built_on_the_device_equal_the_searchs_own():
    queries = torch.randn(7, 64, generator=torch.Generator().manual_seed(3))
    queries[2] = 0  # an all-zero query scores every token 0
    queries[3, :5] = 0
    want = search.score_luts(queries.numpy(), "weighted")
    assert torch.equal(device_retrieval.weighted_luts(queries), torch.from_numpy(want))


def synthetic_archive(n: int, seed: int):
    """A RAM archive of one layer (3 kv-heads, head_dim 64) whose keys cluster around a few centres, and queries near
    some of them, rotated by the archive's R as the engine's are."""
    from infinitekv.scanbench import _ram_archive, clustered_keys

    keys, draw = clustered_keys(np.random.default_rng(seed), n, centres=40)
    archive = _ram_archive(keys)
    queries = np.concatenate([draw() for _ in range(6)], axis=1)[:, :, 0]  # [Hk, C, D]
    q_grouped = np.repeat(queries[:, :, None, :], 3, axis=2) * np.float32([1.0, 0.5, -0.25])[None, None, :, None]
    return archive, np.ascontiguousarray(q_grouped, dtype=np.float32)  # [Hk, C, G, D]


def test_the_device_selection_picks_what_the_cpu_selection_picks(kernel_on_host):
    archive, q_grouped = synthetic_archive(5000, seed=5)
    blocks = [(0, 4), (4, 6)]
    config = RetrievalConfig(shortlist=256, cluster_segment=0)
    want = attention.select_cold_blocks(archive, 0, q_grouped, blocks, config, 32)
    index = search.ResidentIndex("cpu", ext=kernel_on_host, with_records=True)
    index.sync(archive, 0)
    rotation = torch.from_numpy(np.array(archive.rotation))
    got = device_retrieval.select_blocks_on_device(index, torch.from_numpy(q_grouped) @ rotation.T, blocks, 256, 32)
    assert got.shape == want.shape
    assert (got.numpy() == want).mean() >= 0.98  # the rerank sums in another order: a near-tie may flip
    keys, values = device_retrieval.decode_on_device(index, got, rotation, torch.zeros(3, 64))
    want_keys, want_values = attention.decode_cold(archive, 0, got.numpy())
    assert np.allclose(keys.numpy(), want_keys, atol=1e-5) and np.array_equal(values.numpy(), want_values)


def test_retrieval_on_the_device_path_follows_the_cpu_path(kernel_on_host, monkeypatch):
    # the whole device path (resident index and records, selection and dequantising in torch) on CPU tensors, with
    # the kernel's per-thread code built for the host standing in for the GPU
    model = tiny_model("llama")
    ids = tokens(400, 1)
    on_cpu, used = read_and_decode(model, RetrievalConfig(**RETRIEVING), ids)
    assert used > 0
    monkeypatch.setattr(attention, "retrieval_on_device", lambda config, device: True)
    monkeypatch.setattr(search, "_cuda_extension", lambda: kernel_on_host)
    synced = []
    monkeypatch.setattr(search.ResidentIndex, "sync", _counting(search.ResidentIndex.sync, synced))
    on_device, _ = read_and_decode(model, RetrievalConfig(**RETRIEVING), ids)
    assert synced, "the device path was not taken"
    assert (on_device.argmax(-1) == on_cpu.argmax(-1)).all()
    assert torch.allclose(on_device.softmax(-1), on_cpu.softmax(-1), atol=1e-3)


def _counting(method, calls: list):
    def wrapped(self, *args, **kwargs):
        calls.append(1)
        return method(self, *args, **kwargs)
    return wrapped


def test_asking_for_the_cuda_scan_without_a_gpu_model_names_the_fix():
    with pytest.raises(IKVError, match="search_backend='auto'"):
        attention.retrieval_on_device(RetrievalConfig(search_backend="cuda"), torch.device("cpu"))
    assert attention.retrieval_on_device(RetrievalConfig(), torch.device("cpu")) is False


def test_device_and_dtype_names_resolve_or_fail_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(IKVError, match="sees no CUDA device; use --device cpu"):
        resolve_device("cuda")
    with pytest.raises(IKVError, match="is not a device; use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(IKVError, match="is not a dtype"):
        resolve_dtype("fp8", "cpu")


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen3"])
def test_generate_on_the_gpu_inside_enable_equals_the_unmodified_model_while_nothing_is_cold(family):
    model = tiny_model(family).cuda()
    ids = torch.tensor([tokens(120, 2)], device="cuda")
    want = model.generate(ids, max_new_tokens=12, do_sample=False)
    with enable(model, mode="ram"):
        got = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want)


@needs_cuda
def test_retrieval_on_the_gpu_follows_retrieval_through_the_host_on_the_gpu():
    model = tiny_model("llama").cuda()
    ids = tokens(600, 3)
    on_device, used = read_and_decode(model, RetrievalConfig(**RETRIEVING), ids)
    through_host, _ = read_and_decode(model, RetrievalConfig(**RETRIEVING, search_backend="numba"), ids)
    assert used > 0
    assert (on_device.argmax(-1) == through_host.argmax(-1)).all()
    assert torch.allclose(on_device.softmax(-1), through_host.softmax(-1), atol=1e-3)


@needs_cuda
def test_retrieval_on_the_gpu_follows_the_cpu():
    ids = tokens(600, 4)
    on_gpu, _ = read_and_decode(tiny_model("qwen3").cuda(), RetrievalConfig(**RETRIEVING), ids)
    on_cpu, _ = read_and_decode(tiny_model("qwen3"), RetrievalConfig(**RETRIEVING), ids)
    assert (on_gpu.argmax(-1) == on_cpu.argmax(-1)).float().mean() >= 0.85
    assert torch.allclose(on_gpu.softmax(-1), on_cpu.softmax(-1), atol=2e-2)


@needs_cuda
def test_bfloat16_on_the_gpu_reads_retrieves_and_stays_finite():
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    logits, used = read_and_decode(model, RetrievalConfig(**RETRIEVING), tokens(500, 5))
    assert used > 0 and torch.isfinite(logits.float()).all()
