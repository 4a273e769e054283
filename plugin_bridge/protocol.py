"""The bridge's wire protocol: limits, error codes, request validation and event encoding.

Input: one decoded NDJSON line (bytes) from a client. Output: a validated `Request` (op + normalised fields), or a
`ProtocolError(code, message)` naming the bad field; and `encode(event)` gives the bytes of one event line.
docs/protocol.md is the human description, schema/protocol.schema.json the machine one: the three agree (tested).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1

ERROR_CODES = ("bad_json", "line_too_long", "bad_request", "unknown_op", "unknown_character", "unauthorized",
               "too_many_requests", "too_many_sessions", "not_found", "unavailable", "internal")
OPS = ("hello", "list", "load", "unload", "chat", "cancel", "reset", "history", "stats")
FINISH_REASONS = ("stop", "length", "cancelled", "shutdown")


@dataclass(frozen=True)
class ServerConfig:
    """Every limit and default of the bridge (NDJSON and HTTP)."""

    host: str = "127.0.0.1"  # loopback: a game's model server is not a network service unless asked
    port: int = 7411  # used when neither --port nor --socket is given
    max_line_bytes: int = 65536  # docs/protocol.md promises this; a chat text is at most 16K chars anyway
    max_requests_per_connection: int = 16  # a game sends a few at a time; bounds one client's share
    max_sessions: int = 1024  # conversations the server tracks; each may hold history (and KV) in the runtime
    max_connections: int = 256  # beyond this, new connections are closed at once
    max_text_chars: int = 16384  # one user turn; longer text cannot fit a small model's context anyway
    max_name_chars: int = 128  # character ids and session names
    max_stop_sequences: int = 8
    max_tokens_limit: int = 4096  # the largest max_tokens accepted; replies longer than this are a client bug
    token_queue: int = 32  # deltas buffered per chat between runtime thread and socket: backpressure beyond it
    generation_threads: int = 128  # threads that drive runtime streams; each chat in flight holds one
    max_http_body: int = 1 << 20  # OpenAI request bodies carry whole histories; 1 MiB is plenty
    max_http_header_bytes: int = 16384
    http_default_session: str = "default"  # conversation used when a request names none (no user, no header)
    read_chunk: int = 65536  # bytes read per socket read
    shutdown_grace_s: float = 5.0  # on stop, how long chats may take to send their "shutdown" done to a slow client


class ProtocolError(Exception):
    """A request that cannot be served: `code` is one of ERROR_CODES, `message` says why (for humans)."""

    def __init__(self, code: str, message: str):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Request:
    id: str | int
    op: str
    fields: dict[str, Any] = field(default_factory=dict)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def parse_line(line: bytes) -> Any:
    """JSON of one line; NaN/Infinity are refused (they are not JSON and break other clients' parsers)."""
    try:
        return json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise ProtocolError("bad_json", f"line is not UTF-8: {e.reason} at byte {e.start}") from None
    except (ValueError, RecursionError) as e:
        raise ProtocolError("bad_json", f"line is not valid JSON: {str(e)[:200]}") from None


def request_id(obj: Any) -> str | int | None:
    """The request's id if it is a valid one, so an error about the rest can still be matched."""
    rid = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(rid, bool):
        return None
    if isinstance(rid, int) or (isinstance(rid, str) and 1 <= len(rid) <= 128):
        return rid
    return None


def _int(obj: dict, name: str, lo: int, hi: int | None = None) -> int:
    v = obj[name]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError("bad_request", f"{name}: expected an integer, got {type(v).__name__}")
    if v < lo or (hi is not None and v > hi):
        raise ProtocolError("bad_request", f"{name}: {v} is out of range [{lo}, {hi if hi is not None else '∞'}]")
    return v


def _num(obj: dict, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    v = obj[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProtocolError("bad_request", f"{name}: expected a number, got {type(v).__name__}")
    if v < lo or v > hi or (lo_open and v == lo):
        raise ProtocolError("bad_request", f"{name}: {v} is out of range {'(' if lo_open else '['}{lo}, {hi}]")
    return float(v)


def _str(obj: dict, name: str, max_len: int, min_len: int = 1) -> str:
    if name not in obj:
        raise ProtocolError("bad_request", f"{name}: required")
    v = obj[name]
    if not isinstance(v, str):
        raise ProtocolError("bad_request", f"{name}: expected a string, got {type(v).__name__}")
    if not min_len <= len(v) <= max_len:
        raise ProtocolError("bad_request", f"{name}: length {len(v)} is not in [{min_len}, {max_len}]")
    return v


def sampling_fields(obj: dict, config: ServerConfig) -> dict[str, Any]:
    """The optional sampling parameters of a chat (shared by NDJSON and HTTP), only those present and not null."""
    out: dict[str, Any] = {}
    present = {k for k, v in obj.items() if v is not None}
    if "max_tokens" in present:
        out["max_tokens"] = _int(obj, "max_tokens", 1, config.max_tokens_limit)
    if "temperature" in present:
        out["temperature"] = _num(obj, "temperature", 0.0, 2.0)
    if "top_p" in present:
        out["top_p"] = _num(obj, "top_p", 0.0, 1.0, lo_open=True)
    if "top_k" in present:
        out["top_k"] = _int(obj, "top_k", 0)
    if "repetition_penalty" in present:
        out["repetition_penalty"] = _num(obj, "repetition_penalty", 0.0, 4.0, lo_open=True)
    if "seed" in present:
        out["seed"] = _int(obj, "seed", 0, 2**63 - 1)
    if "stop" in present:
        stop = obj["stop"]
        if (not isinstance(stop, list) or len(stop) > config.max_stop_sequences
                or not all(isinstance(s, str) and 0 < len(s) <= config.max_name_chars for s in stop)):
            raise ProtocolError("bad_request", f"stop: expected a list of at most {config.max_stop_sequences} "
                                               f"non-empty strings of at most {config.max_name_chars} chars")
        out["stop"] = list(stop)
    return out


def validate_request(obj: Any, config: ServerConfig) -> Request:
    """Check one parsed message against the protocol; return it normalised or raise ProtocolError."""
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", f"a message must be a JSON object, got {type(obj).__name__}")
    rid = request_id(obj)
    if rid is None:
        raise ProtocolError("bad_request", "id: required, a string of 1-128 chars or an integer")
    op = obj.get("op")
    if not isinstance(op, str):
        raise ProtocolError("bad_request", "op: required, a string")
    if op not in OPS:
        raise ProtocolError("unknown_op", f"unknown op {op[:64]!r} (known: {', '.join(OPS)})")
    f: dict[str, Any] = {}
    n = config.max_name_chars
    if op == "hello":
        if "version" not in obj:
            raise ProtocolError("bad_request", "version: required, the client's protocol version")
        f["version"] = _int(obj, "version", 1)
        if obj.get("token") is not None:
            f["token"] = _str(obj, "token", 4096, 0)
        if obj.get("client") is not None:
            f["client"] = _str(obj, "client", 256, 0)
    elif op in ("load", "unload"):
        f["character"] = _str(obj, "character", n)
    elif op in ("chat", "reset", "history"):
        f["character"] = _str(obj, "character", n)
        f["session"] = _str(obj, "session", n)
    if op == "chat":
        f["text"] = _str(obj, "text", config.max_text_chars, 0)
        f["params"] = sampling_fields(obj, config)
        stream = obj.get("stream", True)
        if not isinstance(stream, bool):
            raise ProtocolError("bad_request", f"stream: expected true or false, got {type(stream).__name__}")
        f["stream"] = stream
    elif op == "cancel":
        target = request_id({"id": obj.get("target")})
        if target is None:
            raise ProtocolError("bad_request", "target: required, the id of a chat in flight")
        f["target"] = target
    return Request(rid, op, f)


def encode(event: dict[str, Any]) -> bytes:
    """One event as a compact NDJSON line (UTF-8, not ASCII-escaped: clients decode UTF-8)."""
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def error_event(rid: str | int | None, code: str, message: str) -> dict[str, Any]:
    assert code in ERROR_CODES, code
    return {"id": rid, "event": "error", "code": code, "message": message}


def result_event(rid: str | int, op: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"id": rid, "event": "result", "op": op, "data": data}
