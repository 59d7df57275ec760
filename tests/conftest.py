"""Shared fixtures: tiny randomly initialised models of every supported family, and the real SmolLM2."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=4096)


def tiny_model(family: str, seed: int = 0, **overrides):
    """A 2-layer random model of `family` (llama, mistral, qwen2, qwen3) in fp32 eval mode; `overrides` change its
    config (e.g. sliding_window=24)."""
    import transformers

    classes = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
    }
    config_class, model_class, extra = classes[family]
    torch.manual_seed(seed)
    config = config_class(**{**TINY, **extra, **overrides})
    config._attn_implementation = "sdpa"
    return model_class(config).eval()


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (downloaded and converted once into the user cache)."""
    from infinitekv.models import load_model

    return load_model()


class KernelOnHost:
    """csrc/host_scan.cpp built with this machine's C++ compiler: the kernels' own per-thread code
    (csrc/signature_score.h) run over their whole launch grid on the CPU, with the binding's calling convention."""

    def __init__(self, library: Path, torch):
        import ctypes

        self.torch, self.lib = torch, ctypes.CDLL(str(library))
        i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        self.lib.ikv_host_weighted_scores.argtypes = [ptr, i64, i64, i32, i32, i64, i64, ptr, ptr, i32, i32, ptr]
        self.lib.ikv_host_hamming_scores.argtypes = [ptr, i64, i64, i32, i32, i64, i64, ptr, i32, i32, ptr]

    def _call(self, fn, sigs, n_tokens, start, row_offset, *tables):
        sigs = np.ascontiguousarray(sigs.numpy())
        n_heads, capacity, n_bytes = sigs.shape
        assert 0 <= start <= n_tokens <= capacity
        out = np.full((len(tables[-1]), n_tokens - start), np.nan, np.float32)
        pointers = [t.ctypes.data for t in tables]
        fn(sigs.ctypes.data, n_tokens, capacity, n_heads, n_bytes, start, row_offset, *pointers, len(tables[-1]),
           int(n_bytes % 4 == 0), out.ctypes.data)
        assert not np.isnan(out).any()  # every cell written once by the grid
        return self.torch.from_numpy(out)

    def weighted_scores(self, sigs, weights, luts, n_tokens, start, row_offset):
        widened = np.ascontiguousarray(weights.numpy().astype(np.float32))  # exact, as the kernel widens float16
        return self._call(self.lib.ikv_host_weighted_scores, sigs, n_tokens, start, row_offset, widened,
                          np.ascontiguousarray(luts.numpy()))

    def hamming_scores(self, sigs, qbits, n_tokens, start, row_offset):
        return self._call(self.lib.ikv_host_hamming_scores, sigs, n_tokens, start, row_offset,
                          np.ascontiguousarray(qbits.numpy()))


@pytest.fixture(scope="session")
def kernel_on_host(tmp_path_factory):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    library = tmp_path_factory.mktemp("kernel") / "host_scan.so"
    built = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-Wall", "-Werror", "-I", str(CSRC), "-o",
                            str(library), str(CSRC / "host_scan.cpp")], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    return KernelOnHost(library, torch)
