"""The pruning pipeline of one character: calibration → selection → heal → shrink → evaluate.

`RosterContext` holds what a whole build shares: the dense model (the teacher, the frozen model the mask is
learned on, and the judge), the corpora, the built-in contrast personas, and caches (reference hidden states,
judge prompt caches). Make it once per build with `RosterContext.create` and pass it as `roster`; a plain list
of characters (or a `Roster`) works too and builds a context for this call only.

`prune_character` is a plain function: the `npcforge build` command calls it per character.
Input: a `Character`, the roster, a `BaseModel`, a `BuildConfig`, a work folder, an optional progress callback
(called with one line of text per step). Output: `PruneResult` (see docs/internals.md), with the stock HF
checkpoint at `workdir/checkpoint`. Seeded: the same inputs give the same checkpoint.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import random
import time
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from builder import lm
from builder.basemodel import BaseModel, load_model
from builder.buildcache import DiskCache
from builder.calibration import (Calibration, Persona, calibrate, calibration_from_json, judge_prompt,
                                 load_paragraphs, load_queries, load_reference_personas, persona_seqs, references)
from builder.cards import Character, substitute
from builder.config import BuildConfig, round_channels
from builder.evaluate import JudgedAnswers, evaluate, gate
from builder.gptq import ffn_codes, ffn_hessians, save_codes, shipped_ffn, wanted as gptq_wanted
from builder.heal import heal, reply_source
from builder.judge import PersonaJudge
from builder.refit import gram_matrices, refit_down
from builder.selection import SelectionData, select_channels
from builder.shrink import save_checkpoint, slice_ffn

log = logging.getLogger(__name__)
GENERIC_METHODS = ("magnitude", "wanda-sp", "taylor")
# Settings that change builder.calibration's output (the rest only change later stages).
CALIBRATION_FIELDS = ("seed", "query_pool", "n_train_queries", "n_heldout_queries", "n_card_questions",
                      "teacher_candidates", "teacher_max_tokens", "teacher_temperature", "teacher_top_p",
                      "teacher_url", "teacher_model", "sensitivity_band", "n_reference_personas", "judge_references",
                      "teacher_max_repetition", "forward_batch", "generation_rows", "user_name")


@dataclass
class RosterContext:
    base: BaseModel
    model: Any  # the dense model in the training dtype, eval mode, never modified
    tok: Any
    characters: list[Character]
    builtin_personas: list[Persona]
    queries: list[str]  # the generic player utterances
    generic_train: list[str]  # generic paragraphs the baselines calibrate and heal on
    generic_eval: list[str]  # generic paragraphs held back for the generic perplexity
    judge: PersonaJudge
    hidden_cache: dict = field(default_factory=dict)  # (prompt, layers) -> {query: last-token states}
    # (character, calibration settings, contrast personas, corpus) -> Calibration; a DiskCache with a cache_dir
    calibrations: MutableMapping = field(default_factory=dict)
    dense_evals: MutableMapping = field(default_factory=dict)  # dense-side evaluation results, shared by every method
    cpu_seconds: float = 0.0  # spent making the context (loading the model)

    @classmethod
    def create(cls, characters: list[Character], base: BaseModel, config: BuildConfig,
               cache_dir: Path | None = None) -> "RosterContext":
        """With `cache_dir`, calibrations and the dense side of evaluation are also kept there for later builds
        (builder.buildcache)."""
        start = time.process_time()
        lm.set_threads(config.threads)
        dtype = lm.train_dtype(config.dtype, config.device)
        lm.require_device(config.device)
        model, tok = load_model(base, dtype)
        model.to(config.device)
        for p in model.parameters():
            p.requires_grad_(False)
        paragraphs = load_paragraphs()
        n_eval = min(config.n_generic_eval, len(paragraphs) // 2)
        ctx = cls(base, model, tok, list(characters), load_reference_personas(), load_queries(),
                  paragraphs[:len(paragraphs) - n_eval], paragraphs[len(paragraphs) - n_eval:],
                  PersonaJudge(model, tok, config.forward_batch))
        if cache_dir is not None:
            salt = f"{base.sha256}:{dtype}:{config.device}"
            ctx.calibrations = DiskCache(Path(cache_dir) / "calibration", salt, asdict,
                                         calibration_from_json)
            ctx.dense_evals = DiskCache(Path(cache_dir) / "dense-eval", salt, JudgedAnswers.to_json,
                                        JudgedAnswers.from_json)
        ctx.cpu_seconds = time.process_time() - start
        return ctx


@dataclass
class PruneResult:
    checkpoint: Path
    kept_channels: list[list[int]]
    metrics: dict
    passed_gate: bool
    gate_reasons: list[str]
    samples: list[dict]
    cpu_seconds: float
    ffn_codes: Path | None = None  # builder.gptq's codes of the FFN, which the export stores as they are


def generic_seqs(tok, paragraphs: list[str], n: int, max_len: int) -> lm.SeqSet:
    return lm.SeqSet([], [lm.text_seq(tok, p, max_len) for p in paragraphs[:n]])


def example_seqs(tok, character: Character, config: BuildConfig) -> lm.SeqSet:
    """The card's example dialogues under an empty system prompt: perplexity on them cannot come from copying."""
    out = lm.SeqSet(lm.chat_seq(tok, "", [])[0])
    for d in character.examples:
        turns = [("user" if t.role == "user" else "assistant", substitute(t.text, character.name, config.user_name))
                 for t in d]
        if turns and turns[0][0] == "user" and any(r == "assistant" for r, _ in turns):
            out.seqs.append(lm.chat_seq(tok, "", turns)[1])
    return out


