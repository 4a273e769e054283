"""NPCPool: many characters' models in one process, their conversations, and the public runtime API.

Input: a dist folder of artifacts (dist/<id>/manifest.json ...). `NPCPool(dist_dir, memory_budget_mb, threads)`
reads every manifest (cheap) and loads a character on first use: hashes verified, ORT session opened with the
shared tensors, persona prefix prefilled. A memory budget evicts idle, unpinned characters least recently used.
`chat(...)` returns a `ChatStream` at once (after loading the character in the caller's thread if needed, which
does not hold up other conversations); worker threads generate. Every method is thread-safe.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from runtime.artifact import Artifact, read_artifact, read_character, verify_artifact
from runtime.config import RuntimeConfig
from runtime.conversation import Conversation, Message, fit_history, load_session_file, save_session
from runtime.errors import ArtifactError, BudgetError, SessionBusy, UnknownCharacter
from runtime.generation import ChatStream, Generation, Scheduler
from runtime.model import Model, TensorShare, estimate_bytes, init_env, shareable
from runtime.sampling import resolve_params

log = logging.getLogger(__name__)
MB = 2**20


def process_memory() -> dict[str, float | None]:
    """PSS and RSS of this process in MB (PSS counts shared, memory-mapped pages once per process)."""
    out: dict[str, float | None] = {"pss_mb": None, "rss_mb": None}
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Pss", "Rss"):
                out[f"{key.lower()}_mb"] = round(int(rest.split()[0]) / 1024, 1)
    except OSError:  # not Linux: no figure rather than a wrong one
        pass
    return out


class NPCPool:
    """The runtime's public API: see docs/runtime.md."""

    def __init__(self, dist_dir: str | Path, memory_budget_mb: float | None = None, threads: int | None = None,
                 config: RuntimeConfig | None = None) -> None:
        config = config or RuntimeConfig()
        if memory_budget_mb is not None:
            config = dataclasses.replace(config, memory_budget_mb=memory_budget_mb)
        if threads is not None:
            config = dataclasses.replace(config, threads=threads)
        self.config = config
        self.dist_dir = Path(dist_dir)
        if not self.dist_dir.is_dir():
            raise FileNotFoundError(f"{self.dist_dir}: no such dist folder; build characters with `npcforge build`")
        env = init_env(config)
        self.global_pool = env.global_pool
        self.threads = env.threads if env.global_pool else config.resolved_threads()
        self._lock = threading.RLock()
        self._artifacts: dict[str, Artifact] = {}
        self.problems: dict[str, str] = {}  # folder -> why it is not served
        self._greetings: dict[str, str] = {}
        self._scan()
        self._models: OrderedDict[str, Model] = OrderedDict()  # least recently used first
        self._load_locks: dict[str, threading.Lock] = {}
        self._reserved = 0  # bytes of loads in progress, so concurrent loads respect the budget together
        self._share = TensorShare() if config.share_tensors else None
        self._convs: dict[tuple[str, str], Conversation] = {}
        self._kv_lru: OrderedDict[tuple[str, str], int] = OrderedDict()  # idle conversations' KV bytes, LRU first
        self._persona_lru: OrderedDict[str, int] = OrderedDict()  # characters' persona prefix KV bytes, LRU first
        self._scheduler = Scheduler(config.resolved_workers())
        self._closed = False

    # --- characters and memory ---

    def _scan(self) -> None:
        for d in sorted(p for p in self.dist_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                a = read_artifact(d)
            except ArtifactError as e:
                if (d / "manifest.json").exists():
                    log.warning("not serving %s: %s", d, e)
                    self.problems[d.name] = str(e)
                continue
            if a.id in self._artifacts:
                self.problems[d.name] = f"{d}: id {a.id!r} already served from {self._artifacts[a.id].path}"
                log.warning(self.problems[d.name])
                continue
            self._artifacts[a.id] = a
            if not a.passed_gate:  # built with ffn_keep_fallback off: served, but never silently
                log.warning("%s failed its quality gate at build time (%s); serving it anyway", a.id,
                            "; ".join(a.manifest["quality"].get("gate_reasons", [])) or "no reason recorded")
            try:  # for listing only; the file is verified with the rest before the character is served
                self._greetings[a.id] = str(read_character(a).get("greeting") or "")
            except ArtifactError:
                self._greetings[a.id] = ""

    def characters(self) -> list[dict[str, Any]]:
        """[{id, name, greeting, loaded, pinned, passed_gate}] of every servable artifact in the dist folder
        (`passed_gate`: the build's quality verdict, False for a character installed although it failed)."""
        with self._lock:
            return [{"id": a.id, "name": a.name, "greeting": self._greetings[a.id], "loaded": a.id in self._models,
                     "pinned": a.id in self._models and self._models[a.id].pinned,
                     "passed_gate": a.passed_gate}
                    for a in self._artifacts.values()]

    def _artifact(self, cid: str) -> Artifact:
        if cid not in self._artifacts:
            raise UnknownCharacter(f"unknown character {cid!r}; known: {', '.join(sorted(self._artifacts)) or 'none'}")
        return self._artifacts[cid]

    def _used(self) -> int:
        shared = self._share.bytes() if self._share else 0
        return sum(m.estimate for m in self._models.values()) + shared + self._reserved

    def _make_room(self, cid: str, need: int) -> None:
        """Evict idle, unpinned characters, least recently used first, until `need` more bytes fit the budget."""
        budget = self.config.memory_budget_mb
        if budget is None:
            return
        while self._used() + need > budget * MB:
            victims = [m for m in self._models.values() if not m.pinned and m.active == 0]
            if not victims:
                held = ", ".join(f"{m.id}({'pinned' if m.pinned else 'busy'})" for m in self._models.values())
                raise BudgetError(f"cannot load {cid!r}: it needs about {need / MB:.0f} MB, the budget is "
                                  f"{budget:.0f} MB and {self._used() / MB:.0f} MB is held by "
                                  f"{held or 'loads in progress'}; raise memory_budget_mb or unpin/unload a character")
            log.info("evicting %s (least recently used) to load %s", victims[0].id, cid)
            self._unload_locked(victims[0].id)

    def _model(self, cid: str, hold: bool = False) -> Model:
        """The loaded model, loading it if needed; `hold` marks it busy (not evictable) before the lock is let go."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this NPCPool is closed")
            artifact = self._artifact(cid)
            if cid in self._models:
                model = self._models[cid]
                self._models.move_to_end(cid)
                model.last_used = time.monotonic()
                model.active += hold
                return model
            lock = self._load_locks.setdefault(cid, threading.Lock())
        with lock:  # one load per character; the pool lock stays free for other characters meanwhile
            with self._lock:
                if cid in self._models:
                    return self._model(cid, hold)
            if self.config.verify_hashes:
                verify_artifact(artifact)
            with self._lock:
                need = estimate_bytes(artifact, self.config)
                if self._share is not None:
                    need += self._share.new_bytes(shareable(artifact, self.config))
                self._make_room(cid, need)
                self._reserved += need
            try:
                model = Model.load(artifact, self.config, self._share)
            finally:
                with self._lock:
                    self._reserved -= need
            with self._lock:
                self._models[cid] = model
                model.active += hold
                self._keep_persona(model)
            log.info("loaded %s in %.2f s (persona prefix %d tokens, %.3f s)", cid, model.load_s,
                     len(model.persona), model.persona_s)
            return model

    def load(self, cid: str) -> None:
        """Load a character now (verify, open, prefill its persona) instead of on its first chat."""
        self._model(cid)

    def unload(self, cid: str) -> bool:
        """Free a character's model and its conversations' KV caches (their histories stay). False if not loaded.
        A reply in progress finishes on the session it holds."""
        with self._lock:
            self._artifact(cid)
            return self._unload_locked(cid)

    def _unload_locked(self, cid: str) -> bool:
        model = self._models.pop(cid, None)
        if model is None:
            return False
        model.close(self._share)
        self._persona_lru.pop(cid, None)
        for key, conv in self._convs.items():
            if key[0] == cid and not conv.busy:
                self._drop_kv(conv)
        return True

    def pin(self, cid: str, pinned: bool = True) -> None:
        """Load a character and keep it loaded whatever the budget needs (pinned=False lets it be evicted again)."""
        self._model(cid)
        with self._lock:
            if cid in self._models:
                self._models[cid].pinned = pinned

    def _keep_persona(self, model: Model) -> None:
        """Mark the model's persona cache most recently used, then drop the least recently used ones beyond
        `persona_cache_mb` (a conversation starting meanwhile keeps the cache it already took)."""
        if model.persona_kv is None:
            return
        self._persona_lru[model.id] = model.persona_kv.nbytes
        self._persona_lru.move_to_end(model.id)
        while self._persona_lru and sum(self._persona_lru.values()) > self.config.persona_cache_mb * MB:
            old, _ = self._persona_lru.popitem(last=False)
            if old in self._models:
                self._models[old].persona_kv = None

    # --- conversations ---

    def _drop_kv(self, conv: Conversation) -> None:
        conv.kv, conv.fed = None, []
        self._kv_lru.pop((conv.character, conv.session), None)

    def chat(self, cid: str, session: str, text: str, max_tokens: int | None = None,
             temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
             repetition_penalty: float | None = None, stop: list[str] | None = None,
             seed: int | None = None) -> ChatStream:
        """Queue the next reply of `cid` in `session` to `text`; iterate the returned stream for text."""
        t0 = time.perf_counter()
        params = resolve_params(self.config, max_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed)
        if not isinstance(text, str) or not isinstance(session, str):
            raise ValueError("text and session must be strings")
        model = self._model(cid, hold=True)
        key = (cid, session)
        with self._lock:
            conv = self._convs.setdefault(key, Conversation(cid, session))
            if conv.busy:
                model.active -= 1
                raise SessionBusy(f"{cid}/{session}: a reply is already in progress; cancel it or wait")
            conv.busy = True
            self._keep_persona(model)
        before = conv.messages
        try:
            messages = conv.messages + [Message("user", model.template.clean(text))]
            kept, target, truncated = fit_history(
                model.template, model.persona, messages, model.character.get("post_history_instructions") or "",
                model.max_context - params.max_tokens, self.config.overflow_target)
            conv.messages = kept  # before the worker may finish the reply and append to it
            stream = ChatStream(self.config.stream_backlog)
            self._scheduler.submit(Generation(model, conv, target, params, truncated, stream, self._finished, t0))
        except BaseException:
            with self._lock:
                conv.messages, conv.busy = before, False
                model.active -= 1
            raise
        if truncated:
            log.info("%s/%s: history truncated to %d messages to fit %d tokens", cid, session, len(kept),
                     model.max_context)
        return stream

    def _finished(self, gen: Generation) -> None:
        """Worker callback: store the reply and the cache, release the session and the model."""
        conv, model = gen.conv, gen.model
        with self._lock:
            key = (conv.character, conv.session)
            if gen.reply is None:  # the step failed: forget the unanswered message
                if conv.messages and conv.messages[-1].role == "user":
                    conv.messages.pop()
                self._drop_kv(conv)
            else:
                conv.messages.append(gen.reply)
                if self.config.reuse_kv and not model.unloaded and gen.kv is not None:
                    conv.fed, conv.kv = gen.fed, gen.kv
                    self._kv_lru[key] = gen.kv.nbytes
                    self._kv_lru.move_to_end(key)
                else:
                    self._drop_kv(conv)
            conv.busy = False
            model.active -= 1
            model.last_used = time.monotonic()
            persona = len(model.persona)
            if (self.config.prefix_cache and model.persona_kv is None and not model.unloaded and gen.kv is not None
                    and gen.kv.n >= persona and gen.fed[:persona] == model.persona):
                model.persona_kv = model.kv(persona, like=gen.kv)  # dropped earlier: this turn prefilled it again
                self._keep_persona(model)
            while self._kv_lru and sum(self._kv_lru.values()) > self.config.kv_cache_mb * MB:
                old = next(iter(self._kv_lru))
                if old in self._convs:
                    self._drop_kv(self._convs[old])
                else:
                    self._kv_lru.pop(old)

    def _conversation(self, cid: str, session: str) -> Conversation | None:
        self._artifact(cid)
        return self._convs.get((cid, session))

    def reset(self, cid: str, session: str) -> None:
        """Forget a conversation (history and cache); its next chat starts from the persona prefix."""
        with self._lock:
            conv = self._conversation(cid, session)
            if conv is None:
                return
            if conv.busy:
                raise SessionBusy(f"{cid}/{session}: a reply is in progress; cancel it before resetting")
            self._drop_kv(conv)
            del self._convs[(cid, session)]

    def history(self, cid: str, session: str) -> list[dict[str, str]]:
        """The exchanges of a conversation, oldest first: [{"role": "user"|"assistant", "content": str}]."""
        with self._lock:
            conv = self._conversation(cid, session)
            return [{"role": m.role, "content": m.content} for m in (conv.messages if conv else [])]

    def save_session(self, cid: str, session: str, path: str | Path) -> Path:
        """Write the conversation's messages to a small JSON file (never the KV cache)."""
        with self._lock:
            conv = self._conversation(cid, session) or Conversation(cid, session)
            snapshot = Conversation(cid, session, list(conv.messages))
        return save_session(snapshot, path)

    def load_session(self, path: str | Path) -> tuple[str, str]:
        """Restore a saved conversation (replacing one of the same id); returns (character id, session)."""
        cid, session, messages = load_session_file(path)
        with self._lock:
            self._artifact(cid)
            old = self._convs.get((cid, session))
            if old is not None and old.busy:
                raise SessionBusy(f"{cid}/{session}: a reply is in progress; cancel it before loading a session")
            if old is not None:
                self._drop_kv(old)
            self._convs[(cid, session)] = Conversation(cid, session, messages)
        return cid, session

    # --- introspection and shutdown ---

    def stats(self) -> dict[str, Any]:
        with self._lock:
            models = {m.id: {"pinned": m.pinned, "active": m.active, "estimated_mb": round(m.estimate / MB, 2),
                             "load_s": round(m.load_s, 3), "persona_tokens": len(m.persona),
                             "persona_prefill_s": round(m.persona_s, 4),
                             "persona_cached": m.persona_kv is not None,
                             "idle_s": round(time.monotonic() - m.last_used, 1),
                             "sessions": sum(1 for k in self._convs if k[0] == m.id),
                             "kv_mb": round(sum(c.kv.nbytes for k, c in self._convs.items()
                                                if k[0] == m.id and c.kv is not None) / MB, 2)}
                      for m in self._models.values()}
            return {**process_memory(), "loaded": list(self._models), "models": models,
                    "characters": len(self._artifacts), "problems": dict(self.problems),
                    "budget_mb": self.config.memory_budget_mb, "estimated_mb": round(self._used() / MB, 2),
                    "shared_tensors": self._share.stats() if self._share else None,
                    "sessions": len(self._convs), "cached_sessions": len(self._kv_lru),
                    "kv_cache_mb": round(sum(self._kv_lru.values()) / MB, 2),
                    "persona_cache_mb": round(sum(self._persona_lru.values()) / MB, 2),
                    "active_generations": self._scheduler.active, "paused_generations": self._scheduler.paused,
                    "threads": self.threads,
                    "global_thread_pool": self.global_pool,
                    "workers": self.config.resolved_workers()}

    def close(self) -> None:
        """Cancel replies in progress, stop the workers and free every model."""
        with self._lock:
            self._closed = True
        self._scheduler.close()
        with self._lock:
            for cid in list(self._models):
                self._unload_locked(cid)

    def __enter__(self) -> "NPCPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
