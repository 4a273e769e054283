"""GPTQ: quantise a character's own FFN weights so that its outputs, not its weights, stay close.

Round-to-nearest block quantisation treats every weight alike. GPTQ (Frantar et al., 2023) quantises a weight's
input columns one at a time and moves each column's rounding error onto the columns not yet quantised, in
proportion to the inverse Hessian H = Σ x xᵀ of that layer's inputs, so the layer's outputs on those inputs move
least. Columns go in act order (largest diag(H) first). Here the inputs are the character's own tokens (its
healing data, prompt included) through its healed model: on magda's int4 FFN, KL to the unquantised model over
384 answer tokens is 0.114 nats/token rounded to nearest, 0.038 with GPTQ in natural order and 0.027 in act order
(docs/artifact.md; generic-text statistics gave 0.060). Only a character's int4 FFN is quantised this way: at int8
rounding to nearest already agreed better (62/64 against 60: a few thousand tokens of statistics resolve less
than int8's rounding error), and every shared tensor keeps its round-to-nearest bits, identical across characters.

Blocks of `block` input columns share one scale and zero point (MatMulNBits' layout). Act order visits a block's
columns at different times, so each block's grid is set from its unquantised weights before any column moves;
the error of each `block` visited columns reaches the later ones in one matrix product.

`ffn_hessians` (torch) gathers the statistics and `ffn_codes` quantises every FFN weight once, on the builder
side; the codes go into a small safetensors file beside the checkpoint (40 MB for SmolLM2 at keep 0.875, where
the statistics were 256 MB) that names the checkpoint's weights by hash, and the export stores them as they are.
`shipped_ffn` gives the copy the build evaluates from the same codes, so the quality gate judges exactly the codes
that ship rather than the fp32 weights they came from (an int4 FFN costs magda 0.04 nats/token of held-out KL,
docs/quality.md, session 21). The checkpoint keeps its unrounded weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.quant import block_grid, dequantize_blocks, pack_blocks, quantize_blocks, quantize_to_grid


def wanted(config) -> bool:
    """Whether a build quantises its character's FFN with GPTQ: only an int4 FFN (see above)."""
    return config.gptq and config.ffn_setting("precision") == "int4"


def hessian_key(weight_name: str) -> str:
    """The statistics a checkpoint FFN weight (`model.layers.{i}.mlp.{gate,up,down}_proj.weight`) is quantised
    with: gate and up read the normalised hidden state, down reads act(gate)*up."""
    i = weight_name.split(".layers.", 1)[1].split(".", 1)[0]
    return f"layers.{i}.down_input" if ".down_proj." in weight_name else f"layers.{i}.mlp_input"


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
    # grids first (see the module docstring), then the columns in act order
    scales, zps = block_grid(W.reshape(n, nb, block).astype(np.float32), bits)  # (N, nb) each
    order = np.argsort(-np.diag(H), kind="stable")  # ties (H ∝ I) keep the natural order: round to nearest
    W, H = W[:, order], H[np.ix_(order, order)]
    col_scale, col_zp = scales[:, order // block], zps[:, order // block]
    # U upper with U^T U = H^-1: column i's error spreads over the later columns by row i of U / U[i, i]
    U = np.linalg.cholesky(np.linalg.inv(H)).T
    codes = np.zeros((n, width), np.uint8)
    for lo in range(0, width, block):  # `block` columns at a time; their error reaches later ones in one product
        hi = lo + block
        W1, U1 = W[:, lo:hi].copy(), U[lo:hi, lo:hi]
        errors = np.zeros_like(W1)
        for i in range(block):
            s, z = col_scale[:, lo + i], col_zp[:, lo + i]
            q = quantize_to_grid(W1[:, i:i + 1].astype(np.float32), s, z, bits)[:, 0]  # (N,)
            codes[:, lo + i] = q
            errors[:, i] = (W1[:, i] - (q.astype(np.float64) - z) * s) / U1[i, i]
            W1[:, i:] -= np.outer(errors[:, i], U1[i, i:])
        W[:, hi:] -= errors @ U[lo:hi, hi:]
    in_place = np.empty_like(codes)
    in_place[:, order] = codes
    return pack_blocks(in_place.reshape(n, nb, block), scales, zps, bits)


@dataclass
class FfnCodes:
    """A character's FFN weights as its artifact stores them: MatMulNBits' (packed codes, scales, zero points) per
    checkpoint weight name (`model.layers.{i}.mlp.{gate,up,down}_proj.weight`), at `bits` in `block`-wide blocks."""
    bits: int
    block: int
    weights: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]
    checkpoint_sha256: str = ""  # weights_sha256 of their checkpoint, as save_codes wrote it (load_codes)


