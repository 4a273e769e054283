"""Fidelity of a pruned character model to its dense base, on held-out queries only, and the quality gate.

Metrics (dense vs pruned):
(a) teacher-forced KL(dense ‖ pruned) per token and cross-entropy on the dense model's in-character answers to the
    held-out queries (the primary metric), plus top-1 agreement;
(b) persona judge on freshly sampled answers (`judge_samples` per held-out query): the dense model's
    log-likelihood of each answer under every roster character's system prompt; identified when its own persona
    ranks first (accuracy with its binomial standard error, mean margin): at 40 answers one accuracy moves by
    ≈ 6 points with the samples drawn;
(c) degeneration of those answers: distinct-2, repeated 3-gram rate, prompt-echo rate;
(d) perplexity on the card's own example dialogues (no system prompt, so nothing can be copied) and on held-back
    generic paragraphs;
(e) two sample answers, dense vs pruned.
`gate` turns them into pass/fail with reasons; `drop_reduction` compares with a baseline.

Inputs: dense and pruned models, the tokenizer, a `PersonaJudge`, the held-out examples, prompts, config.
Output: a flat dict of numbers (+ `samples`), JSON-ready.
"""
from __future__ import annotations

import math

import torch

from builder import judge as judging
from builder import lm
from builder.config import BuildConfig


@torch.no_grad()
def teacher_forced(dense, pruned, seqset: lm.SeqSet, batch: int, pad_id: int) -> dict[str, float]:
    """KL(dense ‖ pruned), cross-entropies and top-1 agreement over the target tokens of a SeqSet."""
    kv_d = lm.prefix_kv(dense, seqset.prefix)
    kv_p = lm.prefix_kv(pruned, seqset.prefix)
    kl = ce_d = ce_p = agree = 0.0
    n = 0
    for chunk in lm.seq_batches(seqset.seqs, batch):
        d = lm.target_forward(dense, kv_d, chunk, pad_id).float()
        p = lm.target_forward(pruned, kv_p, chunk, pad_id).float()
        y = lm.target_ids(chunk, d.device)
        kl += float(lm.kl_per_token(d, p).sum())
        ce_d += float(torch.nn.functional.cross_entropy(d, y, reduction="sum"))
        ce_p += float(torch.nn.functional.cross_entropy(p, y, reduction="sum"))
        agree += float((d.argmax(-1) == p.argmax(-1)).sum())
        n += len(y)
    n = max(n, 1)
    return {"kl": kl / n, "ce_dense": ce_d / n, "ce_pruned": ce_p / n, "top1_agreement": agree / n, "tokens": n}


def answers(model, tok, system: str, queries: list[str], config: BuildConfig, rows: int) -> list[str]:
    """`judge_samples` sampled answers per query (round after round: the queries in order, then again) with the
    teacher's sampling settings and a fixed seed, the same for every model. Rounds share one generator, so the
    first round is the same whatever `judge_samples` is."""
    gen = torch.Generator().manual_seed(config.seed + 7)
    return [text for _ in range(config.judge_samples)
            for text in lm.sample_replies(model, tok, system, queries, config.teacher_max_tokens,
                                          config.teacher_temperature, config.teacher_top_p, rows, gen)]


