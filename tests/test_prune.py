"""prune_character end to end on the tiny model: a loadable checkpoint, shareable tensors, metrics, reproducibility."""
from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file
from builder import lm
from builder.basemodel import ensure_base_model, load_model
from builder.cards import load_roster
from builder.config import round_channels
from builder.prune import prune_character
from tests.prunekit import teacher_server, tiny_config, tiny_context  # noqa: F401 (fixture)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prune_character_end_to_end_and_reproducible(tiny_base, roster_dir, tmp_path, teacher_server):
    ctx = tiny_context(tiny_base, roster_dir)
    base = ensure_base_model(tiny_base)
    character = ctx.characters[2]
    # the random tiny model only babbles; an int4 FFN makes the build gather GPTQ's statistics
    config = tiny_config(ffn_keep=0.5, teacher_url=teacher_server, ffn_precision="int4")
    stages: list[str] = []
    result = prune_character(character, ctx, base, config, tmp_path / "a", stages.append)

    # stages in order, each charged from its first line to the next stage's (evaluate says each judge round too)
    assert list(dict.fromkeys(s.split(":")[0] for s in stages if not s.startswith("calibration"))) == [
        "selection", "refit", "heal", "gptq", "shrink", "evaluate"]
    assert [s.split(":")[0] for s in stages][-1] == "evaluate" and any("judge round 1, pruned" in s for s in stages)
    k = round_channels(128, 0.5, 16)
    # builder.widths moves channels between the layers in steps of width_step (16 here) at the same total
    widths = [len(c) for c in result.kept_channels]
    assert len(widths) == 2 and sum(widths) == 2 * k and all(w % 16 == 0 for w in widths)
    assert result.metrics["ffn_widths"] == widths and result.metrics["intermediate_size"] == k
    model, _ = load_model(result.checkpoint)
    assert [m.gate_proj.out_features for m in lm.mlps(model)] == widths
    assert (result.checkpoint / "tokenizer.json").is_file()
    assert result.ffn_codes is not None and result.ffn_codes.is_file() and result.ffn_codes.parent != result.checkpoint
    # the gate judged the int4 codes the export will store, not the checkpoint's fp32 FFN
    assert result.metrics["evaluated_ffn"] == f"int4, GPTQ, {config.quant_block_size}-wide blocks"

    # FFN-only healing: every non-FFN tensor is bit-identical to the base (the runtime shares them)
    ours = load_file(result.checkpoint / "model.safetensors")
    theirs = load_file(tiny_base / "model.safetensors")
    shared = [n for n in ours if ".mlp." not in n]
    assert shared and all(ours[n].equal(theirs[n]) for n in shared)
    assert any(not ours[n].equal(theirs[n][result.kept_channels[0]]) for n in ours
               if "layers.0.mlp.gate_proj" in n)  # healed

    m = result.metrics
    for key in ("kl", "ce_dense", "ce_pruned", "judge_accuracy_dense", "judge_accuracy_pruned", "judge_margin_pruned",
                "distinct_2_pruned", "repetition_pruned", "echo_rate_pruned", "ppl_examples_pruned",
                "ppl_generic_pruned", "params_pruned"):
        assert key in m, key
    assert m["heldout_queries"] == config.n_heldout_queries and m["params_pruned"] < m["params_dense"]
    assert m["judged_answers"] == config.n_heldout_queries * config.judge_samples
    p, n = m["judge_accuracy_pruned"], m["judged_answers"]
    assert m["judge_accuracy_se_pruned"] == pytest.approx((p * (1 - p) / n) ** 0.5)
    assert result.passed_gate == (result.gate_reasons == [])
    assert len(result.samples) == 2 and set(result.samples[0]) == {"query", "dense", "pruned"}
    assert result.cpu_seconds > 0
    stages = m["stage_cpu_seconds"]  # the report's build cost: every stage clocked, adding up to the total
    assert {"selection", "refit", "heal", "gptq", "shrink", "evaluate"} <= set(stages) and stages["heal"] > 0
    assert abs(sum(stages.values()) - result.cpu_seconds) < 0.1 + 0.05 * len(stages)

    # the same inputs give the same checkpoint, also from a plain character list instead of a context
    again = prune_character(character, load_roster(roster_dir).characters, base, config, tmp_path / "b")
    assert again.kept_channels == result.kept_channels
    assert _sha(again.checkpoint / "model.safetensors") == _sha(result.checkpoint / "model.safetensors")


def test_baseline_method_heals_on_generic_text(tiny_base, roster_dir, tmp_path, teacher_server):
    ctx = tiny_context(tiny_base, roster_dir)
    result = prune_character(ctx.characters[0], ctx, ensure_base_model(tiny_base),
                             tiny_config(method="magnitude", ffn_keep=0.75, teacher_url=teacher_server), tmp_path)
    assert result.metrics["heal_data"] == "generic" and result.metrics["intermediate_size"] == 96


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: runs on a GPU build server")
def test_prune_character_on_cuda_agrees_with_cpu(tiny_base, roster_dir, tmp_path, teacher_server):
    base = ensure_base_model(tiny_base)
    results = {}
    for device in ("cpu", "cuda"):  # fp32 on both: bf16 kernels differ between devices more than this checks
        settings = dict(ffn_keep=0.5, teacher_url=teacher_server, device=device, dtype="fp32")
        ctx = tiny_context(tiny_base, roster_dir, **settings)
        results[device] = prune_character(ctx.characters[2], ctx, base, tiny_config(**settings), tmp_path / device)
    cpu, cuda = results["cpu"], results["cuda"]
    same = sum(len(set(a) & set(b)) for a, b in zip(cpu.kept_channels, cuda.kept_channels))
    assert same >= 0.9 * sum(len(a) for a in cpu.kept_channels)
    assert abs(cpu.metrics["kl"] - cuda.metrics["kl"]) <= 0.1 * cpu.metrics["kl"] + 1e-3
    assert [m.gate_proj.out_features for m in lm.mlps(load_model(cuda.checkpoint)[0])] == \
        [len(c) for c in cuda.kept_channels]
