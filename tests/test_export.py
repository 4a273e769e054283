"""builder.export: the fused ONNX graph against torch (prompt, one-token decode, follow-up prefill), quantisation
packing against MatMulNBits itself, external-data layout, architectures (Llama, Qwen2 biases, Mistral window)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from builder.config import BuildConfig, ConfigError, resolve_config
from builder.export import BIG_ALIGN, ExportError, export_onnx
from builder.quant import dequantize_blocks, quantize_blocks
from tests.slicing import slice_ffn


def _session(model_file: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(model_file), so, providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, ids: np.ndarray, past: dict | None, past_len: int) -> tuple[np.ndarray, dict]:
    names = [o.name for o in sess.get_outputs()]
    feed = {"input_ids": ids, "attention_mask": np.ones((1, past_len + ids.shape[1]), np.int64)}
    for i in sess.get_inputs()[2:]:
        feed[i.name] = past[i.name] if past else np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
    out = dict(zip(names, sess.run(None, feed)))
    return out["logits"], {k.replace("present.", "past_key_values."): v for k, v in out.items() if k != "logits"}


def _compare_three_modes(checkpoint: Path, model_file: Path, n: int = 30) -> tuple[float, float]:
    """Prompt of 20, follow-up prefill of 6 on top, then 4 single-token steps; returns (max diff, top-1 share)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = np.random.RandomState(0).randint(3, 500, size=(1, n)).astype(np.int64)
    with torch.no_grad():
        ref = model(torch.tensor(ids)).logits.numpy()[0]
    sess = _session(model_file)
    diffs, agree = [], []
    logits, past = _run(sess, ids[:, :20], None, 0)
    assert logits.shape == (1, 1, ref.shape[-1])
    assert past["past_key_values.0.key"].shape[2] == 20
    steps = [(20, 26)] + [(t, t + 1) for t in range(26, n)]
    checks = [(logits, 19)]
    for a, b in steps:
        logits, past = _run(sess, ids[:, a:b], past, a)
        assert past["past_key_values.1.value"].shape[2] == b
        checks.append((logits, b - 1))
    for logits, pos in checks:
        diffs.append(float(np.abs(logits[0, 0] - ref[pos]).max()))
        agree.append(int(logits[0, 0].argmax() == ref[pos].argmax()))
    return max(diffs), float(np.mean(agree))


