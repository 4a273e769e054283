"""Calibration data for one character: persona-sensitive queries and in-character teacher answers.

The method is the Persona-Pruner paper's (FACTS §5):
1. a query pool: the generic player utterances of `builder/data/queries.txt`, questions about the character that
   the dense model writes from the card, and the user turns of the card's example dialogues;
2. persona-sensitivity filtering: with a short roleplay system prompt, the last-token hidden states of a middle
   band of layers; s(q) = 1 − mean over reference personas r and layers l of cos(h_l(P, q), h_l(P_r, q)).
   References are the other roster characters, topped up with built-in contrast personas when the roster is small;
   their hidden states on the corpus are computed once per roster (`RosterContext`). The most sensitive queries
   are kept, and the held-out evaluation split is drawn from them BEFORE any answer is sampled or weight trained;
3. teacher answers in character: the dense model with the character's real system prompt (or a stronger
   OpenAI-compatible endpoint, `builder.teacher`) samples several candidates per query; candidates that loop,
   echo the prompt, or stop mid-sentence are rejected, and the rest are ranked by the persona judge.

Inputs: a `Character`, a `RosterContext` (dense model, tokenizer, corpora, caches), a `BuildConfig`.
Output: `Calibration` (train and held-out `Example`s) and `persona_seqs` to turn it into training sequences.
"""
from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
import yaml

from builder import judge, lm
from builder.cards import Character, persona_prompt, substitute
from builder.config import BuildConfig

if TYPE_CHECKING:
    from builder.prune import RosterContext

log = logging.getLogger(__name__)
DATA = Path(__file__).resolve().parent / "data"
SENTENCE_END = re.compile(r"^(.*[.!?…][\"')\]]?)\s", re.DOTALL)


@dataclass
class Example:
    query: str
    answers: list[str]  # accepted teacher answers, best by the persona judge first
    source: str  # "corpus" | "card" | "example": where the query came from
    sensitivity: float


@dataclass
class Calibration:
    system: str  # the character's system prompt (persona_prompt)
    train: list[Example]
    heldout: list[Example]  # answers[0] is the dense reference answer; never trained on
    stats: dict = field(default_factory=dict)


def calibration_from_json(d: dict) -> Calibration:
    """The inverse of `dataclasses.asdict(calibration)`, for builder.buildcache."""
    return Calibration(d["system"], [Example(**e) for e in d["train"]], [Example(**e) for e in d["heldout"]],
                       d["stats"])


@dataclass(frozen=True)
class Persona:
    name: str
    description: str


def load_queries(path: Path = DATA / "queries.txt") -> list[str]:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def load_paragraphs(path: Path = DATA / "generic_text.txt") -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if p.strip()]


def load_reference_personas(path: Path = DATA / "reference_personas.yaml") -> list[Persona]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    for i, item in enumerate(doc):
        if not isinstance(item, dict) or not item.get("name") or not item.get("description"):
            raise ValueError(f"{path}: [{i}]: each reference persona needs a name and a description")
    return [Persona(str(d["name"]), str(d["description"]).strip()) for d in doc]


def persona_of(character: Character) -> Persona:
    text = " ".join(t for t in (character.description, character.personality) if t)
    return Persona(character.name, substitute(text, character.name, "Traveler"))


def sensitivity_prompt(p: Persona) -> str:
    """The paper's roleplay prompt; short, so the comparison is about the persona, not about prompt length."""
    return (f"You are roleplaying as the following character. {p.name}: {p.description} "
            "Answer the question, roleplay as the given persona.")


def judge_prompt(p: Persona | Character, user_name: str) -> str:
    """A roster character is judged under its real prompt; a built-in contrast persona under a plain one."""
    if isinstance(p, Character):
        return persona_prompt(p, user_name)
    return f"You are {p.name}. {p.description} Stay in character."


def references(character: Character, ctx: RosterContext, n: int) -> list[Persona | Character]:
    """Other roster characters first, then built-in contrast personas until there are n."""
    others: list[Persona | Character] = [c for c in ctx.characters if c.id != character.id][:n]
    return others + list(ctx.builtin_personas[:max(0, n - len(others))])


