"""The bridge server: listeners for NDJSON over TCP and/or a Unix socket (plugin_bridge.ndjson) and for
OpenAI-compatible HTTP (plugin_bridge.http), over one shared `Bridge`.

Input: a `runtime.NPCPool`, a `ServerConfig`, the addresses to listen on. Output: `BridgeServer`, whose `start()`
binds and returns the bound `Addresses` (port 0 = a free port) and whose `stop()` ends every chat in flight with
finish_reason "shutdown" and closes every connection; `ThreadedServer` runs one on a thread of its own.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from plugin_bridge import http
from plugin_bridge.ndjson import Connection
from plugin_bridge.protocol import PROTOCOL_VERSION, ServerConfig
from plugin_bridge.service import Bridge

log = logging.getLogger(__name__)

@dataclass
class Addresses:
    """Where the server listens (None: that transport is off)."""

    host: str
    tcp_port: int | None
    unix_path: str | None
    http_port: int | None

    def ready_line(self) -> str:
        parts = ["npcforge serve: ready"]
        if self.tcp_port is not None:
            parts.append(f"tcp={self.host}:{self.tcp_port}")
        if self.unix_path is not None:
            parts.append(f"unix={self.unix_path}")
        if self.http_port is not None:
            parts.append(f"http={self.host}:{self.http_port}")
        return " ".join(parts)

    def ready_record(self, characters: list[str]) -> dict[str, Any]:
        return {"pid": os.getpid(), "protocol": PROTOCOL_VERSION,
                "tcp": None if self.tcp_port is None else {"host": self.host, "port": self.tcp_port},
                "unix": self.unix_path,
                "http": None if self.http_port is None else {"host": self.host, "port": self.http_port},
                "characters": characters}


def _claim_unix_path(path: str) -> None:
    """Remove a stale socket file left by a dead server; refuse a live one or a non-socket file."""
    p = Path(path)
    if not p.exists():
        return
    if not stat.S_ISSOCK(p.stat().st_mode):
        raise OSError(f"{path}: exists and is not a socket; choose another --socket path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        p.unlink()  # nobody listens: stale
        return
    finally:
        probe.close()
    raise OSError(f"{path}: another server is listening there")


class BridgeServer:
    """Listeners + connections over one `Bridge`."""

    def __init__(self, pool: Any, config: ServerConfig | None = None, token: str | None = None):
        self.config = config or ServerConfig()
        self.bridge = Bridge(pool, self.config, token)
        self._servers: list[asyncio.AbstractServer] = []
        self._handlers: set[asyncio.Task] = set()
        self._closers: set[Any] = set()  # Connection / http.HttpConnection objects alive
        self._unix_path: str | None = None
        self._stopped = asyncio.Event()

    async def start(self, host: str | None = None, port: int | None = None, unix_path: str | None = None,
                    http_port: int | None = None) -> Addresses:
        host = host or self.config.host
        tcp_port = None
        if port is not None:
            s = await asyncio.start_server(self._ndjson, host, port)
            self._servers.append(s)
            tcp_port = s.sockets[0].getsockname()[1]
        if unix_path is not None:
            _claim_unix_path(unix_path)
            self._servers.append(await asyncio.start_unix_server(self._ndjson, unix_path))
            os.chmod(unix_path, 0o600)  # only this user's processes may talk to the models
            self._unix_path = unix_path
        bound_http = None
        if http_port is not None:
            s = await asyncio.start_server(self._http, host, http_port, limit=self.config.max_http_header_bytes)
            self._servers.append(s)
            bound_http = s.sockets[0].getsockname()[1]
        return Addresses(host, tcp_port, unix_path, bound_http)

    async def _accept(self, conn: Any) -> None:
        b = self.bridge
        if b.connections >= self.config.max_connections or b.shutting_down:
            if not b.shutting_down:
                log.warning("refused a connection: %d open (limit %d)", b.connections, self.config.max_connections)
            conn.writer.close()
            return
        b.connections += 1
        self._closers.add(conn)
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            await conn.run()
        finally:
            b.connections -= 1
            self._closers.discard(conn)
            self._handlers.discard(task)

    async def _ndjson(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._accept(Connection(self.bridge, reader, writer))

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._accept(http.HttpConnection(self.bridge, reader, writer))

    def request_stop(self) -> None:
        self._stopped.set()

    async def serve_until_stopped(self) -> None:
        await self._stopped.wait()
        await self.stop()

    async def stop(self) -> None:
        """Stop listening, end chats with "shutdown" (their done events are sent), close every connection."""
        for s in self._servers:
            s.close()
        await self.bridge.shutdown()
        await asyncio.gather(*(conn.finish() for conn in list(self._closers)), return_exceptions=True)
        if self._handlers:
            _, pending = await asyncio.wait(list(self._handlers), timeout=self.config.shutdown_grace_s)
            for conn in list(self._closers):  # clients that stopped reading: drop them
                conn.writer.transport.abort()
            if pending:
                await asyncio.wait(pending)
        if self._unix_path and os.path.exists(self._unix_path):
            os.unlink(self._unix_path)
        self.bridge.close()


class ThreadedServer:
    """A BridgeServer on an event loop of its own thread, for `npcforge chat`, tests and benchmarks.

    `ThreadedServer(pool, port=0)` returns once listening (`.addresses`); `stop()` shuts it down like SIGTERM.
    """

    def __init__(self, pool: Any, config: ServerConfig | None = None, token: str | None = None, **listen: Any):
        self.addresses: Addresses | None = None
        self._loop = asyncio.new_event_loop()
        self._server: BridgeServer | None = None
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._server = BridgeServer(pool, config, token)
                self.addresses = self._loop.run_until_complete(self._server.start(**listen))
            except BaseException as e:  # noqa: BLE001 - re-raised in the constructing thread
                failure.append(e)
                started.set()
                self._loop.close()
                return
            started.set()
            self._loop.run_until_complete(self._server.serve_until_stopped())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="npcforge-bridge", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]

    @property
    def bridge(self) -> Bridge:
        assert self._server is not None
        return self._server.bridge

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._server.request_stop)  # type: ignore[union-attr]
            self._thread.join()
