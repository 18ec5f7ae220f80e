"""The gates of stock MoE families in torch, importable without vLLM.

Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE route each token, in each MoE layer, from that layer's own
gate: softmax over the experts in f32, the top k, and (Mixtral always, the others iff
`norm_topk_prob`) the k weights renormalised to sum to 1. Ties go to the lowest expert index,
which is what a stable descending sort gives (`torch.topk` leaves the order of ties unspecified).

A token whose gate logits are not finite gets weight 0 on every expert it routes to. vLLM's
warm-up run before compiling leaves attention's output unwritten (`torch.empty`), so its MoE
layers can see NaN; the library refuses non-finite weights, which would stop the engine from
starting. The token's hidden state stays non-finite through the residual, as in vLLM's own MoE
layers, so a real divergence still shows in the logits.
"""

from __future__ import annotations

import torch


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`[T, E]` gate logits -> experts `[T, k]` (int32) and their weights `[T, k]` (f32)."""
    if logits.dim() != 2:
        raise ValueError(f"gate logits have shape {tuple(logits.shape)}; expected [T, E]")
    if not 1 <= top_k <= logits.shape[-1]:
        raise ValueError(f"top_k {top_k} is outside 1..{logits.shape[-1]}")
    probs = torch.softmax(logits.float(), dim=-1)
    if top_k == 1:
        # argmax returns the first of equal maxima.
        ids = probs.argmax(dim=-1, keepdim=True)
    else:
        ids = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
    w = torch.gather(probs, -1, ids)
    if renormalize:
        w = w / w.sum(dim=-1, keepdim=True)
    return ids.to(torch.int32), torch.nan_to_num(w, nan=0.0, posinf=0.0, neginf=0.0)
