"""GPTQ quantisation of the character's FFN: exact where it must be, better where it claims, and exported right."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from builder import lm
from builder.basemodel import load_model
from builder.config import BuildConfig
from builder.export import ExportError, export_onnx
from builder.gptq import ffn_codes, ffn_hessians, gptq_blocks, load_codes, save_codes, shipped_ffn
from builder.quant import dequantize_blocks, quantize_blocks


@pytest.mark.parametrize("bits,k,block", [(4, 80, 32), (8, 64, 32)])
def test_uncorrelated_inputs_give_round_to_nearest(bits: int, k: int, block: int) -> None:
    """With H ∝ I no column's error can be compensated by another: the codes are exactly round-to-nearest."""
    w = np.random.RandomState(k).randn(16, k).astype(np.float32)
    ours = gptq_blocks(w, 3.0 * np.eye(k), bits, block, 0.01)
    for a, b in zip(ours, quantize_blocks(w, bits, block)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("bits", [4, 8])
def test_correlated_inputs_get_a_smaller_output_error(bits: int) -> None:
    rng = np.random.RandomState(bits)
    k, n = 128, 48
    # (tokens, K): inputs with a few strong directions, as a layer's activations have
    x = rng.randn(2048, 16) @ rng.randn(16, k) + 0.1 * rng.randn(2048, k)
    w = rng.randn(n, k).astype(np.float32)

    def output_error(q) -> float:
        return float(np.square(x @ (w - dequantize_blocks(*q, bits, k)).T).sum())

    rtn, ours = output_error(quantize_blocks(w, bits, 64)), output_error(gptq_blocks(w, x.T @ x, bits, 64, 0.01))
    assert ours < 0.5 * rtn


def test_the_strongest_input_is_quantised_first() -> None:
    """Act order: the column with the most input energy is visited first, so it is rounded to nearest from its own
    weights, while a column visited later carries the earlier columns' compensation."""
    rng = np.random.RandomState(7)
    k, n = 64, 32
    x = rng.randn(4096, 8) @ rng.randn(8, k) + 0.1 * rng.randn(4096, k)
    x[:, -1] *= 10.0  # the last input (natural order: quantised last) carries the most energy
    w = rng.randn(n, k).astype(np.float32)
    ours = dequantize_blocks(*gptq_blocks(w, x.T @ x, 4, 32, 0.01), 4, k)
    rtn = dequantize_blocks(*quantize_blocks(w, 4, 32), 4, k)
    assert np.array_equal(ours[:, -1], rtn[:, -1])
    assert not np.array_equal(ours[:, 0], rtn[:, 0])


def test_export_with_gptq_codes_is_closer_to_the_checkpoint(tiny_base: Path, tmp_path: Path) -> None:
    model, tok = load_model(tiny_base)
    rng = np.random.RandomState(0)
    data = lm.SeqSet([], [lm.Seq(rng.randint(3, 500, size=48).tolist(), [True] * 48) for _ in range(24)])
    hessians = ffn_hessians(model, data, 8, tok.pad_token_id)
    assert set(hessians) == {f"layers.{i}.{p}" for i in range(2) for p in ("mlp_input", "down_input")}
    assert hessians["layers.0.down_input"].trace() > 0 and hessians["layers.0.mlp_input"].shape == (64, 64)
    # only the FFN quantised, computed in fp32 (accuracy_level 0): the error measured is the FFN's own
    config = BuildConfig(precision="fp32", ffn_precision="int4", accuracy_level=0)
    codes = ffn_codes(model, hessians, config)
    path = save_codes(codes, tiny_base, tmp_path / "c.safetensors")
    loaded = load_codes(path)
    assert (loaded.bits, loaded.block, sorted(loaded.weights)) == (4, config.quant_block_size, sorted(codes.weights))
    assert len(codes.weights) == 6 and loaded.checkpoint_sha256
    for name, parts in codes.weights.items():
        assert all(np.array_equal(a, b) for a, b in zip(parts, loaded.weights[name])), name

    errors = {}
    for label, h in (("rtn", None), ("gptq", path)):
        result = export_onnx(tiny_base, tmp_path / label, config, h)
        sess = ort.InferenceSession(str(result.model_file), providers=["CPUExecutionProvider"])
        err = 0.0
        for s in data.seqs[:8]:  # the sequences the statistics came from: what GPTQ optimises for
            ids = np.array([s.ids], np.int64)
            feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            feed.update({i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
                         for i in sess.get_inputs()[2:]})
            last = sess.run(["logits"], feed)[0][0, -1]
            with torch.no_grad():
                ref = model(torch.tensor(ids)).logits[0, -1].numpy()
            err += float(np.square(last - ref).mean())
        errors[label] = err
    # random weights make near-isotropic activations, so the gain is small here (0.097 vs 0.112); the strong
    # effect on correlated inputs is the test above
    assert errors["gptq"] < 0.95 * errors["rtn"], errors


@pytest.mark.parametrize("ffn_precision,with_stats", [("int4", True), ("int4", False), ("int8", False)])
def test_the_evaluated_ffn_is_the_one_the_artifact_holds(tiny_base: Path, tmp_path: Path, ffn_precision: str,
                                                         with_stats: bool) -> None:
    """builder.prune evaluates a copy through `shipped_ffn`: its FFN weights must be exactly what the export
    stores, and with the rest of the graph in fp32 the artifact must compute what that copy computes."""
    from onnx import numpy_helper

    model, tok = load_model(tiny_base)
    rng = np.random.RandomState(1)
    data = lm.SeqSet([], [lm.Seq(rng.randint(3, 500, size=40).tolist(), [True] * 40) for _ in range(12)])
    level = 0 if ffn_precision == "int4" else 4
    config = BuildConfig(precision="fp32", ffn_precision=ffn_precision, ffn_accuracy_level=level,
                         quant_block_size=32)
    codes = ffn_codes(model, ffn_hessians(model, data, 8, tok.pad_token_id), config) if with_stats else None
    result = export_onnx(tiny_base, tmp_path / "x", config,
                         save_codes(codes, tiny_base, tmp_path / "c.safetensors") if with_stats else None)
    shipped = load_model(tiny_base)[0]
    what = shipped_ffn(shipped, codes, config)
    assert what == f"{ffn_precision}, {'GPTQ' if with_stats else 'rounded to nearest'}, 32-wide blocks"

    bits = int(ffn_precision[3:])
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(result.model_file)).graph.initializer}
    ours = dict(shipped.named_parameters())
    for name, p in model.named_parameters():
        if ".mlp." in name:
            stem = name.removesuffix(".weight")
            stored = dequantize_blocks(inits[f"{stem}.qweight"], inits[f"{stem}.scales"], inits[f"{stem}.zero_points"],
                                       bits, p.shape[1])
            assert np.array_equal(ours[name].detach().numpy(), stored), name
            assert not torch.equal(ours[name], p), name
        else:
            assert torch.equal(ours[name], p), name

    if level == 0:  # int4 weights at fp32 compute: torch on the shipped copy is the artifact to float precision
        sess = ort.InferenceSession(str(result.model_file), providers=["CPUExecutionProvider"])
        ids = np.array([data.seqs[0].ids], np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        feed.update({i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs()[2:]})
        with torch.no_grad():
            ref = shipped(torch.tensor(ids)).logits[0, -1].numpy()
            unrounded = model(torch.tensor(ids)).logits[0, -1].numpy()
        got = sess.run(["logits"], feed)[0][0, -1]
        assert np.abs(got - ref).max() < 1e-3 < np.abs(got - unrounded).max()


def test_the_export_refuses_codes_it_was_not_given_for(tiny_base: Path, tmp_path: Path) -> None:
    """Codes at another grid, codes of other weights and a damaged file each stop the export with the file named:
    any of them would ship a model the quality gate never judged."""
    import shutil

    from safetensors.torch import load_file, save_file

    model, tok = load_model(tiny_base)
    data = lm.SeqSet([], [lm.Seq(list(range(3, 43)), [True] * 40) for _ in range(4)])
    config = BuildConfig(precision="fp32", ffn_precision="int4", quant_block_size=32)
    codes = ffn_codes(model, ffn_hessians(model, data, 8, tok.pad_token_id), config)
    path = save_codes(codes, tiny_base, tmp_path / "c.safetensors")
    with pytest.raises(ExportError, match=r"c\.safetensors: the codes are int4 in 32-wide blocks, the export asks for "
                                          r"int4 in 64-wide"):
        export_onnx(tiny_base, tmp_path / "wide", BuildConfig(precision="fp32", ffn_precision="int4"), path)

    other = tmp_path / "other"
    shutil.copytree(tiny_base, other)
    weights = next(other.glob("*.safetensors"))
    state = load_file(str(weights))
    state["model.layers.0.mlp.up_proj.weight"] += 0.01
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ExportError, match="made from other weights than"):
        export_onnx(other, tmp_path / "other-export", config, path)

    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ExportError, match="damaged.safetensors: cannot read the FFN codes"):
        export_onnx(tiny_base, tmp_path / "damaged-export", config, damaged)
    assert not (tmp_path / "wide").exists()  # refused before anything was written

    del codes.weights["model.layers.1.mlp.down_proj.weight"]  # a weight without codes would ship rounded to nearest
    partial = save_codes(codes, tiny_base, tmp_path / "partial.safetensors")
    with pytest.raises(ExportError, match=r"partial\.safetensors: no codes for model\.layers\.1\.mlp\.down_proj"):
        export_onnx(tiny_base, tmp_path / "partial-export", config, partial)