_PARTS = ("qweight", "scales", "zero_points")


def _ffn_weights(model) -> list:
    """(name, parameter) of every FFN projection weight of a torch model."""
    return [(n, p) for n, p in model.named_parameters() if ".mlp." in n and n.endswith("_proj.weight")]


def ffn_codes(model, hessians: dict[str, np.ndarray], config) -> FfnCodes:
    """GPTQ codes of every FFN weight of `model` (torch) against its input statistics, at the FFN's precision."""
    bits, block = int(config.ffn_setting("precision").removeprefix("int")), config.ffn_setting("quant_block_size")
    weights = {name: gptq_blocks(p.detach().float().cpu().numpy(), hessians[hessian_key(name)], bits, block,
                                 config.gptq_damp)
               for name, p in _ffn_weights(model)}
    return FfnCodes(bits, block, weights)


def save_codes(codes: FfnCodes, checkpoint: Path, path: Path) -> Path:
    """Write `codes` to `path`, naming `checkpoint` (the folder whose weights they quantise) by its hash."""
    from safetensors.numpy import save_file

    from builder.basemodel import weights_sha256

    arrays = {f"{name.removesuffix('.weight')}.{part}": a
              for name, parts in codes.weights.items() for part, a in zip(_PARTS, parts)}
    save_file(arrays, str(path), metadata={"bits": str(codes.bits), "block": str(codes.block),
                                           "checkpoint_sha256": weights_sha256(Path(checkpoint))})
    return path


def load_codes(path: Path) -> FfnCodes:
    """The codes `save_codes` wrote; ValueError naming the file when it is not such a file."""
    from safetensors import SafetensorError, safe_open

    weights: dict[str, list[np.ndarray]] = {}
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                stem, part = key.rsplit(".", 1)
                weights.setdefault(f"{stem}.weight", [None, None, None])[_PARTS.index(part)] = f.get_tensor(key)
    except SafetensorError as e:
        raise ValueError(f"{path}: {e}") from e
    if not {"bits", "block", "checkpoint_sha256"} <= set(meta):
        raise ValueError(f"{path}: not an FFN codes file of builder.gptq (its metadata lacks bits, block or "
                         "checkpoint_sha256); rebuild the character")
    return FfnCodes(int(meta["bits"]), int(meta["block"]), {k: tuple(v) for k, v in weights.items()},
                    meta["checkpoint_sha256"])


def shipped_ffn(model, codes: FfnCodes | None, config) -> str:
    """Overwrite every FFN weight of `model` (in place; a copy of the checkpoint's model) with what the artifact
    computes with: the GPTQ `codes`, else rounded to nearest as the export rounds it, at the FFN's bits and block
    width, dequantised. Returns what the weights now are, for the report."""
    import torch

    precision = config.ffn_setting("precision")
    if precision == "fp32":
        return "fp32"
    bits, block = int(precision.removeprefix("int")), config.ffn_setting("quant_block_size")
    with torch.no_grad():
        for name, p in _ffn_weights(model):
            q = codes.weights[name] if codes else quantize_blocks(p.detach().float().cpu().numpy(), bits, block)
            p.copy_(torch.from_numpy(dequantize_blocks(*q, bits, p.shape[1])))
    return f"{precision}, {'GPTQ' if codes else 'rounded to nearest'}, {block}-wide blocks"
