"""The engine clients (Unity C#, C++, Godot GDScript) checked against a live `npcforge serve`.

The C# and C++ check programs are compiled here and run against a real server subprocess on `tiny_dist` that
requires a token; each exits 0 only when all of its checks (JSON escaping, auth, list, a streamed two-turn
conversation, history, two chats at once, cancel, reset, errors, closing mid-reply) passed. The C# program starts
its server itself (NpcForgeServer); the C++ one runs plain, under ThreadSanitizer and under ASan+UBSan. The Godot
addon has no Godot 4 binary to run in, so it is parsed, linted and format-checked with gdtoolkit's GDScript 4
parser, and its public surface is read from the parse tree.
A missing toolchain skips a test locally but fails it when CI is set: CI must exercise every client.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

import pytest

from tests.tinymodel import ROOT

CLIENTS = ROOT / "plugin_bridge" / "clients"
GODOT_ADDON = CLIENTS / "godot" / "addons" / "npcforge"
# Every server here requires it, so every client also proves it authenticates (and is refused without it).
TOKEN = "engine-clients-test-token"


def _missing(what: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must run this test)")
    pytest.skip(what)


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        _missing(f"{name} not found: apt-get install -y {package}")
    return path


def _run_checks(command: list[str], timeout: float = 300) -> str:
    # NPCFORGE_TOKEN: the check programs authenticate with it; a server they spawn reads it too.
    env = {**os.environ, "NPCFORGE_TOKEN": TOKEN}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{command[0]} exited {proc.returncode}:\n{output}"
    assert "FAIL" not in proc.stdout and "ALL CHECKS PASSED" in proc.stdout, output
    return proc.stdout


@pytest.fixture(scope="module")
def server(tiny_dist: Path, tmp_path_factory: pytest.TempPathFactory):
    """`npcforge serve tiny_dist --port 0 --token T` as a child process, the way an engine starts it."""
    work = tmp_path_factory.mktemp("engine-server")
    ready, log = work / "ready.json", work / "server.log"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "npcforge", "serve", str(tiny_dist), "--port", "0", "--threads", "1",
             "--ready-file", str(ready), "--token", TOKEN],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, f"npcforge serve exited {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"npcforge serve not ready after 120 s:\n{log.read_text()}"
            time.sleep(0.1)
        tcp = json.loads(ready.read_text())["tcp"]
        yield tcp["host"], tcp["port"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_csharp_console_test(tiny_dist: Path, tmp_path: Path) -> None:
    # --spawn: the C# side starts `npcforge serve` itself and reads its ready file (NpcForgeServer), as a game does.
    mcs = _tool("mcs", "mono-mcs")
    mono = _tool("mono", "mono-runtime")
    exe = tmp_path / "ConsoleTest.exe"
    sources = sorted((CLIENTS / "unity" / "Runtime").glob("*.cs")) + [CLIENTS / "unity" / "Tests" / "ConsoleTest.cs"]
    build = subprocess.run([mcs, "-warnaserror", "-r:System.dll", "-r:System.Core.dll", f"-out:{exe}",
                            *map(str, sources)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    serve_args = f'-m npcforge serve "{tiny_dist}" --threads 1'
    out = _run_checks([mono, str(exe), "--spawn", sys.executable, serve_args])
    for check in ("server: started as a child process", "auth: hello without the token refused",
                  "cancel: reply stopped early", "dispose: reply in flight fails as disconnected",
                  "json: \\u escapes and a surrogate pair", "server: stopped"):
        assert f"ok   {check}" in out, check


def test_csharp_core_has_no_unity_dependency() -> None:
    # The core must compile with plain Mono (checked above); only the optional wrapper may use UnityEngine.
    for source in (CLIENTS / "unity" / "Runtime").glob("*.cs"):
        assert "UnityEngine" not in source.read_text(), source
    assert "UnityEngine" in (CLIENTS / "unity" / "Unity" / "NpcForgeBehaviour.cs").read_text()


@pytest.mark.parametrize("sanitizer", [None, "thread", "address,undefined"])
def test_cpp_example_chat(server: tuple[str, int], tmp_path: Path, sanitizer: str | None) -> None:
    gxx = _tool("g++", "g++")
    exe = tmp_path / "example_chat"
    flags = ["-std=c++17", "-Wall", "-Wextra", "-Werror", "-pthread"]
    if sanitizer:
        # TSan watches the reader thread, the callbacks and the cancelling thread for data races; ASan/UBSan the
        # buffers and the JSON code. Either makes the program exit non-zero on a finding.
        flags += [f"-fsanitize={sanitizer}", "-fno-sanitize-recover=all", "-g", "-O1"]
    build = subprocess.run([gxx, *flags, str(CLIENTS / "cpp" / "example_chat.cpp"), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    out = _run_checks([str(exe), *map(str, server)])
    for check in ("auth: hello without the token refused", "two chats at once: events routed by id",
                  "cancel: reply stopped early", "destroy: reply in flight fails as disconnected"):
        assert f"ok   {check}" in out, check


def test_cpp_windows_branch_compiles(tmp_path: Path) -> None:
    # Optional, so it skips even in CI: the Winsock branch (#ifdef _WIN32) has no other check on Linux.
    gxx = shutil.which("x86_64-w64-mingw32-g++-posix")
    if gxx is None:
        pytest.skip("x86_64-w64-mingw32-g++-posix not found (apt-get install -y g++-mingw-w64-x86-64-posix)")
    build = subprocess.run([gxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", str(CLIENTS / "cpp" / "example_chat.cpp"),
                            "-o", str(tmp_path / "example_chat.exe"), "-lws2_32"],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr


def _gdtoolkit():
    try:
        from gdtoolkit.formatter import format_code
        from gdtoolkit.linter import lint_code
        from gdtoolkit.parser import parser
    except ImportError:
        _missing("gdtoolkit not installed: pip install gdtoolkit (GDScript 4 parser)")
    return parser, lint_code, format_code


def test_godot_addon_parses_lints_and_is_formatted() -> None:
    parser, lint_code, format_code = _gdtoolkit()
    scripts = sorted(GODOT_ADDON.glob("*.gd"))
    assert [p.name for p in scripts] == ["npcforge_client.gd", "plugin.gd"]
    for script in scripts:
        code = script.read_text()
        parser.parse(code)
        problems = lint_code(code)
        assert not problems, f"{script.name}: " + "; ".join(f"{p.line}: {p.description}" for p in problems)
        assert format_code(code, max_line_length=100) == code, f"{script.name}: run gdformat on it"
    config = (GODOT_ADDON / "plugin.cfg").read_text()
    assert '[plugin]' in config and 'script="plugin.gd"' in config


def test_godot_parser_rejects_broken_gdscript() -> None:
    # The parse check above means something only if the parser refuses what Godot would refuse.
    parser, _, _ = _gdtoolkit()
    from lark.exceptions import UnexpectedInput  # gdtoolkit's parser is built on lark

    code = (GODOT_ADDON / "npcforge_client.gd").read_text()
    assert "func poll() -> void:" in code
    with pytest.raises(UnexpectedInput):
        parser.parse(code.replace("func poll() -> void:", "func poll() -> void"))


def test_godot_client_surface() -> None:
    parser, _, _ = _gdtoolkit()
    tree = parser.parse((GODOT_ADDON / "npcforge_client.gd").read_text())
    statements = {(s.data, str(s.children[0])): s for s in tree.children if hasattr(s, "data") and s.children}
    assert ("classname_stmt", "NpcForgeClient") in statements and ("extends_stmt", "Node") in statements
    signals = {name: [str(arg.children[0]) for arg in s.children[1].children] if len(s.children) > 1 else []
               for (kind, name), s in statements.items() if kind == "signal_stmt"}
    assert signals["token_received"] == ["request_id", "text"]
    assert signals["sentence_received"] == ["request_id", "text"]
    assert signals["reply_finished"] == ["request_id", "result"]
    assert signals["error"] == ["request_id", "code", "message"]
    functions = {str(f.children[0].children[0]) for f in tree.iter_subtrees() if f.data == "func_def"}
    for name in ("connect_to_server", "chat", "cancel", "list_characters", "reset", "history", "poll", "_process",
                 "to_json"):
        assert name in functions, name


def _arity(header) -> tuple[int, int]:
    """(required, total) arguments of a parsed GDScript func_header; an argument with an `expr` has a default."""
    args = [a for a in header.children[1:] if getattr(a, "data", None) == "func_args"]
    params = args[0].children if args else []
    required = sum(1 for p in params if not any(getattr(c, "data", None) == "expr" for c in p.children))
    return required, len(params)


def test_godot_calls_match_definitions() -> None:
    # What the parser cannot see and Godot would refuse: a signal emitted with the wrong number of arguments,
    # a call to a function that does not exist or with the wrong number of arguments, a signal never emitted.
    parser, _, _ = _gdtoolkit()
    tree = parser.parse((GODOT_ADDON / "npcforge_client.gd").read_text())
    signals = {str(s.children[0]): len(s.children[1].children) if len(s.children) > 1 else 0
               for s in tree.children if getattr(s, "data", None) == "signal_stmt"}
    functions = {str(f.children[0].children[0]): _arity(f.children[0])
                 for f in tree.iter_subtrees() if f.data == "func_def"}  # static funcs hold a func_def too
    builtins = {"str", "int", "typeof", "is_nan", "is_inf", "type_string", "assert", "String", "PackedStringArray",
                "PackedByteArray"}
    emitted = set()
    for call in tree.iter_subtrees():
        args = len(call.children) - 1
        if call.data == "standalone_call":
            name = str(call.children[0])
            if name in functions:
                low, high = functions[name]
                assert low <= args <= high, f"{name}() called with {args} arguments"
            else:
                assert name in builtins, f"{name}() is neither defined here nor a known GDScript builtin"
        elif call.data == "getattr_call":
            parts = [str(c) for c in call.children[0].children]
            if len(parts) == 3 and parts[0] in signals and parts[2] == "emit":
                assert args == signals[parts[0]], f"{parts[0]}.emit() with {args} arguments"
                emitted.add(parts[0])
            if len(parts) == 3 and parts[0] in functions and parts[2] in ("call", "call_deferred"):
                low, high = functions[parts[0]]
                assert low <= args <= high, f"{parts[0]}.{parts[2]}() with {args} arguments"
    assert emitted == set(signals), f"declared but never emitted: {set(signals) - emitted}"
