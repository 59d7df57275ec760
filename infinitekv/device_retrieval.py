"""Cold-token retrieval with the model on a GPU: the same selection as attention.select_cold_blocks, in torch on the
device, so a decode step or a prefill block never waits on the host.

The layer's signatures, weights and records are mirrored on the device (`search.ResidentIndex` with records), and
per selection block and kv-head:

1. first stage: the block's mean query (pre-RoPE, turned, in the rotated basis, summed over the GQA group) scores
   every cold token with the weighted signature kernel (csrc/), from LUTs built on the device as search.score_luts
   builds them; the `shortlist` best, ties to the lower index. Flat over the whole cold tier: the two-level index
   exists to bound the CPU's scan, and the GPU's costs 0.035 ms at 1M tokens (BENCHMARKS.md);
2. rerank: q . x for the shortlist's int8 key codes, the max over the block's queries and their query heads, times
   the key scale (codec.score_shortlist's arithmetic, summed in another order);
3. the `retrieved` best, in token order, dequantised (codec.decode_rows) and taken back to the model's basis:
   k = x R + mu.

What it costs: the mirror holds 12 + record_bytes bytes per token and kv-head of each layer on the device (116 for
head_dim 64), against 256 for the fp16 keys and values it stands for.
"""

from __future__ import annotations

import numpy as np
import torch

from infinitekv import search

_BYTE_SIGNS = {}  # device -> float64 [8, 256]: +1 for bit 0, -1 for bit 1; copied once (a copy makes the host wait)


def weighted_luts(queries: torch.Tensor) -> torch.Tensor:
    """float [G, D] -> int32 [G, D/8, 256], search.score_luts' weighted LUTs computed on the queries' device."""
    q = queries.double()
    peak = q.abs().amax(dim=-1, keepdim=True)
    step = torch.where(peak > 0, float(2**search.QUERY_BITS) / peak.clamp_min(1e-300), torch.zeros_like(peak))
    qi = torch.round(q * step)  # half to even, as np.rint; integers < 2**17, exact in float64
    if q.device not in _BYTE_SIGNS:
        _BYTE_SIGNS[q.device] = torch.from_numpy(search._BYTE_SIGNS.T.astype(np.float64)).to(q.device)
    signs = _BYTE_SIGNS[q.device]
    return (qi.view(q.shape[0], -1, 8) @ signs).to(torch.int32)  # sums of <= 8 of them: exact


def top_k_by_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the k best of each row of float32 scores [..., n] (ties to the lower position), ascending."""
    flat = scores.reshape(-1, scores.shape[-1])
    flat = torch.where(flat == 0, torch.zeros_like(flat), flat)  # -0.0 and +0.0 tie
    _, local = search.topk_rows_on_device(flat, k)
    return local.sort(dim=-1).values.reshape(scores.shape[:-1] + (k,))


def _fields(records: torch.Tensor, head_dim: int):
    """Key codes (float32), value codes (float32, unpacked) and the four scales (float32) of uint8 records
    [..., record_bytes], as codec.record_fields lays them out."""
    d = head_dim
    codes = records[..., :d].view(torch.int8).float()
    packed = records[..., d : d + d // 2].to(torch.int32)
    value_codes = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2).float()
    scales = records[..., d + d // 2 : d + d // 2 + 8].contiguous().view(torch.float16).float()
    return codes, value_codes, scales


def select_blocks_on_device(index: search.ResidentIndex, q_rotated: torch.Tensor, blocks, shortlist: int,
                            retrieved: int) -> torch.Tensor:
    """The cold tokens each block attends, per kv-head: int64 ids [Hk, n_blocks, r] ascending, on the device.

    q_rotated: [Hk, C, G, D] float32 queries in the rotated basis (R q); blocks as attention.select_blocks cuts
    them (equal blocks, the last one maybe shorter), so their layout is built on the device from their number and
    width: a list copied from the host would make the host wait for the device, every layer of every step."""
    n_heads, length, group, head_dim = q_rotated.shape
    device = q_rotated.device
    n_blocks, widest = len(blocks), blocks[0][1] - blocks[0][0]
    # each block's queries, the last block padded with copies of the last query (a max is unchanged by repeats)
    positions = torch.arange(n_blocks * widest, device=device).view(n_blocks, widest)
    take = positions.clamp_max(length - 1)
    by_block = q_rotated[:, take]  # [Hk, n_blocks, widest, G, D]
    summed = q_rotated.sum(dim=2)[:, take]  # [Hk, n_blocks, widest, D]: one first-stage query per kv-head
    real = (positions < length).to(summed.dtype)[None, :, :, None]
    means = ((summed * real).sum(dim=2) / real.sum(dim=2)).transpose(0, 1)  # [n_blocks, Hk, D]
    n_tokens = index.n_tokens
    candidates = min(shortlist, n_tokens)
    luts = weighted_luts(means.reshape(-1, head_dim))  # row g: block g // Hk, head g % Hk
    _, first = search.scan_on_device(index.kernel(), index.sigs, index.weights, n_tokens, luts, candidates, "weighted")
    first = first.sort(dim=-1).values.view(n_blocks, n_heads, candidates)  # [n_blocks, Hk, L], in token order
    heads = torch.arange(n_heads, device=device)[None, :, None]
    codes, _, scales = _fields(index.records[heads, first], head_dim)  # [n_blocks, Hk, L, D], [..., 4]
    queries = by_block.permute(1, 0, 2, 3, 4).reshape(n_blocks, n_heads, widest * group, head_dim)
    best = (codes @ queries.transpose(-1, -2)).amax(dim=-1) * scales[..., 0]  # [n_blocks, Hk, L]
    keep = top_k_by_index(best, min(retrieved, candidates))
    return torch.gather(first, -1, keep).transpose(0, 1)  # [Hk, n_blocks, r], ascending: first is ascending


def decode_on_device(index: search.ResidentIndex, ids: torch.Tensor, rotation: torch.Tensor,
                     key_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (k = x R + mu) and values of cold tokens ids [Hk, ...], float32 [Hk, ..., D] each, on the device."""
    head_dim = rotation.shape[0]
    heads = torch.arange(ids.shape[0], device=ids.device).view(-1, *([1] * (ids.dim() - 1)))
    codes, value_codes, scales = _fields(index.records[heads, ids], head_dim)
    x = codes * scales[..., 0:1]
    values = scales[..., 3:4] + value_codes * scales[..., 2:3]
    mean = key_mean.view(key_mean.shape[0], *([1] * (ids.dim() - 1)), head_dim)
    return x @ rotation + mean, values