@dataclass
class StageClock:
    """A progress callback that also keeps time: every progress line starts with its stage's name ("heal: 24
    distillation steps"), and the process CPU seconds from a stage's first line to the next stage's first line are
    charged to that stage ("setup" before the first line). Where a build's minutes go, in its report."""
    say: Callable[[str], None]
    spent: dict[str, float] = field(default_factory=dict)
    stage: str = "setup"
    since: float = field(default_factory=time.process_time)

    def __call__(self, line: str) -> None:
        name = line.split(":", 1)[0]
        if name != self.stage:
            self._charge()
            self.stage = name
        self.say(line)

    def _charge(self) -> None:
        now = time.process_time()
        self.spent[self.stage] = self.spent.get(self.stage, 0.0) + now - self.since
        self.since = now

    def finish(self) -> dict[str, float]:
        self._charge()
        return {k: round(v, 1) for k, v in self.spent.items()}


def _context(roster: Any, base: BaseModel, config: BuildConfig) -> RosterContext:
    if isinstance(roster, RosterContext):
        return roster
    characters = getattr(roster, "characters", roster)
    return RosterContext.create(list(characters), base, config)


def character_calibration(character: Character, ctx: RosterContext, config: BuildConfig,
                          say: Callable[[str], None]) -> Calibration:
    """The character's calibration data (training and held-out queries, teacher answers), from the context's
    cache when its inputs are unchanged: several widths or methods of one character, and later builds with a
    cache folder, share it."""
    # what calibration reads besides the card: the settings, the contrast personas, the query corpus
    contrast = references(character, ctx, max(config.n_reference_personas, config.judge_references))
    key = (character.id, character.card_sha256, *(getattr(config, f) for f in CALIBRATION_FIELDS),
           tuple(judge_prompt(r, config.user_name) for r in contrast),
           hashlib.sha256("\n".join(ctx.queries).encode()).hexdigest())
    if key not in ctx.calibrations:
        ctx.calibrations[key] = calibrate(character, ctx, config, say)
    return ctx.calibrations[key]


def reference_prompts(character: Character, ctx: RosterContext, config: BuildConfig) -> list[str]:
    """The system prompts the persona judge must tell the character from: the reference personas the
    sensitivity filter contrasted it with."""
    return [judge_prompt(r, config.user_name) for r in references(character, ctx, config.n_reference_personas)]


