"""Property-based fuzzing of a LIVE bridge (real sockets, real runtime): thousands of malformed messages and byte
streams. Properties: every reply is a schema-valid event, the server never crashes, and a well-formed request sent
after the garbage is still answered. Bounded: about a minute in all."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugin_bridge.protocol import OPS, ServerConfig
from plugin_bridge.server import ThreadedServer
from runtime import NPCPool
from tests.bridge_util import RawConn, wait_for

pytestmark = pytest.mark.timeout(300)  # a hang is a failure, not a stuck suite

FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def server(tiny_dist: Path):
    pool = NPCPool(tiny_dist, threads=1)
    srv = ThreadedServer(pool, ServerConfig(max_sessions=64, max_tokens_limit=64), port=0, http_port=0)
    yield srv
    srv.stop()
    # nothing leaked: every request of every closed connection was finished or cancelled
    assert srv.bridge.requests_in_flight == 0 and not srv.bridge.generations
    pool.close()


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                      st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                             st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                          max_leaves=12)
FIELDS = ["version", "token", "client", "character", "session", "text", "max_tokens", "temperature", "top_p",
          "top_k", "repetition_penalty", "stop", "seed", "stream", "target"]


@st.composite
def messages(draw, characters: list[str]):
    """Mostly protocol-shaped objects with wrong or edge values, some arbitrary JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_value)
    msg = {}
    if draw(st.integers(0, 9)) > 0:  # sometimes no id at all
        msg["id"] = draw(st.one_of(st.integers(-5, 10**20), st.text(max_size=130), json_leaf))
    msg["op"] = draw(st.one_of(st.sampled_from(OPS), st.text(max_size=10), json_leaf))
    plausible = {"character": st.sampled_from(characters + ["nobody", ""]), "session": st.text(max_size=10),
                 "text": st.text(max_size=30), "max_tokens": st.integers(-3, 70), "stream": st.booleans(),
                 "version": st.integers(0, 3), "target": st.integers(0, 10)}
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=8, unique=True)):
        msg[name] = draw(plausible[name] if name in plausible and draw(st.booleans()) else json_value)
    return msg


def _probe(conn: RawConn, sent_ids: set) -> None:
    conn.send(b"\n", {"id": "probe", "op": "list"})
    while True:
        e = conn.event()  # schema-checked
        assert e["id"] in sent_ids or e["id"] is None or e["id"] == "probe", e
        if e["id"] == "probe" and e["event"] == "result":
            return


@settings(FUZZ, max_examples=500)
@given(data=st.data())
def test_malformed_messages_never_break_the_server(server, data):
    characters = sorted(server.bridge.characters)
    batch = data.draw(st.lists(messages(characters), min_size=1, max_size=12))
    conn = RawConn(server.addresses.tcp_port)
    try:
        lines = [json.dumps(m).encode() + b"\n" for m in batch]
        ids = {m.get("id") for m in batch if isinstance(m, dict) and isinstance(m.get("id"), (int, str))}
        conn.send(b"".join(lines))
        _probe(conn, ids)
    finally:
        conn.close()


@settings(FUZZ, max_examples=200)
@given(chunks=st.lists(st.one_of(st.binary(max_size=300), st.just(b"\n"), st.just(b"{"),
                                 st.builds(lambda n: b"z" * n, st.integers(60000, 140000))), max_size=12))
def test_arbitrary_bytes_then_a_good_request(server, chunks):
    conn = RawConn(server.addresses.tcp_port)
    try:
        for chunk in chunks:
            if chunk:
                conn.send(chunk)
        _probe(conn, set())
    finally:
        conn.close()


def _http(port: int, data: bytes, half_close: bool = False) -> bytes:
    """Send, read until the server closes. `half_close` sends EOF after the bytes (for framing garbage the server
    would otherwise wait on); a well-formed request keeps its side open, as the server reads EOF as "client gone"."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@settings(FUZZ, max_examples=200)
@given(body=st.one_of(json_value, st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(["aldric", "finnian", "jasper", "x"]), json_leaf),
     "messages": st.one_of(json_value, st.lists(st.fixed_dictionaries(
         {"role": st.sampled_from(["user", "system", "assistant", "tool"]),
          "content": st.one_of(st.text(max_size=20), json_value)}), max_size=3))},
    optional={"stream": st.one_of(st.booleans(), json_leaf), "max_tokens": st.one_of(st.integers(-2, 40), json_leaf),
              "temperature": json_leaf, "stop": json_value, "user": json_leaf, "n": json_leaf})),
    raw=st.one_of(st.none(), st.binary(max_size=200)))
def test_http_garbage_and_odd_bodies(server, body, raw):
    port = server.addresses.http_port
    if raw is not None:
        _http(port, raw, half_close=True)
    payload = json.dumps(body).encode()
    reply = _http(port, b"POST /v1/chat/completions HTTP/1.1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(payload), payload))
    status = int(reply.split(b" ", 2)[1])
    assert status in (200, 400, 404, 429), reply[:300]
    if status != 200:
        err = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
        assert err["message"] and err["type"]
    ok = _http(port, b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")


def test_server_is_idle_after_fuzzing(server):
    assert wait_for(lambda: server.bridge.requests_in_flight == 0 and not server.bridge.generations, 10)
    conn = RawConn(server.addresses.tcp_port)
    stats = conn.request({"id": 1, "op": "stats"})["data"]["server"]
    conn.close()
    assert stats["connections"] == 1
