"""Build configuration: the one home of every builder setting.

A `BuildConfig` is resolved in three layers, later ones winning:
preset (`fast` | `default` | `best`) → the character file's `build:` section → command-line overrides.
Every stage reads its settings from here; no stage keeps constants of its own.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A setting is unknown or out of range; the message names the field."""


@dataclass(frozen=True)
class BuildConfig:
    # --- what to build ---
    method: str = "persona-pruner"  # the paper's learned mask; baselines exist for the benchmark
    # fraction of FFN channels kept. 0.875 with an int4 FFN (ffn_precision) rather than 0.75 at int8: fewer bytes
    # (0.62x the FFN), lower KL (fast, GPTQ codes as shipped: 0.17-0.18 against 0.25-0.30 on aldric, magda, rosie;
    # 0.143 and 0.149 at `default` on aldric and finnian, under the 0.15) and faster decoding (docs/quality.md,
    # sessions 21-22); its top-1 to its own fp32 checkpoint falls to 53-59/64, the
    # int4 rounding the gate now prices in. At 0.75 int4 rounding pushes magda over max_kl; at 0.5 all 8 sample
    # characters fail max_kl even in fp32 (KL 0.42-0.54, the roster on a lent H100)
    ffn_keep: float = 0.875
    # wider widths tried in turn when a character fails the quality gate at ffn_keep, so a hard character ships
    # larger rather than broken. 1.0 is the base FFN at the trunk's precision, which passes by construction (KL ~0)
    # and is the same tensors for every such character. () installs the failed artifact, flagged, and the build
    # reports the failure
    ffn_keep_fallback: tuple[float, ...] = (1.0,)
    channel_multiple: int = 16  # k is rounded to this so int4/int8 blocks and SIMD widths stay aligned
    seed: int = 0  # every random choice derives from it: builds are reproducible

    # --- calibration data (builder.calibration) ---
    n_train_queries: int = 64  # persona-sensitive queries answered by the teacher for selection and healing;
    # sampling is a dear step on CPU (~0.5 CPU-s per 64-token answer at 24 rows, docs/quality.md): 20-minute budget.
    # 128 instead of 64 lowered aldric's KL by 3 % only: with 2 answers per query the default is not short of data
    n_heldout_queries: int = 40  # never used for selection or healing; the evaluation split
    # the held-out queries are every n-th of the pool ranked by persona sensitivity (closer when the pool is small):
    # as sensitive as the training queries, and the same whatever n_train_queries is (docs/quality.md)
    heldout_stride: int = 3
    n_card_questions: int = 12  # questions about the character the dense model writes from the card
    query_pool: int = 512  # corpus utterances scored for persona sensitivity (seeded sample of a larger corpus)
    teacher_candidates: int = 2  # sampled answers per query, ranked by the persona judge; all accepted ones train
    teacher_max_tokens: int = 64  # NPC replies are short; longer samples drift and repeat
    teacher_temperature: float = 0.7  # the usual chat setting; greedy answers of a 135M model loop
    teacher_top_p: float = 0.9
    teacher_url: str | None = None  # OpenAI-compatible endpoint of a stronger teacher (the paper's rewrite step)
    teacher_model: str | None = None  # model name sent to teacher_url
    sensitivity_band: tuple[float, float] = (0.2, 0.85)  # middle band of layers (paper: 5..24 of 28)
    n_reference_personas: int = 8  # other characters compared against in the sensitivity score
    judge_references: int = 3  # personas a teacher candidate is ranked against; each costs one forward per answer
    teacher_max_repetition: float = 0.25  # candidates whose repeated 3-gram rate exceeds this are loops: rejected
    multi_turn_sequences: int = 64  # two-exchange chats recombined from the answers: new contexts, no sampling
    forward_batch: int = 8  # sequences per scoring/evaluation forward pass: larger only costs memory on CPU
    # sampled rows decoded together: a decode step's small matrix products are overhead-bound, so 96 answers took
    # 25.9 s at 24 rows, 20.0 at 48 and 16.5 at 96 (docs/quality.md); 48 keeps a batch's KV cache near 0.6 GB
    generation_rows: int = 48

    # --- channel selection (builder.selection) ---
    mask_steps: int = 32  # straight-through top-k steps, ~5 CPU-s each at batch 4 (17 before builder 0.3.0)
    mask_lr: float = 0.002  # SGD (momentum 0.9) on per-layer normalised gradients; scores start at mean 1.
    # First-order swap estimates undercount the cost of removing a kept channel: large steps reshuffle the mask
    # into noise (tests/test_selection.py), so the scores move a few hundredths per step at most.
    mask_batch: int = 4
    # training sequences held aside from the mask's batches; the checkpoint whose hard mask has the lowest KL on
    # them wins (builder.selection: the straight-through mask drifts after a few dozen steps). 16 of ~160
    # sequences at `default`; 0 keeps the last step's mask
    mask_probe: int = 16
    mask_eval_every: int = 8  # steps between probe checks; each costs ~2 training steps at the default probe
    n_generic_calibration: int = 64  # generic text sequences for the baselines' scores
    # per-layer FFN widths at the same total (builder.widths): "probe" measures what cutting each layer alone costs
    # and gives the channels to the layers where a cut costs most; "uniform" keeps k in every layer. At `fast` the
    # probe's widths lowered the held-out KL from 0.296 to 0.258 on aldric (docs/quality.md, session 20)
    ffn_widths: str = "probe"
    width_step: int = 128  # channels moved at a time: a multiple of 64 keeps int8/int4 blocks whole
    width_reach: int = 1  # steps either side of k that are measured: (2r + 1) probe passes per layer
    width_probe: int = 8  # probe sequences the widths are measured on (of the mask's `mask_probe`)

    # --- healing (builder.refit, then builder.heal) ---
    refit: bool = True  # least-squares refit of the kept down_proj columns before healing: seconds of CPU
    # λ relative to the mean activation energy, chosen per layer by k-fold cross-validation on the training
    # sequences: a fixed 0.01 overfit (training KL 0.51 -> 0.30, held-out 0.49 -> 0.69 on aldric, docs/quality.md)
    refit_ridges: tuple[float, ...] = (0.03, 0.3, 3.0, 30.0)
    # folds of the calibration queries; the two-exchange chats that mix folds need Gram matrices of their own
    # (I² floats per layer each): 2 folds keep 4 per layer, ~1.1 GB at 135M
    refit_folds: int = 2
    heal_steps: int = 64  # ~5 CPU-s each at batch 4; FACTS 4d: most of the gain comes in the first 60-150
    heal_lr: float = 1e-4
    heal_batch: int = 4
    # share of heal steps on the student's own sampled replies to training queries, scored by the teacher
    # (builder.heal): magda `fast`, repetition 0.129 -> 0.080 (dense 0.069) at equal KL, +~35 s of sampling
    heal_on_policy: float = 0.5
    on_policy_pool: int = 24  # replies per on-policy pool, sampled in one batch
    on_policy_refresh: int = 12  # heal steps between fresh pools: the student moves
    heal_scope: str = "ffn"  # "ffn" keeps attention/embeddings bit-identical (shareable); "all" heals everything
    heal_data: str = "auto"  # "auto": persona data for persona methods, generic text for generic baselines
    n_generic_eval: int = 12  # generic paragraphs held back from calibration for the generic perplexity
    max_seq_len: int = 320  # system prompt + query + answer fit; longer sequences only cost time

    # --- export (builder.export) ---
    precision: str = "int8"  # weight-only block int8 keeps top-1 agreement; see docs/artifact.md
    # The FFN (the only weights a character does not share with the base) at its own precision; None = precision.
    # "auto": int4 under a quantised trunk, so the default artifact is an int8 trunk with an int4 FFN, and an fp32
    # export stays exact. int4 halves what each loaded character costs and the FFN bytes read per decoded token
    # (docs/artifact.md); the quality gate judges the int4 codes themselves (builder.gptq.shipped_ffn)
    ffn_precision: str | None = "auto"
    # GPTQ (act order) for a character's own int4 FFN, on its healing tokens through its healed model (builder.gptq):
    # held-out KL to dense +0.037 against +0.124 rounded to nearest (magda, keep 0.75, `fast`; docs/quality.md).
    # int8 stays round-to-nearest (62/64; GPTQ gave 60), and so do shared tensors at any precision: they must be
    # identical for every character.
    gptq: bool = True
    gptq_damp: float = 0.01  # Hessian damping, relative to its mean diagonal (the GPTQ paper's 1 %)
    quant_block_size: int = 64  # MatMulNBits block: 64 decodes 1.3x faster than 32 on AVX-512 at equal top-1
    # the vocabulary table's own blocks (tied: embeddings and lm_head). SmolLM2's GGUF stores it as Q8_0, 32-wide
    # symmetric blocks, so at 32 with int8 its codes are the base's own and the table is stored exactly: the
    # artifact's KL to its checkpoint -16 %, for ~3 % of decode speed against 64 (docs/artifact.md)
    lm_head_block_size: int = 32
    ffn_block_size: int | None = None  # the character's own FFN blocks (None = quant_block_size); see docs/artifact.md
    # verification: mean KL(torch checkpoint ‖ ONNX) per probe token above which the artifact fails (builder.verify)
    max_verify_kl: float = 0.05
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (fastest on CPU), 0 = fp32
    # The FFN's own compute (None = accuracy_level). 0 with an int4 FFN: MLAS packs int4 weights for int8 compute
    # with per-block sums beside them, +7 MB per loaded character at keep 0.75; fp32 compute skips them (32
    # characters in 1,441 MB instead of 1,665) but decodes 0.72x as fast (docs/runtime.md)
    ffn_accuracy_level: int | None = None
    quantize_lm_head: bool = True  # the vocab projection is ~20 % of decode FLOPs; tied: stores the table once
    verify_prompts: int = 4  # chat-formatted probe prompts compared ONNX vs torch
    verify_tokens: int = 16  # greedy tokens per probe prompt (4 x 16 = 64 probe tokens)

    # --- quality gate (builder.evaluate) ---
    max_kl: float = 0.30  # KL(dense||pruned) per answer token above which a character fails the gate
    max_degeneration_increase: float = 0.10  # repeated n-gram rate may exceed dense by at most this
    max_judge_drop: float = 0.10  # judge accuracy may trail dense by this
    # answers sampled per held-out query for the judge and the degeneration checks. At 40 answers one answer was
    # 2.5 points, the difference's standard error up to 0.09, and single answers decided widths; 2 rounds bring it
    # to 0.05-0.065 for +392 CPU-s on a character's first width (aldric, 2-core AVX2 CPU), about half on a wider
    # retry, whose dense side is cached; the judge's passes under every reference persona are most of it
    # (docs/quality.md)
    judge_samples: int = 2
    # more rounds, up to this many, while the judge's dense - pruned difference lies within `judge_confidence`
    # standard errors of max_judge_drop: 80 answers passed aldric at a 5-point drop that 480 answers put at 13.6
    # (docs/quality.md, session 18). A round costs ~420 CPU-s on this CPU; only borderline characters pay it
    judge_max_samples: int = 4
    # 1.645: a verdict stands once the line lies outside the difference's 90 % interval. At 1.0 aldric's 5.0 +/- 4.7
    # points passed on 80 answers; at 1.645 two more rounds failed him at 10.6 +/- 3.4 (session 19)
    judge_confidence: float = 1.645

    # --- machine ---
    threads: int = 0  # torch threads; 0 = all cores
    device: str = "cpu"  # torch device of selection, healing and evaluation: "cuda" on a build server with a GPU
    # training precision: "auto" is bf16 where it is native (CUDA, CPUs with AVX512-BF16 or AMX: 1.65x faster than
    # fp32, FACTS 4c) and fp32 elsewhere: an AVX2-only CPU emulates bf16, 7.7x slower than fp32 (builder.lm)
    dtype: str = "auto"
    user_name: str = "Traveler"  # what {{user}} becomes in prompts

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def ffn_setting(self, trunk_field: str) -> Any:
        """A quantisation setting of the character's own FFN: its `ffn_*` override (precision, accuracy_level,
        quant_block_size -> ffn_block_size), else the trunk's value."""
        own = getattr(self, "ffn_" + trunk_field.removeprefix("quant_"))
        if own == "auto":  # ffn_precision's default
            return "int4" if self.precision != "fp32" else "fp32"
        return getattr(self, trunk_field) if own is None else own

    def keep_ladder(self) -> list[float]:
        """The FFN widths a build tries in turn: ffn_keep, then each wider fallback."""
        return [self.ffn_keep] + [k for k in self.ffn_keep_fallback if k > self.ffn_keep]

    def fingerprint(self) -> str:
        """Hash of every setting that changes the artifact (threads do not)."""
        d = self.to_dict()
        d.pop("threads")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


