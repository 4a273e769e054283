"""Quality benchmark of the pruning methods: how close each pruned character stays to its dense base.

Usage: python bench/quality.py CHARDIR [--characters a,b] [--keep 0.75,0.5] [--methods m1,m2] [--preset default]
           [--set field=value ...] [--sweep heal_steps=0,50,150] [--base PATH] [--threads 1] [--json] [--rows FILE.jsonl]
For every character × keep ratio × method, `builder.prune.prune_character` runs with the same settings (the
baselines get the same training budget: their heal distils on generic text as those methods do; persona methods
heal on persona data), and the held-out metrics of `builder.evaluate` are tabulated side by side. Calibration
data and the dense side of the evaluation are computed once per character and shared by every method, so the
methods are compared on identical held-out queries and reference answers. Then, per keep ratio, the drop
reduction 1 − (dense − ours)/(dense − best baseline) of the default method against the strongest baseline
(lowest KL), and with `--sweep FIELD=v1,v2` the default method once per value of one setting (the budget curve is
`--sweep heal_steps=0,24,96`).
Prints tables; `--json` prints everything as JSON instead. CPU figures are process CPU seconds (noisy on a
shared machine; the first character also pays the roster-wide reference hidden states).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.basemodel import ensure_base_model  # noqa: E402
from builder.cards import load_roster  # noqa: E402
from builder.config import METHODS, resolve_config  # noqa: E402
from builder.evaluate import drop_reduction  # noqa: E402
from builder.prune import GENERIC_METHODS, RosterContext, prune_character  # noqa: E402

DEFAULT_METHOD = "persona-pruner"
COLUMNS = [("kl", "KL", "{:.3f}"), ("top1_agreement", "top1", "{:.3f}"), ("ce_pruned", "CE", "{:.3f}"),
           ("judge_accuracy_pruned", "judge", "{:.2f}"), ("judged_answers", "answers", "{:.0f}"),
           ("judge_margin_pruned", "margin", "{:+.3f}"),
           ("distinct_2_pruned", "dist-2", "{:.3f}"), ("repetition_pruned", "rep", "{:.3f}"),
           ("echo_rate_pruned", "echo", "{:.2f}"), ("ppl_examples_pruned", "ppl-ex", "{:.1f}"),
           ("ppl_generic_pruned", "ppl-gen", "{:.1f}"), ("params_pruned", "params M", "{:.1f}"),
           ("cpu_seconds", "CPU-s", "{:.0f}"), ("passed_gate", "gate", "{}")]
# metric -> the dense model's value (KL is 0 by definition); higher-is-better and lower-is-better both work
DROP_METRICS = {"kl": lambda r: 0.0, "ce_pruned": lambda r: r["ce_dense"],
                "judge_accuracy_pruned": lambda r: r["judge_accuracy_dense"],
                "distinct_2_pruned": lambda r: r["distinct_2_dense"],
                "ppl_generic_pruned": lambda r: r["ppl_generic_dense"]}


def _append(path: str, row: dict) -> None:
    """Each finished row (method or sweep) at once: a long run that is stopped keeps its results."""
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")


def run(args: argparse.Namespace) -> dict:
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides["threads"] = args.threads
    roster = load_roster(args.chardir)
    chars = sorted(roster.characters, key=lambda c: c.id)
    chosen = [c for c in chars if not args.characters or c.id in args.characters.split(",")]
    base = ensure_base_model(args.base)
    ctx = RosterContext.create(chars, base, resolve_config(args.preset, overrides), args.cache)
    rows, curve = [], []
    with tempfile.TemporaryDirectory(prefix="npcforge-quality-") as tmp:
        for ch in chosen:
            for keep in [float(k) for k in args.keep.split(",")]:
                for method in [m for m in args.methods.split(",") if m]:
                    config = resolve_config(args.preset, ch.build, overrides, {"method": method, "ffn_keep": keep})
                    start = time.time()
                    r = prune_character(ch, ctx, base, config, Path(tmp) / f"{ch.id}-{keep}-{method}",
                                        lambda m: logging.info("%s %s %s: %s", ch.id, keep, method, m))
                    rows.append({"character": ch.id, "keep": keep, "method": method, **_flat(r.metrics),
                                 "passed_gate": r.passed_gate, "gate_reasons": r.gate_reasons,
                                 "wall_seconds": time.time() - start, "samples": r.samples})
                    logging.info("%s keep %.2f %s: KL %.3f gate %s", ch.id, keep, method, r.metrics["kl"],
                                 r.passed_gate)
                    _append(args.rows, rows[-1])
            for field, value in _sweep(args.sweep):
                config = resolve_config(args.preset, ch.build, overrides,
                                        {"method": DEFAULT_METHOD, "ffn_keep": float(args.keep.split(",")[0]),
                                         field: value})
                r = prune_character(ch, ctx, base, config, Path(tmp) / f"{ch.id}-{field}-{value}",
                                    lambda m: logging.info("%s %s=%s: %s", ch.id, field, value, m))
                curve.append({"character": ch.id, "keep": config.ffn_keep, "field": field, "value": value,
                              **{k: r.metrics[k] for k in ("kl", "top1_agreement", "judge_accuracy_pruned",
                                                           "judge_accuracy_dense", "judged_answers",
                                                           "repetition_pruned", "repetition_dense")},
                              "passed_gate": r.passed_gate, "gate_reasons": r.gate_reasons,
                              "cpu_seconds": r.cpu_seconds})
                logging.info("%s %s=%s: KL %.3f", ch.id, field, value, r.metrics["kl"])
                _append(args.rows, {"sweep": True, **curve[-1]})
    return {"preset": args.preset, "overrides": overrides, "characters": [c.id for c in chosen], "rows": rows,
            "summary": summarise(rows), "sweep": curve, "roster_context_cpu_seconds": ctx.cpu_seconds}


def _sweep(spec: str) -> list[tuple[str, str]]:
    """"heal_steps=0,24,96" -> [("heal_steps", "0"), ...]; values are coerced by resolve_config."""
    if not spec:
        return []
    field, _, values = spec.partition("=")
    if not values:
        raise SystemExit(f"--sweep: expected FIELD=v1,v2,... (e.g. heal_steps=0,24,96), got {spec!r}")
    return [(field.strip(), v.strip()) for v in values.split(",") if v.strip()]


def _flat(metrics: dict) -> dict:
    out = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    out["params_pruned"] = metrics["params_pruned"] / 1e6
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Per keep: mean metrics per method over characters, and drop reductions of the default method."""
    out = []
    for keep in sorted({r["keep"] for r in rows}, reverse=True):
        by_method: dict[str, list[dict]] = {}
        for r in rows:
            if r["keep"] == keep:
                by_method.setdefault(r["method"], []).append(r)
        means = {m: {k: sum(float(r[k]) for r in rs) / len(rs) for k in rs[0]
                     if isinstance(rs[0][k], (int, float)) and not isinstance(rs[0][k], bool)}
                 for m, rs in by_method.items()}
        entry: dict = {"keep": keep, "means": means}
        ours = means.get(DEFAULT_METHOD)
        # all baselines, and the generic ones alone (persona-activation is this method's own initial score)
        for label, pool in (("", [m for m in means if m != DEFAULT_METHOD]),
                            ("_generic", [m for m in means if m in GENERIC_METHODS])):
            if ours and pool:
                best = min(pool, key=lambda m: means[m]["kl"])
                entry[f"strongest{label}_baseline"] = best
                entry[f"drop_reduction{label}"] = {k: drop_reduction(f(ours), ours[k], means[best][k])
                                                   for k, f in DROP_METRICS.items() if k in ours}
        out.append(entry)
    return out


