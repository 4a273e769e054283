"""`npcforge build` (a roster folder → dist/ artifacts) and `npcforge inspect` (describe and re-verify one artifact)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from npcforge.ui import Failed, emit_json


@click.command()
@click.argument("chardir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (dist/): one artifact folder per character, index.json, report.html.")
@click.option("--only", multiple=True, metavar="ID", help="Build only these character ids (repeatable).")
@click.option("--preset", type=click.Choice(["fast", "default", "best"]), default="default", show_default=True,
              help="fast: demos and CI; best: what a release build can afford.")
@click.option("--ffn-keep", type=float, help="Fraction of FFN channels kept (default 0.875; 1.0 = no pruning, "
              "exports the base).")
@click.option("--ffn-keep-fallback", metavar="K1,K2",
              help="Wider FFN widths tried in turn when a character fails the quality gate (default 1.0: the base "
              "FFN, at the trunk's precision); 'none' reports the failure instead.")
@click.option("--method", help="Channel selection: persona-pruner, persona-activation, magnitude, wanda-sp, taylor.")
@click.option("--precision", type=click.Choice(["fp32", "int8", "int4"]), help="Weight precision of the ONNX model.")
@click.option("--ffn-precision", type=click.Choice(["auto", "fp32", "int8", "int4"]),
              help="Precision of the character's own FFN weights (default auto: int4 with GPTQ under a quantised "
              "trunk, fp32 under fp32). The quality gate judges them as stored; int8 doubles their memory.")
@click.option("--base-model", type=click.Path(file_okay=False), help="A local HF folder instead of the default.")
@click.option("--device", help="Torch device for pruning and evaluation: cpu (default) or cuda[:N]. Export and "
              "verification run on the CPU either way.")
@click.option("--jobs", type=int, default=1, show_default=True, help="Characters built in parallel processes.")
@click.option("--force", is_flag=True, help="Rebuild characters whose artifact is up to date.")
@click.option("--no-cache", is_flag=True, help="Compute calibrations and the dense side of evaluation afresh "
              "instead of reusing OUT/.cache (kept from earlier builds; safe to delete).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def build(chardir: Path, out_dir: Path, only: tuple[str, ...], preset: str, ffn_keep: float | None,
          ffn_keep_fallback: str | None, method: str | None, precision: str | None, ffn_precision: str | None, base_model: str | None,
          device: str | None, jobs: int, force: bool, no_cache: bool, as_json: bool) -> None:
    """Build a pruned, exported, verified model for every character file in CHARDIR.

    Unchanged characters are skipped in seconds; each artifact appears complete or not at all. A character whose
    pruned model fails the quality gate is rebuilt with a wider FFN (--ffn-keep-fallback), and the summary says so.
    Exit code 1 when any character failed (the summary names it and says why); the others are built regardless.
    """
    from builder.basemodel import BaseModelError
    from builder.build import BuildError, build_roster
    from builder.config import ConfigError, resolve_config

    overrides: dict[str, Any] = {k: v for k, v in dict(ffn_keep=ffn_keep, method=method,
                                                       ffn_keep_fallback=ffn_keep_fallback,
                                                       precision=precision,
                                                       ffn_precision=ffn_precision,
                                                       device=device).items() if v is not None}
    if jobs < 1:
        raise click.BadParameter("must be at least 1", param_hint="--jobs")
    try:
        config = resolve_config(preset, overrides)
        if config.device != "cpu":
            from builder.lm import require_device
            require_device(config.device)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None

    def progress(cid: str, message: str) -> None:
        click.echo(f"[{cid}] {message}", err=True)

    try:
        summary = build_roster(chardir, out_dir, preset, overrides, list(only) or None, base_model, jobs, force,
                               progress, cache=not no_cache)
    except BuildError as e:
        raise click.UsageError(str(e)) from None
    except BaseModelError as e:
        raise Failed(str(e)) from None
    if as_json:
        emit_json(summary.to_dict())
    else:
        for o in summary.outcomes:
            line = f"{o.status:>8}  {o.id}"
            line += f"  ({o.seconds:.0f} s)" if o.status == "built" else ""
            click.echo(line + "".join(f"  {t}" for t in (o.note, o.reason) if t))
        click.echo(f"{sum(o.status == 'built' for o in summary.outcomes)} built, "
                   f"{sum(o.status == 'skipped' for o in summary.outcomes)} up to date, "
                   f"{sum(o.status == 'failed' for o in summary.outcomes)} failed in {summary.seconds:.1f} s "
                   f"→ {out_dir}")
    failed = [o for o in summary.outcomes if o.status == "failed"]
    if failed:
        raise Failed("; ".join(f"{o.id}: {o.reason}" for o in failed))


@click.command()
@click.argument("artifact", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest and the check as JSON.")
def inspect(artifact: Path, as_json: bool) -> None:
    """Describe one artifact (DIST/ID) and re-verify every file against its manifest's sha256."""
    from builder.artifact import ArtifactError, check_artifact, read_manifest
    from builder.report import precision_label

    try:
        manifest = read_manifest(artifact)
    except ArtifactError as e:
        raise Failed(str(e)) from None
    problems = check_artifact(artifact)
    if as_json:
        emit_json({"ok": not problems, "problems": problems, "manifest": manifest})
    else:
        m, v, q = manifest["model"], manifest["verification"], manifest["quality"]
        rows = [("character", f"{manifest['name']} ({manifest['id']})"), ("created", manifest["created"]),
                ("builder", f"{manifest['builder']['version']}, config {manifest['builder']['config_hash']}"),
                ("base model", f"{manifest['base_model']['id']} {manifest['base_model']['sha256'][:12]}"),
                ("model", f"{precision_label(m)}, {m['num_layers']} layers, {m['num_attention_heads']}/"
                          f"{m['num_kv_heads']} heads x {m['head_dim']}, FFN {m['intermediate_size']}/"
                          f"{m['base_intermediate_size']}{_width_range(m)}, vocab {m['vocab_size']}, "
                          f"context {m['max_context']}"),
                ("verification", f"KL {v.get('kl', float('nan')):.4f}, top-1 {v['top1_agreement']:.3f}, "
                                 f"greedy {v['greedy_agreement']:.3f}, "
                                 f"max |logit diff| {v['max_abs_logit_diff']:.4g} over {v['probe_tokens']} tokens"),
                ("quality gate", "passed" if q.get("passed_gate") else
                 "FAILED: " + "; ".join(q.get("gate_reasons", []))),
                ("shared tensors", f"{len(manifest['shared_tensors'])} "
                                   f"({sum(t['length'] for t in manifest['shared_tensors']) / 1e6:.1f} MB)")]
        for key, value in rows:
            click.echo(f"{key:>15}: {value}")
        for rel, rec in manifest["files"].items():
            bad = any(str(artifact / rel) in p for p in problems)
            click.echo(f"{'BAD' if bad else 'ok':>15}: {rel} ({rec['size']:,} bytes)")
    if problems:
        raise Failed("; ".join(problems))


def _width_range(model: dict) -> str:
    """What inspect adds to the FFN width when it differs between layers: " (per layer 1024-1536)"."""
    widths = model.get("ffn_widths") or []
    return f" (per layer {min(widths)}-{max(widths)})" if len(set(widths)) > 1 else ""
