"""Block quantisation in MatMulNBits' layout: a (N, K) weight in blocks of `block` input columns, each block with
its own scale and zero point, codes of 4 or 8 bits. A block's grid spans its min and max (asymmetric, zero always
representable), unless the block already lies on a symmetric grid, GGUF's Q8_0 layout: SmolLM2's vocabulary table
comes from its GGUF as Q8_0, and at int8 with 32-wide blocks it is stored exactly.

`quantize_blocks` rounds every weight to its block's grid; `builder.gptq` chooses the codes with error
compensation and packs them with the same helpers. `dequantize_blocks` is the inverse, for tests and checks.
"""
from __future__ import annotations

import numpy as np


def quantize_blocks(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric block quantisation of a (N, K) weight along K in MatMulNBits' layout.

    Returns (packed (N, n_blocks, block*bits/8) uint8, scales (N*n_blocks,) float32, zero points uint8:
    (N, ceil(n_blocks/2)) nibble-packed for 4 bits, (N, n_blocks) for 8). Zero is always representable.
    """
    n, k = w.shape
    nb = -(-k // block)
    wp = np.zeros((n, nb * block), np.float32)
    wp[:, :k] = w
    wb = wp.reshape(n, nb, block)
    scale, zp = block_grid(wb, bits)
    return pack_blocks(quantize_to_grid(wb, scale, zp, bits), scale, zp, bits)


def block_grid(wb: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (uint8) of each block of wb (..., block): min/max with zero representable,
    except a block whose values already lie on the symmetric grid (zero point 2^(bits-1), ±amax at
    ±(2^(bits-1) - 1)), which keeps that grid and is stored exactly."""
    qmax, mid = (1 << bits) - 1, 1 << (bits - 1)
    lo = np.minimum(wb.min(axis=-1), 0.0)
    hi = np.maximum(wb.max(axis=-1), 0.0)
    scale = ((hi - lo) / qmax).astype(np.float32)
    scale[scale == 0] = 1.0
    zp = np.clip(np.round(-lo / scale), 0, qmax).astype(np.uint8)
    sym_scale = (np.maximum(hi, -lo) / (mid - 1)).astype(np.float32)
    sym_scale[sym_scale == 0] = 1.0
    codes = wb / sym_scale[..., None]
    exact = np.all(codes == np.round(codes), axis=-1)
    return np.where(exact, sym_scale, scale), np.where(exact, np.uint8(mid), zp)


def quantize_to_grid(wb: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    """Codes (uint8) of wb (..., block) on the grid of each block."""
    return np.clip(np.round(wb / scale[..., None]) + zp[..., None], 0, (1 << bits) - 1).astype(np.uint8)


def pack_blocks(q: np.ndarray, scale: np.ndarray, zp: np.ndarray,
                bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes q (N, n_blocks, block), scales and zero points (N, n_blocks) → MatMulNBits' stored layout."""
    n, nb = scale.shape
    if bits == 8:
        return q, scale.reshape(-1), zp
    packed = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)
    if nb % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
    zpp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
    return packed, scale.reshape(-1), zpp


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, zp: np.ndarray, bits: int, k: int) -> np.ndarray:
    """Inverse of quantize_blocks (for tests and fidelity checks): the (N, K) float32 weight ORT computes with."""
    n, nb = packed.shape[0], packed.shape[1]
    if bits == 8:
        q, z = packed.astype(np.float32), zp.astype(np.float32)
    else:
        q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(n, nb, -1).astype(np.float32)
        z = np.stack([zp & 15, zp >> 4], axis=-1).reshape(n, -1)[:, :nb].astype(np.float32)
    w = (q - z[:, :, None]) * scales.reshape(n, nb)[:, :, None]
    return w.reshape(n, -1)[:, :k]