METHODS = ("persona-pruner", "persona-activation", "magnitude", "wanda-sp", "taylor")
PRECISIONS = ("fp32", "int8", "int4")

PRESETS: dict[str, dict[str, Any]] = {
    # fast: tests and demos. ~7 CPU-minutes per character on the default model (docs/quality.md): the evaluation
    # alone (40 held-out answers sampled twice, dense and pruned, and judged) costs the 2-minute aim. 64 train
    # queries and 24 heal steps instead of 24 and 12 cost +28 % and lowered KL at keep 0.75 from 0.573/0.567 to
    # 0.486/0.452 (aldric, then magda to check), with repetition and judge accuracy back at dense's level; 4x the
    # heal steps alone gave 0.519: data matters more than steps. 96 of a pool of 160 instead of 64 (session 6, same
    # held-out queries): KL -19/-7/-7 %, judge +5 to +7.5 points on aldric, magda, rosie (docs/quality.md).
    # heal_lr 6e-5 (session 9): its 24 steps of 2 sequences are noisy; KL -0.015/-0.004/-0.016 and repetition
    # -0.05/-0.06/-0.05 on aldric (chosen there), magda, rosie. At `default` (64 steps of 4) 6e-5 gained nothing.
    # One judged round and no more: a second costs more than the demo can spare.
    # The layer widths are measured on 4 probe sequences, not 8: half the ~6 CPU-minutes (session 20).
    "fast": dict(query_pool=160, n_reference_personas=3, judge_references=2, multi_turn_sequences=24,
                 n_train_queries=96, n_heldout_queries=40, n_card_questions=4, teacher_candidates=1,
                 teacher_max_tokens=40, mask_steps=12, heal_steps=24, mask_batch=2, heal_batch=2, heal_lr=6e-5,
                 n_generic_calibration=8, max_seq_len=192, judge_samples=1,
                 judge_max_samples=1, width_probe=4),
    "default": {},
    # best: what a release build can afford (~1 CPU-hour per character before builder 0.3.0's speed-ups).
    # 64 mask steps, not 120: the mask's probe KL is lowest near step 40 and drifts from ~50 on (docs/quality.md)
    "best": dict(n_train_queries=192, teacher_candidates=3, n_card_questions=24, multi_turn_sequences=192,
                 mask_steps=64, heal_steps=300),
}


