"""Which FFN channels each layer keeps: the learned persona mask, or a baseline score.

The generic baselines keep the same number k of intermediate channels in every layer; the persona methods keep
L·k in all, spread over the layers by builder.widths (`ffn_widths`). Methods:
- `persona-pruner` (the paper): weights frozen; a trainable score per channel; the forward pass keeps the top-k
  channels of each layer (a hard 0/1 mask on the act(gate)*up product, by forward hooks) and gradients reach the
  scores straight through the mask; the loss is KL(dense ‖ masked) over the full vocabulary on the teacher's
  answer tokens. Scores start at `persona-activation`.
- `persona-activation`: mean |act(gate)*up| on the persona data × the column norm of down_proj (the init alone).
- baselines on generic text: `magnitude` (weight norms of the channel), `wanda-sp` (|W| × input-activation norm,
  summed over the channel's weights, as in FLAP's Wanda-sp), `taylor` (|∂loss/∂mask|, first-order Taylor of
  removing the channel, as in LLM-Pruner's channel criterion).

Input: the dense model (not modified; hooks are removed on return), `SelectionData`, k, the config.
Output: per layer a sorted LongTensor of kept channel indices, and the learned mask's statistics (its probe
trace, the checkpoint chosen, the share of channels it moved from the init) and the widths chosen.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from builder import lm
from builder.config import BuildConfig
from builder.widths import layer_widths, probe_measure

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


def topk(scores: list[torch.Tensor], k: int | list[int]) -> list[torch.Tensor]:
    """The kept channel indices (sorted) of each layer: its top-k scores, k uniform or one per layer."""
    widths = [k] * len(scores) if isinstance(k, int) else k
    return [s.topk(w).indices.sort().values for s, w in zip(scores, widths)]


def masked_kl(model, seqset: lm.SeqSet, chunk: list[lm.Seq], masks: list[torch.Tensor] | None,
              dense_kv: lm.KV | None, pad_id: int, teacher: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KL(dense ‖ masked model) on the chunk's target tokens; `masks` may carry straight-through grads.
    `teacher`: the dense logits of the chunk's targets, when already computed."""
    if teacher is None:
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


def probe_kl(model, seqset: lm.SeqSet, probe: list[tuple[list[lm.Seq], torch.Tensor]], scores: list[torch.Tensor],
             k: int, pad_id: int) -> float:
    """KL(dense ‖ masked) per target token over the probe's (chunk, dense logits) pairs under the hard top-k mask
    of `scores`."""
    masks = [m.detach() for m in hard_masks(scores, k)]
    total, tokens = 0.0, 0
    with torch.no_grad():
        for chunk, teacher in probe:
            total += float(masked_kl(model, seqset, chunk, masks, None, pad_id, teacher)) * len(teacher)
            tokens += len(teacher)
    return total / max(tokens, 1)


def probe_batches(model, seqset: lm.SeqSet, probe: list[lm.Seq], dense_kv: lm.KV | None, batch: int,
                  pad_id: int) -> list[tuple[list[lm.Seq], torch.Tensor]]:
    """The probe in batches, each with its dense logits: computed once (~0.1 GB at the default probe), they halve
    the cost of every later check."""
    with torch.no_grad():
        return [(chunk, lm.target_forward(model, dense_kv, chunk, pad_id)) for chunk in lm.seq_batches(probe, batch)]


