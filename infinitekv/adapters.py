"""Model families: everything InfiniteKV needs to know about one, in one place.

Retrieval attention runs inside the model's own attention modules (registered through transformers'
`AttentionInterface`), so projections, biases, Qwen3's q/k norms and RoPE itself stay the family's own code. What the
engine still reads from the model is listed here: the decoder layers and their attention modules, the rotary
embedding (its inverse frequencies and scaling, to place keys at compact positions), the trained window and the
sliding window, and the cache layout. Adding a family is one entry in `FAMILIES` plus a tiny random-config test
(tests/conftest.py `tiny_model`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from infinitekv import codec
from infinitekv.archive import Layout
from infinitekv.errors import IKVError


@dataclass(frozen=True)
class Family:
    model_type: str
    # attributes of the config that, when true, mean some layers only attend a sliding window (Qwen2 gates it)
    sliding_window_flag: str | None = None


# tested with tiny random configs in tests/test_engine.py and tests/test_generate.py
FAMILIES = {f.model_type: f for f in (
    Family("llama"),
    Family("mistral"),
    Family("qwen2", sliding_window_flag="use_sliding_window"),
    Family("qwen3", sliding_window_flag="use_sliding_window"),
)}


def family_of(model_or_config) -> Family:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", "unknown")
    if model_type not in FAMILIES:
        raise IKVError(
            f"unsupported architecture '{model_type}': InfiniteKV supports {', '.join(FAMILIES)} decoder models; "
            "pick one of those"
        )
    return FAMILIES[model_type]


def check_supported(model: torch.nn.Module) -> None:
    family_of(model)


def decoder_layers(model: torch.nn.Module):
    return model.model.layers


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [layer.self_attn for layer in decoder_layers(model)]


def rotary_embedding(model: torch.nn.Module) -> torch.nn.Module:
    return model.model.rotary_emb


def trained_window(config) -> int:
    """Positions the model was trained to attend across."""
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def sliding_window(config) -> int | None:
    """The narrowest window any layer attends (None: every layer attends the whole sequence)."""
    family = family_of(config)
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    if family.sliding_window_flag is not None and not getattr(config, family.sliding_window_flag, False):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def attention_reach(config) -> int:
    """The longest distance between a query and a key the model ever saw: the compact layout must fit in it."""
    window = sliding_window(config)
    return min(trained_window(config), window) if window else trained_window(config)


def layout(model_or_config) -> Layout:
    config = getattr(model_or_config, "config", model_or_config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return Layout(
        n_layers=config.num_hidden_layers,
        n_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
        record_bytes=codec.record_bytes(head_dim),
    )
