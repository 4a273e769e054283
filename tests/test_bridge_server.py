"""The NDJSON bridge on real sockets over the real runtime (tiny artifacts): protocol, errors, limits, cancel,
disconnect, backpressure, shutdown. Every event read is validated against plugin_bridge/schema."""
from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from plugin_bridge.protocol import ERROR_CODES, OPS, ProtocolError, ServerConfig, validate_request
from plugin_bridge.sentences import SentenceSplitter
from plugin_bridge.server import ThreadedServer
from plugin_bridge.service import Bridge, Generation
from tests.bridge_util import SCHEMA, RawConn, SlowPool, is_valid_request, wait_for

pytestmark = pytest.mark.timeout(120)  # a hang is a failure, not a stuck suite


@pytest.fixture(scope="module")
def slow_pool(tiny_dist: Path):
    p = SlowPool(tiny_dist, threads=1, delay=0.03)
    yield p
    p.close()


@pytest.fixture(scope="module")
def server(pool, tmp_path_factory):
    sock = str(tmp_path_factory.mktemp("sock") / "npc.sock")
    s = ThreadedServer(pool, port=0, unix_path=sock)
    yield s
    s.stop()


@pytest.fixture()
def conn(server):
    c = RawConn(server.addresses.tcp_port)
    yield c
    c.close()


def _chars(server) -> list[str]:
    return sorted(server.bridge.characters)


# --- the protocol description, the schema and the code agree ---

def test_schema_lists_the_ops_and_error_codes_of_the_code():
    defs = SCHEMA["$defs"]
    assert sorted(k[4:] for k in defs if k.startswith("req_")) == sorted(OPS)
    assert defs["ev_error"]["properties"]["code"]["enum"] == list(ERROR_CODES)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    for code in ERROR_CODES:
        assert f"`{code}`" in doc, code


def test_protocol_doc_examples_are_valid_messages():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    block = doc.split("## Example session")[1].split("```")[1]
    lines = [ln[2:] for ln in block.splitlines() if ln.startswith(("> {", "< {"))]
    assert len(lines) >= 10
    for line in lines:
        msg = json.loads(line)
        if "event" not in msg:
            assert is_valid_request(msg), line
            validate_request(msg, ServerConfig())
        else:
            from tests.bridge_util import check_event
            check_event(msg)


@pytest.mark.parametrize("msg, code", [
    ({"op": "list"}, "bad_request"),
    ({"id": True, "op": "list"}, "bad_request"),
    ({"id": "", "op": "list"}, "bad_request"),
    ({"id": 1, "op": "dance"}, "unknown_op"),
    ({"id": 1, "op": 5}, "bad_request"),
    ({"id": 1, "op": "hello"}, "bad_request"),
    ({"id": 1, "op": "chat", "character": "a", "session": "s"}, "bad_request"),
    ({"id": 1, "op": "chat", "character": "a", "session": "s", "text": "x", "max_tokens": "9"}, "bad_request"),
    ({"id": 1, "op": "chat", "character": "a", "session": "s", "text": "x", "max_tokens": 0}, "bad_request"),
    ({"id": 1, "op": "chat", "character": "a", "session": "s", "text": "x", "temperature": 2.5}, "bad_request"),
    ({"id": 1, "op": "chat", "character": "a", "session": "s", "text": "x", "top_p": 0}, "bad_request"),
    ({"id": 1, "op": "chat", "character": "a", "session": "s", "text": "x", "stop": "."}, "bad_request"),
    ({"id": 1, "op": "chat", "character": "a", "session": "s", "text": "x", "stop": [""]}, "bad_request"),
    ({"id": 1, "op": "chat", "character": "a", "session": "s", "text": "x", "stream": 1}, "bad_request"),
    ({"id": 1, "op": "chat", "character": "a", "session": "s", "text": "x", "seed": -1}, "bad_request"),
    ({"id": 1, "op": "chat", "character": "", "session": "s", "text": "x"}, "bad_request"),
    ({"id": 1, "op": "cancel"}, "bad_request"),
    ({"id": 1, "op": "load", "character": ["a"]}, "bad_request"),
])
def test_validation_rejects_what_the_schema_rejects(msg, code):
    with pytest.raises(ProtocolError) as e:
        validate_request(msg, ServerConfig())
    assert e.value.code == code
    assert not is_valid_request(msg)


