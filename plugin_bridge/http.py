"""OpenAI-compatible HTTP front end of the bridge, on plain asyncio streams (no web framework in a game build).

Input: HTTP/1.1 requests on one connection (keep-alive). Output: `GET /v1/models` (the characters), `GET
/v1/models/{id}`, `POST /v1/chat/completions` as JSON or as an SSE stream (chunked, ending `data: [DONE]`),
`GET /health`; errors in OpenAI's `{"error": {...}}` shape. The conversation is named by the body's `user`, else the
`X-Session-Id` header; its history lives in the server, so only the last user message is read (docs/protocol.md).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from plugin_bridge.protocol import ProtocolError, sampling_fields
from plugin_bridge.service import Bridge, Generation

log = logging.getLogger(__name__)

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            413: "Payload Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}
_STATUS = {"bad_request": 400, "bad_json": 400, "unauthorized": 401, "unknown_character": 404, "not_found": 404,
           "too_many_sessions": 429, "too_many_requests": 429, "unavailable": 503, "internal": 500}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          429: "rate_limit_error", 503: "server_error", 500: "server_error"}


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    @classmethod
    def of(cls, e: ProtocolError) -> "HttpError":
        status = _STATUS[e.code]
        field = e.message.split(":", 1)[0]  # protocol messages about a field start with its name
        return cls(status, e.message, "model_not_found" if e.code == "unknown_character" else e.code,
                   field if e.code == "bad_request" and field.isidentifier() else None)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": _TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


@dataclass
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class HttpConnection:
    """One HTTP client connection: requests one after another (keep-alive), each answered in full."""

    def __init__(self, bridge: Bridge, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.bridge, self.config = bridge, bridge.config
        self.reader, self.writer = reader, writer
        self.gen: Generation | None = None  # the chat being answered, cancelled if the client leaves
        self.busy: asyncio.Task | None = None

    async def run(self) -> None:
        try:
            while not self.bridge.shutting_down:
                try:
                    req = await self._read_request()
                except HttpError as e:  # malformed framing: answer, then close (we cannot find the next request)
                    await self._json(e.status, e.body(), keep_alive=False)
                    break
                if req is None:
                    break
                self.busy = asyncio.current_task()
                try:
                    await self._handle(req)
                finally:
                    self.busy = None
                if not req.keep_alive:
                    break
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if self.gen is not None:
                self.gen.cancel()
            self.writer.close()

    async def finish(self) -> None:
        """Server shutdown: the chat in flight (already cancelled) ends its response; idle keep-alives close."""
        if self.busy is None:
            self.writer.close()

    # --- framing ---
    async def _read_request(self) -> HttpRequest | None:
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial.strip():
                raise HttpError(400, "incomplete request head") from None
            return None
        except asyncio.LimitOverrunError:
            raise HttpError(431, f"request head exceeds {self.config.max_http_header_bytes} bytes") from None
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, target, version = lines[0].split(" ")
            headers = {}
            for line in lines[1:]:
                if line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
        except ValueError:
            raise HttpError(400, "malformed request line or header") from None
        if "transfer-encoding" in headers:
            raise HttpError(400, "chunked request bodies are not supported: send Content-Length")
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            raise HttpError(400, "Content-Length is not a number") from None
        if length < 0 or length > self.config.max_http_body:
            raise HttpError(413, f"body of {length} bytes exceeds {self.config.max_http_body}")
        body = await self.reader.readexactly(length) if length else b""
        conn = headers.get("connection", "").lower()
        keep_alive = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
        return HttpRequest(method, target.split("?", 1)[0], headers, body, keep_alive)

    async def _write(self, data: bytes) -> None:
        if self.writer.is_closing():
            raise ConnectionResetError("client disconnected")
        self.writer.write(data)
        await self.writer.drain()

    async def _json(self, status: int, obj: Any, keep_alive: bool) -> None:
        body = json.dumps(obj, ensure_ascii=False).encode()
        head = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
        await self._write(head.encode() + body)

    # --- routing ---
    async def _handle(self, req: HttpRequest) -> None:
        try:
            token = self.bridge.token
            if token is not None and req.path != "/health":
                given = req.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                    raise HttpError(401, "missing or wrong bearer token", "invalid_api_key")
            await self._route(req)
        except HttpError as e:
            await self._json(e.status, e.body(), req.keep_alive)
        except ProtocolError as e:
            await self._json(*_error_pair(e), req.keep_alive)
        except (ConnectionError, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - a bug in one request must not take the server down
            log.exception("HTTP %s %s failed", req.method, req.path)
            req.keep_alive = False
            await self._json(500, HttpError(500, f"{type(e).__name__}: {e}", "internal").body(), keep_alive=False)

    async def _route(self, req: HttpRequest) -> None:
        path = req.path.rstrip("/")
        allowed = "POST" if path == "/v1/chat/completions" else "GET"
        known = path in ("/v1/chat/completions", "/v1/models", "/health") or path.startswith("/v1/models/")
        if not known:
            raise HttpError(404, f"no route {req.path[:200]!r}", "not_found")
        if req.method != allowed:
            raise HttpError(405, f"{req.path} takes {allowed}, not {req.method[:16]}", "method_not_allowed")
        if path == "/health":
            await self._json(200, {"status": "ok"}, req.keep_alive)
        elif path == "/v1/models":
            await self._json(200, {"object": "list", "data": [self._model(c) for c in self.bridge.characters.values()]},
                             req.keep_alive)
        elif path.startswith("/v1/models/"):
            cid = path[len("/v1/models/"):]
            self.bridge.check_character(cid)
            await self._json(200, self._model(self.bridge.characters[cid]), req.keep_alive)
        else:
            await self._completions(req)

    def _model(self, c: dict[str, Any]) -> dict[str, Any]:
        return {"id": c["id"], "object": "model", "created": int(self.bridge.started_wall), "owned_by": "npcforge",
                "name": c["name"]}

    # --- chat completions ---
    async def _completions(self, req: HttpRequest) -> None:
        gen, stream, include_usage = self._parse_completion(req)
        model = gen.character
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        started = False  # SSE head sent (after it, errors go into the stream)

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "system_fingerprint": None, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        async def sse(obj: Any) -> None:
            nonlocal started
            data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj, ensure_ascii=False).encode())
            data += b"\n\n"
            if not started:
                started = True
                head = ("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
                        f"Transfer-Encoding: chunked\r\nConnection: {'keep-alive' if req.keep_alive else 'close'}"
                        "\r\n\r\n").encode()
                first = b"data: " + json.dumps(chunk({"role": "assistant", "content": ""}, None)).encode() + b"\n\n"
                data = head + b"%x\r\n%s\r\n" % (len(first), first) + b"%x\r\n%s\r\n" % (len(data), data)
            else:
                data = b"%x\r\n%s\r\n" % (len(data), data)
            await self._write(data)

        async def on_delta(text: str) -> None:
            if self.reader.at_eof():  # the client closed its side: stop generating for it
                raise ConnectionResetError("client disconnected")
            if stream:
                await sse(chunk({"content": text}, None))

        self.gen = gen
        try:
            done = await self.bridge.chat(gen, on_delta)
        except ProtocolError as e:
            if not started:
                raise
            await sse({"error": _error_pair(e)[1]["error"]})
            await self._write(b"0\r\n\r\n")
            return
        finally:
            self.gen = None
        finish = "length" if done["finish_reason"] == "length" else "stop"
        u = done["usage"]
        usage = {**u, "total_tokens": u["prompt_tokens"] + u["completion_tokens"]}
        if not stream:
            await self._json(200, {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": done["text"]},
                             "finish_reason": finish, "logprobs": None}],
                "usage": usage}, req.keep_alive)
            return
        await sse(chunk({}, finish))
        if include_usage:
            await sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                       "choices": [], "usage": usage})
        await sse(b"[DONE]")
        await self._write(b"0\r\n\r\n")

    def _parse_completion(self, req: HttpRequest) -> tuple[Generation, bool, bool]:
        try:
            body = json.loads(req.body)
        except (ValueError, RecursionError) as e:
            raise HttpError(400, f"body is not valid JSON: {str(e)[:200]}", "invalid_json") from None
        if not isinstance(body, dict):
            raise HttpError(400, "body must be a JSON object", "invalid_request")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise HttpError(400, "model: required, a character id (GET /v1/models lists them)", param="model")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise HttpError(400, "messages: required, a non-empty list of {role, content}", param="messages")
        users = [m for m in messages if m.get("role") == "user"]
        if not users:
            raise HttpError(400, "messages: no user message (the last one is the new turn)", param="messages")
        text = _content_text(users[-1].get("content"))
        if len(text) > self.config.max_text_chars:
            raise HttpError(400, f"messages: the last user message exceeds {self.config.max_text_chars} chars",
                            param="messages")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise HttpError(400, "stream: expected true or false", param="stream")
        if body.get("n") not in (None, 1):
            raise HttpError(400, "n: only 1 choice is supported", param="n")
        session = body.get("user") or self._session_header(req)
        if not isinstance(session, str) or not 0 < len(session) <= self.config.max_name_chars:
            raise HttpError(400, f"user: a session name of 1-{self.config.max_name_chars} chars", param="user")
        fields = dict(body)
        if fields.get("max_tokens") is None and fields.get("max_completion_tokens") is not None:
            fields["max_tokens"] = fields["max_completion_tokens"]
        if isinstance(fields.get("stop"), str):
            fields["stop"] = [fields["stop"]]
        try:
            params = sampling_fields(fields, self.config)
            self.bridge.check_character(model)
            self.bridge.open_session(model, session)
        except ProtocolError as e:
            raise HttpError.of(e) from None
        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        return Generation(model, session, text, params), stream, include_usage

    def _session_header(self, req: HttpRequest) -> str:
        return req.headers.get("x-session-id") or self.config.http_default_session


def _content_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    raise HttpError(400, "messages: content must be a string or a list of text parts", param="messages")


def _error_pair(e: ProtocolError) -> tuple[int, dict[str, Any]]:
    err = HttpError.of(e)
    return err.status, err.body()
