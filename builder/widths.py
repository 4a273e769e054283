"""Per-layer FFN widths: where a character's channel budget goes.

Uniform pruning keeps k channels in every layer, but layers differ in what a cut costs. On aldric (`fast`,
learned mask, keep 0.75), cutting one layer alone to 1152 of 1536 channels raised the probe KL by 0.078 in
layer 0 and 0.057 in layer 29, against 0.008-0.015 in most middle layers (docs/quality.md, session 20).
So the total of L·k channels is handed out by measurement:

1. For each layer alone (the other layers dense), the probe KL(dense ‖ cut) at the widths
   k - r·s, ..., k + r·s (s = `width_step`, r = `width_reach`), the layer's channels ranked by the selection's
   scores. The full width costs 0; widths between the last measured one and full are interpolated.
2. Every layer starts at the narrowest width; the budget left goes, `width_step` at a time, to the layer whose
   KL falls most per channel added, until the total is L·k again.

The total stays L·k, so parameters, file size and decode speed are uniform pruning's; only where they sit moves.
Costs (2r + 1) · L probe passes over `width_probe` sequences.

Input: the dense model (frozen), the persona `SeqSet`, its probe sequences and the selection's per-layer channel
scores (`probe_measure`), or any measure(layer, width) -> KL; the layer count, the full width n, k, the config.
Output: widths per layer (sum L·k, each a multiple of `channel_multiple`) and what was measured.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from builder import lm
from builder.config import BuildConfig

log = logging.getLogger(__name__)


def grid(k: int, n: int, step: int, reach: int) -> tuple[list[int], list[int]]:
    """(every width a layer may take, the widths that are measured): up to `reach` steps of `step` either side
    of k, none below one step nor above n, and n itself (the dense layer, KL 0)."""
    lowest = k - min(reach, max(k // step - 1, 0)) * step
    measured = list(range(lowest, min(k + reach * step, n - 1) + 1, step))
    widths = list(range(lowest, n, step)) + [n]
    return widths, measured


def probe_measure(model, seqset: lm.SeqSet, probe: list[lm.Seq], scores: list[torch.Tensor], batch: int,
                  pad_id: int) -> Callable[[int, int], float]:
    """measure(layer, width): KL(dense ‖ cut) per target token of the probe, with only `layer` cut to its
    top-`width` channels by `scores`. The layers below it compute what the dense model computes, so their
    outputs are kept from one dense pass and each measure runs from the cut layer up; the system prompt's cache
    stays the dense one (the cut acts on the answers)."""
    with torch.no_grad():
        kv = lm.prefix_kv(model, seqset.prefix)
        # (sequences, residual stream entering each layer, dense logits at the targets from the last state)
        chunks = []
        for chunk in lm.seq_batches(probe, batch):
            states = lm.hidden_states(model, kv, [s.ids for s in chunk], pad_id)
            chunks.append((chunk, states, model.lm_head(lm.target_rows(states[-1], chunk))))

    @torch.no_grad()
    def measure(layer: int, width: int) -> float:
        mask = torch.zeros_like(scores[layer])
        mask[scores[layer].topk(width).indices] = 1.0
        total, tokens = 0.0, 0
        for chunk, states, teacher in chunks:
            with lm.channel_hook(model, lambda i, h: h * mask.to(h.dtype) if i == layer else None):
                student = lm.target_forward_from(model, layer, states[layer], kv, chunk, pad_id)
            total += float(lm.kl_per_token(teacher, student).sum())
            tokens += len(teacher)
        return total / max(tokens, 1)
    return measure


def layer_curves(measure: Callable[[int, int], float], n_layers: int,
                 measured: list[int]) -> list[dict[int, float]]:
    """Per layer i {width: measure(i, width)}, the probe KL with only layer i cut to `width`."""
    return [{w: measure(i, w) for w in measured} for i in range(n_layers)]


def interpolate(curve: dict[int, float], widths: list[int]) -> dict[int, float]:
    """The curve at every width: measured points as they are, the full width at 0, linear in between."""
    points = sorted({**curve, widths[-1]: 0.0}.items())
    out = {}
    for w in widths:
        below = max((p for p in points if p[0] <= w), default=points[0])
        above = min((p for p in points if p[0] >= w), default=points[-1])
        t = 0.0 if above[0] == below[0] else (w - below[0]) / (above[0] - below[0])
        out[w] = below[1] + t * (above[1] - below[1])
    return out


def allocate(curves: list[dict[int, float]], widths: list[int], total: int) -> list[int]:
    """Greedy: all layers at the narrowest width, then the next step of the layer with the largest KL fall per
    channel, until the widths sum to `total`."""
    step = {w: nxt for w, nxt in zip(widths, widths[1:])}
    chosen = [widths[0]] * len(curves)
    while sum(chosen) < total:
        best, gain = None, -float("inf")
        for i, (c, w) in enumerate(zip(curves, chosen)):
            if w in step and sum(chosen) + step[w] - w <= total:
                g = (c[w] - c[step[w]]) / (step[w] - w)
                if g > gain:
                    best, gain = i, g
        if best is None:  # no step fits what is left; layer_widths then keeps k everywhere
            break
        chosen[best] = step[chosen[best]]
    return chosen


def layer_widths(measure: Callable[[int, int], float], n_layers: int, n: int, k: int,
                 config: BuildConfig) -> tuple[list[int], dict]:
    """Per-layer widths summing to L·k, from `measure(layer, width)`: the probe KL with only that layer cut to
    that width. k in every layer when `config.ffn_widths` is "uniform" or k is the full width."""
    if config.ffn_widths == "uniform" or k >= n:
        return [k] * n_layers, {}
    widths, measured = grid(k, n, config.width_step, config.width_reach)
    if widths[0] == k:  # no layer can give a step away
        return [k] * n_layers, {}
    curves = layer_curves(measure, n_layers, measured)
    chosen = allocate([interpolate(c, widths) for c in curves], widths, n_layers * k)
    if sum(chosen) != n_layers * k:  # the full width's last step did not fit what was left
        log.warning("FFN widths: no allocation sums to %d channels on this grid; keeping %d per layer", n_layers * k, k)
        return [k] * n_layers, {}
    log.info("FFN widths per layer: %s", chosen)
    return chosen, {"ffn_widths": chosen, "width_curves": [{str(w): round(v, 5) for w, v in c.items()}
                                                          for c in curves]}