def test_validation_accepts_full_chat():
    msg = {"id": "c", "op": "chat", "character": "a", "session": "s", "text": "hi", "max_tokens": 5,
           "temperature": 0, "top_p": 1, "top_k": 0, "repetition_penalty": 1.1, "stop": ["\n"], "seed": 3,
           "stream": False, "extra": "ignored"}
    req = validate_request(msg, ServerConfig())
    assert is_valid_request(msg)
    assert req.fields["params"] == {"max_tokens": 5, "temperature": 0.0, "top_p": 1.0, "top_k": 0,
                                    "repetition_penalty": 1.1, "stop": ["\n"], "seed": 3}
    assert req.fields["stream"] is False


def test_sentence_splitter_streams_whole_sentences():
    text = 'Mr. Vane left. "Really?" she said… Then\nno more. The price is 3.5 gold! Done'
    sp = SentenceSplitter()
    out = []
    for i in range(0, len(text), 3):
        out += sp.feed(text[i:i + 3])
    out.append(sp.flush())
    assert out == ["Mr. Vane left.", '"Really?"', "she said…", "Then", "no more.", "The price is 3.5 gold!", "Done"]
    assert "".join(out).replace(" ", "") == text.replace(" ", "").replace("\n", "")


# --- live server ---

def test_hello_and_list(conn, server):
    r = conn.request({"id": 1, "op": "hello", "version": 1, "client": "pytest"})
    assert r["event"] == "result" and r["data"]["protocol"] == 1 and r["data"]["authenticated"] is True
    r = conn.request({"id": "l", "op": "list"})
    ids = [c["id"] for c in r["data"]["characters"]]
    assert sorted(ids) == _chars(server) and len(ids) == 3


def test_streaming_chat_tokens_sentences_done(conn, server, pool):
    cid = _chars(server)[0]
    conn.send({"id": "c1", "op": "chat", "character": cid, "session": "stream", "text": "Hello!",
               "max_tokens": 40, "seed": 7})
    events = conn.until_end("c1")
    done = events[-1]
    assert done["event"] == "done" and done["finish_reason"] in ("stop", "length")
    tokens = "".join(e["text"] for e in events if e["event"] == "token")
    assert tokens == done["text"] and done["usage"]["completion_tokens"] > 0
    sentences = [e["text"] for e in events if e["event"] == "sentence"]
    assert " ".join(sentences).split() == done["text"].split()
    assert pool.history(cid, "stream")[-1] == {"role": "assistant", "content": done["text"]}


def test_non_streaming_chat_sends_only_done(conn, server):
    cid = _chars(server)[1]
    conn.send({"id": 5, "op": "chat", "character": cid, "session": "ns", "text": "Hi", "max_tokens": 8,
               "stream": False})
    events = conn.until_end(5)
    assert [e["event"] for e in events] == ["done"] and events[0]["usage"]["completion_tokens"] <= 8


def test_many_requests_in_flight_are_matched_by_id(conn, server, pool):
    a, b, c = _chars(server)
    conn.send(*[{"id": f"m{i}", "op": "chat", "character": ch, "session": f"multi{i}", "text": "Tell me",
                 "max_tokens": 20} for i, ch in enumerate((a, b, c, a))], {"id": "st", "op": "stats"})
    ends = {}
    while len(ends) < 5:
        e = conn.event()
        if e["event"] in ("done", "result", "error"):
            ends[e["id"]] = e
    assert all(ends[f"m{i}"]["event"] == "done" for i in range(4))
    for i, ch in enumerate((a, b, c, a)):
        text = "".join(e["text"] for e in conn.seen if e["id"] == f"m{i}" and e["event"] == "token")
        assert text == ends[f"m{i}"]["text"] == pool.history(ch, f"multi{i}")[-1]["content"]
    assert ends["st"]["data"]["server"]["connections"] >= 1 and "runtime" in ends["st"]["data"]


