"""The bridge's core, shared by the NDJSON and HTTP front ends: runtime calls off the event loop, conversations,
limits, cancellation and shutdown.

Input: a `runtime.NPCPool` (blocking API) and a `ServerConfig`. Output: coroutines the front ends await —
`chat(gen, on_delta)` streams one reply's deltas into an async callback and returns the `done` payload; `call(...)`
runs any other blocking pool method in a thread; errors come out as `ProtocolError` with a protocol error code.
A runtime stream is driven by one worker thread; a semaphore of `token_queue` slots makes that thread wait when the
client reads slowly, so no buffer grows without bound.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from plugin_bridge.protocol import ProtocolError, ServerConfig
from runtime.errors import (ArtifactError, BudgetError, ContextOverflow, NPCRuntimeError, SessionBusy,
                            UnknownCharacter)

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity semantics: kept in sets
class Generation:
    """One chat in flight. `cancel()` may be called from any thread, any time (before, during, after)."""

    character: str
    session: str
    text: str
    params: dict[str, Any]
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    shutdown: bool = False
    stream: Any = None  # the runtime ChatStream once started

    def cancel(self, shutdown: bool = False) -> None:
        self.shutdown = self.shutdown or shutdown
        self.cancelled = True  # set before reading .stream: the worker sets .stream, then reads this flag
        stream = self.stream
        if stream is not None:
            stream.cancel()


class _End:
    """Sentinel the worker thread queues last: the stream's result or the exception it raised."""

    def __init__(self, result: Any = None, error: BaseException | None = None):
        self.result, self.error = result, error


def map_runtime_error(e: BaseException) -> ProtocolError:
    """Runtime exceptions → protocol errors (messages kept: the runtime's name the file/field)."""
    if isinstance(e, ProtocolError):
        return e
    if isinstance(e, UnknownCharacter):
        return ProtocolError("unknown_character", str(e))
    if isinstance(e, (BudgetError, ArtifactError)):
        return ProtocolError("unavailable", str(e))
    if isinstance(e, ContextOverflow):
        return ProtocolError("bad_request", f"text: {e}")
    if isinstance(e, SessionBusy):
        return ProtocolError("too_many_requests", str(e))
    if isinstance(e, (NPCRuntimeError, ValueError)):
        return ProtocolError("bad_request", str(e))
    log.exception("internal error in the runtime", exc_info=e)
    return ProtocolError("internal", f"{type(e).__name__}: {e}")


