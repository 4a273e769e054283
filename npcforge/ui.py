"""Shared command-line manners: JSON output, failures with exit code 1, progress bars on stderr."""
from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator

import click


class Failed(click.ClickException):
    """A command that did not do its job: message on stderr, exit code 1."""

    exit_code = 1


def emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@contextmanager
def progress(length: int, label: str, enabled: bool = True) -> Iterator[Any]:
    """A click progress bar on stderr (silent under --json or when stderr is not a terminal)."""
    with click.progressbar(length=length, label=label, file=sys.stderr, show_eta=True, show_pos=True,
                           hidden=not enabled) as bar:
        yield bar
