"""Which FFN channels each layer keeps: the learned persona mask, or a baseline score.

Every method keeps the same number k of intermediate channels in every layer (uniform widths keep the checkpoint
stock, FACTS §3). Methods:
- `persona-pruner` (the paper): weights frozen; a trainable score per channel; the forward pass keeps the top-k
  channels of each layer (a hard 0/1 mask on the act(gate)*up product, by forward hooks) and gradients reach the
  scores straight through the mask; the loss is KL(dense ‖ masked) over the full vocabulary on the teacher's
  answer tokens. Scores start at `persona-activation`.
- `persona-activation`: mean |act(gate)*up| on the persona data × the column norm of down_proj (the init alone).
- baselines on generic text: `magnitude` (weight norms of the channel), `wanda-sp` (|W| × input-activation norm,
  summed over the channel's weights, as in FLAP's Wanda-sp), `taylor` (|∂loss/∂mask|, first-order Taylor of
  removing the channel, as in LLM-Pruner's channel criterion).

Input: the dense model (not modified; hooks are removed on return), `SelectionData`, k, the config.
Output: per layer a sorted LongTensor of kept channel indices.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from builder import lm
from builder.config import BuildConfig

log = logging.getLogger(__name__)


@dataclass
class SelectionData:
    persona: lm.SeqSet  # the character's training sequences (system prompt prefix + answers)
    generic: lm.SeqSet  # plain generic text, for the baselines


def activation_score(model, seqset: lm.SeqSet, batch: int, pad_id: int) -> list[torch.Tensor]:
    """Mean |act*up| per channel over the real tokens × the L2 norm of the channel's down_proj column."""
    mlps = lm.mlps(model)
    sums = [torch.zeros(m.down_proj.in_features, device=model.device) for m in mlps]
    count = lm.channel_activations(model, seqset, batch, pad_id, lambda i, h: sums[i].add_(h.abs().float().sum(0)))
    return [s / max(count, 1) * m.down_proj.weight.float().norm(dim=0) for s, m in zip(sums, mlps)]


def magnitude_score(model) -> list[torch.Tensor]:
    return [m.gate_proj.weight.float().norm(dim=1) + m.up_proj.weight.float().norm(dim=1)
            + m.down_proj.weight.float().norm(dim=0) for m in lm.mlps(model)]


@torch.no_grad()
def wanda_sp_score(model, seqset: lm.SeqSet, batch: int, pad_id: int) -> list[torch.Tensor]:
    mlps = lm.mlps(model)
    h_sq = [torch.zeros(m.down_proj.in_features, device=model.device) for m in mlps]
    x_sq = [torch.zeros(m.gate_proj.in_features, device=model.device) for m in mlps]
    lm.channel_activations(model, seqset, batch, pad_id, lambda i, h: h_sq[i].add_(h.float().pow(2).sum(0)),
                           on_input=lambda i, x: x_sq[i].add_(x.float().pow(2).sum(0)))
    scores = []
    for m, hs, xs in zip(mlps, h_sq, x_sq):
        down = m.down_proj.weight.float().abs().sum(0) * hs.sqrt()
        inner = (m.gate_proj.weight.float().abs() + m.up_proj.weight.float().abs()) @ xs.sqrt()
        scores.append(down + inner)
    return scores


def taylor_score(model, seqset: lm.SeqSet, batch: int, pad_id: int) -> list[torch.Tensor]:
    ones = [torch.ones(m.down_proj.in_features, requires_grad=True, device=model.device) for m in lm.mlps(model)]
    with lm.channel_hook(model, lambda i, h: h * ones[i].to(h.dtype)):
        for chunk in lm.seq_batches(seqset.seqs, batch):
            loss = torch.nn.functional.cross_entropy(lm.target_forward(model, None, chunk, pad_id).float(),
                                                     lm.target_ids(chunk, model.device))
            loss.backward()
    return [o.grad.abs() for o in ones]


