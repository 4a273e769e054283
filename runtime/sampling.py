"""Next-token choice: repetition penalty, temperature, top-k, top-p, seeded; temperature 0 is greedy.

`resolve_params(config, **overrides)` turns chat() arguments into a validated `SamplingParams` (None = the
RuntimeConfig default). `sample(logits, recent, params, rng)` picks one token id from a (vocab,) float32 row.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.config import RuntimeConfig

TOPK_BLOCK = 128  # block width of top_k_desc's threshold: 384 block maxima over a 49k vocabulary
NUCLEUS_START = 64  # most likely tokens sorted first when top-p works without top-k (x4 until the nucleus fits)


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


def top_k_desc(x: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest values of x (1-D), largest first, ties by id; exact.

    np.argpartition over a 49k vocabulary costs ~0.4 ms, more than the rest of a sampling step together (4 % of a
    decoding step of the default artifact), so the candidates are first cut by a threshold that cannot lose one:
    the k-th largest of the maxima of `TOPK_BLOCK`-wide blocks. k blocks hold a value at least that large, so the
    k-th largest value is too, and every top-k value passes the threshold."""
    n = x.size
    k = min(k, n)
    blocks = n // TOPK_BLOCK
    if k < n and blocks >= k:
        maxima = x[:blocks * TOPK_BLOCK].reshape(blocks, TOPK_BLOCK).max(axis=1)  # (blocks,)
        if n > blocks * TOPK_BLOCK:
            maxima = np.append(maxima, x[blocks * TOPK_BLOCK:].max())
        idx = np.flatnonzero(x >= np.partition(maxima, -k)[-k])
    else:
        idx = np.arange(n)
    if idx.size > k:  # idx is ascending: of the values tied with the k-th, the lowest ids stay
        vals = x[idx]
        kth = np.partition(vals, -k)[-k]
        above, tied = idx[vals > kth], idx[vals == kth]
        idx = np.sort(np.concatenate([above, tied[:k - above.size]]))
    return idx[np.argsort(-x[idx], kind="stable")]


def sample(logits: np.ndarray, recent: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id. `recent` holds the context ids the repetition penalty applies to (CTRL's rule). Top-p keeps
    the smallest set of the most likely tokens whose probability (after top-k, renormalised) reaches top_p."""
    x = np.array(logits, dtype=np.float32, copy=True)
    if params.repetition_penalty != 1.0 and recent.size:
        v = x[recent]  # a repeated id gets the same value from every copy: no np.unique needed
        x[recent] = np.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
    if params.temperature == 0.0:
        return int(np.argmax(x))
    # Candidates are ranked on the raw logits (temperature keeps the order), and only they are exponentiated:
    # right after a model call the caches are cold, and each whole-vocabulary pass costs tens of microseconds.
    if 0 < params.top_k < x.size:
        idx = top_k_desc(x, params.top_k)
        w = np.exp((x[idx] - x[idx[0]]) / params.temperature)
        mass = w.sum()
    elif params.top_p < 1.0:
        # no top-k: only as many of the most likely tokens as the nucleus needs are sorted (a whole-vocabulary
        # sort costs ~3 ms); the nucleus is measured against the mass of the whole vocabulary
        e = np.exp((x - x.max()) / params.temperature)
        mass, k = e.sum(), NUCLEUS_START
        idx = top_k_desc(x, k)
        while e[idx].sum() < params.top_p * mass and idx.size < x.size:
            k *= 4
            idx = top_k_desc(x, k)
        w = e[idx]
    else:  # neither top-k nor top-p: the whole distribution, in id order
        idx, w = np.arange(x.size), np.exp((x - x.max()) / params.temperature)
    cdf = np.cumsum(w)
    if params.top_p < 1.0:  # the smallest set whose mass reaches top_p
        cdf = cdf[:int(np.searchsorted(cdf, params.top_p * mass)) + 1]
    return int(idx[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), cdf.size - 1)])
