"""`npcforge serve` and `npcforge chat` as real subprocesses (and Ctrl-C of a reply with a real SIGINT)."""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.bridge_util import RawConn, SlowPool

pytestmark = pytest.mark.timeout(180)  # a hang is a failure, not a stuck suite

NPCFORGE = [sys.executable, "-m", "npcforge"]


def _ready_line(proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.2)[0]:
            line = proc.stdout.readline()
            if line.startswith("npcforge serve: ready"):
                return line.strip()
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"no ready line; stderr: {proc.stderr.read()}")


@pytest.fixture()
def served(tiny_dist: Path, tmp_path: Path):
    ready = tmp_path / "ready.json"
    sock = tmp_path / "npc.sock"
    proc = subprocess.Popen([*NPCFORGE, "serve", str(tiny_dist), "--port", "0", "--http-port", "0", "--socket",
                             str(sock), "--ready-file", str(ready), "--token", "tk", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = _ready_line(proc)
    yield proc, line, ready, sock
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_serve_ready_chat_and_sigterm_shutdown(served):
    proc, line, ready, sock = served
    record = json.loads(ready.read_text())
    assert record["pid"] == proc.pid and record["protocol"] == 1 and record["unix"] == str(sock)
    assert record["characters"] == ["aldric", "finnian", "jasper"]
    assert line == (f"npcforge serve: ready tcp=127.0.0.1:{record['tcp']['port']} unix={sock} "
                    f"http=127.0.0.1:{record['http']['port']}")
    c = RawConn(record["tcp"]["port"])
    assert c.request({"id": 0, "op": "hello", "version": 1, "token": "tk"})["event"] == "result"
    c.send({"id": 1, "op": "chat", "character": "aldric", "session": "p", "text": "Talk", "max_tokens": 900,
            "seed": 1})
    assert c.event()["event"] == "token"
    proc.send_signal(signal.SIGTERM)
    done = c.until_end(1)[-1]
    assert done["event"] == "done" and done["finish_reason"] == "shutdown"
    assert c.closed_by_server()
    assert proc.wait(20) == 0
    assert not ready.exists() and not sock.exists()


def test_serve_refuses_public_host_without_token(tiny_dist):
    out = subprocess.run([*NPCFORGE, "serve", str(tiny_dist), "--host", "0.0.0.0", "--port", "0"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "NPCFORGE_TOKEN": ""})
    assert out.returncode == 2 and "not a loopback address" in out.stderr and "--token" in out.stderr


def test_serve_port_in_use_fails_cleanly(served, tiny_dist):
    _, _, ready, _ = served
    port = json.loads(ready.read_text())["tcp"]["port"]
    out = subprocess.run([*NPCFORGE, "serve", str(tiny_dist), "--port", str(port)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 1 and "cannot listen" in out.stderr


def test_chat_one_shot_json_and_connect(served, tiny_dist):
    out = subprocess.run([*NPCFORGE, "chat", str(tiny_dist), "finnian", "-m", "Hello", "--json", "--max-tokens", "6"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    done = json.loads(out.stdout)
    assert done["character"] == "finnian" and done["finish_reason"] in ("stop", "length")
    assert done["usage"]["completion_tokens"] <= 6
    proc, _, ready, sock = served
    port = json.loads(ready.read_text())["tcp"]["port"]
    out = subprocess.run([*NPCFORGE, "chat", "--connect", f"127.0.0.1:{port}", "--token", "tk", "jasper",
                          "-m", "Hi", "--max-tokens", "4"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([*NPCFORGE, "chat", "--connect", str(sock), "--token", "tk", "nobody", "-m", "Hi"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "unknown character 'nobody'" in out.stderr
    out = subprocess.run([*NPCFORGE, "chat", "--connect", f"127.0.0.1:{port}", "jasper", "-m", "Hi"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "NPCFORGE_TOKEN": ""})
    assert out.returncode == 1 and "unauthorized" in out.stderr


def test_chat_interactive_commands(tiny_dist):
    script = "/list\nHello there\n/switch finnian\nHi\n/switch nobody\n/reset\n/quit\nnever sent\n"
    out = subprocess.run([*NPCFORGE, "chat", str(tiny_dist), "aldric", "--max-tokens", "5"], input=script,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    o = out.stdout
    greeting = json.loads((tiny_dist / "aldric" / "character.json").read_text())["greeting"]
    assert greeting and f"Aldric Thorne: {greeting}" in o
    assert "talking to Aldric Thorne (aldric)" in o and "aldric finnian jasper" in o
    assert "Aldric Thorne: " in o and "talking to Finnian Larkspur (finnian)" in o and "Finnian Larkspur: " in o
    assert "unknown character 'nobody'" in o and "conversation with Finnian Larkspur forgotten" in o
    assert o.count("you> ") == 7  # /quit ended the session: the last line was not read


def test_chat_usage_errors(tiny_dist, tmp_path):
    assert subprocess.run([*NPCFORGE, "chat"], capture_output=True, timeout=60).returncode == 2
    assert subprocess.run([*NPCFORGE, "chat", str(tmp_path / "none")], capture_output=True,
                          timeout=60).returncode == 2
    assert subprocess.run([*NPCFORGE, "chat", str(tiny_dist), "--json"], capture_output=True,
                          timeout=60).returncode == 2


def test_ctrl_c_cancels_the_current_reply(tiny_dist, capsys, monkeypatch):
    """A real SIGINT during a streamed reply cancels it on the server; the chat goes on."""
    import click

    from npcforge.cmd_serve import _reply
    from plugin_bridge.clients.python.npcforge_client import Client
    from plugin_bridge.server import ThreadedServer

    echo, printed = click.echo, []

    def echo_then_interrupt(text="", **kw):  # the SIGINT comes with the reply's first token: surely mid-stream
        echo(text, **kw)
        printed.append(text)
        if len(printed) == 2:
            os.kill(os.getpid(), signal.SIGINT)

    # Python raises KeyboardInterrupt only if SIGINT was not ignored when it started, and a shell ignores it for
    # the jobs it starts with `&`: install the handler `npcforge chat` runs with in a terminal.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    pool = SlowPool(tiny_dist, threads=1, delay=0.03)
    srv = ThreadedServer(pool, port=0)
    try:
        with Client(port=srv.addresses.tcp_port, timeout=30) as c:
            monkeypatch.setattr(click, "echo", echo_then_interrupt)
            _reply(c, "Aldric", "aldric", "ctrl-c", "Talk", {"max_tokens": 300, "seed": 1})
            monkeypatch.setattr(click, "echo", echo)
            assert capsys.readouterr().out.rstrip().endswith("[cancelled]")
            assert pool.history("aldric", "ctrl-c")[-1]["role"] == "assistant"
            _reply(c, "Aldric", "aldric", "ctrl-c", "Again", {"max_tokens": 3})
            assert not capsys.readouterr().out.rstrip().endswith("[cancelled]")
    finally:
        signal.signal(signal.SIGINT, previous)
        srv.stop()
        pool.close()


def test_bridge_and_commands_import_without_torch():
    """A game ships runtime + bridge only: serving must not pull torch or transformers."""
    code = ("import sys; import plugin_bridge.server, plugin_bridge.http, npcforge.cmd_serve, npcforge.cli; "
            "import plugin_bridge.clients.python.npcforge_client; "
            "print(sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