def _normalise(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer to mean 1, so one learning rate fits every layer and model."""
    return [s / s.mean().clamp(min=1e-12) for s in scores]


def topk(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    return [s.topk(k).indices.sort().values for s in scores]


def masked_kl(model, seqset: lm.SeqSet, chunk: list[lm.Seq], masks: list[torch.Tensor] | None,
              dense_kv: lm.KV | None, pad_id: int) -> torch.Tensor:
    """Mean KL(dense ‖ masked model) on the chunk's target tokens; `masks` may carry straight-through grads."""
    with torch.no_grad():
        teacher = lm.target_forward(model, dense_kv, chunk, pad_id)
    hook = (lambda i, h: h * masks[i].to(h.dtype)) if masks is not None else (lambda i, h: None)
    with lm.channel_hook(model, hook):
        with torch.no_grad():  # the masked prompt, as a constant: see lm.prefix_kv on why it is not trained through
            kv = lm.prefix_kv(model, seqset.prefix)
        student = lm.target_forward(model, kv, chunk, pad_id)
    return lm.kl_per_token(teacher, student).mean()


def hard_masks(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Top-k 0/1 mask per layer whose gradient passes straight through to the scores."""
    out = []
    for z in scores:
        hard = torch.zeros_like(z)
        hard[z.detach().topk(k).indices] = 1.0
        out.append(hard + z - z.detach())
    return out


def learn_mask(model, seqset: lm.SeqSet, init: list[torch.Tensor], k: int, config: BuildConfig,
               pad_id: int) -> list[torch.Tensor]:
    """The paper's straight-through top-k mask learning; returns the learned scores."""
    scores = [s.clone().float().requires_grad_(True) for s in init]
    if config.mask_steps == 0 or not seqset.seqs:
        return scores
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)  # frozen weights: only the scores learn
    # SGD on per-layer normalised gradients, not Adam: a swap of channel i (out) for j (in) lowers the loss to
    # first order when g_i < g_j, so scores must move in proportion to their gradients. Adam's per-coordinate
    # scaling moves every pruned channel up at the same pace and turns the mask into noise.
    opt = torch.optim.SGD(scores, lr=config.mask_lr, momentum=0.9)
    rng = torch.Generator().manual_seed(config.seed + 1)
    with torch.no_grad():
        dense_kv = lm.prefix_kv(model, seqset.prefix)
    feed = lm.batches(seqset.seqs, min(config.mask_batch, len(seqset.seqs)), rng)
    try:
        for step in range(config.mask_steps):
            loss = masked_kl(model, seqset, next(feed), hard_masks(scores, k), dense_kv, pad_id)
            opt.zero_grad()
            loss.backward()
            for z in scores:
                z.grad /= z.grad.abs().mean().clamp(min=1e-12)
            opt.step()
            if step % 20 == 0 or step == config.mask_steps - 1:
                log.info("mask step %d/%d: KL %.4f", step + 1, config.mask_steps, loss.item())
    finally:
        for p in params:
            p.requires_grad_(True)
    return [s.detach() for s in scores]


def select_channels(method: str, model, data: SelectionData, k: int, config: BuildConfig,
                    pad_id: int = 0) -> list[torch.Tensor]:
    """Kept channel indices per layer (sorted), k in every layer."""
    batch = config.mask_batch
    if method == "magnitude":
        scores = magnitude_score(model)
    elif method == "wanda-sp":
        scores = wanda_sp_score(model, data.generic, batch, pad_id)
    elif method == "taylor":
        scores = taylor_score(model, data.generic, batch, pad_id)
    elif method in ("persona-activation", "persona-pruner"):
        scores = _normalise(activation_score(model, data.persona, batch, pad_id))
        if method == "persona-pruner":
            init = topk(scores, k)
            scores = learn_mask(model, data.persona, scores, k, config, pad_id)
            moved = sum(len(set(a.tolist()) - set(b.tolist())) for a, b in zip(topk(scores, k), init))
            log.info("learned mask moved %.1f%% of kept channels from the init", 100 * moved / (k * len(init)))
    else:
        raise ValueError(f"method: unknown selection method {method!r}")
    return topk(scores, k)