def evaluate(dense, pruned, tok, persona_judge: judging.PersonaJudge, system: str, other_prompts: list[str],
             heldout: list[tuple[str, str]], examples: lm.SeqSet, generic: lm.SeqSet, config: BuildConfig,
             batch: int = 8, dense_cache: dict | None = None) -> dict:
    """All metrics for one character. `heldout` is (query, dense reference answer); `other_prompts` are the
    system prompts of the other personas the judge must tell this character from. `dense_cache` keeps the dense
    model's side (its sampled answers and their judging), which is the same for every pruned model compared."""
    pad = tok.pad_token_id
    held = lm.SeqSet(lm.chat_seq(tok, system, [])[0],
                     [lm.chat_seq(tok, system, [("user", q), ("assistant", a)])[1] for q, a in heldout])
    m: dict = {"heldout_queries": len(heldout)}
    tf = teacher_forced(dense, pruned, held, batch, pad)
    m.update({"kl": tf["kl"], "ce_dense": tf["ce_dense"], "ce_pruned": tf["ce_pruned"],
              "top1_agreement": tf["top1_agreement"], "kl_tokens": tf["tokens"]})

    queries = [q for q, _ in heldout]
    prompts = [system] + other_prompts
    cache = {} if dense_cache is None else dense_cache
    sampling = (config.seed, config.teacher_max_tokens, config.teacher_temperature, config.teacher_top_p,
                config.generation_rows, config.judge_samples)  # rows: the seeded batches
    asked = queries * config.judge_samples  # the query of each answer, round after round
    key = (system, tuple(prompts), tuple(queries), sampling)
    for name, model in (("dense", dense), ("pruned", pruned)):
        if name == "pruned" or key not in cache:
            texts = answers(model, tok, system, queries, config, config.generation_rows)
            side = judging.identification(persona_judge.loglik(prompts, list(zip(asked, texts))))
            side.update(judging.degeneration(texts, system))
            side["_texts"] = texts
            if name == "dense":
                cache[key] = side
        else:
            side = cache[key]
        for k, value in side.items():
            m[f"{k}_{name}"] = value
        p = m[f"judge_accuracy_{name}"]
        m[f"judge_accuracy_se_{name}"] = math.sqrt(p * (1 - p) / max(len(asked), 1))
    m["judged_answers"] = len(asked)
    for label, seqset in (("examples", examples), ("generic", generic)):
        if seqset.seqs:
            tf = teacher_forced(dense, pruned, seqset, batch, pad)
            m[f"ppl_{label}_dense"] = math.exp(min(tf["ce_dense"], 50.0))
            m[f"ppl_{label}_pruned"] = math.exp(min(tf["ce_pruned"], 50.0))
    dense_texts, pruned_texts = m.pop("_texts_dense"), m.pop("_texts_pruned")
    m["samples"] = [{"query": q, "dense": d, "pruned": p}
                    for q, d, p in list(zip(queries, dense_texts, pruned_texts))[:2]]
    return m


def gate(m: dict, config: BuildConfig) -> tuple[bool, list[str]]:
    """Pass/fail with one reason per failed check (an empty list when it passes)."""
    reasons = []
    if m["kl"] > config.max_kl:
        reasons.append(f"KL(dense||pruned) {m['kl']:.3f} nats/token > max_kl {config.max_kl}")
    for key in ("repetition", "echo_rate"):
        if m[f"{key}_pruned"] > m[f"{key}_dense"] + config.max_degeneration_increase:
            reasons.append(f"{key} {m[f'{key}_pruned']:.3f} > dense {m[f'{key}_dense']:.3f} + "
                           f"max_degeneration_increase {config.max_degeneration_increase}")
    # "trails by at most max_judge_drop", with room for the decimal fraction: 0.8 - 0.1 is 0.7000000000000001
    if m["judge_accuracy_dense"] - m["judge_accuracy_pruned"] > config.max_judge_drop + 1e-9:
        noise = ""
        if "judge_accuracy_se_pruned" in m and "judge_accuracy_se_dense" in m:  # say how sure one sample is
            se = math.hypot(m["judge_accuracy_se_pruned"], m["judge_accuracy_se_dense"])
            noise = f" (standard error of the difference {se:.2f} at {m.get('judged_answers', '?')} answers each)"
        reasons.append(f"judge accuracy {m['judge_accuracy_pruned']:.2f} < dense {m['judge_accuracy_dense']:.2f} "
                       f"- max_judge_drop {config.max_judge_drop}{noise}")
    return not reasons, reasons


def drop_reduction(dense: float, ours: float, baseline: float) -> float | None:
    """1 − (dense − ours)/(dense − baseline): 1 = no loss at all, 0 = as bad as the baseline.
    Works for higher-is-better and lower-is-better metrics alike; None when the baseline lost nothing."""
    if abs(dense - baseline) < 1e-12:
        return None
    return 1.0 - (dense - ours) / (dense - baseline)