def test_requests_on_one_conversation_run_in_arrival_order(conn, server, pool):
    cid = _chars(server)[0]
    conv = {"character": cid, "session": "order"}
    conn.send({"id": 1, "op": "chat", **conv, "text": "one", "max_tokens": 5},
              {"id": 2, "op": "chat", **conv, "text": "two", "max_tokens": 5},
              {"id": 3, "op": "history", **conv},
              {"id": 4, "op": "reset", **conv},
              {"id": 5, "op": "chat", **conv, "text": "three", "max_tokens": 5},
              {"id": 6, "op": "history", **conv})
    ends = {}
    while len(ends) < 6:
        e = conn.event()
        if e["event"] in ("done", "result", "error"):
            ends[e["id"]] = e
    assert [ends[i]["event"] for i in range(1, 7)] == ["done", "done", "result", "result", "done", "result"]
    assert [m["content"] for m in ends[3]["data"]["messages"] if m["role"] == "user"] == ["one", "two"]
    assert [m["content"] for m in ends[6]["data"]["messages"]] == ["three", ends[5]["text"]]


def test_load_unload(conn, server, pool):
    cid = _chars(server)[2]
    assert conn.request({"id": 1, "op": "load", "character": cid})["data"] == {"character": cid, "loaded": True}
    listed = {c["id"]: c for c in conn.request({"id": 2, "op": "list"})["data"]["characters"]}
    assert listed[cid]["loaded"] is True
    assert conn.request({"id": 3, "op": "unload", "character": cid})["data"]["loaded"] is False
    listed = {c["id"]: c for c in conn.request({"id": 4, "op": "list"})["data"]["characters"]}
    assert listed[cid]["loaded"] is False


def test_errors_are_events_and_the_connection_keeps_working(conn, server):
    cid = _chars(server)[0]
    conn.send(b"not json\n", b"[1, 2]\n", b"\xff\xfe\n", b'{"id": 7}\n', b'{"id": 8, "op": "fly"}\n',
              b'{"id": 9, "op": "chat", "character": "nobody", "session": "s", "text": "x"}\n',
              b'{"id": 10, "op": "chat", "character": "' + cid.encode() + b'", "session": "s", "text": 3}\n',
              b'{"id": 11, "op": "cancel", "target": "nothing"}\n', b"NaN\n", b"\r\n", b"   \n")
    got = [conn.event() for _ in range(9)]
    assert [(e["id"], e["code"]) for e in got] == [
        (None, "bad_json"), (None, "bad_json"), (None, "bad_json"), (7, "bad_request"), (8, "unknown_op"),
        (9, "unknown_character"), (10, "bad_request"), (11, "not_found"), (None, "bad_json")]
    assert conn.request({"id": "ok", "op": "list"})["event"] == "result"


def test_line_too_long_then_resync(conn):
    big = b'{"id": 1, "op": "list", "pad": "' + b"x" * 70000 + b'"}\n'
    conn.send(big, b"y" * 200000, b'\n{"id": 2, "op": "list"}\n')
    e = conn.event()
    assert e == {"id": None, "event": "error", "code": "line_too_long", "message": e["message"]}
    e = conn.event()
    assert e["code"] == "line_too_long"
    assert conn.event()["id"] == 2
    # exactly at the limit is accepted
    line = b'{"id": 3, "op": "list", "pad": "'
    line += b"x" * (65536 - len(line) - 2) + b'"}'
    assert len(line) == 65536
    conn.send(line + b"\r\n")
    assert conn.event()["id"] == 3


def test_duplicate_id_and_too_many_requests(tiny_dist, slow_pool):
    srv = ThreadedServer(slow_pool, ServerConfig(max_requests_per_connection=2), port=0)
    c = RawConn(srv.addresses.tcp_port)
    try:
        cid = sorted(srv.bridge.characters)[0]
        chat = {"op": "chat", "character": cid, "text": "hi", "max_tokens": 30}
        c.send({"id": 1, **chat, "session": "a"}, {"id": 1, **chat, "session": "b"},
               {"id": 2, **chat, "session": "c"}, {"id": 3, **chat, "session": "d"})
        errors = [c.event() for _ in range(2)]
        assert [(e["id"], e["code"]) for e in errors] == [(1, "bad_request"), (3, "too_many_requests")]
        assert c.request({"id": "x", "op": "cancel", "target": 1})["data"] == {"target": 1, "cancelled": True}
        assert c.until_end(1)[-1]["finish_reason"] == "cancelled"
        assert c.until_end(2)[-1]["event"] == "done"
    finally:
        c.close()
        srv.stop()


