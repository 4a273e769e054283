"""The OpenAI-compatible HTTP front end, driven by the official `openai` client (unchanged) and by raw sockets."""
from __future__ import annotations

import json
import socket
import time

import openai
import pytest

from plugin_bridge.server import ThreadedServer
from tests.bridge_util import RawConn, SlowPool, wait_for

pytestmark = pytest.mark.timeout(120)  # a hang is a failure, not a stuck suite


@pytest.fixture(scope="module")
def server(pool):
    s = ThreadedServer(pool, port=0, http_port=0)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.addresses.http_port}/v1", api_key="unused",
                         max_retries=0, timeout=30)


def _raw(port: int, data: bytes) -> tuple[int, dict, bytes]:
    """Send raw bytes, read one response (Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(data)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def test_models(client, server):
    ids = sorted(m.id for m in client.models.list())
    assert ids == sorted(server.bridge.characters) and len(ids) == 3
    m = client.models.retrieve(ids[0])
    assert m.id == ids[0] and m.owned_by == "npcforge"


def test_completion_non_streaming(client, server, pool):
    cid = sorted(server.bridge.characters)[0]
    r = client.chat.completions.create(
        model=cid, user="http-ns", max_tokens=12, seed=4,
        messages=[{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Old turn"},
                  {"role": "assistant", "content": "Old answer"}, {"role": "user", "content": "Hello"}])
    assert r.object == "chat.completion" and r.model == cid
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # only the last user message is the new turn; the client's system message is ignored
    assert pool.history(cid, "http-ns") == [{"role": "user", "content": "Hello"},
                                            {"role": "assistant", "content": r.choices[0].message.content}]


def test_completion_streaming(client, server, pool):
    cid = sorted(server.bridge.characters)[1]
    chunks = list(client.chat.completions.create(
        model=cid, user="http-s", max_tokens=16, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}]}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    assert chunks[-1].usage.completion_tokens > 0
    assert pool.history(cid, "http-s") == [{"role": "user", "content": "Hi you"},
                                           {"role": "assistant", "content": text}]


def test_session_header_and_ndjson_share_the_conversation(server, pool):
    cid = sorted(server.bridge.characters)[2]
    body = json.dumps({"model": cid, "messages": [{"role": "user", "content": "via http"}], "max_tokens": 3})
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           f"X-Session-Id: shared\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()
    status, headers, raw = _raw(server.addresses.http_port, req)
    assert status == 200 and headers["Content-Type"] == "application/json"
    c = RawConn(server.addresses.tcp_port)
    hist = c.request({"id": 1, "op": "history", "character": cid, "session": "shared"})["data"]["messages"]
    c.close()
    assert hist[0] == {"role": "user", "content": "via http"}
    assert hist[1]["content"] == json.loads(raw)["choices"][0]["message"]["content"]


def test_sse_wire_format(server):
    cid = sorted(server.bridge.characters)[0]
    body = json.dumps({"model": cid, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                       "stream": True})
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
           f"Content-Length: {len(body)}\r\n\r\n{body}").encode()
    status, headers, raw = _raw(server.addresses.http_port, req)
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert headers["Transfer-Encoding"] == "chunked"
    data = b""
    while raw:  # de-chunk
        size, _, rest = raw.partition(b"\r\n")
        n = int(size, 16)
        data, raw = data + rest[:n], rest[n + 2:]
        if n == 0:
            break
    events = [e for e in data.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_http_errors_have_openai_shape(client, server):
    cid = sorted(server.bridge.characters)[0]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nobody")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=cid, messages=[{"role": "user", "content": "x"}], temperature=9)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=cid, messages=[{"role": "system", "content": "only system"}])
    port = server.addresses.http_port
    for req, status in [
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nConnection: close\r\n\r\n{nope", 400),
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\n[]", 400),
        (b"GET /v1/chat/completions HTTP/1.1\r\nConnection: close\r\n\r\n", 405),
        (b"GET /v2/nothing HTTP/1.1\r\nConnection: close\r\n\r\n", 404),
        (b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
        (b"garbage\r\n\r\n", 400),
    ]:
        got, _, body = _raw(port, req)
        assert got == status, req
        err = json.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]


def test_keep_alive_serves_many_requests_on_one_connection(server):
    port = server.addresses.http_port
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        f = s.makefile("rb")
        for _ in range(3):
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            assert f.readline().startswith(b"HTTP/1.1 200")
            length = 0
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            assert json.loads(f.read(length))["object"] == "list"


def test_bearer_token(pool):
    srv = ThreadedServer(pool, token="tok", http_port=0)
    base = f"http://127.0.0.1:{srv.addresses.http_port}/v1"
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()
        assert e.value.status_code == 401 and e.value.body["type"] == "authentication_error"
        good = openai.OpenAI(base_url=base, api_key="tok", max_retries=0)
        cid = sorted(srv.bridge.characters)[0]
        r = good.chat.completions.create(model=cid, messages=[{"role": "user", "content": "x"}], max_tokens=2)
        assert r.choices[0].message.content is not None
    finally:
        srv.stop()


def test_client_leaving_mid_stream_cancels(tiny_dist):
    slow = SlowPool(tiny_dist, threads=1, delay=0.03)
    srv = ThreadedServer(slow, http_port=0)
    try:
        cid = sorted(srv.bridge.characters)[0]
        body = json.dumps({"model": cid, "messages": [{"role": "user", "content": "Talk"}], "max_tokens": 300,
                           "seed": 1, "stream": True, "user": "leaver"})
        s = socket.create_connection(("127.0.0.1", srv.addresses.http_port), timeout=20)
        s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        assert b"200 OK" in s.recv(4096)
        s.close()
        started = time.monotonic()
        assert wait_for(lambda: not srv.bridge.generations, 5)
        assert time.monotonic() - started < 3  # 300 tokens × 30 ms = 9 s uncancelled
        assert wait_for(lambda: slow.stats()["active_generations"] == 0, 5)
        assert slow.history(cid, "leaver")[-1]["role"] == "assistant"
    finally:
        srv.stop()
        slow.close()
