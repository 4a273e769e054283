"""Healing: distil the dense teacher into the pruned model on the character's data.

Distillation needs only the teacher's logits on each sequence (one forward pass over the cached system prompt),
never a sampled answer, so it can afford far more, and more varied, sequences than calibration samples
(FACTS 4d: the 80 sequences of the first trial were memorised; data, not steps, was the limit).
Loss: KL(dense ‖ pruned) over the full vocabulary on target tokens.

By default (`heal_scope="ffn"`) only the remaining FFN weights train: embeddings, attention, norms and lm_head stay
bit-identical to the base, so the runtime can share them across characters (FACTS §4). "all" trains everything.
Training runs in bf16 on CPU (1.65× faster, FACTS 4c) with fp32 master weights: Adam updates of 1e-4 relative
size vanish under bf16 rounding, and untouched tensors must keep their exact fp32 bits.

Input: the pruned fp32 student (modified in place), the dense teacher, a `SeqSet`, the config.
Output: stats (loss at start and end, steps, sequences seen).
"""
from __future__ import annotations

import copy
import logging

import torch

from builder import lm
from builder.config import BuildConfig

log = logging.getLogger(__name__)


def trainable(model, scope: str) -> list[tuple[str, torch.nn.Parameter]]:
    if scope == "all":
        return list(model.named_parameters())
    return [(n, p) for n, p in model.named_parameters() if ".mlp." in n]


def heal(student, teacher, seqset: lm.SeqSet, config: BuildConfig, pad_id: int,
         seed_offset: int = 0) -> dict:
    if config.heal_steps == 0 or not seqset.seqs:
        return {"steps": 0, "sequences_seen": 0}
    masters = trainable(student, config.heal_scope)
    work = copy.deepcopy(student).to(torch.bfloat16) if config.dtype == "bf16" else student
    names = {n for n, _ in masters}
    for n, p in work.named_parameters():
        p.requires_grad_(n in names)
    work_params = dict(work.named_parameters())
    opt = torch.optim.Adam([p for _, p in masters], lr=config.heal_lr)
    rng = torch.Generator().manual_seed(config.seed + 2 + seed_offset)
    with torch.no_grad():
        teacher_kv = lm.prefix_kv(teacher, seqset.prefix)
    feed = lm.batches(seqset.seqs, min(config.heal_batch, len(seqset.seqs)), rng)
    losses: list[float] = []
    work.train()
    try:
        for step in range(config.heal_steps):
            chunk = next(feed)
            rows = [s.ids for s in chunk]
            with torch.no_grad():
                t = lm.target_logits(lm.forward(teacher, teacher_kv, rows, pad_id).logits, chunk)
            with torch.no_grad():  # the student's own prompt cache, as a constant (see lm.prefix_kv)
                kv = lm.prefix_kv(work, seqset.prefix)
            s = lm.target_logits(lm.forward(work, kv, rows, pad_id).logits, chunk)
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
                log.info("heal step %d/%d: KL %.4f", step + 1, config.heal_steps, losses[-1])
    finally:
        work.eval()
        student.eval()
        for p in student.parameters():
            p.grad = None
    head = losses[:max(1, len(losses) // 10)]
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": len(losses), "sequences_seen": len(losses) * min(config.heal_batch, len(seqset.seqs)),
            "loss_start": sum(head) / len(head), "loss_end": sum(tail) / len(tail)}
