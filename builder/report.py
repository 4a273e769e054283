"""Build reports: per character `report.json` + `report.html`, and one `report.html` for the whole roster.

Input: the manifest being written, the `ExportResult` (tensor sizes) and the optional `PruneResult` (kept channels,
fidelity metrics dense vs pruned vs baselines, sample answers). Output: static HTML with inline CSS and an inline SVG
heat strip of kept FFN channels per layer; no script, no network.
"""
from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path
from typing import Any

from builder.artifact import jsonable

CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
BINS = 64  # columns of the kept-channel heat strip: enough to show clustering, small enough to stay light

CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222;background:#fff;max-width:70em}
h1,h2{color:#402010}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f3ebe3}.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#176b2c;font-weight:bold}.bad{color:#a11;font-weight:bold}section{border-top:3px solid #c87;padding-top:1em}"""


def precision_label(model: dict) -> str:
    """The manifest's precision, with the FFN's when the character's own weights have their own ("int8, FFN int4")."""
    ffn = model.get("ffn_precision", model["precision"])
    return model["precision"] if ffn == model["precision"] else f"{model['precision']}, FFN {ffn}"


def report_data(manifest: dict[str, Any], exported: Any, prune: Any) -> dict[str, Any]:
    """Everything the pages show, as plain JSON (also written as report.json)."""
    m = manifest["model"]
    model_bytes = exported.model_file.stat().st_size + exported.data_file.stat().st_size
    ffn_bytes = sum(t.length for t in exported.tensors if ".mlp." in t.name)
    k, k0, L, H = m["intermediate_size"], m["base_intermediate_size"], m["num_layers"], m["hidden_size"]
    dense_bytes = model_bytes - ffn_bytes + round(ffn_bytes * k0 / k)
    shared_params = sum(_numel(t.shape) for t in exported.tensors if t.shared and t.dtype == "float32")
    return {
        "id": manifest["id"], "name": manifest["name"], "created": manifest["created"],
        "precision": precision_label(m), "config_hash": manifest["builder"]["config_hash"],
        "size": {"artifact_bytes": model_bytes, "dense_artifact_bytes": dense_bytes,
                 "ffn_bytes": ffn_bytes,
                 "shared_bytes": model_bytes - sum(t.length for t in exported.tensors if not t.shared),
                 "ffn_channels": k, "base_ffn_channels": k0, "ffn_params": 3 * L * H * k,
                 "base_ffn_params": 3 * L * H * k0, "shared_fp32_params": shared_params},
        "speed": {"prefill_ms": manifest["verification"]["prefill_ms"],
                  "decode_tokens_per_s": manifest["verification"]["decode_tokens_per_s"],
                  "note": "measured during verification, threads = config.threads or 1; noisy on a shared CPU"},
        "verification": manifest["verification"],
        "quality": manifest["quality"],
        "kept_channels": prune.kept_channels if prune is not None else None,
        "samples": list(prune.samples) if prune is not None else [],
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def kept_channels_svg(kept: list[list[int]], n_channels: int, bins: int = BINS) -> str:
    """One row per layer, one cell per bin of channel indices; darker = more of that bin kept. Each row ends with
    the layer's width: builder.widths gives layers different ones."""
    cell_w, cell_h, left, right = 10, 12, 46, 44
    width, height = left + bins * cell_w + right, 24 + len(kept) * cell_h
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="kept FFN channels per layer">',
             f'<text x="{left}" y="12" font-size="11">channel index 0 → {n_channels - 1} ({bins} bins); '
             'darker = more channels kept</text>']
    per_bin = n_channels / bins
    for layer, channels in enumerate(kept):
        counts = [0] * bins
        for c in channels:
            counts[min(int(c / per_bin), bins - 1)] += 1
        y = 18 + layer * cell_h
        parts.append(f'<text x="0" y="{y + cell_h - 2}" font-size="10">L{layer}</text>')
        for b, count in enumerate(counts):
            frac = count / per_bin
            shade = int(245 - 200 * min(frac, 1.0))
            parts.append(f'<rect x="{left + b * cell_w}" y="{y}" width="{cell_w}" height="{cell_h - 1}" '
                         f'fill="rgb({shade},{int(shade * 0.8)},{int(shade * 0.6)})"/>')
        parts.append(f'<text x="{left + bins * cell_w + 4}" y="{y + cell_h - 2}" font-size="10">'
                     f'{len(channels)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    text = json.dumps(v, ensure_ascii=False, default=jsonable) if isinstance(v, (list, dict)) else str(v)
    # model samples may hold control bytes, which HTML forbids
    return html.escape(CONTROL.sub("\ufffd", text))


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="num">{_fmt(c)}</td>' if isinstance(c, (int, float))
                                    and not isinstance(c, bool) else f"<td>{_fmt(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _quality_tables(quality: dict[str, Any]) -> str:
    """`<metric>_dense` / `<metric>_pruned` (and `baselines: {method: {metric: value}}`) side by side; the rest as
    one table of scalars."""
    pivot: dict[str, dict[str, Any]] = {}
    columns = ["dense", "pruned"]
    scalars = []
    for key, value in quality.items():
        metric, _, variant = key.rpartition("_")
        if metric and variant in ("dense", "pruned"):
            pivot.setdefault(metric, {})[variant] = value
        elif key == "baselines" and isinstance(value, dict):
            for method, metrics in value.items():
                columns.append(f"baseline {method}")
                for name, v in (metrics or {}).items():
                    pivot.setdefault(name.removesuffix("_pruned"), {})[f"baseline {method}"] = v
        else:
            scalars.append([key, value])
    out = _table([[m] + [pivot[m].get(c, "") for c in columns] for m in pivot], ["metric", *columns]) if pivot else ""
    return out + (_table(scalars, ["measure", "value"]) if scalars else "")


def character_section(data: dict[str, Any], level: int = 1) -> str:
    s, v, sp = data["size"], data["verification"], data["speed"]
    ok = data["quality"].get("passed_gate")
    h = f"h{level}"
    parts = [f"<{h}>{html.escape(data['name'])} <small>({html.escape(data['id'])})</small></{h}>",
             f"<p>precision {data['precision']} · config {data['config_hash']} · built {data['created']} · quality gate "
             f"<span class=\"{'ok' if ok else 'bad'}\">{'passed' if ok else 'failed'}</span></p>",
             "<h3>Size</h3>",
             _table([["artifact (ONNX + data)", s["dense_artifact_bytes"], s["artifact_bytes"],
                      round(s["artifact_bytes"] / s["dense_artifact_bytes"], 3)],
                     ["FFN channels per layer", s["base_ffn_channels"], s["ffn_channels"],
                      round(s["ffn_channels"] / s["base_ffn_channels"], 3)],
                     ["FFN parameters", s["base_ffn_params"], s["ffn_params"],
                      round(s["ffn_params"] / s["base_ffn_params"], 3)]],
                    ["", "dense", "pruned", "ratio"]),
             "<h3>Speed and export fidelity</h3>",
             _table([["prefill (probe prompt), ms", sp["prefill_ms"]],
                     ["decode, tokens/s", sp["decode_tokens_per_s"]],
                     ["ONNX vs torch: KL per probe token, nats (what verification checks)", v.get("kl", "")],
                     ["ONNX vs torch: teacher-forced top-1 agreement", v["top1_agreement"]],
                     ["ONNX vs torch: greedy agreement", v["greedy_agreement"]],
                     ["ONNX vs torch: max |logit diff|", v["max_abs_logit_diff"]],
                     ["probe tokens", v["probe_tokens"]]], ["measure", "value"]),
             f"<p><small>{html.escape(sp['note'])}</small></p>",
             "<h3>Fidelity to the dense model</h3>"]
    quality = dict(data["quality"])
    stages = quality.pop("stage_cpu_seconds", None)  # its own table below
    failed_widths = quality.pop("failed_widths", [])
    if failed_widths:
        parts += [f"<p class=\"bad\">Widened: the quality gate failed at FFN keep "
                  f"{', '.join(str(w['ffn_keep']) for w in failed_widths)}, so this artifact keeps "
                  f"{quality.get('ffn_keep', 1.0)}.</p>",
                  _table([[w["ffn_keep"], w.get("kl", ""), w.get("judge_accuracy_pruned", ""),
                           w.get("repetition_pruned", ""), "; ".join(w["gate_reasons"])] for w in failed_widths],
                         ["FFN keep", "KL", "judge", "repetition", "gate"])]
    parts.append(_quality_tables(quality))
    if stages:
        total = sum(stages.values())
        parts += ["<h3>Build cost (process CPU seconds, all threads)</h3>",
                  _table([[name, sec, f"{sec / total:.0%}" if total else ""] for name, sec in stages.items()]
                         + [["total", round(total, 1), ""]], ["stage", "CPU-s", "share"])]
    if data["kept_channels"]:
        parts += ["<h3>Kept FFN channels per layer</h3>",
                  kept_channels_svg(data["kept_channels"], s["base_ffn_channels"])]
    if data["samples"]:
        parts += ["<h3>Sample answers</h3>",
                  _table([[x.get("query", ""), x.get("dense", x.get("dense_answer", "")),
                           x.get("pruned", x.get("pruned_answer", ""))] for x in data["samples"]],
                         ["query", "dense", "pruned"])]
    return "\n".join(parts)


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_character_report(folder: Path, manifest: dict[str, Any], exported: Any, prune: Any) -> dict[str, Any]:
    data = report_data(manifest, exported, prune)
    _write(folder / "report.json", json.dumps(data, indent=1, ensure_ascii=False, default=jsonable) + "\n")
    _write(folder / "report.html", _page(f"npcforge report: {data['name']}", character_section(data)))
    return data


def write_roster_report(dist: Path, ids: list[str], failures: dict[str, str]) -> Path:
    """dist/report.html: a summary table and one section per built character (from their report.json)."""
    sections, rows = [], []
    for cid in ids:
        path = dist / cid / "report.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        s = data["size"]
        kept = f"{s['ffn_channels'] / s['base_ffn_channels']:.3g}" + (
            ", widened" if data["quality"].get("failed_widths") else "")
        rows.append([data["name"], cid, data["precision"], kept, s["artifact_bytes"],
                     round(s["artifact_bytes"] / s["dense_artifact_bytes"], 3), data["speed"]["decode_tokens_per_s"],
                     data["verification"].get("kl", ""), "passed" if data["quality"].get("passed_gate") else "failed"])
        sections.append(f'<section id="{html.escape(cid)}">{character_section(data, level=2)}</section>')
    body = ["<h1>npcforge build report</h1>",
            _table(rows, ["character", "id", "precision", "FFN kept", "bytes", "size vs dense", "decode tok/s",
                          "ONNX KL to torch", "quality gate"])]
    if failures:
        body += ["<h2>Failed</h2>", _table([[k, v] for k, v in sorted(failures.items())], ["id", "reason"])]
    out = dist / "report.html"
    _write(out, _page("npcforge build report", "\n".join(body + sections)))
    return out


__all__ = ["write_character_report", "write_roster_report", "kept_channels_svg", "report_data"]