def print_tables(result: dict) -> None:
    if result["rows"]:
        print_method_tables(result)
    if result["sweep"]:
        print(f"\nSweep ({DEFAULT_METHOD})")
        print("| character | keep | setting | KL | top1 | judge (dense), answers | rep (dense) | gate | CPU-s |\n"
              "|---|---|---|---|---|---|---|---|---|")
        for c in result["sweep"]:
            gate = "passed" if c["passed_gate"] else "fails: " + "; ".join(c["gate_reasons"])
            print(f"| {c['character']} | {c['keep']:.2f} | {c['field']}={c['value']} | {c['kl']:.3f} | "
                  f"{c['top1_agreement']:.3f} | {c['judge_accuracy_pruned']:.2f} ({c['judge_accuracy_dense']:.2f}), "
                  f"{c['judged_answers']} | "
                  f"{c['repetition_pruned']:.3f} ({c['repetition_dense']:.3f}) | {gate} | {c['cpu_seconds']:.0f} |")


def print_method_tables(result: dict) -> None:
    head = ["character", "keep", "method"] + [c[1] for c in COLUMNS]
    print("Per character (held-out queries; dense: KL 0, see the dense columns of --json)")
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in result["rows"]:
        cells = [r["character"], f"{r['keep']:.2f}", r["method"]] + [fmt.format(r[k]) for k, _, fmt in COLUMNS]
        print("| " + " | ".join(cells) + " |")
    dense_cols = ["ce_dense", "judge_accuracy_dense", "distinct_2_dense", "repetition_dense", "echo_rate_dense",
                  "ppl_examples_dense", "ppl_generic_dense"]
    print("\nDense reference per character")
    print("| character | " + " | ".join(dense_cols) + " |\n|" + "---|" * (len(dense_cols) + 1))
    for ch in result["characters"]:
        r = next((r for r in result["rows"] if r["character"] == ch), None)
        if r:
            print(f"| {ch} | " + " | ".join(f"{r[k]:.3f}" for k in dense_cols) + " |")
    for s in result["summary"]:
        print(f"\nkeep {s['keep']:.2f}: mean over characters")
        keys = [k for k, _, _ in COLUMNS if k != "passed_gate"]
        print("| method | " + " | ".join(c[1] for c in COLUMNS if c[0] != "passed_gate") + " |\n|"
              + "---|" * (len(keys) + 1))
        for m, v in s["means"].items():
            print(f"| {m} | " + " | ".join(fmt.format(v[k]) for k, _, fmt in COLUMNS if k in keys) + " |")
        for label in ("", "_generic"):
            if f"drop_reduction{label}" in s:
                dr = ", ".join(f"{k} {v:.0%}" if v is not None else f"{k} n/a"
                               for k, v in s[f"drop_reduction{label}"].items())
                print(f"drop reduction of {DEFAULT_METHOD} vs strongest{label.replace('_', ' ')} baseline "
                      f"({s[f'strongest{label}_baseline']}): {dr}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("chardir", type=Path)
    p.add_argument("--characters", default="", help="comma-separated character ids (default: all)")
    p.add_argument("--keep", default="0.75,0.5")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--preset", default="default")
    p.add_argument("--set", action="append", default=[], help="BuildConfig override field=value (repeatable)")
    p.add_argument("--sweep", default="", help="FIELD=v1,v2,...: the default method once per value, sharing "
                   "calibration (e.g. heal_steps=0,24,96 for the budget curve, or refit=false,true)")
    p.add_argument("--base", default=None, help="base model folder (default: the provisioned default model)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("--cache", type=Path, default=None,
                   help="keep calibrations and the dense side of evaluation here for later runs (as a build's "
                        "OUT/.cache): a second run with other widths, methods or healing settings skips them")
    p.add_argument("--rows", default="", help="append each finished row to this JSON-lines file as it completes")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print_tables(result)


if __name__ == "__main__":
    main()
