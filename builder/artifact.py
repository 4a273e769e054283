"""The artifact: one character's folder in dist/, the contract between builder and runtime (docs/artifact.md).

`write_artifact(checkpoint, character, out_dir, config, base, prune=None)` exports the checkpoint to ONNX, verifies
it against torch, copies the tokenizer, writes character.json, the report and manifest.json (with every file's size
and sha256), all in a temporary sibling folder renamed into place: an artifact is complete or absent.
`check_artifact(folder)` re-verifies a folder's files against its manifest; `read_manifest` loads one. Both read
through runtime.artifact, the format's one reader, so what the builder accepts is what a game will load.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from builder.basemodel import BaseModel
from builder.config import BuildConfig
from builder.export import export_onnx
from runtime.artifact import FORMAT, FORMAT_VERSION, artifact_problems, file_sha256, read_artifact
from runtime.errors import ArtifactError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
PROBE_QUESTIONS = ("Who are you?", "What do you do around here?", "Any news from town?",
                   "What do you want most?", "Can you help me?", "What do you think of strangers?")


class VerificationFailed(ArtifactError):
    """The ONNX model disagrees with its torch checkpoint more than the config allows."""


def builder_version() -> str:
    from npcforge import __version__

    return __version__


def chat_template(tokenizer_dir: Path) -> dict[str, str]:
    """The tokenizer's jinja chat template reduced to per-role format strings with a `{content}` slot.

    Renders conversations holding sentinel strings and takes the text each message adds, so the runtime can build
    prompts without jinja. Fails when a template is not incremental (later messages rewrite earlier text).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not tok.chat_template:
        raise ArtifactError(f"{tokenizer_dir / 'tokenizer_config.json'}: chat_template: missing; "
                            "the runtime needs the model's chat format")
    sentinels = {"system": "NPCFSENTINELSYSTEM", "user": "NPCFSENTINELUSER", "assistant": "NPCFSENTINELASSISTANT"}
    msgs = [{"role": r, "content": c} for r, c in sentinels.items()]

    def render(n: int, gen: bool = False) -> str:
        return tok.apply_chat_template(msgs[:n], tokenize=False, add_generation_prompt=gen)

    out: dict[str, str] = {}
    prev = ""
    for n, role in enumerate(sentinels, start=1):
        text = render(n)
        if not text.startswith(prev) or text[len(prev):].count(sentinels[role]) != 1:
            raise ArtifactError(f"{tokenizer_dir / 'tokenizer_config.json'}: chat_template: the {role} turn is not "
                                "rendered incrementally; the runtime cannot use this template")
        out[role] = text[len(prev):].replace(sentinels[role], "{content}")
        prev = text
    with_gen, without = render(2, True), render(2)
    if not with_gen.startswith(without):
        raise ArtifactError(f"{tokenizer_dir / 'tokenizer_config.json'}: chat_template: generation prompt is not a "
                            "suffix of the conversation")
    out["generation_prompt"] = with_gen[len(without):]
    return out


def _token_ids(tokenizer_dir: Path, checkpoint: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    eos: list[int] = []
    gen_path = checkpoint / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    for value in (tok.eos_token_id, gen.get("eos_token_id")):
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v not in eos:
                eos.append(int(v))
    if not eos:
        raise ArtifactError(f"{tokenizer_dir}: no eos token in the tokenizer or generation_config.json")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    return {"file": "tokenizer.json", "eos_token_ids": eos, "pad_token_id": int(pad)}


def probe_prompts(character: Any, template: dict[str, str], config: BuildConfig) -> list[str]:
    """Chat-formatted prompts in the character's own voice: its system prompt + example or stock questions."""
    from builder.cards import persona_prompt

    system = template["system"].replace("{content}", persona_prompt(character, config.user_name))
    questions = [t.text for d in character.examples for t in d if t.role == "user"]
    questions += [q for q in PROBE_QUESTIONS if q not in questions]
    return [system + template["user"].replace("{content}", q) + template["generation_prompt"]
            for q in questions[:config.verify_prompts]]


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an artifact folder; ArtifactError naming the file and field when it is not one."""
    return read_artifact(folder).manifest


def check_artifact(folder: Path) -> list[str]:
    """Every problem of the folder against its manifest (malformed, missing file, size or sha256); [] when intact."""
    try:
        return artifact_problems(read_artifact(folder))
    except ArtifactError as e:
        return [str(e)]


def jsonable(value: Any) -> Any:
    """numpy/torch scalars and arrays that metrics may hold, as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=jsonable) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def install(tmp: Path, out_dir: Path) -> None:
    """Rename a finished folder into place; an existing artifact is moved aside first, then deleted."""
    old = out_dir.parent / f".old-{out_dir.name}-{os.getpid()}"
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def export_settings(config: BuildConfig, base_ffn: bool, widened: bool) -> BuildConfig:
    """The settings a checkpoint is exported with. The base's own FFN (`base_ffn`: ffn_keep 1.0, or a character
    `widened` to it after failing the gate) goes at the trunk's precision unless an unwidened build asked for its
    own: a fallback must pass without a gate, and rounding the base FFN to int4 a second time (its weights came
    from the GGUF's 4-bit grid, and shared tensors get no GPTQ) costs 0.14 nats/token on the verification probes
    (55/64 top-1). At the trunk's precision it is the same tensors as every such character's, which the runtime
    shares."""
    if base_ffn and (widened or config.ffn_precision == "auto"):
        return dataclasses.replace(config, ffn_precision=None, ffn_accuracy_level=None, ffn_block_size=None)
    return config


