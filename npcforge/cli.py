"""The one command-line entry point. Thin: each command lives in its own `npcforge/cmd_*.py` module.

Commands load lazily so that `npcforge --help` is instant and `serve`/`chat` work in an install without torch.
Exit codes: 0 ok, 1 failed (a clear message on stderr), 2 usage error.
"""
from __future__ import annotations

import importlib
import logging

import click

from npcforge import __version__

# name -> "module:attribute" of a click command. Only commands that work are listed here.
COMMANDS: dict[str, str] = {
    "model": "npcforge.cmd_model:model",
    "validate": "npcforge.cmd_cards:validate",
    "export-card": "npcforge.cmd_cards:export_card",
    "serve": "npcforge.cmd_serve:serve",
    "chat": "npcforge.cmd_serve:chat",
    "build": "npcforge.cmd_build:build",
    "inspect": "npcforge.cmd_build:inspect",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="npcforge")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """npcforge: build small per-character NPC models offline, serve many at once in the game.

    \b
    Typical use:
      npcforge validate characters/
      npcforge build characters/ -o dist/
      npcforge serve dist/
    """
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
