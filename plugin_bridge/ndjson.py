"""The NDJSON front end of the bridge (docs/protocol.md): one `Connection` per client socket.

Input: the socket's byte stream. Output: events written back, each matched to its request by id. The connection
splits lines itself (a line over the limit is skipped without being held in memory), answers hello/list/cancel in
the read loop, and runs every other request as a task (many in flight; chats stream through `Bridge.chat`).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any

from npcforge import __version__
from plugin_bridge.protocol import (PROTOCOL_VERSION, ProtocolError, Request, encode, error_event, parse_line,
                                    request_id, result_event, validate_request)
from plugin_bridge.sentences import SentenceSplitter
from plugin_bridge.service import Bridge, Generation, describe_characters

log = logging.getLogger(__name__)

SERVER_NAME = f"npcforge/{__version__}"
_IMMEDIATE = ("hello", "list", "cancel")  # answered in the read loop, in order, never queued behind work


def _key(rid: str | int) -> tuple[bool, str | int]:
    return (isinstance(rid, int), rid)  # 1 and "1" are different ids


class Connection:
    """One NDJSON client: its auth state, its requests in flight (by id) and their tasks."""

    def __init__(self, bridge: Bridge, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.bridge, self.config = bridge, bridge.config
        self.reader, self.writer = reader, writer
        self.authenticated = bridge.token is None
        self.inflight: dict[tuple[bool, str | int], Generation | None] = {}
        self.tasks: set[asyncio.Task] = set()

    async def send(self, event: dict[str, Any]) -> None:
        if self.writer.is_closing():
            raise ConnectionResetError("client disconnected")
        self.writer.write(encode(event))
        await self.writer.drain()  # a slow reader pauses us here: backpressure, not an unbounded buffer

    async def run(self) -> None:
        buf = bytearray()
        skipping = False  # inside a line that was too long: drop bytes up to the next newline
        limit = self.config.max_line_bytes
        try:
            while True:
                chunk = await self.reader.read(self.config.read_chunk)
                if not chunk:
                    break
                buf += chunk
                while True:
                    nl = buf.find(b"\n")
                    if nl < 0:
                        if len(buf) > limit + 1:  # +1: a "\r" before the newline is not part of the line
                            if not skipping:
                                await self._line_too_long()
                            skipping = True
                            buf.clear()
                        break
                    line = bytes(buf[:nl])
                    del buf[:nl + 1]
                    if skipping:
                        skipping = False
                        continue
                    line = line[:-1] if line.endswith(b"\r") else line
                    if len(line) > limit:
                        await self._line_too_long()
                    elif line.strip():
                        await self.handle_line(line)
        except (ConnectionError, OSError):
            pass
        finally:
            await self.close()

    async def _line_too_long(self) -> None:
        await self.send(error_event(None, "line_too_long", f"line exceeds {self.config.max_line_bytes} bytes; "
                                                           f"skipped up to the next newline"))

    async def handle_line(self, line: bytes) -> None:
        rid = None
        try:
            obj = parse_line(line)
            rid = request_id(obj)
            req = validate_request(obj, self.config)
            if not self.authenticated and req.op != "hello":
                raise ProtocolError("unauthorized", "send hello with the server's token first")
            if req.op in _IMMEDIATE:
                await self.send(result_event(req.id, req.op, self._immediate(req)))
                return
            self._start(req)
        except ProtocolError as e:
            await self.send(error_event(rid, e.code, e.message))

    def _immediate(self, req: Request) -> dict[str, Any]:
        if req.op == "hello":
            token = self.bridge.token
            if token is not None:
                if not hmac.compare_digest(req.fields.get("token", "").encode(), token.encode()):
                    raise ProtocolError("unauthorized", "wrong or missing token")
                self.authenticated = True
            log.info("hello from %s (protocol %d)", req.fields.get("client", "?"), req.fields["version"])
            c = self.config
            return {"protocol": PROTOCOL_VERSION, "server": SERVER_NAME, "authenticated": self.authenticated,
                    "auth_required": token is not None,
                    "limits": {"max_line_bytes": c.max_line_bytes,
                               "max_requests_per_connection": c.max_requests_per_connection,
                               "max_sessions": c.max_sessions, "max_text_chars": c.max_text_chars}}
        if req.op == "list":
            return {"characters": describe_characters(self.bridge.pool)}
        target = req.fields["target"]  # cancel
        gen = self.inflight.get(_key(target))
        if gen is None:
            raise ProtocolError("not_found", f"no chat with id {target!r} is in flight on this connection")
        gen.cancel()
        return {"target": target, "cancelled": True}

    def _start(self, req: Request) -> None:
        """Check what must be checked in arrival order, then run the request as a task."""
        key = _key(req.id)
        if key in self.inflight:
            raise ProtocolError("bad_request", f"id: {req.id!r} is already in flight on this connection")
        if len(self.inflight) >= self.config.max_requests_per_connection:
            raise ProtocolError("too_many_requests", f"this connection has {len(self.inflight)} requests in "
                                                     f"flight (limit {self.config.max_requests_per_connection})")
        f = req.fields
        if "character" in f:
            self.bridge.check_character(f["character"])
        gen = None
        if req.op == "chat":
            self.bridge.open_session(f["character"], f["session"])
            gen = Generation(f["character"], f["session"], f["text"], f["params"])
        self.inflight[key] = gen
        self.bridge.requests_in_flight += 1
        task = asyncio.create_task(self._run(req, gen))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, req: Request, gen: Generation | None) -> None:
        try:
            if gen is not None:
                await self._chat(req, gen)
            else:
                await self.send(result_event(req.id, req.op, await self._work(req)))
        except ProtocolError as e:
            await self._send_quietly(error_event(req.id, e.code, e.message))
        except (ConnectionError, OSError):
            pass  # the client is gone; close() cancels what is left
        except Exception as e:  # noqa: BLE001 - a bug in one request must not take the connection down
            log.exception("request %r failed", req.id)
            await self._send_quietly(error_event(req.id, "internal", f"{type(e).__name__}: {e}"))
        finally:
            self.inflight.pop(_key(req.id), None)
            self.bridge.requests_in_flight -= 1

    async def _send_quietly(self, event: dict[str, Any]) -> None:
        try:
            await self.send(event)
        except (ConnectionError, OSError):
            pass

    async def _work(self, req: Request) -> dict[str, Any]:
        b, f = self.bridge, req.fields
        if req.op == "load":
            await b.call(b.pool.load, f["character"])
            return {"character": f["character"], "loaded": True}
        if req.op == "unload":
            await b.call(b.pool.unload, f["character"])
            return {"character": f["character"], "loaded": False}
        if req.op == "reset":
            await b.conversation(f["character"], f["session"], b.pool.reset, f["character"], f["session"])
            b.sessions.discard((f["character"], f["session"]))
            return {"character": f["character"], "session": f["session"]}
        if req.op == "history":
            messages = await b.conversation(f["character"], f["session"], b.pool.history, f["character"],
                                            f["session"])
            return {"character": f["character"], "session": f["session"], "messages": list(messages)}
        return {"server": b.server_stats(), "runtime": await b.call(b.pool.stats)}  # stats

    async def _chat(self, req: Request, gen: Generation) -> None:
        rid = req.id
        splitter = SentenceSplitter()

        async def on_delta(text: str) -> None:
            await self.send({"id": rid, "event": "token", "text": text})
            for sentence in splitter.feed(text):
                await self.send({"id": rid, "event": "sentence", "text": sentence})

        async def ignore(text: str) -> None:
            pass

        streaming = req.fields["stream"]
        done = await self.bridge.chat(gen, on_delta if streaming else ignore)
        rest = splitter.flush()
        if streaming and rest:
            await self.send({"id": rid, "event": "sentence", "text": rest})
        await self.send({"id": rid, "event": "done", **done})

    async def finish(self) -> None:
        """Server shutdown: let the chats in flight send their done events (bounded wait), then close."""
        if self.tasks:
            _, pending = await asyncio.wait(list(self.tasks), timeout=self.config.shutdown_grace_s)
            if pending:  # a client that stopped reading: drop it rather than hang the shutdown
                self.writer.transport.abort()
        self.writer.close()

    async def close(self) -> None:
        """The client is gone (or the server stops): cancel its chats, wait for them, close the socket."""
        for gen in self.inflight.values():
            if gen is not None:
                gen.cancel()
        if self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)
        self.writer.close()
