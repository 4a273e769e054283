"""ONNX export: a Llama/Qwen2/Mistral-style HF checkpoint → one fused ONNX Runtime graph with a KV cache.

Input: a checkpoint folder (config.json + *.safetensors). Output: `model.onnx` and its external data file
`model.onnx.data` in `out_dir`, plus an `ExportResult` describing every stored tensor (offset, length, sha256).

The graph is written directly with `onnx.helper` from the weights — no exporter package — using ONNX Runtime's fused
contrib ops (FACTS §4b: the fused graph decodes ~1.6x faster than a traced one): `GroupQueryAttention` with rotary
inside (positions come from the attention mask, so a follow-up turn prefills on top of the past), `MatMulNBits`
(weight-only int8/int4 block quantisation), `SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization`.
The I/O contract is docs/internals.md's: logits for the last position only, KV cache in BNSH layout.
Tensors of 64 KiB or more lie at 64-KiB-aligned offsets of the data file (ORT memory-maps them, and the runtime
can map them itself to share one copy between characters); smaller ones at 64-byte alignment.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from builder.basemodel import SUPPORTED_ARCHITECTURES, weights_sha256
from builder.config import BuildConfig
from builder.gptq import FfnCodes, load_codes, wanted as gptq_wanted
from builder.quant import quantize_blocks

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
BIG_ALIGN = 64 * 1024
SMALL_ALIGN = 64


class ExportError(RuntimeError):
    """The checkpoint cannot be exported; the message says which file/field and why."""


@dataclass
class TensorRecord:
    name: str
    dtype: str
    shape: list[int]
    offset: int
    length: int
    sha256: str
    # identical in every artifact of one base at these settings: all but the FFN (FFN-only pruning), and the FFN
    # too when it is the base's own (export_onnx's base_ffn)
    shared: bool


@dataclass
class ExportResult:
    model_file: Path
    data_file: Path
    precision: str
    shapes: dict[str, Any]  # num_layers, heads, head_dim, ... as the manifest's "model" section needs
    tensors: list[TensorRecord] = field(default_factory=list)
    seconds: float = 0.0

    def shared_tensors(self) -> list[dict[str, Any]]:
        return [dict(name=t.name, sha256=t.sha256, dtype=t.dtype, shape=t.shape, file=self.data_file.name,
                     offset=t.offset, length=t.length) for t in self.tensors if t.shared]


class _Graph:
    """A graph under construction whose large initializers stream straight into the external data file."""

    def __init__(self, data: BinaryIO, data_name: str) -> None:
        self.data, self.data_name = data, data_name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.records: list[TensorRecord] = []
        self.pos = 0
        self.count = 0

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs: Any) -> list[str]:
        self.count += 1
        outs = [f"{op}_{self.count}_{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"{op}_{self.count}", domain=domain, **attrs))
        return outs

    def const(self, name: str, value: np.ndarray) -> str:
        """A small inline constant (shapes, axes)."""
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def weight(self, name: str, arr: np.ndarray, shared: bool) -> str:
        arr = np.ascontiguousarray(arr)
        raw = arr.tobytes()
        align = BIG_ALIGN if len(raw) >= BIG_ALIGN else SMALL_ALIGN
        pad = -self.pos % align
        self.data.write(b"\0" * pad)
        self.pos += pad
        self.data.write(raw)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype), dims=list(arr.shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_name), ("offset", str(self.pos)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        self.inits.append(t)
        self.records.append(TensorRecord(name, str(arr.dtype), list(arr.shape), self.pos, len(raw),
                                         hashlib.sha256(raw).hexdigest(), shared))
        self.pos += len(raw)
        return name


def _dequant_rows(g: _Graph, q: list[str], ids: str, bits: int, block: int, width: int) -> str:
    """Rows `ids` of a MatMulNBits-quantised (N, K) weight as float32 (B, S, K): Gather the blocks, then
    (q - zero_point) * scale, unpacking nibbles for 4 bits. A few small nodes on S rows per step."""
    qweight, scales, zps = q
    axes_m1 = g.const("axes_m1", np.array([-1], np.int64))
    keep2 = g.const("shape_keep2", np.array([0, 0, -1], np.int64))

    def unpack(x: str, shape: str) -> str:  # uint8 (..., n) with two nibbles each → float (..., 2n), low first
        f = g.node("Cast", [x], to=TensorProto.FLOAT)[0]
        hi = g.node("Floor", [g.node("Mul", [f, c1_16])[0]])[0]
        lo = g.node("Sub", [f, g.node("Mul", [hi, c16])[0]])[0]
        pair = g.node("Concat", [g.node("Unsqueeze", [v, axes_m1])[0] for v in (lo, hi)], axis=-1)[0]
        return g.node("Reshape", [pair, shape])[0]

    def cut(x: str, n: int, axis: int) -> str:  # drop padding: blocks round K (and nibble pairs round n_blocks) up
        return g.node("Slice", [x, g.const(f"zero_{n}_{axis}", np.array([0], np.int64)),
                                g.const(f"end_{n}_{axis}", np.array([n], np.int64)),
                                g.const(f"axis_{n}_{axis}", np.array([axis], np.int64))])[0]

    n_blocks = -(-width // block)
    qg = g.node("Gather", [qweight, ids])[0]  # (B, S, n_blocks, block*bits/8) uint8
    sg = g.node("Unsqueeze", [g.node("Gather", [scales, ids])[0], axes_m1])[0]  # (B, S, n_blocks, 1)
    zg = g.node("Gather", [zps, ids])[0]  # (B, S, n_blocks), nibble-packed for 4 bits
    if bits == 8:
        qf = g.node("Cast", [qg], to=TensorProto.FLOAT)[0]
        zf = g.node("Cast", [zg], to=TensorProto.FLOAT)[0]
    else:
        c1_16 = g.const("c1_16", np.array(1 / 16, np.float32))
        c16 = g.const("c16", np.array(16, np.float32))
        qf = unpack(qg, g.const("shape_keep3", np.array([0, 0, 0, -1], np.int64)))
        zf = unpack(zg, keep2)
        if n_blocks % 2:
            zf = cut(zf, n_blocks, 2)
    rows = g.node("Mul", [g.node("Sub", [qf, g.node("Unsqueeze", [zf, axes_m1])[0]])[0], sg])[0]
    rows = g.node("Reshape", [rows, keep2])[0]
    return cut(rows, width, 2) if n_blocks * block != width else rows


def _load_weights(checkpoint: Path) -> dict[str, np.ndarray]:
    import torch
    from safetensors import safe_open

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{checkpoint}: no *.safetensors weights; save the checkpoint with safe_serialization=True")
    weights: dict[str, np.ndarray] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                weights[key] = f.get_tensor(key).to(torch.float32).numpy()
    return weights


def _rope_cache(cfg: dict[str, Any], head_dim: int, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables (max_context, rotary_dim/2) exactly as transformers computes them for this config."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = cfg.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3", "yarn", "longrope"):
        raise ExportError(f"config.json: rope_scaling type {rope_type!r} changes with the sequence length; "
                          "only static rotary scalings (default, linear, llama3, yarn) can be exported")
    hf_cfg = AutoConfig.for_model(**cfg)
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_cfg, "cpu")
    inv_freq = inv_freq.double().numpy()
    angles = np.outer(np.arange(max_context, dtype=np.float64), inv_freq)
    cos = (np.cos(angles) * attention_scaling).astype(np.float32)
    sin = (np.sin(angles) * attention_scaling).astype(np.float32)
    if 2 * inv_freq.shape[0] > head_dim:
        raise ExportError(f"config.json: rotary dim {2 * inv_freq.shape[0]} exceeds head_dim {head_dim}")
    return cos, sin


def model_shapes(cfg: dict[str, Any]) -> dict[str, Any]:
    """The manifest's model shapes. `intermediate_size` is the mean FFN width, `ffn_widths` each layer's
    (builder.widths moves channels between layers at the same total)."""
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    widths = cfg.get("ffn_widths") or [cfg["intermediate_size"]] * layers
    return dict(
        num_layers=layers, num_attention_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, hidden_size=cfg["hidden_size"],
        intermediate_size=round(sum(widths) / layers), ffn_widths=list(widths), vocab_size=cfg["vocab_size"],
        max_context=cfg.get("max_position_embeddings", 2048),
    )


def _check_arch(cfg: dict[str, Any], checkpoint: Path) -> None:
    archs = cfg.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ExportError(f"{checkpoint / 'config.json'}: architectures {archs} not supported; "
                          f"export handles {', '.join(SUPPORTED_ARCHITECTURES)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ExportError(f"{checkpoint / 'config.json'}: hidden_act {cfg.get('hidden_act')!r}; only silu (SwiGLU)")
    if cfg.get("mlp_bias"):
        raise ExportError(f"{checkpoint / 'config.json'}: mlp_bias=true is not supported by the export")


_BITS = {"fp32": 0, "int8": 8, "int4": 4}


def _codes_for(path: Path, checkpoint: Path, config: BuildConfig) -> FfnCodes:
    """The FFN codes in `path`, checked against the checkpoint they claim to quantise and the FFN layout asked for:
    codes of other weights or another grid would export a model nobody evaluated."""
    try:
        codes = load_codes(path)
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: cannot read the FFN codes ({e}); rebuild the character") from e
    bits, block = _BITS[config.ffn_setting("precision")], config.ffn_setting("quant_block_size")
    if (codes.bits, codes.block) != (bits, block):
        raise ExportError(f"{path}: the codes are int{codes.bits} in {codes.block}-wide blocks, the export asks for "
                          f"int{bits} in {block}-wide blocks; rebuild the character with these settings")
    if codes.checkpoint_sha256 != weights_sha256(checkpoint):
        raise ExportError(f"{path}: the codes were made from other weights than {checkpoint}'s; rebuild the "
                          "character (its checkpoint and codes come from one build)")
    return codes


def export_onnx(checkpoint: Path, out_dir: Path, config: BuildConfig, ffn_codes: Path | None = None,
                base_ffn: bool = False) -> ExportResult:
    """Write model.onnx + model.onnx.data for `checkpoint` at `config.precision` into out_dir. With `ffn_codes`
    (builder.gptq's file of the checkpoint's GPTQ-quantised FFN) and `config.gptq`, an int4 FFN stores those codes.
    `base_ffn`: the checkpoint is the base itself (no pruning), so its FFN tensors are identical in every artifact
    exported from it at these settings, and are listed as shared too."""
    t0 = time.perf_counter()
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    cfg = json.loads((checkpoint / "config.json").read_text())
    _check_arch(cfg, checkpoint)
    shapes = model_shapes(cfg)
    L, nh, kvh, hd = (shapes[k] for k in ("num_layers", "num_attention_heads", "num_kv_heads", "head_dim"))
    H, V = shapes["hidden_size"], shapes["vocab_size"]
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    bits = _BITS[config.precision]
    ffn_bits = _BITS[config.ffn_setting("precision")]  # a character's own weights may be narrower
    w = _load_weights(checkpoint)
    codes = _codes_for(ffn_codes, checkpoint, config) if ffn_codes is not None and gptq_wanted(config) else None
    out_dir.mkdir(parents=True, exist_ok=True)
    data_path, model_path = out_dir / DATA_FILE, out_dir / MODEL_FILE

    def get(name: str) -> np.ndarray:
        if name not in w:
            raise ExportError(f"{checkpoint}: weight {name!r} missing from the safetensors files")
        return w[name]

    with open(data_path, "wb") as data:
        g = _Graph(data, DATA_FILE)

        def store_q(name: str, weight: np.ndarray, shared: bool, nbits: int = bits,
                    block: int = config.quant_block_size) -> list[str]:
            if codes and not shared:  # a character's own FFN: the codes the gate judged, every one of them
                if f"{name}.weight" not in codes.weights:
                    raise ExportError(f"{ffn_codes}: no codes for {name}.weight; rebuild the character")
                packed, scales, zp = codes.weights[f"{name}.weight"]
            else:
                packed, scales, zp = quantize_blocks(weight, nbits, block)
            return [g.weight(f"{name}.qweight", packed, shared),
                    g.weight(f"{name}.scales", scales.reshape(packed.shape[0], -1), shared),
                    g.weight(f"{name}.zero_points", zp, shared)]

        def matmul_nbits(x: str, q: list[str], n: int, k: int, bias: str | None = None, nbits: int = bits,
                         level: int = config.accuracy_level, block: int = config.quant_block_size) -> str:
            return g.node("MatMulNBits", [x, *q] + (["", bias] if bias else []), domain="com.microsoft", K=k, N=n,
                          bits=nbits, block_size=block, accuracy_level=level)[0]

        def linear(x: str, name: str, weight: np.ndarray, bias: np.ndarray | None, shared: bool,
                   quantize: bool = True, nbits: int = bits,
                   ffn: bool = False, block: int | None = None) -> str:
            n, k = weight.shape
            if nbits and quantize:
                b = g.weight(f"{name}.bias", bias, shared) if bias is not None else None
                def own(field: str) -> int:  # a character's FFN may set its own, else the trunk's
                    return config.ffn_setting(field) if ffn else getattr(config, field)

                level, width = own("accuracy_level"), block or own("quant_block_size")
                return matmul_nbits(x, store_q(name, weight, shared, nbits, width), n, k, b, nbits, level,
                                    width)
            y = g.node("MatMul", [x, g.weight(f"{name}.weight_t", weight.T, shared)])[0]
            return g.node("Add", [y, g.weight(f"{name}.bias", bias, shared)])[0] if bias is not None else y

        # Positions and lengths for GroupQueryAttention come from the mask: seqlens_k = valid tokens - 1.
        mask_sum = g.node("ReduceSum", ["attention_mask", g.const("axes_1", np.array([1], np.int64))], keepdims=0)[0]
        seqlens = g.node("Cast", [g.node("Sub", [mask_sum, g.const("one_i64", np.array(1, np.int64))])[0]],
                         to=TensorProto.INT32)[0]
        mask_shape = g.node("Shape", ["attention_mask"], start=1, end=2)[0]
        total_len = g.node("Cast", [g.node("Squeeze", [mask_shape, g.const("axes_0", np.array([0], np.int64))])[0]],
                           to=TensorProto.INT32)[0]
        cos, sin = _rope_cache(cfg, hd, shapes["max_context"])
        cos_name, sin_name = g.weight("rotary.cos_cache", cos, True), g.weight("rotary.sin_cache", sin, True)

        embed = get("model.embed_tokens.weight")
        tied = cfg.get("tie_word_embeddings", False) or "lm_head.weight" not in w
        # Tied and quantised: the embedding rows are dequantised from the lm_head's own MatMulNBits blocks, so the
        # artifact stores the vocabulary table once (no fp32 copy: -113 MB on SmolLM2-135M).
        vocab_block = config.lm_head_block_size
        embed_q = store_q("model.embed_tokens", embed, True, block=vocab_block) \
            if bits and config.quantize_lm_head and tied else None
        if embed_q:
            resid = _dequant_rows(g, embed_q, "input_ids", bits, vocab_block, H)
        else:
            resid = g.node("Gather", [g.weight("model.embed_tokens.weight", embed, True), "input_ids"])[0]
        h = g.node("SimplifiedLayerNormalization",
                   [resid, g.weight("model.layers.0.input_layernorm.weight", get("model.layers.0.input_layernorm.weight"),
                                    True)], epsilon=eps, axis=-1, stash_type=1)[0]
        for i in range(L):
            p = f"model.layers.{i}"
            # 1/√head_dim goes into the q rows (rotary is linear, so it commutes) and the attention's own scale is
            # 1: GroupQueryAttention's Q·Kᵀ is one GEMM per head, and MLAS takes its one-row path, which reads K in
            # place instead of packing it (a copy as long as the context), only for a factor of 1. A power of two
            # for head_dim 64: the quantised codes and the scores come out the same (docs/artifact.md).
            q_scale = np.float32(hd ** -0.5)
            qkv_w = np.concatenate([get(f"{p}.self_attn.q_proj.weight") * q_scale,
                                    get(f"{p}.self_attn.k_proj.weight"), get(f"{p}.self_attn.v_proj.weight")], axis=0)
            q_b, k_b, v_b = (w.get(f"{p}.self_attn.{n}_proj.bias") for n in "qkv")
            qkv_b = np.concatenate([q_b * q_scale, k_b, v_b]) if all(b is not None for b in (q_b, k_b, v_b)) else None
            qkv = linear(h, f"{p}.self_attn.qkv_proj", qkv_w, qkv_b, True)
            attn, present_k, present_v = g.node(
                "GroupQueryAttention",
                [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value", seqlens, total_len,
                 cos_name, sin_name], n_out=3, domain="com.microsoft", num_heads=nh, kv_num_heads=kvh,
                do_rotary=1, rotary_interleaved=0, scale=1.0, local_window_size=int(window or -1))
            g.nodes[-1].output[1:] = [f"present.{i}.key", f"present.{i}.value"]
            o = linear(attn, f"{p}.self_attn.o_proj", get(f"{p}.self_attn.o_proj.weight"),
                       w.get(f"{p}.self_attn.o_proj.bias"), True)
            h, _, _, resid = g.node("SkipSimplifiedLayerNormalization",
                                    [o, resid, g.weight(f"{p}.post_attention_layernorm.weight",
                                                        get(f"{p}.post_attention_layernorm.weight"), True)],
                                    n_out=4, domain="com.microsoft", epsilon=eps)
            g.nodes[-1].output[1:3] = ["", ""]
            gate = linear(h, f"{p}.mlp.gate_proj", get(f"{p}.mlp.gate_proj.weight"), None, base_ffn, nbits=ffn_bits,
                          ffn=True)
            up = linear(h, f"{p}.mlp.up_proj", get(f"{p}.mlp.up_proj.weight"), None, base_ffn, nbits=ffn_bits,
                        ffn=True)
            act = g.node("Mul", [g.node("Mul", [gate, g.node("Sigmoid", [gate])[0]])[0], up])[0]
            down = linear(act, f"{p}.mlp.down_proj", get(f"{p}.mlp.down_proj.weight"), None, base_ffn,
                          nbits=ffn_bits, ffn=True)
            if i + 1 < L:
                nxt = f"model.layers.{i + 1}.input_layernorm.weight"
                h, _, _, resid = g.node("SkipSimplifiedLayerNormalization",
                                        [down, resid, g.weight(nxt, get(nxt), True)],
                                        n_out=4, domain="com.microsoft", epsilon=eps)
                g.nodes[-1].output[1:3] = ["", ""]
        # Only the last position reaches the vocabulary projection: prefill skips S-1 rows of it.
        last = [g.const("last_start", np.array([-1], np.int64)), g.const("last_end", np.array([1 << 62], np.int64)),
                g.const("seq_axis", np.array([1], np.int64))]
        down_last = g.node("Slice", [down] + last)[0]
        resid_last = g.node("Slice", [resid] + last)[0]
        final = g.node("SkipSimplifiedLayerNormalization",
                       [down_last, resid_last, g.weight("model.norm.weight", get("model.norm.weight"), True)],
                       n_out=1, domain="com.microsoft", epsilon=eps)[0]
        if embed_q:
            matmul_nbits(final, embed_q, V, H, block=vocab_block)
        else:
            linear(final, "lm_head", embed if tied else get("lm_head.weight"), None, True,
                   quantize=config.quantize_lm_head, block=vocab_block)
        g.nodes[-1].output[0] = "logits"

    def vinfo(name: str, elem: int, dims: list[Any]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, dims)

    f32, i64 = TensorProto.FLOAT, TensorProto.INT64
    inputs = [vinfo("input_ids", i64, ["batch", "sequence"]), vinfo("attention_mask", i64, ["batch", "total"])]
    outputs = [vinfo("logits", f32, ["batch", 1, V])]
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(vinfo(f"past_key_values.{i}.{kind}", f32, ["batch", kvh, "past", hd]))
            outputs.append(vinfo(f"present.{i}.{kind}", f32, ["batch", kvh, "total", hd]))
    graph = helper.make_graph(g.nodes, "npcforge_decoder", inputs, outputs, initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                              producer_name="npcforge")
    model.ir_version = 9
    onnx.save(model, str(model_path))
    result = ExportResult(model_path, data_path, config.precision, shapes, g.records, time.perf_counter() - t0)
    log.info("exported %s (%s, %d nodes, %.1f MB) in %.1f s", model_path, config.precision, len(g.nodes),
             data_path.stat().st_size / 1e6, result.seconds)
    return result


__all__ = ["ExportError", "ExportResult", "TensorRecord", "export_onnx", "quantize_blocks", "dequantize_blocks",
           "model_shapes", "MODEL_FILE", "DATA_FILE"]