class Bridge:
    """State shared by every connection: the pool, the conversations known, the chats in flight."""

    def __init__(self, pool: Any, config: ServerConfig, token: str | None = None):
        self.pool = pool
        self.config = config
        self.token = token
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.characters: dict[str, dict[str, Any]] = {c["id"]: c for c in describe_characters(pool)}
        self.sessions: set[tuple[str, str]] = set()
        self.generations: set[Generation] = set()
        self.connections = 0
        self.requests_in_flight = 0
        self.shutting_down = False
        self._locks: dict[tuple[str, str], list] = {}  # key -> [asyncio.Lock, users]
        # One thread per chat in flight (each blocks on its runtime stream); separate from the default executor
        # so that slow loads never wait behind generations, nor the reverse.
        self._executor = ThreadPoolExecutor(config.generation_threads, thread_name_prefix="npc-chat")

    # --- checks ---
    def check_character(self, character: str) -> None:
        if character not in self.characters:
            known = ", ".join(sorted(self.characters)) or "none"
            raise ProtocolError("unknown_character", f"unknown character {character[:128]!r} (known: {known})")

    def open_session(self, character: str, session: str) -> None:
        """Count a conversation; refuse a new one past max_sessions."""
        key = (character, session)
        if key not in self.sessions:
            if len(self.sessions) >= self.config.max_sessions:
                raise ProtocolError("too_many_sessions", f"the server holds {self.config.max_sessions} "
                                                         f"conversations already; reset one to free it")
            self.sessions.add(key)

    # --- blocking runtime calls ---
    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except Exception as e:  # noqa: BLE001 - every runtime failure becomes an error event, never a crash
            raise map_runtime_error(e) from None

    async def conversation(self, character: str, session: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking call on one conversation, after the requests on it that arrived earlier."""
        async with self._lock(character, session):
            return await self.call(fn, *args)

    def _lock(self, character: str, session: str) -> "_SessionLock":
        return _SessionLock(self._locks, (character, session))

    # --- chat ---
    async def chat(self, gen: Generation, on_delta: Callable[[str], Awaitable[None]]) -> dict[str, Any]:
        """Generate one reply, awaiting `on_delta(text)` per delta; return the `done` payload.

        If `on_delta` raises (the client is gone), the generation is cancelled, its thread joined, and the
        exception propagates. Runtime errors raise ProtocolError.
        """
        self.generations.add(gen)
        try:
            async with self._lock(gen.character, gen.session):
                if self.shutting_down:
                    gen.cancel(shutdown=True)
                if gen.cancelled:
                    return done_payload(gen, None)
                return await self._drive(gen, on_delta)
        finally:
            self.generations.discard(gen)

    async def _drive(self, gen: Generation, on_delta: Callable[[str], Awaitable[None]]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        slots = threading.Semaphore(self.config.token_queue)
        abandoned = False

        def work() -> None:
            try:
                stream = self.pool.chat(gen.character, gen.session, gen.text, **gen.params)
                gen.stream = stream
                if gen.cancelled:
                    stream.cancel()
                for delta in stream:
                    if not abandoned:
                        slots.acquire()
                    if abandoned:  # nobody reads any more: drain what the runtime still holds, without waiting
                        stream.cancel()
                        continue
                    loop.call_soon_threadsafe(queue.put_nowait, delta)
                loop.call_soon_threadsafe(queue.put_nowait, _End(result=stream.result))
            except BaseException as e:  # noqa: BLE001 - handed to the event loop, which maps it
                loop.call_soon_threadsafe(queue.put_nowait, _End(error=e))

        worker = loop.run_in_executor(self._executor, work)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _End):
                    break
                slots.release()
                if item:
                    await on_delta(item)
        except BaseException:
            abandoned = True
            gen.cancel()
            slots.release(self.config.token_queue + 1)  # a worker waiting for a slot must wake to see the cancel
            await asyncio.shield(worker)
            raise
        await worker
        if item.error is not None:
            raise map_runtime_error(item.error)
        return done_payload(gen, item.result)

    async def shutdown(self) -> None:
        """Cancel every chat in flight; they end with finish_reason "shutdown"."""
        self.shutting_down = True
        for gen in list(self.generations):
            gen.cancel(shutdown=True)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def server_stats(self) -> dict[str, Any]:
        return {"connections": self.connections, "requests_in_flight": self.requests_in_flight,
                "sessions": len(self.sessions), "chats_in_flight": len(self.generations),
                "uptime_s": round(time.monotonic() - self.started, 3)}


class _SessionLock:
    """FIFO lock per conversation; the entry is dropped when nobody holds or waits for it."""

    def __init__(self, table: dict[tuple[str, str], list], key: tuple[str, str]):
        self.table, self.key = table, key

    async def __aenter__(self) -> None:
        entry = self.table.setdefault(self.key, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            await entry[0].acquire()
        except BaseException:
            self._leave(entry, locked=False)
            raise

    async def __aexit__(self, *exc: Any) -> None:
        self._leave(self.table[self.key], locked=True)

    def _leave(self, entry: list, locked: bool) -> None:
        if locked:
            entry[0].release()
        entry[1] -= 1
        if entry[1] == 0:
            del self.table[self.key]


def done_payload(gen: Generation, result: Any) -> dict[str, Any]:
    """The `done` event's fields from a runtime ChatResult (None: the chat never started)."""
    total = time.perf_counter() - gen.arrived
    if result is None:
        reason, text, usage, ttft, tps, truncated = "cancelled", "", (0, 0), None, None, False
    else:
        reason, text = result.finish_reason, result.text
        usage = (int(result.prompt_tokens), int(result.completion_tokens))
        ttft, tps, truncated = result.ttft_s, result.tokens_per_s, bool(result.truncated_history)
    if gen.shutdown and reason == "cancelled":
        reason = "shutdown"
    return {"finish_reason": reason, "text": text,
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]},
            "timings": {"ttft_s": None if ttft is None else round(float(ttft), 6),
                        "tokens_per_s": None if tps is None else round(float(tps), 3),
                        "total_s": round(total, 6)},
            "truncated_history": truncated}


def describe_characters(pool: Any) -> list[dict[str, Any]]:
    """`[{id, name, greeting, loaded}]` of every character the pool can serve (live: `loaded` changes)."""
    return [{"id": c["id"], "name": c["name"], "greeting": c.get("greeting") or "", "loaded": bool(c.get("loaded"))}
            for c in pool.characters()]
