"""Refit: a closed-form correction of each pruned layer's down_proj before healing.

Removing FFN channels R of a layer drops their share W_R h_R of the FFN output. The kept channels' activations
h_S are unchanged (their gate/up rows are kept as they are), so the down_proj columns of S can be re-solved to
carry what R carried, as far as h_S predicts h_R on this character's tokens:

    W'_S = argmin Σ_t ‖W h_t − W'_S h_S,t‖² + λ‖W'_S − W_S‖²  =  (W G[:, S] + λ W_S) (G[S, S] + λ I)⁻¹

with G = Σ_t h_t h_tᵀ, the Gram matrix of act(gate)*up over the dense model's tokens (one forward pass, no
gradients) and a few solves (36 s on 2 CPU threads at 135M), and λ = ridge × the mean of diag(G[S, S]), which
pulls poorly determined directions back to the original weights; the ridge is chosen per layer by
cross-validation over the calibration queries (`refit_ridges`, `refit_folds`). This is the least-squares step of structured-pruning methods such as
FLAP and SlimGPT; here it only moves the starting point of the gradient healing that follows, and it touches
nothing but the character's own FFN, so every shared tensor stays bit-identical.

Every layer is solved on the dense model's activations (one pass), not on the pruned model's (one pass per
layer): healing, which sees the whole pruned network, corrects the drift between layers.

Input: the dense model, the data the character heals on (`SeqSet`), the full-width fp32 student, kept indices.
Output: the student's down_proj columns of the kept channels replaced in place; stats per layer (the relative
reconstruction error of the FFN output on the fitting tokens, before and after).
"""
from __future__ import annotations

import logging

import torch

from builder import lm

log = logging.getLogger(__name__)


def gram_matrices(model, seqset: lm.SeqSet, batch: int, pad_id: int,
                  folds: int) -> tuple[list[dict[frozenset, torch.Tensor]], int]:
    """Per layer {folds touched: G}: G = Σ h hᵀ (I, I) over the real tokens of the sequences whose answers come
    from calibration queries in exactly those folds (query q is in fold q % folds; a sequence without sources,
    such as a plain paragraph, counts as query = its index). The shared prompt is counted once, under the empty
    set: every fit trains on it, no fold validates on it. Also returns the number of tokens."""
    n_layers, width = len(lm.mlps(model)), lm.mlps(model)[0].down_proj.in_features
    groups: dict[frozenset, list[lm.Seq]] = {}
    for i, s in enumerate(seqset.seqs):
        groups.setdefault(frozenset(q % folds for q in (s.sources or (i,))), []).append(s)
    grams: list[dict[frozenset, torch.Tensor]] = [{} for _ in range(n_layers)]
    tokens = 0
    for key, seqs in [(frozenset(), [])] + sorted(groups.items(), key=lambda kv: sorted(kv[0])):
        def add(i: int, h: torch.Tensor, key: frozenset = key) -> None:  # h: (N, I)
            h = h.float()
            if key not in grams[i]:
                grams[i][key] = torch.zeros(width, width, dtype=h.dtype, device=h.device)
            grams[i][key].add_(h.T @ h)
        tokens += lm.channel_activations(model, lm.SeqSet(seqset.prefix, seqs), batch, pad_id, add,
                                         with_prefix=not key)
    return grams, tokens


def _solve(w: torch.Tensor, gram: torch.Tensor, idx: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin over W' (D, k) of tr((W − W'P) G (W − W'P)ᵀ) + λ‖W' − W_S‖², P the rows `idx` of the identity."""
    g_ss = gram[idx][:, idx]  # (k, k)
    lam = ridge * float(g_ss.diagonal().mean().clamp(min=1e-12))
    rhs = w @ gram[:, idx] + lam * w[:, idx]  # (D, k)
    eye = torch.eye(len(idx), dtype=g_ss.dtype, device=g_ss.device)
    return torch.linalg.solve(g_ss + lam * eye, rhs.T).T


def _error(w: torch.Tensor, idx: torch.Tensor, new: torch.Tensor, gram: torch.Tensor) -> float:
    """Σ_t ‖W h_t − W' h_S,t‖² = tr(Δ G Δᵀ) with Δ = W − W'P."""
    delta = w.clone()
    delta[:, idx] -= new
    return float(((delta @ gram) * delta).sum())


@torch.no_grad()
def refit_down(student, kept: list[torch.Tensor], grams: list[dict[frozenset, torch.Tensor]],
               ridges: tuple[float, ...]) -> dict:
    """Replace the kept columns of every full-width down_proj (before slicing) with their least-squares refit.
    Per layer, λ is the ridge of `ridges` with the lowest error on held-back folds of the fitting sequences
    (cross-validation on the training data: a 1152-wide regression on a few thousand tokens overfits, and the
    evaluation split may not choose). A fold is validated on the sequences that hold only its queries' answers
    and fitted without every sequence that holds any of them: the two-exchange chats reuse answers, and a
    validation answer seen in training made the cross-validation choose ridges too small. The largest ridge is
    close to keeping the weights as they are."""
    before, after, chosen = [], [], []
    for mlp, idx, parts in zip(lm.mlps(student), kept, grams):
        w = mlp.down_proj.weight.float()  # (D, I)
        idx = torch.as_tensor(idx, dtype=torch.long, device=w.device)
        total = sum(parts.values())
        # a fold validates when it has sequences of its own and the other folds leave something to fit on
        valid = sorted(f for key in parts if len(key) == 1 for f in key
                       if any(f not in other for other in parts))
        cv = [sum(_error(w, idx, _solve(w, sum(g for key, g in parts.items() if f not in key), idx, r),
                         parts[frozenset([f])]) for f in valid) for r in ridges]
        # nothing to validate on (one sequence, say): the most conservative fit
        ridge = ridges[min(range(len(ridges)), key=cv.__getitem__)] if valid else max(ridges)
        new = _solve(w, total, idx, ridge)
        energy = max(_error(w, idx, torch.zeros_like(new), total), 1e-30)  # Σ‖W h‖², all channels
        before.append(_error(w, idx, w[:, idx], total) / energy)
        after.append(_error(w, idx, new, total) / energy)
        chosen.append(ridge)
        mlp.down_proj.weight[:, idx] = new.to(mlp.down_proj.weight.dtype)
    log.info("refit: FFN output error %.4f -> %.4f (mean relative, fitting tokens); ridges %s",
             sum(before) / len(before), sum(after) / len(after), chosen)
    return {"error_before": sum(before) / len(before), "error_after": sum(after) / len(after),
            "ridge_per_layer": chosen, "per_layer_before": before, "per_layer_after": after}
