"""Recall of the exact top-k cold tokens against shortlist size, for candidate signature designs.

Runs the unmodified SmolLM2 over real English text (the Python docs shipped in the standard library), captures the
pre-RoPE queries and keys of every layer, and for the last `--queries` positions asks: of the exact top-k cold tokens
by GQA-summed q.k, what fraction does each first-stage signature scan put in its shortlist of L candidates?

    python scripts/measure_recall.py --tokens 6000 --queries 64
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from infinitekv import codec
from infinitekv.corpus import english_text
from infinitekv.models import load_model


def capture(model, ids):
    qs, ks = {}, {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.self_attn.q_proj.register_forward_hook(lambda m, a, o, i=i: qs.__setitem__(i, o[0].detach())))
        hooks.append(layer.self_attn.k_proj.register_forward_hook(lambda m, a, o, i=i: ks.__setitem__(i, o[0].detach())))
    with torch.no_grad():
        model(ids, use_cache=False, logits_to_keep=1)
    for h in hooks:
        h.remove()
    return qs, ks


def recall(top_true, shortlist):
    return np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(top_true, shortlist)])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=6000)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--hot-window", type=int, default=512)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--layers", default="0,5,10,15,20,25,29")
    args = parser.parse_args()
    loaded = load_model()
    model, tok = loaded.model, loaded.tokenizer
    cfg = model.config
    ids = torch.tensor([tok(english_text(args.tokens * 6))["input_ids"][: args.tokens]])
    qs, ks = capture(model, ids)
    hq, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    group = hq // hk
    sinks = 4
    shortlists = [32, 64, 128, 256, 512, 1024]
    rot = codec.rotation_matrix(d, 0)
    results = {}
    for layer in [int(x) for x in args.layers.split(",")]:
        q = qs[layer].view(-1, hk, group, d).sum(2).numpy()  # [T, Hk, D] GQA-summed
        k = ks[layer].view(-1, hk, d).numpy()  # [T, Hk, D]
        T = k.shape[0]
        mu = k[: 1024].mean(0)  # per-head mean from the first chunk, as the engine does
        designs = {
            "sign(k) hamming": (k, None, "hamming"),
            "sign(k-mu) hamming": (k - mu, None, "hamming"),
            "sign(R(k-mu)) hamming": (np.einsum("ij,thj->thi", rot, k - mu), rot, "hamming"),
            "sign(k-mu) weighted": (k - mu, None, "weighted"),
            "sign(R(k-mu)) weighted": (np.einsum("ij,thj->thi", rot, k - mu), rot, "weighted"),
        }
        for name, (x, r, mode) in designs.items():
            rec = {L: [] for L in shortlists}
            rec_q8 = []
            for t in range(T - args.queries, T):
                cold_end = t - args.hot_window
                for h in range(hk):
                    exact = k[sinks:cold_end, h] @ q[t, h]
                    true = np.argsort(-exact, kind="stable")[: args.k]
                    qq = r @ q[t, h] if r is not None else q[t, h]
                    xs = x[sinks:cold_end, h]
                    if mode == "hamming":
                        est = -((xs < 0) != (qq < 0)).sum(1)
                    else:
                        est = np.abs(xs).mean(1) * (np.where(xs < 0, -1.0, 1.0) @ qq)
                    order = np.argsort(-est, kind="stable")
                    for L in shortlists:
                        rec[L].append(len(set(true) & set(order[:L])) / args.k)
            results.setdefault(name, {})[layer] = {L: float(np.mean(v)) for L, v in rec.items()}
        print(f"layer {layer}: " + "; ".join(f"{n}: " + " ".join(f"{results[n][layer][L]:.2f}" for L in shortlists) for n in designs), flush=True)
    print("\nmean recall of exact top-%d over layers, by shortlist size %s" % (args.k, shortlists))
    for name, per_layer in results.items():
        means = [np.mean([per_layer[l][L] for l in per_layer]) for L in shortlists]
        print(f"{name:28s} " + " ".join(f"{m:.3f}" for m in means))
    print(json.dumps({"args": vars(args), "results": results}))


if __name__ == "__main__":
    main()
