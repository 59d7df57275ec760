"""Shared fixtures: tiny randomly initialised models of every supported family, and the real SmolLM2."""

from __future__ import annotations

import pytest
import torch

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
