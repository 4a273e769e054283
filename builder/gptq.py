"""GPTQ: quantise a character's own FFN weights so that its outputs, not its weights, stay close.

Round-to-nearest block quantisation treats every weight alike. GPTQ (Frantar et al., 2023) quantises a weight's
input columns one at a time and moves each column's rounding error onto the columns not yet quantised, in
proportion to the inverse Hessian H = Σ x xᵀ of that layer's inputs, so the layer's outputs on those inputs move
least. Here the inputs are the character's own tokens (its healing data, prompt included) through its healed
model: on magda's int4 FFN this lowered KL to the unquantised model from 0.127 to 0.049 nats/token and raised
bench/export.py's probe top-1 from 46 to 58 of 64 (docs/artifact.md). Only a character's int4 FFN is quantised
this way: at int8 rounding to nearest already agreed better (62/64 against 60: a few thousand tokens of statistics
resolve less than int8's rounding error), and every shared tensor keeps its round-to-nearest bits, identical
across characters.

Blocks of `block` input columns share one scale and zero point (MatMulNBits' layout); a block's grid is set from
its error-updated weights when the block starts, and its error reaches later blocks in one matrix product.

`ffn_hessians` (torch, builder side) → a safetensors file beside the checkpoint → `gptq_blocks` (numpy, export side).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from builder.quant import block_grid, pack_blocks, quantize_to_grid


def wanted(config) -> bool:
    """Whether a build quantises its character's FFN with GPTQ: only an int4 FFN (see above)."""
    return config.gptq and (config.ffn_precision or config.precision) == "int4"


def ffn_hessians(model, seqset, batch: int, pad_id: int) -> dict[str, np.ndarray]:
    """Σ x xᵀ (float32) over the real tokens of `seqset` (its prompt once) of each layer's two FFN inputs:
    `layers.{i}.mlp_input` (the normalised hidden state: gate_proj and up_proj) and `layers.{i}.down_input`
    (act(gate)*up)."""
    import torch

    from builder import lm

    sums: dict[str, torch.Tensor] = {}

    def add(key: str, x: torch.Tensor) -> None:  # x: (N, D)
        x = x.float()
        sums[key] = sums[key].add_(x.T @ x) if key in sums else x.T @ x

    with torch.no_grad():
        lm.channel_activations(model, seqset, batch, pad_id, lambda i, h: add(f"layers.{i}.down_input", h),
                               with_prefix=True, on_input=lambda i, x: add(f"layers.{i}.mlp_input", x))
    return {k: v.cpu().numpy() for k, v in sums.items()}


def save_hessians(hessians: dict[str, np.ndarray], path: Path) -> Path:
    from safetensors.numpy import save_file

    save_file(hessians, str(path))
    return path


def load_hessians(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def gptq_blocks(w: np.ndarray, hessian: np.ndarray, bits: int, block: int,
                damp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ-quantise a (N, K) weight whose inputs have Hessian (K, K); returns `quantize_blocks`' layout."""
    n, k = w.shape
    nb = -(-k // block)
    width = nb * block
    W = np.zeros((n, width))  # float64 throughout: the error updates accumulate
    W[:, :k] = w
    H = np.eye(width)
    H[:k, :k] = hessian
    dead = np.diag(H) <= 0  # inputs never active here (and the padding): quantise them as they are
    H[dead, dead] = 1.0
    H[np.arange(width), np.arange(width)] += damp * np.diag(H).mean()
    # U upper with U^T U = H^-1: column i's error spreads over the later columns by row i of U / U[i, i]
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    codes = np.zeros((n, nb, block), np.uint8)
    scales = np.zeros((n, nb), np.float32)
    zps = np.zeros((n, nb), np.uint8)
    for b in range(nb):
        lo, hi = b * block, (b + 1) * block
        W1, U1 = W[:, lo:hi].copy(), U[lo:hi, lo:hi]
        errors = np.zeros_like(W1)
        scale, zp = block_grid(W1.astype(np.float32), bits)
        scales[:, b], zps[:, b] = scale, zp
        for i in range(block):
            q = quantize_to_grid(W1[:, i:i + 1].astype(np.float32), scale, zp, bits)[:, 0]  # (N,)
            codes[:, b, i] = q
            err = (W1[:, i] - (q.astype(np.float64) - zp) * scale) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            errors[:, i] = err
        W[:, hi:] -= errors @ U[lo:hi, hi:]
    return pack_blocks(codes, scales, zps, bits)
