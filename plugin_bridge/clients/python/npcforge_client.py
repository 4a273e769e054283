"""Python client of the npcforge bridge (docs/protocol.md), sync and asyncio. Standard library only: a game or
tool may copy this one file.

Input: the address of a running `npcforge serve` (host/port, Unix socket path, or its --ready-file).
Output: `Client` (blocking, thread-safe; a reader thread routes events by request id) and `AsyncClient` (asyncio).
Both: `list()`, `load()`, `unload()`, `reset()`, `history()`, `stats()`, `chat()` (the whole reply: the `done`
event), `stream()` (an iterator of `token` / `sentence` / `done` events with `.cancel()`). A server `error` event
raises `BridgeError(code, message)`.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import queue
import socket
import threading
import time
from typing import Any, AsyncIterator, Iterator

PROTOCOL_VERSION = 1
DEFAULT_PORT = 7411
log = logging.getLogger("npcforge_client")



def _route(line: bytes, queues: dict[Any, Any]) -> tuple[Any, dict[str, Any]] | None:
    """The queue of the request an event line answers, and the event; None (logged) for anything else."""
    try:
        event = json.loads(line)
    except ValueError:
        log.warning("server sent a line that is not JSON: %r", line[:200])
        return None
    q = queues.get(event.get("id")) if isinstance(event, dict) else None
    if q is None:
        log.warning("event for no request in flight: %s", str(event)[:300])
        return None
    return q, event

class BridgeError(Exception):
    """An `error` event from the server (`code` as in docs/protocol.md), or the connection was lost (`closed`)."""

    def __init__(self, code: str, message: str, request_id: Any = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.request_id = code, message, request_id


def read_ready_file(path: str | os.PathLike, timeout: float = 60.0) -> dict[str, Any]:
    """Wait for a server's --ready-file (written atomically when it listens) and return its record."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path}: no ready file after {timeout} s (did the server start?)") from None
            time.sleep(0.05)


def _ready_address(record: dict[str, Any]) -> dict[str, Any]:
    if record.get("unix"):
        return {"unix_path": record["unix"]}
    return {"host": record["tcp"]["host"], "port": record["tcp"]["port"]}


def _encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _chat_msg(character: str, session: str, text: str, stream: bool, params: dict[str, Any]) -> dict[str, Any]:
    return {"op": "chat", "character": character, "session": session, "text": text, "stream": stream,
            **{k: v for k, v in params.items() if v is not None}}


def _check(event: dict[str, Any]) -> dict[str, Any]:
    if event.get("event") == "error":
        raise BridgeError(event.get("code", "internal"), event.get("message", ""), event.get("id"))
    return event


_CLOSED = {"event": "error", "code": "closed", "message": "connection to the server was lost"}


class ChatStream:
    """The events of one streaming chat: iterate for `token` / `sentence` / `done` (the last one)."""

    def __init__(self, client: "Client", request_id: int, events: "queue.Queue[dict]"):
        self.client, self.id, self._events = client, request_id, events
        self.done: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.done is None:
            event = _check(self.client._get(self._events, self.id))
            if event["event"] == "done":
                self.done = event
                self.client._forget(self.id)
            yield event

    def tokens(self) -> Iterator[str]:
        """Just the text pieces, as they come."""
        return (e["text"] for e in self if e["event"] == "token")

    def cancel(self) -> bool:
        """Ask the server to stop this reply (it still ends with a `done` event: keep iterating)."""
        return self.client.cancel(self.id)

    def result(self) -> dict[str, Any]:
        """Wait for the `done` event (consuming the rest of the stream)."""
        for _ in self:
            pass
        return self.done  # type: ignore[return-value]