def band_layers(n_layers: int, band: tuple[float, float]) -> list[int]:
    """Indices into output_hidden_states (1..n_layers) of the middle band; at least one layer."""
    lo = max(1, int(round(band[0] * n_layers)))
    hi = min(n_layers, max(lo, int(round(band[1] * n_layers))))
    return list(range(lo, hi + 1))


@torch.no_grad()
def hidden_states(ctx: RosterContext, prompt: str, queries: list[str], layers: list[int],
                  batch: int = 8) -> torch.Tensor:
    """(len(queries), len(layers), hidden) last-token states, cached per (prompt, layers, query)."""
    cache = ctx.hidden_cache.setdefault((prompt, tuple(layers)), {})
    todo = [q for q in dict.fromkeys(queries) if q not in cache]
    if todo:
        prefix, _ = lm.chat_seq(ctx.tok, prompt, [])
        kv = lm.prefix_kv(ctx.model, prefix)
        rows = [lm.chat_seq(ctx.tok, prompt, [("user", q)], generation_prompt=True)[1].ids for q in todo]
        for idx in lm.by_length([len(r) for r in rows], batch):
            hidden = lm.hidden_states(ctx.model, kv, [rows[j] for j in idx], ctx.tok.pad_token_id)
            for i, j in enumerate(idx):
                cache[todo[j]] = torch.stack([hidden[l][i, len(rows[j]) - 1].float() for l in layers])
    return torch.stack([cache[q] for q in queries])


def sensitivity(ctx: RosterContext, character: Character, queries: list[str], config: BuildConfig) -> torch.Tensor:
    layers = band_layers(ctx.model.config.num_hidden_layers, config.sensitivity_band)
    own = hidden_states(ctx, sensitivity_prompt(persona_of(character)), queries, layers, config.forward_batch)
    refs = references(character, ctx, config.n_reference_personas)
    if not refs:
        raise ValueError("sensitivity: no reference personas; builder/data/reference_personas.yaml is empty")
    sims = [F.cosine_similarity(own, hidden_states(ctx, sensitivity_prompt(
        persona_of(r) if isinstance(r, Character) else r), queries, layers, config.forward_batch), dim=-1)
            for r in refs]
    return (1.0 - torch.stack(sims).mean(dim=(0, 2))).cpu()


def example_queries(character: Character, user_name: str) -> list[str]:
    return [substitute(t.text, character.name, user_name) for d in character.examples for t in d if t.role == "user"]


@torch.no_grad()
def card_questions(ctx: RosterContext, character: Character, config: BuildConfig,
                   gen: torch.Generator) -> list[str]:
    """Questions a player might ask this character, written by the dense model from the card."""
    if config.n_card_questions == 0:
        return []
    p = persona_of(character)
    system = "You write what players in a role-playing game say to the characters they meet."
    ask = (f"Character: {p.name}. {p.description}\n\nWrite one short question a traveler might ask {p.name} "
           "about their life, work, town or troubles. Reply with the question only.")
    prefix, seq = lm.chat_seq(ctx.tok, system, [("user", ask)], generation_prompt=True)
    outs = lm.generate(ctx.model, ctx.tok, lm.prefix_kv(ctx.model, prefix), [seq.ids], 2 * config.n_card_questions,
                       40, 1.0, 0.95, gen)
    found: list[str] = []
    for ids in outs:
        text = ctx.tok.decode(ids, skip_special_tokens=True).strip().split("\n")[0].strip().strip('"')
        if "?" in text:
            text = text[:text.index("?") + 1]
            if 3 <= len(judge.words(text)) <= 30 and text not in found:
                found.append(text)
    return found[:config.n_card_questions]


def _norm(q: str) -> str:
    return " ".join(judge.words(q))