def split_probe(seqs: list[lm.Seq], config: BuildConfig) -> tuple[list[lm.Seq], list[lm.Seq]]:
    """The mask's probe sequences and the rest (seeded); a small card keeps three quarters for training."""
    order = torch.randperm(len(seqs), generator=torch.Generator().manual_seed(config.seed + 3)).tolist()
    n = min(config.mask_probe, len(seqs) // 4)
    return [seqs[i] for i in order[:n]], [seqs[i] for i in order[n:]]


def learn_mask(model, seqset: lm.SeqSet, init: list[torch.Tensor], k: int, config: BuildConfig,
               pad_id: int) -> tuple[list[torch.Tensor], dict]:
    """The paper's straight-through top-k mask learning; returns the learned scores and what the probe saw.

    The straight-through estimate is first order: past a few dozen steps it drifts, and the mask's KL rose from
    0.31-0.45 at step 41 to 0.99-1.35 at step 61 on all three characters tried (`best`, docs/quality.md). So
    `mask_probe` training sequences are held aside from the mask's batches, the hard mask's KL on them is checked
    at the start and every `mask_eval_every` steps, and the best checkpoint wins: more steps can no longer make
    the mask worse than the activation init on data it did not train on."""
    scores = [s.clone().float().requires_grad_(True) for s in init]
    if config.mask_steps == 0 or not seqset.seqs:
        return scores, {}
    probe, train = split_probe(seqset.seqs, config)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)  # frozen weights: only the scores learn
    # SGD on per-layer normalised gradients, not Adam: a swap of channel i (out) for j (in) lowers the loss to
    # first order when g_i < g_j, so scores must move in proportion to their gradients. Adam's per-coordinate
    # scaling moves every pruned channel up at the same pace and turns the mask into noise.
    opt = torch.optim.SGD(scores, lr=config.mask_lr, momentum=0.9)
    with torch.no_grad():
        dense_kv = lm.prefix_kv(model, seqset.prefix)
    feed = lm.batches(train, min(config.mask_batch, len(train)), torch.Generator().manual_seed(config.seed + 1))
    checks = probe_batches(model, seqset, probe, dense_kv, config.forward_batch, pad_id)
    trace: list[tuple[int, float]] = []
    best: tuple[float, int, list[torch.Tensor]] | None = None  # probe KL, step, scores

    def check(step: int) -> None:
        nonlocal best
        if not probe:
            return
        kl = probe_kl(model, seqset, checks, scores, k, pad_id)
        trace.append((step, round(kl, 4)))
        if best is None or kl < best[0]:
            best = (kl, step, [s.detach().clone() for s in scores])

    try:
        check(0)
        for step in range(1, config.mask_steps + 1):
            loss = masked_kl(model, seqset, next(feed), hard_masks(scores, k), dense_kv, pad_id)
            opt.zero_grad()
            loss.backward()
            for z in scores:
                z.grad /= z.grad.abs().mean().clamp(min=1e-12)
            opt.step()
            if step % config.mask_eval_every == 0 or step == config.mask_steps:
                check(step)
            if step % 20 == 1 or step == config.mask_steps:
                log.info("mask step %d/%d: KL %.4f (batch)%s", step, config.mask_steps, loss.item(),
                         f", probe {trace[-1][1]:.4f}" if trace and trace[-1][0] == step else "")
    finally:
        for p in params:
            p.requires_grad_(True)
    if best is None:
        return [s.detach() for s in scores], {}
    kl, chosen, best_scores = best
    log.info("mask probe KL %.4f at the init, %.4f at step %d (chosen), %.4f at the last step",
             trace[0][1], kl, chosen, trace[-1][1])
    return best_scores, {"probe_sequences": len(probe), "probe_kl": trace, "chosen_step": chosen}


def allocate_widths(model, seqset: lm.SeqSet, scores: list[torch.Tensor], k: int, config: BuildConfig,
                    pad_id: int) -> tuple[list[int], dict]:
    """Per-layer widths (builder.widths) measured on `width_probe` of the mask's probe sequences."""
    probe = split_probe(seqset.seqs, config)[0][:config.width_probe]
    if not probe:
        return [k] * len(scores), {}
    measure = probe_measure(model, seqset, probe, scores, config.forward_batch, pad_id)
    return layer_widths(measure, len(scores), len(scores[0]), k, config)


def select_channels(method: str, model, data: SelectionData, k: int, config: BuildConfig,
                    pad_id: int = 0) -> tuple[list[torch.Tensor], dict]:
    """Kept channel indices per layer (sorted) and the selection's statistics. The generic baselines keep k in
    every layer; the persona methods hand the same total out by measured cost per layer (builder.widths)."""
    batch = config.mask_batch
    stats: dict = {}
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
            scores, stats = learn_mask(model, data.persona, scores, k, config, pad_id)
            moved = sum(len(set(a.tolist()) - set(b.tolist())) for a, b in zip(topk(scores, k), init))
            stats["moved"] = round(moved / (k * len(init)), 4)
            log.info("learned mask moved %.1f%% of kept channels from the init", 100 * stats["moved"])
        widths, width_stats = allocate_widths(model, data.persona, scores, k, config, pad_id)
        stats.update(width_stats)
        return topk(scores, widths), stats
    else:
        raise ValueError(f"method: unknown selection method {method!r}")
    return topk(scores, k), stats
