"""The model on a GPU: the engine computes there what it computes on the CPU, and the first stage can run on the
device from a resident index. The CPU tests drive the device path with the kernel's own code built for the host;
the CUDA tests run where torch sees a GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from infinitekv import attention, search
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


def test_the_first_stage_on_the_device_path_gives_the_cpu_scans_logits(kernel_on_host, monkeypatch):
    # the resident index and its glue, with the kernel's per-thread code built for the host standing in for the GPU
    model = tiny_model("llama")
    ids = tokens(400, 1)
    on_cpu, used = read_and_decode(model, RetrievalConfig(**RETRIEVING), ids)
    assert used > 0
    monkeypatch.setattr(attention, "scan_on_device", lambda backend, device: True)
    monkeypatch.setattr(search, "_cuda_extension", lambda: kernel_on_host)
    built = []
    monkeypatch.setattr(search.ResidentIndex, "append", _counting(search.ResidentIndex.append, built))
    on_device, _ = read_and_decode(model, RetrievalConfig(**RETRIEVING), ids)
    assert built, "the device path was not taken"
    assert torch.equal(on_device, on_cpu)  # the same shortlist, so the same logits, bit for bit


def _counting(method, calls: list):
    def wrapped(self, *args, **kwargs):
        calls.append(len(args[0]))
        return method(self, *args, **kwargs)
    return wrapped


def test_asking_for_the_cuda_scan_without_a_gpu_model_names_the_fix():
    with pytest.raises(IKVError, match="search_backend='auto'"):
        attention.scan_on_device("cuda", torch.device("cpu"))
    assert attention.scan_on_device("auto", torch.device("cpu")) is False


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
def test_retrieval_on_the_gpu_with_the_resident_scan_equals_the_cpu_scan_on_the_gpu():
    model = tiny_model("llama").cuda()
    ids = tokens(600, 3)
    resident, used = read_and_decode(model, RetrievalConfig(**RETRIEVING), ids)
    host, _ = read_and_decode(model, RetrievalConfig(**RETRIEVING, search_backend="numba"), ids)
    assert used > 0
    assert torch.equal(resident, host)


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
