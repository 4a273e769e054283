"""Player-side quality benchmark: what the shipped artifacts say, through the runtime, dense against pruned.

Usage: python bench/player.py CHARDIR DIST [--characters a,b] [--samples 2] [--sampling runtime,builder]
           [--seed 0] [--cache DIR] [--base PATH] [--threads 2] [--json]
bench/quality.py measures the pruned torch checkpoint, sampled the way the build's evaluation samples. A game gets
the int8 ONNX artifact, decoded by `runtime.NPCPool` at the runtime's default sampling (top-k 40, repetition
penalty 1.1). For every character with an artifact in DIST, the base model is exported for that character with
the artifact's own settings (cached under $NPCFORGE_HOME/bench/player), and both answer the character's held-out
queries through NPCPool, `--samples` seeded answers per query, with the same seeds on both sides (`--seed`
draws another set). The held-out queries are the build's: its calibration is read from DIST/.cache (or
`--cache`), and computed when missing, at a build's calibration cost.
The dense torch model judges every answer as the build's evaluation does (builder.judge: identified when the
character's own persona ranks first among the reference personas), and the degeneration checks run on it.
Samplings: `runtime` (RuntimeConfig's defaults) and `builder` (the evaluation's: no top-k, no repetition penalty).
Prints one table per sampling; `--json` prints everything as JSON instead. Cost per character and sampling, on
2 AVX2 cores: about a minute of decoding per model and five of judging.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import runtime  # noqa: E402
from builder.artifact import builder_version, read_manifest, write_artifact  # noqa: E402
from builder.basemodel import BaseModel, ensure_base_model, npcforge_home  # noqa: E402
from builder.cards import Character, load_roster  # noqa: E402
from builder.config import resolve_config  # noqa: E402
from builder.judge import degeneration, identification  # noqa: E402
from builder.prune import RosterContext, character_calibration, reference_prompts  # noqa: E402

# name -> (per-call overrides of runtime.RuntimeConfig, what they mean); `builder` matches the build's evaluation
# sampling, whose temperature and top-p are the runtime's defaults too
SAMPLINGS = {"runtime": ({}, "the runtime's defaults: top-k 40, repetition penalty 1.1"),
             "builder": ({"top_k": 0, "repetition_penalty": 1.0}, "the build's evaluation: no top-k, no penalty")}
COLUMNS = [("judge_accuracy", "judge", "{:.3f}"), ("judge_margin", "margin", "{:+.3f}"),
           ("repetition", "repetition", "{:.3f}"), ("distinct_2", "distinct-2", "{:.3f}"),
           ("echo_rate", "echo", "{:.3f}"), ("mean_words", "words", "{:.1f}")]


def dense_dist(character: Character, config_dict: dict, base: BaseModel) -> Path:
    """A dist holding the base model exported as `character` with the artifact's settings (cached per settings,
    base and builder version: another builder may write another graph)."""
    config = resolve_config("default", config_dict)
    out = npcforge_home() / "bench" / "player" / f"{config.fingerprint()}-{base.sha256[:12]}-{builder_version()}"
    if not (out / character.id / "manifest.json").is_file():
        write_artifact(Path(base.path), character, out / character.id, config, base)
    return out


def answers(dist: Path, cid: str, queries: list[str], samples: int, max_tokens: int, sampling: str,
            threads: int, seed: int) -> list[str]:
    """`samples` seeded replies per query, round after round, each in a fresh conversation; both sides of a
    comparison draw with the same seeds."""
    with runtime.NPCPool(dist, threads=threads) as pool:
        return [pool.chat(cid, f"q{i}-r{r}", q, max_tokens=max_tokens, seed=seed + 1000 * r + i,
                          **SAMPLINGS[sampling][0]).wait().text.strip()
                for r in range(samples) for i, q in enumerate(queries)]


def run(args: argparse.Namespace) -> dict:
    unknown = set(args.sampling.split(",")) - set(SAMPLINGS)
    if unknown:
        raise SystemExit(f"--sampling: unknown {', '.join(sorted(unknown))}; choose from {', '.join(SAMPLINGS)}")
    chars = sorted(load_roster(args.chardir).characters, key=lambda c: c.id)
    built = {c.id for c in chars if (args.dist / c.id / "manifest.json").is_file()}
    chosen = [c for c in chars if c.id in built and (not args.characters or c.id in args.characters.split(","))]
    if not chosen:
        raise SystemExit(f"{args.dist}: no artifact of the chosen characters of {args.chardir}; build them first")
    base = ensure_base_model(args.base)
    rows = []
    ctx = None
    for ch in chosen:
        manifest = read_manifest(args.dist / ch.id)
        config = resolve_config("default", manifest["builder"]["config"], {"threads": args.threads})
        if ctx is None:
            ctx = RosterContext.create(chars, base, config, args.cache or args.dist / ".cache")
        cal = character_calibration(ch, ctx, config, lambda line: logging.info("%s %s", ch.id, line))
        queries = [e.query for e in cal.heldout]
        asked = queries * args.samples
        prompts = [cal.system] + reference_prompts(ch, ctx, config)  # own persona first, as evaluate's
        dists = {"dense": dense_dist(ch, manifest["builder"]["config"], base), "pruned": args.dist}
        # the width that shipped: a character the gate widened keeps the asked ffn_keep in builder.config
        keep = manifest["model"]["intermediate_size"] / manifest["model"]["base_intermediate_size"]
        for sampling in args.sampling.split(","):
            row: dict = {"character": ch.id, "sampling": sampling, "answers": len(asked), "ffn_keep": keep}
            for side, dist in dists.items():
                start = time.time()
                texts = answers(dist, ch.id, queries, args.samples, config.teacher_max_tokens, sampling, args.threads,
                                args.seed)
                decoded = time.time() - start
                m = identification(ctx.judge.loglik(prompts, list(zip(asked, texts))))
                m.update(degeneration(texts, cal.system))
                row.update({f"{k}_{side}": v for k, v in m.items()})
                row[f"seconds_{side}"] = {"decode": round(decoded, 1), "judge": round(time.time() - start - decoded, 1)}
                row[f"sample_{side}"] = {"query": queries[0], "answer": texts[0]}
            logging.info("%s %s: judge %.3f / %.3f, repetition %.3f / %.3f", ch.id, sampling,
                         row["judge_accuracy_dense"], row["judge_accuracy_pruned"], row["repetition_dense"],
                         row["repetition_pruned"])
            rows.append(row)
    return {"dist": str(args.dist), "samples": args.samples, "seed": args.seed, "rows": rows}


def print_tables(result: dict) -> None:
    for sampling in dict.fromkeys(r["sampling"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["sampling"] == sampling]
        n = result["samples"]
        print(f"\nSampling `{sampling}` ({SAMPLINGS[sampling][1]}): dense / pruned, {n} answer{'s' * (n != 1)} per "
              f"held-out query, seed {result['seed']}")
        print("| character | keep | " + " | ".join(c[1] for c in COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 2))
        for r in rows:
            cells = [f"{fmt.format(r[k + '_dense'])} / {fmt.format(r[k + '_pruned'])}" for k, _, fmt in COLUMNS]
            print(f"| {r['character']} | {r['ffn_keep']:.3f} | " + " | ".join(cells) + " |")
        if len(rows) > 1:
            cells = [f"{fmt.format(sum(r[k + '_dense'] for r in rows) / len(rows))} / "
                     f"{fmt.format(sum(r[k + '_pruned'] for r in rows) / len(rows))}" for k, _, fmt in COLUMNS]
            print("| **mean** | | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("chardir", type=Path, help="the character files the artifacts were built from")
    p.add_argument("dist", type=Path, help="the build's output folder (npcforge build -o DIST)")
    p.add_argument("--characters", default="", help="comma-separated character ids (default: every one built)")
    p.add_argument("--samples", type=int, default=2, help="answers per held-out query (the build judges 2)")
    p.add_argument("--sampling", default="runtime,builder", help=f"comma-separated, of: {', '.join(SAMPLINGS)}")
    p.add_argument("--seed", type=int, default=0, help="added to every answer's seed: another set of samples")
    p.add_argument("--cache", type=Path, default=None, help="calibration cache (default: DIST/.cache)")
    p.add_argument("--base", default=None, help="base model folder (default: the provisioned default model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_tables(result)


if __name__ == "__main__":
    main()