def test_cancel_mid_reply_keeps_the_partial_reply(slow_pool):
    srv = ThreadedServer(slow_pool, port=0)
    c = RawConn(srv.addresses.tcp_port)
    try:
        cid = sorted(srv.bridge.characters)[0]
        c.send({"id": "c", "op": "chat", "character": cid, "session": "cx", "text": "Talk", "max_tokens": 200, "seed": 1})
        while sum(e["event"] == "token" for e in c.seen) < 3:
            c.event()
        c.send({"id": "k", "op": "cancel", "target": "c"})
        done = c.until_end("c")[-1]
        assert done["finish_reason"] == "cancelled" and 3 <= done["usage"]["completion_tokens"] < 200
        assert "".join(e["text"] for e in c.seen if e["id"] == "c" and e["event"] == "token") == done["text"]
        assert any(e["id"] == "k" and e["event"] == "result" for e in c.seen)
        assert slow_pool.history(cid, "cx")[-1]["content"] == done["text"]
    finally:
        c.close()
        srv.stop()


def test_disconnect_mid_reply_cancels_and_frees(slow_pool):
    srv = ThreadedServer(slow_pool, port=0)
    try:
        cid = sorted(srv.bridge.characters)[1]
        c = RawConn(srv.addresses.tcp_port)
        c.send({"id": 1, "op": "chat", "character": cid, "session": "gone", "text": "Talk", "max_tokens": 300, "seed": 1})
        assert c.event()["event"] == "token"
        c.close()
        started = time.monotonic()
        assert wait_for(lambda: not srv.bridge.generations and srv.bridge.requests_in_flight == 0, 5)
        assert time.monotonic() - started < 3  # 300 tokens at 30 ms would take 9 s: it was cancelled
        assert wait_for(lambda: slow_pool.stats()["active_generations"] == 0, 5)
        c2 = RawConn(srv.addresses.tcp_port)
        done = c2.request({"id": 2, "op": "chat", "character": cid, "session": "gone", "text": "Again",
                           "max_tokens": 3, "stream": False})
        assert done["event"] == "done"  # the conversation is not left busy
        c2.close()
    finally:
        srv.stop()


def test_too_many_sessions_and_reset_frees(pool):
    srv = ThreadedServer(pool, ServerConfig(max_sessions=2), port=0)
    c = RawConn(srv.addresses.tcp_port)
    try:
        cid = sorted(srv.bridge.characters)[0]
        chat = {"op": "chat", "character": cid, "text": "hi", "max_tokens": 2, "stream": False}
        assert c.request({"id": 1, **chat, "session": "s1"})["event"] == "done"
        assert c.request({"id": 2, **chat, "session": "s2"})["event"] == "done"
        assert c.request({"id": 3, **chat, "session": "s1"})["event"] == "done"  # an existing one is fine
        assert c.request({"id": 4, **chat, "session": "s3"})["code"] == "too_many_sessions"
        c.request({"id": 5, "op": "reset", "character": cid, "session": "s2"})
        assert c.request({"id": 6, **chat, "session": "s3"})["event"] == "done"
    finally:
        c.close()
        srv.stop()


def test_token_required_before_anything_but_hello(pool):
    srv = ThreadedServer(pool, token="s3cret", port=0)
    c = RawConn(srv.addresses.tcp_port)
    try:
        assert c.request({"id": 1, "op": "list"})["code"] == "unauthorized"
        hello = c.request({"id": 2, "op": "hello", "version": 1})
        assert hello["code"] == "unauthorized"
        assert c.request({"id": 3, "op": "hello", "version": 1, "token": "wrong"})["code"] == "unauthorized"
        assert c.request({"id": 4, "op": "stats"})["code"] == "unauthorized"
        ok = c.request({"id": 5, "op": "hello", "version": 1, "token": "s3cret"})
        assert ok["data"]["authenticated"] is True and ok["data"]["auth_required"] is True
        assert c.request({"id": 6, "op": "list"})["event"] == "result"
        other = RawConn(srv.addresses.tcp_port)  # the token is per connection
        assert other.request({"id": 1, "op": "list"})["code"] == "unauthorized"
        other.close()
    finally:
        c.close()
        srv.stop()


