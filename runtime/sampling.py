"""Next-token choice: repetition penalty, temperature, top-k, top-p, seeded; temperature 0 is greedy.

`resolve_params(config, **overrides)` turns chat() arguments into a validated `SamplingParams` (None = the
RuntimeConfig default). `sample(logits, recent, params, rng)` picks one token id from a (vocab,) float32 row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.config import RuntimeConfig


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float
    stop: tuple[str, ...]
    seed: int | None


def resolve_params(config: RuntimeConfig, max_tokens: int | None = None, temperature: float | None = None,
                   top_p: float | None = None, top_k: int | None = None, repetition_penalty: float | None = None,
                   stop: list[str] | tuple[str, ...] | str | None = None, seed: int | None = None) -> SamplingParams:
    """Fill defaults from the config and reject values out of range with a ValueError naming the parameter."""
    if isinstance(stop, str):
        stop = [stop]
    p = SamplingParams(
        max_tokens=config.max_tokens if max_tokens is None else int(max_tokens),
        temperature=config.temperature if temperature is None else float(temperature),
        top_p=config.top_p if top_p is None else float(top_p),
        top_k=config.top_k if top_k is None else int(top_k),
        repetition_penalty=config.repetition_penalty if repetition_penalty is None else float(repetition_penalty),
        stop=tuple(s for s in (stop or ()) if s), seed=None if seed is None else int(seed))
    if p.max_tokens < 1:
        raise ValueError(f"max_tokens: must be at least 1, got {p.max_tokens}")
    if not 0.0 <= p.temperature <= 10.0:
        raise ValueError(f"temperature: must be in [0, 10], got {p.temperature}")
    if not 0.0 < p.top_p <= 1.0:
        raise ValueError(f"top_p: must be in (0, 1], got {p.top_p}")
    if p.top_k < 0:
        raise ValueError(f"top_k: must be 0 (off) or positive, got {p.top_k}")
    if not 0.0 < p.repetition_penalty <= 10.0:
        raise ValueError(f"repetition_penalty: must be in (0, 10], got {p.repetition_penalty}")
    if not all(isinstance(s, str) for s in p.stop):
        raise ValueError("stop: must be a list of strings")
    return p


def sample(logits: np.ndarray, recent: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id. `recent` holds the context ids the repetition penalty applies to (CTRL's rule)."""
    x = np.array(logits, dtype=np.float32, copy=True)
    if params.repetition_penalty != 1.0 and recent.size:
        ids = np.unique(recent)
        v = x[ids]
        x[ids] = np.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
    if params.temperature == 0.0:
        return int(np.argmax(x))
    x /= params.temperature
    if 0 < params.top_k < x.size:
        idx = np.argpartition(x, -params.top_k)[-params.top_k:]
    else:
        idx = np.arange(x.size)
    cand = x[idx]
    order = np.argsort(-cand, kind="stable")
    idx, cand = idx[order], cand[order]
    p = np.exp(cand - cand[0])
    p /= p.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p)) + 1  # smallest set whose mass reaches top_p
        idx, p = idx[:keep], p[:keep] / p[:keep].sum()
    cdf = np.cumsum(p)
    return int(idx[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), idx.size - 1)])