def _validate(c: BuildConfig) -> None:
    if c.method not in METHODS:
        raise ConfigError(f"method: unknown method {c.method!r}; choose one of {', '.join(METHODS)}")
    if c.heldout_stride < 1:
        raise ConfigError(f"heldout_stride: {c.heldout_stride} must be at least 1")
    if not 0.0 < c.ffn_keep <= 1.0:
        raise ConfigError(f"ffn_keep: {c.ffn_keep} is not in (0, 1]")
    if any(not 0.0 < k <= 1.0 for k in c.ffn_keep_fallback) or list(c.ffn_keep_fallback) != sorted(
            set(c.ffn_keep_fallback)):
        raise ConfigError(f"ffn_keep_fallback: {list(c.ffn_keep_fallback)} must be increasing widths in (0, 1], "
                          f"e.g. [0.875, 1.0], or empty to report a failed gate instead of widening")
    if c.precision not in PRECISIONS:
        raise ConfigError(f"precision: {c.precision!r} is not one of {', '.join(PRECISIONS)}")
    if c.ffn_precision is not None and c.ffn_precision not in ("auto",) + PRECISIONS:
        raise ConfigError(f"ffn_precision: {c.ffn_precision!r} is not auto or one of {', '.join(PRECISIONS)} "
                          f"(or none: the trunk's)")
    # MatMulNBits settings; the FFN's own may be unset (None: the trunk's)
    for name, allowed, what in (("accuracy_level", (0, 1, 2, 3, 4), "0..4 (MatMulNBits)"),
                                ("ffn_accuracy_level", (0, 1, 2, 3, 4), "0..4 (MatMulNBits)"),
                                ("quant_block_size", (16, 32, 64, 128, 256), "a power of two in 16..256"),
                                ("ffn_block_size", (16, 32, 64, 128, 256), "a power of two in 16..256"),
                                ("lm_head_block_size", (16, 32, 64, 128, 256), "a power of two in 16..256")):
        value = getattr(c, name)
        if value not in allowed and not (name.startswith("ffn_") and value is None):
            raise ConfigError(f"{name}: {value} is not {what}")
    # ORT's CPU MatMulNBits has no float-compute kernel for 8-bit weights: it dequantises the whole matrix every
    # call (2.2-2.4 tok/s against 65-128 at level 4 on AVX2 and AVX-512 machines, docs/artifact.md)
    for name, precision, level in (("accuracy_level", c.precision, c.accuracy_level),
                                   ("ffn_accuracy_level", c.ffn_setting("precision"), c.ffn_setting("accuracy_level"))):
        if precision == "int8" and level != 4:
            raise ConfigError(f"{name}: {level} with int8 weights decodes ~30x slower on CPU (ONNX Runtime has no "
                              f"float-compute kernel for 8-bit weights); use 4, or int4 weights for fp32 compute")
    if not 0.0 <= c.heal_on_policy <= 1.0:
        raise ConfigError(f"heal_on_policy: {c.heal_on_policy} is not in [0, 1]")
    if c.ffn_widths not in ("probe", "uniform"):
        raise ConfigError(f"ffn_widths: {c.ffn_widths!r} is not 'probe' or 'uniform'")
    if c.heal_data not in ("auto", "persona", "generic"):
        raise ConfigError(f"heal_data: {c.heal_data!r} is not 'auto', 'persona' or 'generic'")
    if c.heal_scope not in ("ffn", "all"):
        raise ConfigError(f"heal_scope: {c.heal_scope!r} is not 'ffn' or 'all'")
    if c.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", c.device):
        raise ConfigError(f"device: {c.device!r} is not 'cpu', 'cuda' or 'cuda:N'")
    if c.dtype not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"dtype: {c.dtype!r} is not 'auto', 'bf16' or 'fp32'")
    if not c.refit_ridges or min(c.refit_ridges) <= 0:
        raise ConfigError(f"refit_ridges: need one or more positive values, got {c.refit_ridges}")
    if c.judge_confidence < 0:
        raise ConfigError(f"judge_confidence: {c.judge_confidence} standard errors must not be negative")
    if c.refit_folds < 2:
        raise ConfigError(f"refit_folds: cross-validation needs at least 2 folds, got {c.refit_folds}")
    for name in ("n_train_queries", "n_heldout_queries", "teacher_candidates", "teacher_max_tokens",
                 "mask_batch", "heal_batch", "max_seq_len", "channel_multiple", "quant_block_size",
                 "verify_prompts", "verify_tokens", "on_policy_refresh", "on_policy_pool", "generation_rows",
                 "mask_eval_every", "judge_samples", "judge_max_samples", "width_step", "width_reach",
                 "width_probe"):
        if getattr(c, name) < 1:
            raise ConfigError(f"{name}: must be at least 1, got {getattr(c, name)}")
    for name in ("mask_steps", "heal_steps", "n_card_questions", "threads", "mask_probe"):
        if getattr(c, name) < 0:
            raise ConfigError(f"{name}: must not be negative, got {getattr(c, name)}")
    if c.width_step % c.channel_multiple:
        raise ConfigError(f"width_step: {c.width_step} is not a multiple of channel_multiple {c.channel_multiple}")