def split_queries(pool: list[tuple[str, str]], scores: torch.Tensor,
                  config: BuildConfig) -> tuple[list[int], list[int]]:
    """Indices of (train, held-out) among the most persona-sensitive queries. Held out: every `heldout_stride`-th
    query of the pool ranked by sensitivity (closer when the pool is too small for that), from the top down, never
    one from the card's example dialogues (their answers are in the system prompt: copying would pass). So the
    held-out queries are as sensitive as the training ones, and the split does not depend on the training budget:
    builds with more or fewer training queries are evaluated on the same queries. Training takes the most
    sensitive of the rest."""
    order = sorted(range(len(pool)), key=lambda i: -float(scores[i]))
    eligible = [i for i in order if pool[i][1] != "example"]
    stride = max(1, min(config.heldout_stride, len(eligible) // max(1, config.n_heldout_queries)))
    heldout = eligible[::stride][:config.n_heldout_queries]
    if len(heldout) < config.n_heldout_queries:
        log.warning("only %d held-out queries available (asked for %d)", len(heldout), config.n_heldout_queries)
    held = set(heldout)
    train = [i for i in order if i not in held][:config.n_train_queries]
    return train, heldout


def trim_answer(text: str, hit_cap: bool) -> str | None:
    """An answer that ran into the token cap is cut at its last full sentence; None when there is none."""
    text = text.strip()
    if not hit_cap:
        return text
    m = SENTENCE_END.match(text + " ")
    return m.group(1).strip() if m and len(judge.words(m.group(1))) >= 3 else None


def acceptable(answer: str | None, system: str, config: BuildConfig) -> bool:
    return (answer is not None and len(judge.words(answer)) >= 2 and not judge.echoes(answer, system)
            and judge.repetition_rate(answer) <= config.teacher_max_repetition)


def candidates(ctx: RosterContext, system: str, queries: list[str], config: BuildConfig,
               gen: torch.Generator) -> list[list[tuple[str, str | None]]]:
    """Sampled teacher answers per query as (raw text, trimmed text or None when it broke off mid-sentence)."""
    if config.teacher_url:
        from builder.teacher import ask
        return [[(a, trim_answer(a, False)) for a in ask(config.teacher_url, config.teacher_model, system, q,
                                                          config.teacher_candidates, config)] for q in queries]
    prefix, _ = lm.chat_seq(ctx.tok, system, [])
    kv = lm.prefix_kv(ctx.model, prefix)
    out: list[list[tuple[str, str | None]]] = []
    per_batch = max(1, config.generation_rows // config.teacher_candidates)
    for start in range(0, len(queries), per_batch):
        chunk = queries[start:start + per_batch]
        prompts = [lm.chat_seq(ctx.tok, system, [("user", q)], generation_prompt=True)[1].ids for q in chunk]
        ids = lm.generate(ctx.model, ctx.tok, kv, prompts, config.teacher_candidates, config.teacher_max_tokens,
                          config.teacher_temperature, config.teacher_top_p, gen)
        for i in range(len(chunk)):
            rows = ids[i * config.teacher_candidates:(i + 1) * config.teacher_candidates]
            texts = [(ctx.tok.decode(r, skip_special_tokens=True).strip(), len(r) >= config.teacher_max_tokens)
                     for r in rows]
            out.append([(t, trim_answer(t, cap)) for t, cap in texts])
    return out


def calibrate(character: Character, ctx: RosterContext, config: BuildConfig,
              progress: Callable[[str], None] | None = None) -> Calibration:
    say = progress or (lambda _m: None)
    rng = random.Random(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    system = persona_prompt(character, config.user_name)

    say("calibration: writing questions from the card")
    pool: dict[str, tuple[str, str]] = {}
    for source, qs in (("example", example_queries(character, config.user_name)),
                       ("card", card_questions(ctx, character, config, gen)), ("corpus", ctx.queries)):
        for q in qs:
            pool.setdefault(_norm(q), (q, source))
    items = list(pool.values())
    corpus = [i for i, (_, s) in enumerate(items) if s == "corpus"]
    if len(corpus) > config.query_pool:  # a seeded sample keeps the sensitivity cost bounded
        drop = set(rng.sample(corpus, len(corpus) - config.query_pool))
        items = [it for i, it in enumerate(items) if i not in drop]

    say(f"calibration: persona sensitivity of {len(items)} queries")
    scores = sensitivity(ctx, character, [q for q, _ in items], config)
    train_idx, held_idx = split_queries(items, scores, config)

    say(f"calibration: teacher answers for {len(train_idx) + len(held_idx)} queries")
    chosen = held_idx + train_idx  # held-out first: their reference answers do not depend on the training budget
    cands = candidates(ctx, system, [items[i][0] for i in chosen], config, gen)
    refs = [judge_prompt(r, config.user_name) for r in references(character, ctx, config.judge_references)]
    accepted = [[a for _, a in answers if acceptable(a, system, config)] for answers in cands]
    rejected = sum(len(answers) - len(ok) for answers, ok in zip(cands, accepted))
    # every answer to rank in one judge call: per-query calls of two answers ran half-empty batches
    ranked = [(n, j) for n, ok in enumerate(accepted) if len(ok) > 1 for j in range(len(ok))]
    ll = ctx.judge.loglik([system] + refs, [(items[chosen[n]][0], accepted[n][j]) for n, j in ranked])
    margins: dict[int, list[float]] = {}
    for (n, _), row in zip(ranked, ll):
        margins.setdefault(n, []).append(float(row[0] - (row[1:].max() if refs else 0)))
    train, heldout = [], []
    for n, (i, answers) in enumerate(zip(chosen, cands)):
        query, source = items[i]
        ok = accepted[n]
        if n in margins:
            ok = [ok[j] for j in sorted(range(len(ok)), key=lambda j: -margins[n][j])]
        if i in held_idx and not ok:
            ok = [raw for raw, _ in answers if raw]  # a held-out reference is whatever the dense model says
        if ok:
            (heldout if i in held_idx else train).append(Example(query, ok, source, float(scores[i])))
    if not train:  # the card's example dialogues still train; the quality gate judges the result
        log.warning("calibration: no acceptable teacher answer for %s; every candidate looped, echoed the prompt "
                    "or broke off. Raise teacher_candidates or use teacher_url", character.name)
    stats = {"pool": len(items), "train_queries": len(train), "heldout_queries": len(heldout),
             "train_answers": sum(len(e.answers) for e in train), "rejected_candidates": rejected,
             "card_questions": sum(1 for q, s in items if s == "card")}
    log.info("calibration of %s: %s", character.id, stats)
    return Calibration(system, train, heldout, stats)


def persona_seqs(tok, cal: Calibration, character: Character, config: BuildConfig, rng: random.Random) -> lm.SeqSet:
    """Training sequences after the character's system prompt: every accepted answer (or the best n), chained
    two-exchange conversations (the same answers in new contexts, as in a real multi-turn chat), and the card's
    own example dialogues."""
    prefix, _ = lm.chat_seq(tok, cal.system, [])
    out = lm.SeqSet(prefix)

    def add(turns: list[tuple[str, str]], sources: tuple[int, ...] = ()) -> None:
        seq = lm.chat_seq(tok, cal.system, turns)[1]
        out.seqs.append(lm.Seq(seq.ids[:config.max_seq_len], seq.target[:config.max_seq_len], sources))

    for i, e in enumerate(cal.train):
        for a in e.answers:
            add([("user", e.query), ("assistant", a)], (i,))
    for _ in range(config.multi_turn_sequences if len(cal.train) > 1 else 0):
        i, j = rng.sample(range(len(cal.train)), 2)
        a, b = cal.train[i], cal.train[j]
        add([("user", a.query), ("assistant", rng.choice(a.answers)),
             ("user", b.query), ("assistant", rng.choice(b.answers))], (i, j))
    for d in character.examples:
        turns = [("user" if t.role == "user" else "assistant", substitute(t.text, character.name, config.user_name))
                 for t in d]
        if any(r == "assistant" for r, _ in turns) and turns[0][0] == "user":
            add(turns)
    return out
