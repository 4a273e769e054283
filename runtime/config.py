"""Runtime settings: the one home of every default the runtime uses.

`RuntimeConfig` is passed to `NPCPool(..., config=RuntimeConfig(...))`; everything has a default that works for a
game shipping a few dozen characters on a small CPU. Sampling defaults apply when `chat()` leaves a parameter None.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class RuntimeConfig:
    # --- threads ---
    # Intra-op threads of one model call; 0 = all cores. Measured (bench/runtime.py, 2 cores): one thread per call
    # and one worker per core give 1.3-1.4x the total tok/s of 2-thread calls from 4 conversations on (143 vs 100
    # at 16); one conversation alone decodes faster with 2 threads (110 vs 71): a game talks to several NPCs.
    threads: int = 1
    # One process-wide ORT thread pool for every runtime session (FACTS 4) instead of one small pool per session.
    # The first pool of the process fixes its size for all later ones, so it is for processes that hold one pool
    # (`npcforge serve`); the builder's ORT sessions (the Python binding, another ORT instance) are not affected.
    global_thread_pool: bool = False
    workers: int = 0  # threads taking decoding steps round-robin; 0 = cores // threads, so calls never oversubscribe

    # --- loading and memory ---
    memory_budget_mb: float | None = None  # estimated model memory allowed; None = no limit (no eviction)
    verify_hashes: bool = True  # sha256 of every manifest file before a character is served (cached per file stat)
    share_tensors: bool = True  # one memory-mapped copy of each `shared_tensors` entry for all sessions
    # MLAS pre-packs MatMul weights into copies it computes with. MatMulNBits (int8/int4) without it decodes ~20x
    # slower (dense int8 base: 1.1 vs 25.7 tok/s), so "auto" pre-packs quantised models. Packed copies of shared
    # weights are made once per process (runtime/ortc.py's container); a character's own packed FFN replaces its
    # file's bytes (measured 1.0x). fp32 is not pre-packed: its packed copies cost ~490 MB/session (FACTS 4) for
    # ~15 % speed. "on" | "off" force it; bench/runtime.py measures.
    prepacking: str = "auto"
    session_overhead_mb: float = 8.0  # per-session ORT bookkeeping added to the file-size estimate for the budget
    graph_optimization: str = "all"  # "basic" | "extended" | "all": ORT graph optimisation level at load
    # glibc's M_MMAP_THRESHOLD, fixed so freed large blocks go back to the OS (runtime/model.py); 0 leaves it alone
    malloc_mmap_threshold_kb: int = 256

    # --- generation ---
    max_tokens: int = 128  # NPC replies are short; callers may ask for more
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    repetition_penalty: float = 1.1  # small models loop (FACTS 4d); 1.0 turns it off
    repetition_window: int = 64  # last N context tokens the penalty looks at (llama.cpp's repeat_last_n)
    # text deltas a slow reader may leave unread before its generation pauses (it resumes when half are read):
    # a stalled client costs a paused slot, not max_tokens of decoding
    stream_backlog: int = 64
    prefill_chunk: int = 256  # long prompts prefill in chunks so one big prompt cannot stall other conversations
    # KV cache in preallocated OrtValue buffers written in place (GroupQueryAttention's static cache) instead of numpy
    # arrays the graph concatenates every step: same logits, 7 % faster per step at 300 cached tokens, 32 % at 1500.
    kv_buffers: bool = True
    kv_slack: int = 32  # unused buffer positions a finished reply may keep; more are trimmed (one copy)

    # --- conversations ---
    prefix_cache: bool = True  # prefill each character's system prompt (+ greeting) once and start every chat there
    # Persona prefix caches kept (LRU over characters): ~22 MB per 500-token SmolLM2 persona, more than a pruned FFN's
    # third of a character. 256 MB keeps a busy scene's ~11 speakers instant; a character whose cache was dropped
    # prefills its persona with its next conversation's first turn (~0.7 s, 1 thread) and caches it again.
    persona_cache_mb: float = 256.0
    reuse_kv: bool = True  # keep a conversation's KV between turns so a follow-up prefills only the new tokens
    kv_cache_mb: float = 256.0  # KV caches of idle conversations kept (LRU); an evicted one re-prefills its history
    max_context: int | None = None  # cap on the manifest's max_context (None = the manifest's value)
    overflow_target: float = 0.75  # on overflow, cut history to this fraction of the room so the next turns fit too

    def prepack(self, precision: str) -> bool:
        return self.prepacking == "on" or (self.prepacking == "auto" and precision != "fp32")

    def resolved_threads(self) -> int:
        return self.threads or _cores()

    def resolved_workers(self) -> int:
        return self.workers or max(1, _cores() // self.resolved_threads())

    def __post_init__(self) -> None:
        for name in ("threads", "workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"RuntimeConfig.{name}: must not be negative, got {getattr(self, name)}")
        for name in ("max_tokens", "prefill_chunk", "repetition_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"RuntimeConfig.{name}: must be at least 1, got {getattr(self, name)}")
        if self.graph_optimization not in ("basic", "extended", "all"):
            raise ValueError(f"RuntimeConfig.graph_optimization: {self.graph_optimization!r} is not basic|extended|all")
        if self.prepacking not in ("auto", "on", "off"):
            raise ValueError(f"RuntimeConfig.prepacking: {self.prepacking!r} is not auto|on|off")
        if self.persona_cache_mb < 0:
            raise ValueError(f"RuntimeConfig.persona_cache_mb: must not be negative, got {self.persona_cache_mb}")
        if self.kv_cache_mb < 0:
            raise ValueError(f"RuntimeConfig.kv_cache_mb: must not be negative, got {self.kv_cache_mb}")
        if not 0.1 <= self.overflow_target <= 1.0:
            raise ValueError(f"RuntimeConfig.overflow_target: {self.overflow_target} is not in [0.1, 1]")
