"""Healing: distil the dense teacher into the pruned model on the character's data.

Distillation needs only the teacher's logits on each sequence (one forward pass over the cached system prompt),
never a sampled answer, so it can afford far more, and more varied, sequences than calibration samples
(FACTS 4d: the 80 sequences of the first trial were memorised; data, not steps, was the limit).
Loss: KL(dense ‖ pruned) over the full vocabulary on target tokens.

On-policy steps (`heal_on_policy`, a share of the steps): the teacher's answers show the student only contexts the
teacher writes, while in the game it continues its own words, and its loops start there (exposure bias). So part
of the steps train on the student's own sampled replies to the training queries, scored token by token by the
teacher (as in GKD, Agarwal et al. 2024). Replies come in pools of `on_policy_pool`, sampled in one batch and
refreshed every `on_policy_refresh` steps as the student moves: on magda (`fast`) repetition fell from 0.129 to
0.080 (dense 0.069) at the same KL, for 34-38 s of sampling (docs/quality.md).

By default (`heal_scope="ffn"`) only the remaining FFN weights train: embeddings, attention, norms and lm_head stay
bit-identical to the base, so the runtime can share them across characters (FACTS §4). "all" trains everything.
Training runs in bf16 where it is native (1.65× faster, FACTS 4c; `BuildConfig.dtype`) with fp32 master weights:
Adam updates of 1e-4 relative size vanish under bf16 rounding, and untouched tensors must keep their exact fp32 bits.

Input: the pruned fp32 student (modified in place), the dense teacher, a `SeqSet`, the config, and for on-policy
steps a `replies` source (`reply_source`: the student → its sequences).
Output: stats (loss at start and end, steps, sequences seen, on-policy steps and replies).
"""
from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable, Iterator

import torch

from builder import lm
from builder.config import BuildConfig

log = logging.getLogger(__name__)


def trainable(model, scope: str) -> list[tuple[str, torch.nn.Parameter]]:
    if scope == "all":
        return list(model.named_parameters())
    return [(n, p) for n, p in model.named_parameters() if ".mlp." in n]


def reply_source(tok, system: str, queries: list[str], config: BuildConfig) -> Callable[[Any], list[lm.Seq]]:
    """A seeded source of on-policy pools: `on_policy_pool` of the training queries, the given model's sampled
    reply to each (the teacher's sampling settings), as sequences whose reply tokens are the targets."""
    gen = torch.Generator().manual_seed(config.seed + 5)

    def pool(model) -> list[lm.Seq]:
        picks = [queries[int(i)] for i in torch.randperm(len(queries), generator=gen)[:config.on_policy_pool]]
        texts = lm.sample_replies(model, tok, system, picks, config.teacher_max_tokens, config.teacher_temperature,
                                  config.teacher_top_p, config.generation_rows, gen)
        return [lm.chat_seq(tok, system, [("user", q), ("assistant", t)])[1] for q, t in zip(picks, texts) if t]
    return pool


def on_policy_step(step: int, share: float) -> bool:
    """Spread a share of the steps evenly: 0.5 trains every second step on the student's replies."""
    return int((step + 1) * share) > int(step * share)


def heal(student, teacher, seqset: lm.SeqSet, config: BuildConfig, pad_id: int, seed_offset: int = 0,
         replies: Callable[[Any], list[lm.Seq]] | None = None) -> dict:
    if config.heal_steps == 0 or not seqset.seqs:
        return {"steps": 0, "sequences_seen": 0}
    masters = trainable(student, config.heal_scope)
    dtype = lm.train_dtype(config.dtype, config.device)
    work = copy.deepcopy(student).to(dtype) if dtype != torch.float32 else student
    names = {n for n, _ in masters}
    for n, p in work.named_parameters():
        p.requires_grad_(n in names)
    work_params = dict(work.named_parameters())
    opt = torch.optim.Adam([p for _, p in masters], lr=config.heal_lr)
    rng = torch.Generator().manual_seed(config.seed + 2 + seed_offset)
    with torch.no_grad():
        teacher_kv = lm.prefix_kv(teacher, seqset.prefix)
    feed = lm.batches(seqset.seqs, min(config.heal_batch, len(seqset.seqs)), rng)
    pool: Iterator[list[lm.Seq]] | None = None
    pool_step, on_steps, n_replies, sampling_s = -config.on_policy_refresh, 0, 0, 0.0
    losses: list[float] = []
    work.train()
    try:
        for step in range(config.heal_steps):
            on_policy = replies is not None and on_policy_step(step, config.heal_on_policy)
            if on_policy and step - pool_step >= config.on_policy_refresh:
                t0 = time.perf_counter()
                fresh = replies(work)
                sampling_s += time.perf_counter() - t0
                pool_step, n_replies = step, n_replies + len(fresh)
                pool = lm.batches(fresh, min(config.heal_batch, len(fresh)), rng) if fresh else None
            on_policy = on_policy and pool is not None  # a pool of empty replies: this step stays off-policy
            chunk = next(pool) if on_policy else next(feed)
            on_steps += on_policy
            with torch.no_grad():
                t = lm.target_forward(teacher, teacher_kv, chunk, pad_id)
            with torch.no_grad():  # the student's own prompt cache, as a constant (see lm.prefix_kv)
                kv = lm.prefix_kv(work, seqset.prefix)
            s = lm.target_forward(work, kv, chunk, pad_id)
            loss = lm.kl_per_token(t, s).mean()
            work.zero_grad(set_to_none=True)
            loss.backward()
            if work is not student:
                for n, p in masters:
                    p.grad = work_params[n].grad.float()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if work is not student:
                with torch.no_grad():
                    for n, p in masters:
                        work_params[n].copy_(p)
            losses.append(loss.item())
            if step % 25 == 0 or step == config.heal_steps - 1:
                log.info("heal step %d/%d: KL %.4f%s", step + 1, config.heal_steps, losses[-1],
                         " (on-policy)" if on_policy else "")
    finally:
        work.eval()
        student.eval()
        for p in student.parameters():
            p.grad = None
    head = losses[:max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": len(losses), "sequences_seen": len(losses) * min(config.heal_batch, len(seqset.seqs)),
            "loss_start": sum(head) / len(head), "loss_end": sum(tail) / len(tail), "on_policy_steps": on_steps,
            "on_policy_replies": n_replies, "sampling_seconds": round(sampling_s, 1)}