class Client:
    """Blocking client; safe to use from several threads (each request waits on its own queue)."""

    def __init__(self, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, unix_path: str | None = None,
                 token: str | None = None, timeout: float | None = 60.0, client_name: str = "npcforge_client.py"):
        if unix_path is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.connect(unix_path)
        else:
            self._sock = socket.create_connection((host, port))
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self._ids = itertools.count(1)
        self._queues: dict[int, queue.Queue] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name="npcforge-client-reader", daemon=True)
        self._reader.start()
        self.server = self.request("hello", version=PROTOCOL_VERSION, token=token, client=client_name)

    @classmethod
    def from_ready_file(cls, path: str | os.PathLike, wait: float = 60.0, **kw: Any) -> "Client":
        return cls(**_ready_address(read_ready_file(path, wait)), **kw)

    def _read_loop(self) -> None:
        f = self._sock.makefile("rb")
        try:
            for line in f:
                routed = _route(line, self._queues)
                if routed:
                    routed[0].put(routed[1])
        except OSError:
            pass
        finally:
            self._closed = True
            for q in list(self._queues.values()):
                q.put(_CLOSED)

    def _send(self, msg: dict[str, Any]) -> tuple[int, queue.Queue]:
        rid = next(self._ids)
        q: queue.Queue = queue.Queue()
        self._queues[rid] = q
        if self._closed:
            raise BridgeError("closed", "connection to the server was lost", rid)
        with self._lock:
            self._sock.sendall(_encode({"id": rid, **{k: v for k, v in msg.items() if v is not None}}))
        return rid, q

    def _get(self, q: queue.Queue, rid: int) -> dict[str, Any]:
        try:
            event = q.get(timeout=self.timeout)
        except queue.Empty:
            raise TimeoutError(f"no event for request {rid} within {self.timeout} s") from None
        if event.get("event") == "error":
            self._forget(rid)
        return event

    def _forget(self, rid: int) -> None:
        self._queues.pop(rid, None)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send any non-chat request and return its `result.data`."""
        rid, q = self._send({"op": op, **fields})
        event = _check(self._get(q, rid))
        self._forget(rid)
        return event["data"]

    def list(self) -> list[dict[str, Any]]:
        return self.request("list")["characters"]

    def load(self, character: str) -> dict[str, Any]:
        return self.request("load", character=character)

    def unload(self, character: str) -> dict[str, Any]:
        return self.request("unload", character=character)

    def reset(self, character: str, session: str) -> dict[str, Any]:
        return self.request("reset", character=character, session=session)

    def history(self, character: str, session: str) -> list[dict[str, str]]:
        return self.request("history", character=character, session=session)["messages"]

    def stats(self) -> dict[str, Any]:
        return self.request("stats")

    def stream(self, character: str, session: str, text: str, **params: Any) -> ChatStream:
        """Start a reply; iterate the returned stream for its events. params: max_tokens, temperature, top_p,
        top_k, repetition_penalty, stop, seed."""
        rid, q = self._send(_chat_msg(character, session, text, True, params))
        return ChatStream(self, rid, q)

    def chat(self, character: str, session: str, text: str, **params: Any) -> dict[str, Any]:
        """The whole reply at once: the `done` event (`text`, `finish_reason`, `usage`, `timings`)."""
        rid, q = self._send(_chat_msg(character, session, text, False, params))
        return ChatStream(self, rid, q).result()

    def cancel(self, request_id: int) -> bool:
        """Stop a chat in flight; False if it had already finished."""
        try:
            self.request("cancel", target=request_id)
            return True
        except BridgeError as e:
            if e.code == "not_found":
                return False
            raise

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._reader.join(timeout=5)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncChatStream:
    """The events of one streaming chat, for `async for`."""

    def __init__(self, client: "AsyncClient", request_id: int, events: asyncio.Queue):
        self.client, self.id, self._events = client, request_id, events
        self.done: dict[str, Any] | None = None

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        while self.done is None:
            event = _check(await self.client._get(self._events, self.id))
            if event["event"] == "done":
                self.done = event
                self.client._forget(self.id)
            yield event

    async def cancel(self) -> bool:
        return await self.client.cancel(self.id)

    async def result(self) -> dict[str, Any]:
        async for _ in self:
            pass
        return self.done  # type: ignore[return-value]


class AsyncClient:
    """asyncio client: `client = await AsyncClient.connect(port=...)`; many requests may be awaited at once."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float | None):
        self._reader, self._writer, self.timeout = reader, writer, timeout
        self._ids = itertools.count(1)
        self._queues: dict[int, asyncio.Queue] = {}
        self._task = asyncio.create_task(self._read_loop())
        self.server: dict[str, Any] = {}

    @classmethod
    async def connect(cls, host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, unix_path: str | None = None,
                      token: str | None = None, timeout: float | None = 60.0,
                      client_name: str = "npcforge_client.py") -> "AsyncClient":
        if unix_path is not None:
            reader, writer = await asyncio.open_unix_connection(unix_path, limit=1 << 22)
        else:
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 22)
        client = cls(reader, writer, timeout)
        client.server = await client.request("hello", version=PROTOCOL_VERSION, token=token, client=client_name)
        return client

    @classmethod
    async def from_ready_file(cls, path: str | os.PathLike, wait: float = 60.0, **kw: Any) -> "AsyncClient":
        record = await asyncio.to_thread(read_ready_file, path, wait)
        return await cls.connect(**_ready_address(record), **kw)

    async def _read_loop(self) -> None:
        try:
            while line := await self._reader.readline():
                routed = _route(line, self._queues)
                if routed:
                    routed[0].put_nowait(routed[1])
        except (OSError, ValueError):  # ValueError: a line over the reader's limit
            pass
        finally:
            for q in list(self._queues.values()):
                q.put_nowait(_CLOSED)

    async def _send(self, msg: dict[str, Any]) -> tuple[int, asyncio.Queue]:
        rid = next(self._ids)
        q: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = q
        if self._task.done():
            raise BridgeError("closed", "connection to the server was lost", rid)
        self._writer.write(_encode({"id": rid, **{k: v for k, v in msg.items() if v is not None}}))
        await self._writer.drain()
        return rid, q

    async def _get(self, q: asyncio.Queue, rid: int) -> dict[str, Any]:
        try:
            event = await asyncio.wait_for(q.get(), self.timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"no event for request {rid} within {self.timeout} s") from None
        if event.get("event") == "error":
            self._forget(rid)
        return event

    def _forget(self, rid: int) -> None:
        self._queues.pop(rid, None)

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        rid, q = await self._send({"op": op, **fields})
        event = _check(await self._get(q, rid))
        self._forget(rid)
        return event["data"]

    async def list(self) -> list[dict[str, Any]]:
        return (await self.request("list"))["characters"]

    async def load(self, character: str) -> dict[str, Any]:
        return await self.request("load", character=character)

    async def unload(self, character: str) -> dict[str, Any]:
        return await self.request("unload", character=character)

    async def reset(self, character: str, session: str) -> dict[str, Any]:
        return await self.request("reset", character=character, session=session)

    async def history(self, character: str, session: str) -> list[dict[str, str]]:
        return (await self.request("history", character=character, session=session))["messages"]

    async def stats(self) -> dict[str, Any]:
        return await self.request("stats")

    async def stream(self, character: str, session: str, text: str, **params: Any) -> AsyncChatStream:
        rid, q = await self._send(_chat_msg(character, session, text, True, params))
        return AsyncChatStream(self, rid, q)

    async def chat(self, character: str, session: str, text: str, **params: Any) -> dict[str, Any]:
        rid, q = await self._send(_chat_msg(character, session, text, False, params))
        return await AsyncChatStream(self, rid, q).result()

    async def cancel(self, request_id: int) -> bool:
        try:
            await self.request("cancel", target=request_id)
            return True
        except BridgeError as e:
            if e.code == "not_found":
                return False
            raise

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass
        await self._task

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()
