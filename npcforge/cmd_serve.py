"""`npcforge serve` (the bridge server a game starts) and `npcforge chat` (a terminal chat through the bridge).

serve: DIST (artifact folders) → listening NDJSON/HTTP server, one ready line on stdout, optional JSON ready file;
SIGINT/SIGTERM shut it down cleanly (exit 0). chat: talks to a server started in-process on a free loopback port
(or to `--connect HOST:PORT|SOCKET`); interactive, or one-shot with `-m TEXT [--json]`.
No torch import on these paths: a game build ships runtime + bridge only.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from npcforge.ui import Failed, emit_json


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def _open_pool(dist: Path, memory_budget: float | None, threads: int | None) -> Any:
    from runtime import NPCPool
    from runtime.errors import NPCRuntimeError

    try:
        return NPCPool(dist, memory_budget_mb=memory_budget, threads=threads)
    except (NPCRuntimeError, OSError, ValueError) as e:
        raise Failed(f"{dist}: cannot serve: {e}") from None


def _write_atomic(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


@click.command("serve")
@click.argument("dist", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), help="TCP port (0 = a free one). Default 7411 unless "
                                                            "--socket is given.")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), help="Listen on this Unix socket too.")
@click.option("--http-port", type=click.IntRange(0, 65535), help="Serve OpenAI-compatible HTTP on this port.")
@click.option("--host", help="Address to bind (default 127.0.0.1). Non-loopback requires --token.")
@click.option("--token", envvar="NPCFORGE_TOKEN", help="Clients must send this token (env NPCFORGE_TOKEN).")
@click.option("--memory-budget", type=click.FloatRange(min=1), metavar="MB", help="Model memory allowed (LRU).")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads per model call (default 1: one reply per core decodes faster in aggregate).")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Write {pid, tcp, unix, http, characters} as JSON here once listening.")
def serve(dist: Path, port: int | None, socket_path: str | None, http_port: int | None, host: str | None,
          token: str | None, memory_budget: float | None, threads: int | None, ready_file: Path | None) -> None:
    """Serve the characters of DIST to game engines (docs/protocol.md)."""
    from plugin_bridge.protocol import ServerConfig
    from plugin_bridge.server import BridgeServer

    config = ServerConfig()
    if host is not None and not _is_loopback(host) and not token:
        raise click.UsageError(f"--host {host} is not a loopback address: anyone on the network could use the "
                               f"models. Give --token (or NPCFORGE_TOKEN) too, or bind 127.0.0.1.")
    if port is None and socket_path is None:
        port = config.port
    if ready_file is not None and ready_file.exists():
        ready_file.unlink()  # a stale file from an earlier run must not look like this server
    pool = _open_pool(dist, memory_budget, threads)

    async def main() -> None:
        server = BridgeServer(pool, config, token)
        try:
            addresses = await server.start(host or config.host, port, socket_path, http_port)
        except OSError as e:
            raise Failed(f"cannot listen: {e}") from None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.request_stop)
        if ready_file is not None:
            _write_atomic(ready_file, addresses.ready_record(sorted(server.bridge.characters)))
        click.echo(addresses.ready_line())
        sys.stdout.flush()
        try:
            await server.serve_until_stopped()
        finally:
            if ready_file is not None and ready_file.exists():
                ready_file.unlink()

    try:
        asyncio.run(main())
    finally:
        pool.close()


def _connect_args(connect: str) -> dict[str, Any]:
    if "/" in connect:
        return {"unix_path": connect}
    host, _, port = connect.rpartition(":")
    if not host or not port.isdigit():
        raise click.UsageError(f"--connect {connect}: expected HOST:PORT or a Unix socket path")
    return {"host": host, "port": int(port)}


@click.command("chat")
@click.argument("args", nargs=-1, metavar="[DIST] [ID]")
@click.option("--connect", metavar="HOST:PORT|SOCKET", help="Use a running server instead of starting one (then "
                                                           "the only argument is the character ID).")
@click.option("--token", envvar="NPCFORGE_TOKEN", help="The server's token, with --connect.")
@click.option("-m", "--message", help="Send this one message, print the reply, exit.")
@click.option("--json", "as_json", is_flag=True, help="With -m: print the done event as JSON.")
@click.option("--session", default="terminal", show_default=True, help="Conversation name.")
@click.option("--max-tokens", type=click.IntRange(1, 4096))
@click.option("--temperature", type=click.FloatRange(0, 2))
@click.option("--seed", type=click.IntRange(min=0))
@click.option("--memory-budget", type=click.FloatRange(min=1), metavar="MB")
def chat(args: tuple[str, ...], connect: str | None, token: str | None, message: str | None, as_json: bool,
         session: str, max_tokens: int | None, temperature: float | None, seed: int | None,
         memory_budget: float | None) -> None:
    """Chat with a character of DIST in the terminal, through the bridge.

    \b
    Commands: /switch ID, /list, /reset, /quit. Ctrl-C stops the current reply; Ctrl-C or Ctrl-D at the prompt
    quits. One-shot: npcforge chat dist/ magda -m "Hello" [--json]
    """
    from plugin_bridge.clients.python.npcforge_client import BridgeError, Client

    if connect is not None:
        if len(args) > 1:
            raise click.UsageError("with --connect, give only the character ID")
        dist, character = None, (args[0] if args else None)
    else:
        if not args or len(args) > 2:
            raise click.UsageError("give DIST (the artifacts folder) and optionally a character ID")
        dist, character = Path(args[0]), (args[1] if len(args) > 1 else None)
        if not dist.is_dir():
            raise click.UsageError(f"DIST {dist}: not a folder")
    if as_json and message is None:
        raise click.UsageError("--json needs -m TEXT")
    params = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}

    server = pool = None
    try:
        if dist is not None:
            from plugin_bridge.server import ThreadedServer

            pool = _open_pool(dist, memory_budget, None)
            server = ThreadedServer(pool, port=0)
            address: dict[str, Any] = {"host": server.addresses.host, "port": server.addresses.tcp_port}
            token = None
        else:
            address = _connect_args(connect)  # type: ignore[arg-type]
        try:
            client = Client(**address, token=token, timeout=None, client_name="npcforge chat")
        except OSError as e:
            raise Failed(f"cannot connect to the server: {e}") from None
        with client:
            characters = {c["id"]: c for c in client.list()}
            if not characters:
                raise Failed("the server has no characters")
            character = character or sorted(characters)[0]
            if character not in characters:
                raise Failed(f"unknown character {character!r} (known: {', '.join(sorted(characters))})")
            if message is not None:
                _one_shot(client, character, session, message, as_json, params)
            else:
                _interactive(client, characters, character, session, params)
    except BridgeError as e:
        raise Failed(str(e)) from None
    finally:
        if server is not None:
            server.stop()
        if pool is not None:
            pool.close()


def _one_shot(client: Any, character: str, session: str, text: str, as_json: bool, params: dict) -> None:
    if as_json:
        done = client.chat(character, session, text, **params)
        emit_json({"character": character, "session": session,
                   **{k: v for k, v in done.items() if k not in ("id", "event")}})
        return
    for delta in client.stream(character, session, text, **params).tokens():
        click.echo(delta, nl=False)
    click.echo()


def _interactive(client: Any, characters: dict[str, dict], character: str, session: str, params: dict) -> None:
    def greet(cid: str) -> None:
        c = characters[cid]
        click.echo(f"-- talking to {c['name']} ({cid}), session {session!r}. /switch ID, /list, /reset, /quit")
        if c.get("greeting"):
            click.echo(f"{c['name']}: {c['greeting']}")

    greet(character)
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        line = line.strip()
        if not line:
            continue
        if not sys.stdin.isatty():
            click.echo(line)  # a scripted conversation reads like a typed one
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip()
            if cmd == "/quit":
                return
            if cmd == "/list":
                click.echo(" ".join(sorted(characters)))
            elif cmd == "/reset":
                client.reset(character, session)
                click.echo(f"-- conversation with {characters[character]['name']} forgotten")
            elif cmd == "/switch" and arg in characters:
                character = arg
                greet(character)
            elif cmd == "/switch":
                click.echo(f"-- unknown character {arg!r}; known: {' '.join(sorted(characters))}")
            else:
                click.echo("-- commands: /switch ID, /list, /reset, /quit")
            continue
        _reply(client, characters[character]["name"], character, session, line, params)


def _reply(client: Any, name: str, character: str, session: str, text: str, params: dict) -> None:
    """Stream one reply; Ctrl-C asks the server to cancel it and waits for its end."""
    stream = client.stream(character, session, text, **params)
    click.echo(f"{name}: ", nl=False)
    while stream.done is None:
        try:
            for event in stream:  # a fresh iterator after an interrupt: the stream's state is in `stream`
                if event["event"] == "token":
                    click.echo(event["text"], nl=False)
        except KeyboardInterrupt:
            stream.cancel()
    suffix = " [cancelled]" if stream.done and stream.done["finish_reason"] == "cancelled" else ""
    click.echo(suffix)