_FIELDS = {f.name: f for f in dataclasses.fields(BuildConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML or command-line value into the field's type, naming the field on failure."""
    f = _FIELDS[name]
    optional = "None" in str(f.type)  # annotations are strings here (postponed evaluation)
    kind = type(f.default) if f.default is not None else int if str(f.type).startswith("int") else str
    try:
        if value is None or (optional and str(value).lower() in ("none", "null", "")):
            if not optional:
                raise ValueError
            return None
        if kind is bool:
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(value)
        if kind is tuple:  # a YAML list, or "a,b" on the command line ("" or "none": empty)
            items = value.split(",") if isinstance(value, str) else value
            return tuple(float(v) for v in items if str(v).strip().lower() not in ("", "none"))
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot use {value!r} (expected {kind.__name__})") from None


def resolve_config(preset: str = "default", *layers: dict[str, Any] | None) -> BuildConfig:
    """Preset, then each override layer in order (card `build:` section, then command line)."""
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    values: dict[str, Any] = dict(PRESETS[preset])
    for layer in layers:
        for key, value in (layer or {}).items():
            name = key.replace("-", "_")
            if name not in _FIELDS:
                raise ConfigError(f"{key}: unknown build setting; known: {', '.join(sorted(_FIELDS))}")
            values[name] = _coerce(name, value)
    return BuildConfig(**values)


def round_channels(n_channels: int, keep: float, multiple: int) -> int:
    """Channels kept per layer: keep * n rounded to a multiple, at least one multiple, at most n."""
    k = int(round(n_channels * keep / multiple)) * multiple
    return max(min(k, n_channels), min(multiple, n_channels))


__all__ = ["BuildConfig", "ConfigError", "METHODS", "PRECISIONS", "PRESETS", "resolve_config", "round_channels"]
