"""How an answer is judged: the persona judge (is it recognisably this character?) and degeneration checks.

Used twice: calibration ranks and rejects the teacher's candidate answers with it, evaluation measures dense vs
pruned with it. FACTS 4d: an embedding judge rewards broken models that echo the system prompt, so the judge here
is the dense model's own log-likelihood of the answer under each persona's system prompt, and every answer is also
checked for repetition and prompt echo.

Inputs: the dense model and tokenizer, persona prompts (name → system prompt text), (query, answer) pairs.
Outputs: log-likelihood matrices and plain-number metrics.
"""
from __future__ import annotations

import re

import torch

from builder import lm

WORD = re.compile(r"\w+", re.UNICODE)
ECHO_NGRAM = 8  # words copied verbatim from the system prompt; shorter spans are names and set phrases
REPEAT_NGRAM = 3


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def _ngrams(ws: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]


def repetition_rate(text: str, n: int = REPEAT_NGRAM) -> float:
    """Fraction of the answer's word n-grams that already occurred earlier in it (0 = no loop, →1 = a loop)."""
    grams = _ngrams(words(text), n)
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams) if grams else 0.0


def echoes(text: str, prompt: str, n: int = ECHO_NGRAM) -> bool:
    """Does the answer copy a span of n words from the system prompt?"""
    return bool(set(_ngrams(words(text), n)) & set(_ngrams(words(prompt), n)))


def distinct_2(texts: list[str]) -> float:
    """Unique word bigrams over all bigrams of a set of answers (corpus-level distinct-2)."""
    grams = [g for t in texts for g in _ngrams(words(t), 2)]
    return len(set(grams)) / len(grams) if grams else 0.0


def degeneration(texts: list[str], prompt: str) -> dict[str, float]:
    n = max(len(texts), 1)
    return {"distinct_2": distinct_2(texts),
            "repetition": sum(repetition_rate(t) for t in texts) / n,
            "echo_rate": sum(echoes(t, prompt) for t in texts) / n,
            "mean_words": sum(len(words(t)) for t in texts) / n}


class PersonaJudge:
    """Mean per-token log-likelihood of answers under each persona's system prompt, from the dense model.
    The prompts' KV caches are computed once and kept: the judge is asked about many answers."""

    def __init__(self, model, tok, batch: int = 8):
        self.model, self.tok, self.batch = model, tok, batch
        self._kv: dict[str, tuple[list[int], lm.KV]] = {}

    def _prefix(self, prompt: str) -> tuple[list[int], lm.KV]:
        if prompt not in self._kv:
            prefix, _ = lm.chat_seq(self.tok, prompt, [])
            with torch.no_grad():
                self._kv[prompt] = (prefix, lm.prefix_kv(self.model, prefix))
        return self._kv[prompt]

    @torch.no_grad()
    def loglik(self, prompts: list[str], pairs: list[tuple[str, str]]) -> torch.Tensor:
        """(len(pairs), len(prompts)) mean log-prob per answer token of each (query, answer) under each prompt."""
        result = torch.zeros((len(pairs), len(prompts)))
        if not pairs:
            return result
        seqs = [lm.chat_seq(self.tok, "x", [("user", q), ("assistant", a)])[1] for q, a in pairs]
        for j, prompt in enumerate(prompts):
            _, kv = self._prefix(prompt)
            for idx in lm.by_length([len(s.ids) for s in seqs], self.batch):
                chunk = [seqs[i] for i in idx]
                picked = lm.target_forward(self.model, kv, chunk, self.tok.pad_token_id).float()  # (N, V)
                lp = torch.log_softmax(picked, -1).gather(-1, lm.target_ids(chunk, picked.device)[:, None])[:, 0]
                for i, part in zip(idx, lp.split([sum(s.target[1:]) for s in chunk])):
                    result[i, j] = float(part.mean()) if part.numel() else float("-inf")
        return result


def identification(scores: torch.Tensor, own: int = 0) -> dict[str, float]:
    """From a loglik matrix whose column `own` is the answer's persona: accuracy (own ranks first) and the mean
    margin of own over the best other persona (nats per token)."""
    if scores.numel() == 0 or scores.shape[1] < 2:
        return {"judge_accuracy": 0.0, "judge_margin": 0.0}
    margin = _margin(scores, own)
    # a count over the answers, not a float32 mean: 34/40 must be 0.85, not 0.8500000238, or the gate's
    # "may trail dense by 10 points" fails a drop of exactly 4 answers in 40
    return {"judge_accuracy": int((margin > 0).sum()) / len(margin), "judge_margin": float(margin.mean())}


def identified(scores: torch.Tensor, own: int = 0) -> torch.Tensor:
    """(answers,) bool: does the answer's own persona rank first?"""
    if scores.numel() == 0 or scores.shape[1] < 2:
        return torch.zeros(scores.shape[0], dtype=torch.bool)
    return _margin(scores, own) > 0


def _margin(scores: torch.Tensor, own: int) -> torch.Tensor:
    """Own persona's log-likelihood minus the best other persona's, per answer."""
    others = torch.cat([scores[:, :own], scores[:, own + 1:]], dim=1).max(dim=1).values
    return scores[:, own] - others