def test_fp32_matches_torch_prompt_decode_and_followup(tiny_base: Path, tmp_path: Path) -> None:
    result = export_onnx(tiny_base, tmp_path, BuildConfig(precision="fp32"))
    diff, agree = _compare_three_modes(tiny_base, result.model_file)
    assert diff < 1e-4 and agree == 1.0
    # the 1/sqrt(head_dim) lives in the q rows (the comparison above checks it), so that the attention's scale is
    # 1, the condition of MLAS's one-row Q.K^T path (docs/artifact.md)
    import onnx
    scales = [a.f for n in onnx.load(str(result.model_file), load_external_data=False).graph.node
              if n.op_type == "GroupQueryAttention" for a in n.attribute if a.name == "scale"]
    assert scales and set(scales) == {1.0}


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantised_exports_stay_close(tiny_base: Path, tmp_path: Path, precision: str) -> None:
    result = export_onnx(tiny_base, tmp_path, BuildConfig(precision=precision, ffn_precision=None))  # all `precision`
    ops = {n.op_type for n in __import__("onnx").load(str(result.model_file), load_external_data=False).graph.node}
    assert {"MatMulNBits", "GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops and "MatMul" not in ops
    diff, agree = _compare_three_modes(tiny_base, result.model_file)
    # the tiny random model's logits span about +-3: int8 moves them by a few hundredths, int4 by tenths
    assert diff < (0.15 if precision == "int8" else 1.0)
    assert agree >= (0.8 if precision == "int8" else 0.5)
    fp32_size = export_onnx(tiny_base, tmp_path / "fp32", BuildConfig(precision="fp32")).data_file.stat().st_size
    assert result.data_file.stat().st_size < fp32_size


def _q8_0_weight(rng: np.random.RandomState, n: int, k: int) -> np.ndarray:
    """A weight as GGUF's Q8_0 stores it and transformers dequantises it: fp16 scale × int8 code per 32 columns."""
    d = (rng.rand(n, k // 32, 1) * 0.02 + 1e-3).astype(np.float16).astype(np.float32)
    q = rng.randint(-127, 128, size=(n, k // 32, 32))
    q[:, :, 0] = 127 * rng.choice([-1, 1], size=(n, k // 32))  # Q8_0 maps each block's amax to ±127
    return (d * q).reshape(n, k).astype(np.float32)


@pytest.mark.parametrize("bits,k,block,q8_0", [(8, 96, 32, False), (4, 96, 32, False), (4, 80, 32, False),
                                               (8, 40, 16, False), (4, 64, 64, False), (8, 96, 32, True)])
def test_block_packing_is_what_matmulnbits_computes(bits: int, k: int, block: int, q8_0: bool) -> None:
    """accuracy_level 0 computes in fp32 from the dequantised weight: ours must be exactly that weight. A weight
    already on a Q8_0 grid (SmolLM2's vocabulary table) is stored without error."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(bits * k)
    n = 24
    w = _q8_0_weight(rng, n, k) if q8_0 else rng.randn(n, k).astype(np.float32)
    packed, scales, zp = quantize_blocks(w, bits, block)
    deq = dequantize_blocks(packed, scales, zp, bits, k)
    assert np.abs(deq - w).max() <= scales.max() * 0.5 + 1e-6  # round-to-nearest within half a step
    if q8_0:
        np.testing.assert_array_equal(deq, w)
        assert (zp == 128).all()
        wide = quantize_blocks(w, bits, 64)  # two Q8_0 blocks per block: no longer one grid
        assert np.abs(dequantize_blocks(*wide, bits, k) - w).max() > 0
    else:
        assert (zp != (128 if bits == 8 else 0x88)).any()  # off-grid weights keep the min/max grid
    node = helper.make_node("MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
                              [numpy_helper.from_array(packed, "b"), numpy_helper.from_array(scales, "s"),
                               numpy_helper.from_array(zp, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    x = rng.randn(3, k).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ deq.T, rtol=1e-4, atol=1e-4)


def test_external_data_layout_and_hashes(tiny_base: Path, tmp_path: Path) -> None:
    import hashlib

    result = export_onnx(tiny_base, tmp_path, BuildConfig(precision="int8"))
    raw = result.data_file.read_bytes()
    assert raw and len(result.tensors) > 10
    for t in result.tensors:
        assert t.offset % (BIG_ALIGN if t.length >= BIG_ALIGN else 64) == 0
        assert hashlib.sha256(raw[t.offset:t.offset + t.length]).hexdigest() == t.sha256
    names = {t.name for t in result.tensors if t.shared}
    # tied + quantised: one int8 vocabulary table serves the embedding and the lm_head; no fp32 copy
    assert {"model.embed_tokens.qweight", "rotary.cos_cache"} <= names and "model.embed_tokens.weight" not in names
    assert not any(".mlp." in n for n in names)
    fp32 = export_onnx(tiny_base, tmp_path / "fp32", BuildConfig(precision="fp32"))
    emb = next(t for t in fp32.tensors if t.name == "model.embed_tokens.weight")
    table = np.frombuffer(fp32.data_file.read_bytes(), np.float32, count=emb.shape[0] * emb.shape[1],
                          offset=emb.offset)
    from safetensors.numpy import load_file
    np.testing.assert_array_equal(table.reshape(emb.shape), load_file(tiny_base / "model.safetensors")[
        "model.embed_tokens.weight"])


def test_shared_tensors_identical_across_pruned_characters(tiny_base: Path, tmp_path: Path) -> None:
    a, _ = slice_ffn(tiny_base, tmp_path / "a", keep=64, seed=1)
    b, _ = slice_ffn(tiny_base, tmp_path / "b", keep=64, seed=2)
    ra = export_onnx(a, tmp_path / "ea", BuildConfig(precision="int8"))
    rb = export_onnx(b, tmp_path / "eb", BuildConfig(precision="int8"))
    sa = {t["name"]: t["sha256"] for t in ra.shared_tensors()}
    sb = {t["name"]: t["sha256"] for t in rb.shared_tensors()}
    assert sa == sb
    ffn_a = {t.name: t.sha256 for t in ra.tensors if not t.shared}
    ffn_b = {t.name: t.sha256 for t in rb.tensors if not t.shared}
    assert ffn_a.keys() == ffn_b.keys() and ffn_a != ffn_b
    assert ra.shapes["intermediate_size"] == 64
    diff, agree = _compare_three_modes(a, export_onnx(a, tmp_path / "fa", BuildConfig(precision="fp32")).model_file)
    assert diff < 1e-4 and agree == 1.0


def _tiny_other(tmp_path: Path, kind: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, \
        Qwen2ForCausalLM

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(3)
    if kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, rope_theta=10000.0))
    elif kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, sliding_window=8))
    else:  # llama with llama3 rope scaling and attention biases
        model = LlamaForCausalLM(LlamaConfig(**common, attention_bias=True, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    if kind == "mistral":
        model.config._attn_implementation = "eager"
    model.save_pretrained(tmp_path / kind, safe_serialization=True)
    return tmp_path / kind


@pytest.mark.parametrize("kind", ["qwen2", "mistral", "llama3-rope-bias"])
def test_other_architectures_match_torch(tmp_path: Path, kind: str) -> None:
    ckpt = _tiny_other(tmp_path, kind)
    result = export_onnx(ckpt, tmp_path / "onnx", BuildConfig(precision="fp32"))
    diff, agree = _compare_three_modes(ckpt, result.model_file)
    assert diff < 1e-4 and agree == 1.0


def test_unsupported_architecture_is_refused(tiny_base: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "gpt"
    ckpt.mkdir()
    cfg = json.loads((tiny_base / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match=r"config\.json: architectures .*GPT2LMHeadModel"):
        export_onnx(ckpt, tmp_path / "out", BuildConfig())


@pytest.mark.parametrize("bits,k", [(8, 96), (4, 96), (4, 80), (8, 80)])
def test_quantised_embedding_rows_equal_the_lm_head_blocks(tmp_path: Path, bits: int, k: int) -> None:
    """The tied embedding is read from the lm_head's MatMulNBits tensors: its rows must dequantise exactly."""
    import onnx
    from onnx import TensorProto, helper

    from builder.export import _dequant_rows, _Graph

    w = np.random.RandomState(k).randn(50, k).astype(np.float32)
    packed, scales, zp = quantize_blocks(w, bits, 32)
    with open(tmp_path / "d.bin", "wb") as f:
        g = _Graph(f, "d.bin")
        names = [g.weight("q", packed, True), g.weight("s", scales.reshape(50, -1), True), g.weight("z", zp, True)]
        out = _dequant_rows(g, names, "ids", bits, 32, k)
    g.nodes[-1].output[0] = "rows"
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None])],
                              [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)], g.inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    ids = np.array([[0, 7, 49, 7]], np.int64)
    rows = _session(tmp_path / "m.onnx").run(None, {"ids": ids})[0]
    assert out and rows.shape == (1, 4, k)
    np.testing.assert_array_equal(rows[0], dequantize_blocks(packed, scales, zp, bits, k)[ids[0]])


@pytest.mark.slow
def test_real_base_model_default_export_is_faithful(tmp_path: Path, roster_dir: Path) -> None:
    """SmolLM2-135M exported as the default settings export the base (ffn_keep 1.0): verification passes and the
    file is < 0.3x the fp32 weights."""
    from builder.artifact import chat_template, export_settings, probe_prompts
    from builder.basemodel import ensure_base_model
    from builder.cards import load_character
    from builder.config import resolve_config
    from builder.verify import verify_export

    base = ensure_base_model()
    config = export_settings(resolve_config("default", {"threads": 1}), base_ffn=True, widened=False)
    assert config.ffn_setting("precision") == config.precision == "int8"
    result = export_onnx(base.path, tmp_path, config, base_ffn=True)
    prompts = probe_prompts(load_character(roster_dir / "magda.yaml"), chat_template(base.path), config)
    verification = verify_export(base.path, result.model_file, prompts, config)
    assert verification.passed and verification.kl < 0.02 and verification.top1_agreement >= 0.9, verification
    assert result.data_file.stat().st_size < 0.3 * (base.path / "model.safetensors").stat().st_size
    # the vocabulary table came from the GGUF as Q8_0: the artifact holds it bit for bit
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    inits = {t.name: t for t in onnx.load(str(result.model_file)).graph.initializer}
    q, s, z = (numpy_helper.to_array(inits[f"model.embed_tokens.{n}"]) for n in ("qweight", "scales", "zero_points"))
    table = load_file(str(base.path / "model.safetensors"))["model.embed_tokens.weight"]
    np.testing.assert_array_equal(dequantize_blocks(q, s, z, 8, table.shape[1]), table)


def test_ffn_precision_narrows_only_the_characters_own_weights(tiny_base: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    full = export_onnx(tiny_base, tmp_path / "int8", BuildConfig(precision="int8", ffn_precision="int8"))
    mixed = export_onnx(tiny_base, tmp_path / "mixed", BuildConfig())  # the default: int8 trunk, int4 FFN
    bits = {n.input[1].rsplit(".", 1)[0]: helper.get_attribute_value(next(a for a in n.attribute if a.name == "bits"))
            for n in onnx.load(str(mixed.model_file), load_external_data=False).graph.node if n.op_type == "MatMulNBits"}
    assert {b for name, b in bits.items() if ".mlp." in name} == {4}
    assert {b for name, b in bits.items() if ".mlp." not in name} == {8}  # attention and the tied lm_head
    assert {t["name"]: t["sha256"] for t in mixed.shared_tensors()} == \
        {t["name"]: t["sha256"] for t in full.shared_tensors()}  # still shareable with int8 characters
    own = lambda r: sum(t.length for t in r.tensors if not t.shared)  # noqa: E731
    assert own(mixed) < 0.65 * own(full)
    diff, agree = _compare_three_modes(tiny_base, mixed.model_file)
    assert diff < 1.0 and agree >= 0.5
    with pytest.raises(ConfigError, match="ffn_precision"):
        BuildConfig(ffn_precision="int2")


def test_ffn_accuracy_level_and_block_size_set_only_the_ffn_nodes(tiny_base: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import helper

    config = resolve_config("default", {"ffn_precision": "int4", "ffn_accuracy_level": "0", "ffn_block_size": "32"})
    assert (config.ffn_accuracy_level, config.ffn_block_size) == (0, 32)
    assert resolve_config("default", {"ffn_accuracy_level": "none"}).ffn_accuracy_level is None
    result = export_onnx(tiny_base, tmp_path / "fp32ffn", config)
    nodes = [n for n in onnx.load(str(result.model_file), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]

    def attrs(name: str) -> dict[str, int]:
        return {n.input[1].rsplit(".", 1)[0]: helper.get_attribute_value(next(a for a in n.attribute if a.name == name))
                for n in nodes}

    for name, ffn, trunk, vocab in (("accuracy_level", 0, config.accuracy_level, config.accuracy_level),
                                    ("block_size", 32, config.quant_block_size, config.lm_head_block_size)):
        assert {v for k, v in attrs(name).items() if ".mlp." in k} == {ffn}
        assert {v for k, v in attrs(name).items() if ".self_attn." in k} == {trunk}
        assert attrs(name)["model.embed_tokens"] == vocab  # the tied vocabulary projection has its own blocks
    assert config.lm_head_block_size != config.quant_block_size  # so the line above can tell them apart
    # the stored blocks follow the attribute: one scale per 32 input columns of the FFN's own weights
    scales = {t.name: t.shape for t in result.tensors if t.name.endswith("mlp.down_proj.scales")}
    k_down = json.loads((tiny_base / "config.json").read_text())["intermediate_size"]
    assert scales and all(shape[1] == -(-k_down // 32) for shape in scales.values())
    diff, agree = _compare_three_modes(tiny_base, result.model_file)
    assert diff < 1.0 and agree >= 0.5
    with pytest.raises(ConfigError, match="ffn_accuracy_level"):
        BuildConfig(ffn_accuracy_level=5)
    with pytest.raises(ConfigError, match="ffn_block_size"):
        BuildConfig(ffn_block_size=48)


def test_verification_kl_weighs_how_far_probability_moved() -> None:
    from builder.lm import kl_per_token

    def kl_divergence(reference: np.ndarray, other: np.ndarray) -> float:  # verify_export's use, one logit row each
        return float(kl_per_token(torch.tensor(reference)[None], torch.tensor(other)[None])[0])

    x = np.array([2.0, 1.0, -1.0, 0.5], np.float32)
    assert kl_divergence(x, x) == 0.0 and kl_divergence(x, x + 3.0) < 1e-12  # a constant shift is the same softmax
    near_tie, swapped = np.array([1.0, 0.99, -5.0]), np.array([0.99, 1.0, -5.0])  # top-1 flips, barely
    p = np.exp(near_tie) / np.exp(near_tie).sum()
    q = np.exp(swapped) / np.exp(swapped).sum()
    assert kl_divergence(near_tie, swapped) == pytest.approx(float((p * np.log(p / q)).sum()), rel=1e-5)  # fp32
    assert kl_divergence(near_tie, swapped) < 1e-4 < kl_divergence(near_tie, np.array([-5.0, 1.0, 0.99]))