def write_artifact(checkpoint: Path, character: Any, out_dir: Path, config: BuildConfig, base: BaseModel,
                   prune: Any = None, progress: Callable[[str], None] | None = None,
                   failed_widths: list[dict[str, Any]] | None = None) -> Path:
    """Export, verify, hash and install one character's artifact at out_dir; returns out_dir. `failed_widths`: the
    narrower FFN widths that failed the quality gate before this one (builder.build), kept in the quality record."""
    from builder.cards import character_record
    from builder.report import write_character_report
    from builder.verify import verify_export

    say = progress or (lambda msg: log.info(msg))
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    base_ffn = checkpoint.resolve() == Path(base.path).resolve()
    settings = export_settings(config, base_ffn, bool(failed_widths))  # the manifest keeps the request's hash
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        t0 = time.perf_counter()
        say("export")
        exported = export_onnx(checkpoint, tmp, settings, getattr(prune, "ffn_codes", None), base_ffn=base_ffn)
        tok_src = checkpoint if (checkpoint / "tokenizer.json").is_file() else base.path
        for name in TOKENIZER_FILES:
            if (tok_src / name).is_file():
                shutil.copyfile(tok_src / name, tmp / name)
        template = chat_template(tmp)
        say("verify")
        verification = verify_export(checkpoint, exported.model_file, probe_prompts(character, template, config),
                                     settings)
        if not verification.passed:
            raise VerificationFailed(f"{character.id}: {verification.reason}")
        _write_json(tmp / "character.json", character_record(character, config.user_name))
        quality = dict(prune.metrics, passed_gate=prune.passed_gate, gate_reasons=prune.gate_reasons) if prune \
            else {"method": "dense", "ffn_keep": 1.0, "passed_gate": True}
        if failed_widths:
            quality["failed_widths"] = failed_widths
        manifest: dict[str, Any] = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "id": character.id, "name": character.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "builder": {"version": builder_version(), "config": config.to_dict(), "config_hash": config.fingerprint()},
            "base_model": {"id": base.model_id, "sha256": base.sha256}, "card_sha256": character.card_sha256,
            "model": {"file": exported.model_file.name, "data_file": exported.data_file.name,
                      "precision": settings.precision, "ffn_precision": settings.ffn_setting("precision"),
                      **exported.shapes,
                      "base_intermediate_size": base.config["intermediate_size"], "kv_layout": "BNSH",
                      "logits": "last"},
            "tokenizer": _token_ids(tmp, checkpoint),
            "chat_template": template,
            "shared_tensors": exported.shared_tensors(),
            "verification": verification.to_dict(),
            "quality": quality,
            "build_seconds": {"export": round(exported.seconds, 1), "artifact": 0.0},
        }
        say("report")
        write_character_report(tmp, manifest, exported, prune)
        manifest["build_seconds"]["artifact"] = round(time.perf_counter() - t0, 1)
        manifest["files"] = {p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
                             for p in sorted(tmp.iterdir()) if p.is_file() and p.name != MANIFEST}
        _write_json(tmp / MANIFEST, manifest)
        install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("artifact %s written", out_dir)
    return out_dir


__all__ = ["ArtifactError", "VerificationFailed", "write_artifact", "check_artifact", "read_manifest",
           "chat_template", "probe_prompts", "install", "MANIFEST", "FORMAT_VERSION"]
