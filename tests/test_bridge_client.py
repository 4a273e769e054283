"""The Python client (sync and asyncio) against a live bridge over the real runtime."""
from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

import plugin_bridge.clients.python.npcforge_client as packaged
from plugin_bridge.server import ThreadedServer
from tests.bridge_util import SlowPool

pytestmark = pytest.mark.timeout(120)  # a hang is a failure, not a stuck suite

CLIENT_DIR = Path(__file__).resolve().parents[1] / "plugin_bridge" / "clients" / "python"


@pytest.fixture(scope="module")
def slow_pool(tiny_dist: Path):
    p = SlowPool(tiny_dist, threads=1, delay=0.02)
    yield p
    p.close()


@pytest.fixture(scope="module")
def server(slow_pool, tmp_path_factory):
    s = ThreadedServer(slow_pool, token="t0k", port=0, unix_path=str(tmp_path_factory.mktemp("s") / "c.sock"))
    yield s
    s.stop()


def test_client_file_is_standalone(tmp_path):
    """A game copies the one file: it must import with nothing of npcforge around."""
    import subprocess
    import sys

    (tmp_path / "npcforge_client.py").write_text((CLIENT_DIR / "npcforge_client.py").read_text())
    code = "import sys; import npcforge_client as c; print(c.Client, c.AsyncClient, 'runtime' in sys.modules)"
    out = subprocess.run([sys.executable, "-E", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip().endswith("False")


def test_sync_client_requests_and_stream(server, slow_pool):
    with packaged.Client(port=server.addresses.tcp_port, token="t0k") as c:
        assert c.server["authenticated"] and c.server["protocol"] == packaged.PROTOCOL_VERSION
        ids = [ch["id"] for ch in c.list()]
        cid = ids[0]
        stream = c.stream(cid, "py", "Hello", max_tokens=12, seed=2)
        events = list(stream)
        assert events[-1] is stream.done and stream.done["event"] == "done"
        assert "".join(e["text"] for e in events if e["event"] == "token") == stream.done["text"]
        done = c.chat(cid, "py", "More", max_tokens=5)
        assert done["usage"]["completion_tokens"] <= 5
        assert [m["role"] for m in c.history(cid, "py")] == ["user", "assistant"] * 2
        c.reset(cid, "py")
        assert c.history(cid, "py") == []
        assert c.load(ids[1])["loaded"] is True and c.unload(ids[1])["loaded"] is False
        assert "runtime" in c.stats()
        with pytest.raises(packaged.BridgeError) as e:
            c.chat("nobody", "py", "x")
        assert e.value.code == "unknown_character"


def test_sync_client_cancel_and_threads(server):
    with packaged.Client(unix_path=server.addresses.unix_path, token="t0k") as c:
        cid = c.list()[1]["id"]
        stream = c.stream(cid, "cancel-me", "Talk", max_tokens=300, seed=1)
        pieces = stream.tokens()
        next(pieces)
        assert stream.cancel() is True
        done = stream.result()
        assert done["finish_reason"] == "cancelled" and done["usage"]["completion_tokens"] < 300
        assert c.cancel(stream.id) is False  # finished already
        results = {}

        def talk(i: int) -> None:
            results[i] = c.chat(cid, f"thread{i}", "Hi", max_tokens=6)["finish_reason"]

        threads = [threading.Thread(target=talk, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results) == [0, 1, 2, 3] and set(results.values()) <= {"stop", "length"}


def test_wrong_token_is_refused(server):
    with pytest.raises(packaged.BridgeError) as e:
        packaged.Client(port=server.addresses.tcp_port, token="nope")
    assert e.value.code == "unauthorized"


def test_async_client(server):
    async def main():
        c = await packaged.AsyncClient.connect(port=server.addresses.tcp_port, token="t0k")
        async with c:
            cid = (await c.list())[2]["id"]
            dones = await asyncio.gather(*(c.chat(cid, f"a{i}", "Hi", max_tokens=5) for i in range(3)))
            stream = await c.stream(cid, "a-stream", "Talk", max_tokens=300, seed=1)
            kinds = []
            async for event in stream:
                kinds.append(event["event"])
                if len(kinds) == 2:
                    assert await stream.cancel()
            return dones, kinds, stream.done

    dones, kinds, done = asyncio.run(main())
    assert all(d["event"] == "done" for d in dones)
    assert kinds[-1] == "done" and done["finish_reason"] == "cancelled"


def test_ready_file_connect(server, tmp_path):
    ready = tmp_path / "ready.json"
    ready.write_text(json.dumps(server.addresses.ready_record(sorted(server.bridge.characters))))
    with packaged.Client.from_ready_file(ready, token="t0k") as c:
        assert len(c.list()) == 3
    with pytest.raises(TimeoutError):
        packaged.read_ready_file(tmp_path / "absent.json", timeout=0.2)
