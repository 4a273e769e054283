"""Fidelity of a pruned character model to its dense base, on held-out queries only, and the quality gate.

Metrics (dense vs pruned):
(a) teacher-forced KL(dense ‖ pruned) per token and cross-entropy on the dense model's in-character answers to the
    held-out queries (the primary metric), plus top-1 agreement;
(b) persona judge on freshly sampled answers (`judge_samples` rounds of one answer per held-out query): the
    dense model's log-likelihood of each answer under every roster character's system prompt; identified when its
    own persona ranks first (accuracy with its binomial standard error, mean margin). At 80 answers the
    dense − pruned difference still carries a standard error of ≈ 5 points, so while the difference lies within
    `judge_confidence` standard errors of the gate's `max_judge_drop`, more rounds are drawn, up to
    `judge_max_samples`: a borderline character is decided on more answers, a clear one costs no more;
(c) degeneration of those answers: distinct-2, repeated 3-gram rate, prompt-echo rate;
(d) perplexity on the card's own example dialogues (no system prompt, so nothing can be copied) and on held-back
    generic paragraphs;
(e) two sample answers, dense vs pruned.
`gate` turns them into pass/fail with reasons; `drop_reduction` compares with a baseline.

Inputs: dense and pruned models, the tokenizer, a `PersonaJudge`, the held-out examples, prompts, config.
Output: a flat dict of numbers (+ `samples`), JSON-ready.
"""
from __future__ import annotations

import base64
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from builder import judge as judging
from builder import lm
from builder.config import BuildConfig

log = logging.getLogger(__name__)


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


def sampler(config: BuildConfig) -> torch.Generator:
    """The generator every model's judged answers are drawn with: the same seed for dense and pruned."""
    return torch.Generator().manual_seed(config.seed + 7)


def answer_round(model, tok, system: str, queries: list[str], config: BuildConfig, rows: int,
                 generator: torch.Generator) -> list[str]:
    """One sampled answer per query with the teacher's sampling settings."""
    return lm.sample_replies(model, tok, system, queries, config.teacher_max_tokens, config.teacher_temperature,
                             config.teacher_top_p, rows, generator)


@dataclass
class JudgedAnswers:
    """One model's judged answers to the held-out queries, round after round. A later round continues the same
    generator, so rounds drawn later are the rounds one longer call would have drawn."""
    generator: torch.Generator
    texts: list[str] = field(default_factory=list)
    scores: torch.Tensor = field(default_factory=lambda: torch.zeros((0, 0)))  # (answers, personas), own first

    def rounds(self, n_queries: int) -> int:
        return len(self.texts) // max(n_queries, 1)

    def draw(self, model, tok, persona_judge: judging.PersonaJudge, prompts: list[str], queries: list[str],
             config: BuildConfig) -> None:
        texts = answer_round(model, tok, prompts[0], queries, config, config.generation_rows, self.generator)
        scores = persona_judge.loglik(prompts, list(zip(queries, texts)))
        self.texts += texts
        self.scores = torch.cat([self.scores, scores]) if self.scores.numel() else scores

    def to_json(self) -> dict:
        """For the build cache: the generator's state too, so a later build can draw the next round."""
        state = self.generator.get_state().numpy().tobytes()
        return {"generator": base64.b64encode(state).decode("ascii"), "texts": self.texts,
                "scores": self.scores.tolist()}

    @classmethod
    def from_json(cls, d: dict) -> "JudgedAnswers":
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(base64.b64decode(d["generator"])), dtype=torch.uint8))
        scores = torch.tensor(d["scores"], dtype=torch.float32) if d["scores"] else torch.zeros((0, 0))
        return cls(generator, list(d["texts"]), scores)


def drop_se(dense_hits: torch.Tensor, pruned_hits: torch.Tensor) -> float:
    """Standard error of the judge accuracy difference over paired answers (the same query and round, dense and
    pruned): the spread of the per-answer differences, so queries that are hard for both cancel out. 0 below two
    answers, where there is no spread to measure."""
    diff = dense_hits.float() - pruned_hits.float()
    n = len(diff)
    return float(diff.std(unbiased=True)) / math.sqrt(n) if n > 1 else 0.0


def judge_uncertain(drop: float, se: float, config: BuildConfig) -> bool:
    """Is the judge's verdict too close to call at this many answers?"""
    return abs(drop - config.max_judge_drop) < config.judge_confidence * se


