"""`npcforge validate DIR` (check every character file) and `npcforge export-card ID` (one of ours as a Tavern card).

validate prints one `file: field: message` line per problem and a summary; exit 0 when clean, 1 otherwise.
export-card writes a Tavern V2 card (`.json`, or `.png` with a generated portrait) that loads back to an equal
Character, so our NPCs open in Tavern front-ends and card editors.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click

from npcforge.ui import Failed, emit_json


@click.command()
@click.argument("directory", type=click.Path(path_type=Path), default="characters")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def validate(directory: Path, as_json: bool) -> None:
    """Check every character file in DIRECTORY (default: characters/)."""
    from builder.cards import load_roster, persona_prompt

    roster = load_roster(directory)
    n, m = len(roster.characters), len(roster.problems)
    summary = f"{n} character{'s' * (n != 1)} ok, {m} problem{'s' * (m != 1)}"
    if as_json:
        emit_json({
            "ok": not roster.problems,
            "characters": [{"id": c.id, "name": c.name, "file": str(c.source), "format": c.source_format,
                            "card_sha256": c.card_sha256, "prompt_chars": len(persona_prompt(c))}
                           for c in roster.characters],
            "problems": [{"file": p.file, "field": p.field, "message": p.message} for p in roster.problems],
        })
    else:
        for problem in roster.problems:
            click.echo(str(problem))
        if not roster.problems:
            click.echo(summary)
    if roster.problems:
        raise Failed(summary)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would hide the card from the game's asset tools
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@click.command("export-card")
@click.argument("character_id")
@click.option("--format", "fmt", type=click.Choice(["png", "json"]), default="png", show_default=True)
@click.option("--characters", "directory", type=click.Path(path_type=Path), default="characters",
              show_default=True, help="Folder of character files.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write (default: ID.png / ID.json).")
def export_card(character_id: str, fmt: str, directory: Path, output: Path | None) -> None:
    """Write character CHARACTER_ID as a Tavern V2 card (PNG with a generated portrait, or JSON)."""
    from builder.cardfiles import write_png_card
    from builder.cards import load_roster, slug
    from builder.tavern import to_tavern_v2

    roster = load_roster(directory)
    found = [c for c in roster.characters if c.id == character_id]
    if not found:
        mine = [str(p) for p in roster.problems if Path(p.file).stem == character_id]
        known = ", ".join(c.id for c in roster.characters) or "none"
        raise Failed("\n".join(mine) if mine else
                     f"no character {character_id!r} in {directory} (characters there: {known})")
    character = found[0]
    output = output or Path(f"{character.id}.{fmt}")
    card = to_tavern_v2(character)
    data = (write_png_card(card, character.id) if fmt == "png"
            else (json.dumps(card, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    try:
        _write_atomic(output, data)
    except OSError as e:
        raise Failed(f"{output}: cannot write: {e.strerror or e}") from None
    click.echo(f"wrote {output} ({len(data)} bytes, Tavern V2 {fmt} card of {character.name})")
    if slug(output.stem) != character.id:
        click.echo(f"note: a card's id comes from its file name; {output.name} loads as id {slug(output.stem)!r}",
                   err=True)
