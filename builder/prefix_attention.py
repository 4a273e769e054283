"""Shared-prefix attention for the builder's torch models: a batch of sequences that all continue ONE cached prompt.

Every persona batch continues its character's system prompt (`lm.prefix_kv`, batch 1). Expanding that cache to
the batch made each decoding step copy it B times (the cache's concatenation), copy it again per query head
(`repeat_kv`) and run a masked attention over the copies: at 24 sampled rows after a 400-token prompt those were
~70 % of a step's CPU time (torch profiler; docs/internals.md). Here the prefix stays one tensor per layer: the
queries of every row and of every head that shares a KV head are stacked into one matrix multiplied by it, each
row's own suffix keys are attended as usual, and one softmax spans both parts, so the result is the same attention.

Inputs: the prefix KV (per layer `(1, kv_heads, P, head_dim)`) passed to the model call as `prefix_kv=`, and a
boolean suffix mask `(B, 1, Q, S)` from `suffix_mask`. Output: the attention function, registered with
transformers as `NAME`; a call without `prefix_kv` gets transformers' own sdpa attention.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "npcforge-prefix"


def suffix_mask(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, S) valid-key flags of the suffix → (B, 1, q_len, S): the last q_len positions are the queries, and each
    sees the valid keys up to itself (the prefix is always visible and is not in this mask). A padding query also
    sees its own key: a row with nothing to attend to would make NaNs that later layers read as keys."""
    s = valid.shape[1]
    keys = torch.arange(s, device=valid.device)[None, :]
    query_pos = torch.arange(s - q_len, s, device=valid.device)[:, None]
    allowed = valid.bool()[:, None, :] & (keys <= query_pos)[None]  # (B, Q, S)
    return (allowed | (keys == query_pos)[None]).unsqueeze(1)  # (B, 1, Q, S)


def prefix_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, None]:
    prefix = kwargs.pop("prefix_kv", None)
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    kp, vp = prefix[module.layer_idx]  # (1, KH, P, hs)
    b, nh, q_len, hs = query.shape
    kh, s, p = key.shape[1], key.shape[2], kp.shape[2]
    window = getattr(module, "sliding_window", None)
    if window and p + s > window:
        raise ValueError(f"sequence of {p + s} tokens exceeds the model's sliding window of {window}: shorten "
                         "max_seq_len or the system prompt")
    g = nh // kh  # query heads per KV head; head h reads KV head h // g
    scale = scaling if scaling is not None else hs ** -0.5
    q = query.reshape(b, kh, g * q_len, hs)  # (B, KH, G·Q, hs)
    # the prefix: all rows' queries of one KV head in one (B·G·Q, hs) x (hs, P) product
    q_rows = q.transpose(0, 1).reshape(kh, b * g * q_len, hs)  # (KH, B·G·Q, hs)
    s_pre = (q_rows @ kp[0].transpose(1, 2)).view(kh, b, g * q_len, p).transpose(0, 1)  # (B, KH, G·Q, P)
    s_suf = q @ key.transpose(2, 3)  # (B, KH, G·Q, S)
    allowed = attention_mask.unsqueeze(2).expand(b, 1, g, q_len, s).reshape(b, 1, g * q_len, s)
    s_suf = s_suf.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(torch.cat([s_pre, s_suf], dim=-1).float() * scale, dim=-1).to(query.dtype)
    p_pre, p_suf = probs.split([p, s], dim=-1)
    out = (p_pre.transpose(0, 1).reshape(kh, b * g * q_len, p) @ vp[0]).view(kh, b, g * q_len, hs).transpose(0, 1)
    out = out + p_suf @ value  # (B, KH, G·Q, hs)
    return out.reshape(b, nh, q_len, hs).transpose(1, 2).contiguous(), None  # (B, Q, nh, hs)


AttentionInterface.register(NAME, prefix_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # calls without a prefix build their masks as sdpa does


def use_prefix_attention(model) -> None:
    """Switch a loaded model to this attention (idempotent; its outputs without a prefix are sdpa's)."""
    if model.config._attn_implementation != NAME:
        model.set_attn_implementation(NAME)