def test_unix_socket_is_private_and_removed(server, tmp_path, pool):
    path = server.addresses.unix_path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    c = RawConn(unix_path=path)
    assert c.request({"id": 1, "op": "list"})["event"] == "result"
    c.close()
    sock = str(tmp_path / "other.sock")
    srv = ThreadedServer(pool, unix_path=sock)
    with pytest.raises(OSError, match="another server is listening"):
        ThreadedServer(pool, unix_path=sock)
    srv.stop()
    assert not os.path.exists(sock)
    (tmp_path / "plain").write_text("x")
    with pytest.raises(OSError, match="not a socket"):
        ThreadedServer(pool, unix_path=str(tmp_path / "plain"))


def test_shutdown_ends_replies_with_shutdown(slow_pool):
    srv = ThreadedServer(slow_pool, port=0)
    c = RawConn(srv.addresses.tcp_port)
    cid = sorted(srv.bridge.characters)[2]
    c.send({"id": 1, "op": "chat", "character": cid, "session": "bye", "text": "Talk", "max_tokens": 300, "seed": 1})
    assert c.event()["event"] == "token"
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    done = c.until_end(1)[-1]
    assert done["event"] == "done" and done["finish_reason"] == "shutdown"
    assert c.closed_by_server()
    stopper.join(10)
    assert not stopper.is_alive()
    c.close()


def test_backpressure_pauses_generation_for_a_slow_reader(pool):
    """A consumer that stops taking deltas stops the bridge's worker after `token_queue` of them."""
    config = ServerConfig(token_queue=4)
    pulled = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def chat(self, *a, **kw):
            stream = self.inner.chat(*a, **kw)

            class S:
                def __iter__(s):
                    return s

                def __next__(s):
                    d = next(stream)
                    pulled.append(d)
                    return d

                cancel = stream.cancel
                result = property(lambda s: stream.result)
            return S()

    async def scenario():
        bridge = Bridge(Counting(pool), config)
        cid = sorted(bridge.characters)[0]
        gate = asyncio.Event()
        got = []

        async def slow(text):
            got.append(text)
            await gate.wait()

        task = asyncio.create_task(bridge.chat(Generation(cid, "bp", "Talk", {"max_tokens": 200, "seed": 1}), slow))
        await asyncio.sleep(1.0)
        paused_at = len(pulled)
        gate.set()
        done = await task
        bridge.close()
        return paused_at, done, got

    paused_at, done, got = asyncio.run(scenario())
    assert paused_at <= config.token_queue + 2 < done["usage"]["completion_tokens"]
    assert "".join(got) == done["text"]


def test_abandoned_reply_does_not_hang_when_the_runtime_ran_ahead(pool):
    """The client leaves while the runtime holds many more deltas than the bridge's queue: no deadlock."""
    config = ServerConfig(token_queue=2)

    async def scenario():
        bridge = Bridge(pool, config)
        cid = sorted(bridge.characters)[1]

        async def leave(text):
            await asyncio.sleep(0.3)  # meanwhile the runtime generates far ahead of the bridge
            raise ConnectionResetError("client left")

        try:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(bridge.chat(Generation(cid, "ahead", "Talk", {"max_tokens": 400, "seed": 1}),
                                                   leave), 20)
        finally:
            bridge.close()

    asyncio.run(scenario())
    assert pool.history(sorted(c["id"] for c in pool.characters())[1], "ahead")[-1]["role"] == "assistant"


def test_connections_over_the_limit_are_closed(pool):
    srv = ThreadedServer(pool, ServerConfig(max_connections=2), port=0)
    try:
        a, b = RawConn(srv.addresses.tcp_port), RawConn(srv.addresses.tcp_port)
        assert a.request({"id": 1, "op": "list"})["event"] == "result"
        assert b.request({"id": 1, "op": "list"})["event"] == "result"
        c = RawConn(srv.addresses.tcp_port)
        assert c.closed_by_server(5)
        a.close()
        assert wait_for(lambda: srv.bridge.connections == 1, 5)
        d = RawConn(srv.addresses.tcp_port)
        assert d.request({"id": 1, "op": "list"})["event"] == "result"
        for x in (b, c, d):
            x.close()
    finally:
        srv.stop()