def prune_character(character: Character, roster: Any, base: BaseModel, config: BuildConfig, workdir: Path,
                    progress: Callable[[str], None] | None = None) -> PruneResult:
    say = StageClock(progress or (lambda _m: None))
    start = time.process_time()
    ctx = _context(roster, base, config)
    if all(c.id != character.id for c in ctx.characters):
        ctx.characters.append(character)
    lm.set_threads(config.threads)
    torch.manual_seed(config.seed)
    tok, pad = ctx.tok, ctx.tok.pad_token_id

    cal = character_calibration(character, ctx, config, say)
    rng = random.Random(config.seed)
    persona = persona_seqs(tok, cal, character, config, rng)
    generic = generic_seqs(tok, ctx.generic_train, config.n_generic_calibration, config.max_seq_len)
    n_channels = ctx.model.config.intermediate_size
    k = round_channels(n_channels, config.ffn_keep, config.channel_multiple)

    say(f"selection: {config.method}, keeping {k} of {n_channels} FFN channels per layer on average")
    kept, selection_stats = select_channels(config.method, ctx.model, SelectionData(persona, generic), k, config,
                                            pad)

    student, _ = load_model(base, torch.float32)
    student.to(ctx.model.device)
    heal_data = config.heal_data if config.heal_data != "auto" else (
        "generic" if config.method in GENERIC_METHODS else "persona")
    heal_set = persona if heal_data == "persona" else generic
    refit_stats: dict = {}
    if config.refit:
        say("refit: least-squares down_proj of the kept channels")
        grams, tokens = gram_matrices(ctx.model, heal_set, config.forward_batch, pad, config.refit_folds)
        refit_stats = {"tokens": tokens, **refit_down(student, kept, grams, config.refit_ridges)}
        del grams
    slice_ffn(student, kept)
    say(f"heal: {config.heal_steps} distillation steps")
    # on-policy steps need chat queries: persona healing only (generic text has none)
    replies = reply_source(tok, cal.system, [e.query for e in cal.train], config) \
        if heal_data == "persona" and cal.train else None
    heal_stats = heal(student, ctx.model, heal_set, config, pad, replies=replies)

    codes = None
    if gptq_wanted(config):
        say("gptq: activation statistics of the healed FFN, then its codes")
        codes = ffn_codes(student, ffn_hessians(student, heal_set, config.forward_batch, pad), config)

    say("shrink: writing the checkpoint")
    student.to("cpu")
    checkpoint = save_checkpoint(student, base.path, Path(workdir) / "checkpoint")
    codes_file = save_codes(codes, checkpoint, Path(workdir) / "ffn_codes.safetensors") if codes else None

    say(f"evaluate: {len(cal.heldout)} held-out queries, dense vs pruned")
    pruned = copy.deepcopy(student)
    evaluated_ffn = shipped_ffn(pruned, codes, config)  # the gate judges the FFN codes the artifact holds
    del codes
    pruned.to(device=ctx.model.device, dtype=ctx.model.dtype)
    n_eval_generic = len(ctx.generic_eval)
    metrics = evaluate(ctx.model, pruned, tok, ctx.judge, cal.system, reference_prompts(character, ctx, config),
                       [(e.query, e.answers[0]) for e in cal.heldout], example_seqs(tok, character, config),
                       generic_seqs(tok, ctx.generic_eval, n_eval_generic, config.max_seq_len), config,
                       config.forward_batch, ctx.dense_evals, say)
    passed, reasons = gate(metrics, config)
    samples = metrics.pop("samples")
    cpu = time.process_time() - start
    metrics.update({"method": config.method, "ffn_keep": config.ffn_keep, "intermediate_size": k,
                    "ffn_widths": [len(k_) for k_ in kept], "base_intermediate_size": n_channels,
                    "heal_data": heal_data, "evaluated_ffn": evaluated_ffn,
                    "train_dtype": str(ctx.model.dtype).removeprefix("torch."),
                    "params_dense": sum(p.numel() for p in ctx.model.parameters()),
                    "params_pruned": sum(p.numel() for p in student.parameters()),
                    "calibration": cal.stats, "selection": selection_stats, "refit": refit_stats, "heal": heal_stats,
                    "cpu_seconds": cpu,
                    "stage_cpu_seconds": say.finish()})
    if not passed:
        log.warning("%s failed the quality gate: %s", character.id, "; ".join(reasons))
    return PruneResult(checkpoint, [k_.tolist() for k_ in kept], metrics, passed, reasons, samples, cpu,
                       codes_file)
