"""builder.artifact: a complete, self-describing, tamper-evident artifact folder, or nothing at all."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from builder.artifact import (VerificationFailed, chat_template, check_artifact, read_manifest, write_artifact)
from builder.basemodel import ensure_base_model
from builder.cards import load_roster
from builder.config import resolve_config
from builder.verify import OnnxDecoder
from tests.slicing import slice_ffn
from tests.tinymodel import ROOT


@pytest.fixture(scope="module")
def character(roster_dir: Path):
    return sorted(load_roster(roster_dir).characters, key=lambda c: c.id)[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, character) -> Path:
    out = tmp_path_factory.mktemp("dist") / character.id
    return write_artifact(tiny_base, character, out, resolve_config("fast"), ensure_base_model(tiny_base))


def test_manifest_follows_the_schema_and_contract(built: Path, character) -> None:
    import jsonschema

    manifest = read_manifest(built)
    jsonschema.validate(manifest, json.loads((ROOT / "docs" / "manifest.schema.json").read_text()))
    assert manifest["id"] == character.id and manifest["card_sha256"] == character.card_sha256
    assert manifest["model"]["precision"] == "int8" and manifest["model"]["num_kv_heads"] == 2
    assert manifest["chat_template"]["user"] == "<|im_start|>user\n{content}<|im_end|>\n"
    assert manifest["chat_template"]["generation_prompt"] == "<|im_start|>assistant\n"
    assert manifest["tokenizer"]["eos_token_ids"] == [2]
    assert manifest["verification"]["passed"] and manifest["verification"]["probe_tokens"] == 64
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "character.json", "report.json",
            "report.html"} <= set(manifest["files"])
    record = json.loads((built / "character.json").read_text())
    assert record["id"] == character.id and record["system_prompt"] and record["greeting"]
    assert check_artifact(built) == []
    assert not list(built.parent.glob(".tmp-*"))


def test_shared_tensors_can_be_mapped_without_onnx(built: Path) -> None:
    manifest = read_manifest(built)
    shared = manifest["shared_tensors"]
    assert any(t["name"] == "model.embed_tokens.qweight" for t in shared)
    for t in shared:
        mm = np.memmap(built / t["file"], dtype=t["dtype"], mode="r", offset=t["offset"], shape=tuple(t["shape"]))
        assert mm.nbytes == t["length"]
        assert hashlib.sha256(mm.tobytes()).hexdigest() == t["sha256"]


def test_the_artifact_runs_as_documented(built: Path) -> None:
    """Only the artifact folder: tokenizer + chat template + ONNX, and the model answers with the KV cache."""
    from tokenizers import Tokenizer

    manifest = read_manifest(built)
    tok = Tokenizer.from_file(str(built / manifest["tokenizer"]["file"]))
    t = manifest["chat_template"]
    record = json.loads((built / "character.json").read_text())
    prompt = t["system"].replace("{content}", record["system_prompt"]) + \
        t["user"].replace("{content}", "Hello!") + t["generation_prompt"]
    ids = tok.encode(prompt, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    dec = OnnxDecoder(built / manifest["model"]["file"])
    logits = dec.step(ids)
    assert logits.shape == (manifest["model"]["vocab_size"],) and np.isfinite(logits).all()
    for _ in range(5):
        logits = dec.step([int(logits.argmax())])
    assert dec.length == len(ids) + 5


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_tampering_is_detected_and_named(built: Path, tmp_path: Path, damage: str) -> None:
    copy = Path(shutil.copytree(built, tmp_path / "copy"))
    target = copy / "model.onnx.data"
    if damage == "flip":
        raw = bytearray(target.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        target.write_bytes(bytes(raw))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-10])
    else:
        target.unlink()
    problems = check_artifact(copy)
    assert len(problems) == 1 and "model.onnx.data" in problems[0]


def test_the_check_refuses_what_the_runtime_would_refuse(built: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(built, tmp_path / "copy"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokenizer"]["eos_token_ids"] = []  # every file still matches its hash
    (copy / "manifest.json").write_text(json.dumps(manifest))
    problems = check_artifact(copy)
    assert len(problems) == 1 and "tokenizer.eos_token_ids" in problems[0] and "manifest.json" in problems[0]


def test_rebuild_replaces_in_place(tmp_path: Path, tiny_base: Path, character) -> None:
    base = ensure_base_model(tiny_base)
    out = tmp_path / character.id
    write_artifact(tiny_base, character, out, resolve_config("fast", {"precision": "fp32"}), base)
    first = read_manifest(out)
    write_artifact(tiny_base, character, out, resolve_config("fast", {"precision": "int4"}), base)
    second = read_manifest(out)
    assert first["model"]["precision"] == "fp32" and second["model"]["precision"] == "int4"
    assert check_artifact(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == [character.id]


def _outlier_checkpoint(tiny_base: Path, out: Path) -> Path:
    """Weights with a 40x outlier every 32 inputs: int4 blocks flatten everything else to zero."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p[:, ::32] *= 40.0
    model.save_pretrained(out, safe_serialization=True)
    for f in tiny_base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(f, out / f.name)
    return out


def test_failed_verification_leaves_nothing(tmp_path: Path, tiny_base: Path, character) -> None:
    ckpt = _outlier_checkpoint(tiny_base, tmp_path / "outlier")
    dist = tmp_path / "dist"
    with pytest.raises(VerificationFailed, match=r"KL .* nats per probe token \(> max_verify_kl 0.05; top-1 agreement"):
        write_artifact(ckpt, character, dist / character.id, resolve_config("fast", {"precision": "int4"}),
                       ensure_base_model(tiny_base))
    assert list(dist.iterdir()) == []
    # the same checkpoint in fp32 is faithful: the failure was the precision, not the checkpoint
    write_artifact(ckpt, character, dist / character.id, resolve_config("fast", {"precision": "fp32"}),
                   ensure_base_model(tiny_base))
    verification = read_manifest(dist / character.id)["verification"]
    assert verification["top1_agreement"] == 1.0 and verification["kl"] < 1e-6


def test_pruned_characters_share_trunk_tensors(tmp_path: Path, tiny_base: Path, roster_dir: Path) -> None:
    base = ensure_base_model(tiny_base)
    chars = sorted(load_roster(roster_dir).characters, key=lambda c: c.id)[:2]
    manifests = []
    for seed, ch in enumerate(chars):
        ckpt, _ = slice_ffn(tiny_base, tmp_path / f"ckpt{seed}", keep=96, seed=seed)
        manifests.append(read_manifest(write_artifact(ckpt, ch, tmp_path / "dist" / ch.id,
                                                      resolve_config("fast"), base)))
    a, b = ({t["name"]: t["sha256"] for t in m["shared_tensors"]} for m in manifests)
    assert a == b and len(a) >= 4 * 2 + 4
    assert not [name for name in a if ".mlp." in name]  # each character's own FFN is its own
    assert manifests[0]["model"]["intermediate_size"] == 96 and manifests[0]["model"]["base_intermediate_size"] == 128
    assert manifests[0]["files"]["model.onnx.data"]["sha256"] != manifests[1]["files"]["model.onnx.data"]["sha256"]


def test_chat_template_refuses_a_missing_template(tmp_path: Path, tiny_base: Path) -> None:
    from builder.artifact import ArtifactError

    folder = Path(shutil.copytree(tiny_base, tmp_path / "notemplate"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="tokenizer_config.json: chat_template: missing"):
        chat_template(folder)