def evaluate(dense, pruned, tok, persona_judge: judging.PersonaJudge, system: str, other_prompts: list[str],
             heldout: list[tuple[str, str]], examples: lm.SeqSet, generic: lm.SeqSet, config: BuildConfig,
             batch: int = 8, dense_cache: dict | None = None,
             progress: Callable[[str], None] | None = None) -> dict:
    """All metrics for one character. `heldout` is (query, dense reference answer); `other_prompts` are the
    system prompts of the other personas the judge must tell this character from. `dense_cache` keeps the dense
    model's judged answers, which are the same for every pruned model compared (a wider retry draws only its own).
    `progress` (default: the log) gets a line per step ("evaluate: ..."): at `default` a borderline character's
    four judge rounds are half an hour of a build on two cores, and whoever watches it should see which round it is
    in."""
    say = progress or log.info
    pad = tok.pad_token_id
    held = lm.SeqSet(lm.chat_seq(tok, system, [])[0],
                     [lm.chat_seq(tok, system, [("user", q), ("assistant", a)])[1] for q, a in heldout])
    m: dict = {"heldout_queries": len(heldout)}
    tf = teacher_forced(dense, pruned, held, batch, pad)
    m.update({"kl": tf["kl"], "ce_dense": tf["ce_dense"], "ce_pruned": tf["ce_pruned"],
              "top1_agreement": tf["top1_agreement"], "kl_tokens": tf["tokens"]})
    say(f"evaluate: held-out KL {tf['kl']:.3f} nats/token over {tf['tokens']} answer tokens")

    queries = [q for q, _ in heldout]
    prompts = [system] + other_prompts
    cache = {} if dense_cache is None else dense_cache
    sampling = (config.seed, config.teacher_max_tokens, config.teacher_temperature, config.teacher_top_p,
                config.generation_rows)  # rows: the seeded batches
    key = (system, tuple(prompts), tuple(queries), sampling)
    sides = {"dense": cache[key] if key in cache else JudgedAnswers(sampler(config)),
             "pruned": JudgedAnswers(sampler(config))}
    models = {"dense": dense, "pruned": pruned}
    rounds = config.judge_samples
    while True:
        n = rounds * len(queries)
        for name, side in sides.items():
            missing = rounds - side.rounds(len(queries)) if queries else 0
            for _ in range(missing):
                say(f"evaluate: judge round {side.rounds(len(queries)) + 1}, {name}: {len(queries)} answers "
                    f"scored under {len(prompts)} personas")
                side.draw(models[name], tok, persona_judge, prompts, queries, config)
            if missing > 0 and name == "dense":
                cache[key] = side  # stored again: a build cache on disk keeps what it was given
        hits = {name: judging.identified(side.scores[:n]) for name, side in sides.items()}
        drop = (int(hits["dense"].sum()) - int(hits["pruned"].sum())) / n if n else 0.0  # counts, as the gate
        se = drop_se(hits["dense"], hits["pruned"])
        if rounds >= max(config.judge_max_samples, config.judge_samples) or not judge_uncertain(drop, se, config):
            break
        say(f"evaluate: judge dense - pruned {drop:.3f} ± {se:.3f} over {n} answers is too close to "
            f"max_judge_drop {config.max_judge_drop:.2f} to call: drawing round {rounds + 1}")
        rounds += 1
    for name, side in sides.items():
        m.update({f"{k}_{name}": v for k, v in judging.identification(side.scores[:n]).items()})
        m.update({f"{k}_{name}": v for k, v in judging.degeneration(side.texts[:n], system).items()})
        p = m[f"judge_accuracy_{name}"]
        m[f"judge_accuracy_se_{name}"] = math.sqrt(p * (1 - p) / max(n, 1))
    m.update({"judged_answers": n, "judge_rounds": rounds, "judge_drop_se": se})
    for label, seqset in (("examples", examples), ("generic", generic)):
        if seqset.seqs:
            tf = teacher_forced(dense, pruned, seqset, batch, pad)
            m[f"ppl_{label}_dense"] = math.exp(min(tf["ce_dense"], 50.0))
            m[f"ppl_{label}_pruned"] = math.exp(min(tf["ce_pruned"], 50.0))
    m["samples"] = [{"query": q, "dense": d, "pruned": p}
                    for q, d, p in list(zip(queries, sides["dense"].texts, sides["pruned"].texts))[:2]]
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
        if "judge_drop_se" in m:  # say how sure the answers drawn are
            noise = (f" (standard error of the difference {m['judge_drop_se']:.2f} over {m['judged_answers']} "
                     f"paired answers)")
        reasons.append(f"judge accuracy {m['judge_accuracy_pruned']:.2f} < dense {m['judge_accuracy_dense']:.2f} "
                       f"- max_judge_drop {config.max_judge_drop}{noise}")
    return not reasons, reasons


def drop_reduction(dense: float, ours: float, baseline: float) -> float | None:
    """1 − (dense − ours)/(dense − baseline): 1 = no loss at all, 0 = as bad as the baseline.
    Works for higher-is-better and lower-is-better metrics alike; None when the baseline lost nothing."""
    if abs(dense - baseline) < 1e-12:
        return None
    return 1.0 - (dense - ours) / (dense - baseline)
