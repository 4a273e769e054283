"""Helpers of the bridge tests: a raw NDJSON connection that checks every event against the JSON Schema, and a
pool whose model steps are slowed down (the real runtime, throttled) so that cancel / disconnect / shutdown can be
made to happen mid-reply deterministically."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import jsonschema

from runtime import NPCPool

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "plugin_bridge" / "schema" / "protocol.schema.json").read_text())
_EVENT = jsonschema.Draft202012Validator({"$ref": "#/$defs/event", "$defs": SCHEMA["$defs"]})
_REQUEST = jsonschema.Draft202012Validator({"$ref": "#/$defs/request", "$defs": SCHEMA["$defs"]})


def check_event(event: dict[str, Any]) -> dict[str, Any]:
    _EVENT.validate(event)
    return event


def is_valid_request(msg: Any) -> bool:
    return _REQUEST.is_valid(msg)


class RawConn:
    """A plain socket speaking NDJSON; every event read is validated against the protocol schema."""

    def __init__(self, port: int | None = None, unix_path: str | None = None, timeout: float = 20.0):
        if unix_path:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(unix_path)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(timeout)
        self.buf = b""
        self.seen: list[dict[str, Any]] = []

    def send(self, *msgs: dict[str, Any] | bytes) -> None:
        data = b"".join(m if isinstance(m, bytes) else json.dumps(m).encode() + b"\n" for m in msgs)
        self.sock.sendall(data)

    def event(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        event = check_event(json.loads(line))
        self.seen.append(event)
        return event

    def until_end(self, rid: Any) -> list[dict[str, Any]]:
        """Events of request `rid` up to its last one (result, done or error); others stay in `seen`."""
        out = []
        while True:
            e = self.event()
            if e["id"] == rid:
                out.append(e)
                if e["event"] in ("result", "done", "error"):
                    return out

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.send(msg)
        return self.until_end(msg["id"])[-1]

    def closed_by_server(self, timeout: float = 10.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionError, socket.timeout):
            return False

    def close(self) -> None:
        self.sock.close()


class SlowPool(NPCPool):
    """The real pool whose models take `delay` seconds more per forward pass (a big model on a slow CPU), so that
    a reply is still being generated when a test cancels it, disconnects or stops the server."""

    def __init__(self, *args: Any, delay: float = 0.05, **kw: Any):
        super().__init__(*args, **kw)
        self.delay = delay

    def _model(self, cid: str, hold: bool = False) -> Any:
        model = super()._model(cid, hold)
        if "forward" not in vars(model):
            inner = model.forward

            def forward(*a: Any, **kw: Any) -> Any:
                time.sleep(self.delay)
                return inner(*a, **kw)

            model.forward = forward
        return model


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
