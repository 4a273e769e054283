"""Character files → one normalised `Character` record, and the persona prompt every stage uses.

Inputs: our YAML format (`characters/<id>.yaml`, docs/character-format.md; builder.yamlcard) or a Tavern card
(V1/V2/V3 `.json`, `.png` with a `chara`/`ccv3` text chunk, `.charx` zip; builder.tavern, builder.cardfiles).
The records themselves live in builder.character and are re-exported here.
Outputs: `load_character(path) -> Character` (raises `CardError` listing every `CardProblem` of the file),
`load_roster(dir) -> Roster` (one bad file never stops the others), `persona_prompt(character, user_name)` (THE
system prompt of teacher, evaluation and runtime) and `character_record(character, user_name)` (character.json).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from builder.cardfiles import ContainerError, charx_card_text, png_card_text
from builder.character import (CARD_SUFFIXES, SETTINGS, CardError, CardProblem, CardSettings, Character, Checker,
                               Dialogue, LoreEntry, Roster, Turn, kind_of, slug)
from builder.tavern import from_tavern
from builder.yamlcard import from_yaml, parse_yaml

log = logging.getLogger(__name__)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ContainerError(where, f"not UTF-8 text (line {line}, byte {e.start}); save the file as UTF-8") from None


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ContainerError(where, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise ContainerError(where, "invalid JSON: nested too deeply") from None


def load_character(path: str | Path, settings: CardSettings = SETTINGS) -> Character:
    """Parse and check one character file of any supported format."""
    path = Path(path)
    c = Checker(str(path), settings)
    suffix = path.suffix.lower()
    caps = {".png": settings.max_png_bytes, ".charx": settings.max_charx_bytes}
    try:
        if suffix not in CARD_SUFFIXES:
            raise ContainerError("file", f"unknown file type {suffix or '(none)'!r}; "
                                         f"use one of {', '.join(CARD_SUFFIXES)}")
        size = path.stat().st_size
        cap = caps.get(suffix, settings.max_text_file_bytes)
        if size > cap:
            raise ContainerError("file", f"{size} bytes, more than the limit of {cap} for {suffix} files")
        data = path.read_bytes()
        if suffix in (".yaml", ".yml"):
            doc, fmt = parse_yaml(_decode(data, "encoding")), "yaml"
        elif suffix == ".json":
            doc, fmt = _parse_json(_decode(data, "encoding"), "json"), None
        elif suffix == ".png":
            keyword, text = png_card_text(data)
            doc, fmt = _parse_json(text, keyword), None
        else:
            text = charx_card_text(data, settings.max_charx_unpacked, settings.max_charx_ratio,
                                   settings.max_text_file_bytes)
            doc, fmt = _parse_json(text, "card.json"), "charx"
    except ContainerError as e:
        raise CardError([CardProblem(str(path), e.field, e.message)]) from None
    except OSError as e:
        raise CardError([CardProblem(str(path), "file", f"cannot read: {e.strerror or e}")]) from None
    if not isinstance(doc, dict):
        raise CardError([CardProblem(str(path), "file", f"expected a mapping of fields at the top level, "
                                                        f"got {kind_of(doc) if doc is not None else 'nothing'}")])
    if fmt == "yaml":
        fields = from_yaml(doc, c, path.stem)
    else:
        fields, version = from_tavern(doc, c)
        fields["id"] = slug(path.stem)
        fmt = fmt or (version if suffix == ".json" else f"png-{'v3' if version == 'v3' else 'v2'}")
    if not fields["id"] and not c.problems:
        c.add("id", f"cannot derive an id from the file name; rename the file, e.g. to guard-captain{suffix}")
    if c.problems:
        raise CardError(c.problems)
    return Character(**fields, source=path, source_format=fmt, card_sha256=hashlib.sha256(data).hexdigest())


def load_roster(directory: str | Path, settings: CardSettings = SETTINGS) -> Roster:
    """Every character file in a folder (not recursive), sorted by file name; other files are skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        return Roster([], [CardProblem(str(directory), "folder", "not a folder; give the folder of character files")])
    characters: list[Character] = []
    problems: list[CardProblem] = []
    owner: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in CARD_SUFFIXES:
            log.info("%s: skipped (not a character file: %s)", path, ", ".join(CARD_SUFFIXES))
            continue
        try:
            character = load_character(path, settings)
        except CardError as e:
            problems.extend(e.problems)
            continue
        if character.id in owner:
            problems.append(CardProblem(str(path), "id", f"duplicate id {character.id!r}, already used by "
                                                         f"{owner[character.id]}; rename one file or set another id"))
            continue
        owner[character.id] = path
        characters.append(character)
    if not characters and not problems:
        problems.append(CardProblem(str(directory), "folder", f"no character files ({', '.join(CARD_SUFFIXES)})"))
    return Roster(characters, problems)


# --- prompts -----------------------------------------------------------------------------------------------------

_MACRO = re.compile(r"\{\{(char|user)\}\}|<(BOT|USER)>", re.IGNORECASE)


def substitute(text: str, char_name: str, user_name: str) -> str:
    """Expand {{char}}/{{user}} (any case) and the V1 forms <BOT>/<USER>."""
    return _MACRO.sub(lambda m: char_name if (m[1] or m[2]).lower() in ("char", "bot") else user_name, text)


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if len(w) > 3}


def _default_prompt(ch: Character, settings: CardSettings) -> str:
    """Our prompt template with macros still in: short sections a 135M chat model follows."""
    head = [f"You are {ch.name}, speaking with {{{{user}}}}.", ch.description]
    traits = [f"{label}: {value}" for label, value in (("Personality", ch.personality), ("Situation", ch.scenario),
                                                        ("How you speak", ch.speaking_style)) if value]
    # card authors often restate the description as facts; every repeated token costs prefill and context
    known = _words(" ".join([ch.description, ch.personality, ch.scenario]))
    facts = [e for e in sorted((e for e in ch.lore if e.constant), key=lambda e: e.insertion_order)
             if len(_words(e.content) & known) < settings.redundant_fact_overlap * max(len(_words(e.content)), 1)]
    sections = ["\n".join(head), "\n".join(traits)]
    if facts:
        sections.append("Facts you know:\n" + "\n".join(f"- {e.content}" for e in facts))
    tail = f"Stay in character as {ch.name}. Answer {{{{user}}}} briefly, in 1 to 3 sentences."
    examples: list[str] = []
    for dialogue in ch.examples[:settings.max_prompt_examples]:
        text = "\n".join(f"{'{{user}}' if t.role == 'user' else ch.name}: {t.text}" for t in dialogue)
        size = sum(map(len, sections + examples + [text, tail])) + 2 * (len(sections) + len(examples) + 2)
        if examples and size > settings.prompt_budget_chars:
            break  # the first example always goes in: it shows the voice better than any description
        examples.append(text)
    if examples:
        sections.append(("Example:\n" if len(examples) == 1 else "Examples:\n") + "\n\n".join(examples))
    return "\n\n".join(s for s in sections + [tail] if s)


def persona_prompt(character: Character, user_name: str = "Traveler", settings: CardSettings = SETTINGS) -> str:
    """THE system prompt of this character (teacher, evaluation and runtime all use exactly this)."""
    prompt = _default_prompt(character, settings)
    if character.system_prompt:
        prompt = re.sub(r"\{\{original\}\}", lambda _: prompt, character.system_prompt, flags=re.IGNORECASE)
    return substitute(prompt, character.name, user_name)


def character_record(character: Character, user_name: str = "Traveler",
                     settings: CardSettings = SETTINGS) -> dict[str, Any]:
    """The `character.json` of an artifact: everything the runtime needs, macros expanded."""
    def render(text: str) -> str:
        return substitute(text, character.name, user_name)

    greetings = [render(g) for g in character.greetings]
    # small models run on into the user's next line; stopping there costs nothing
    stop = list(dict.fromkeys([render(s) for s in character.stop] + [f"\n{user_name}:"]))
    instructions = re.sub(r"\{\{original\}\}", "", character.post_history_instructions, flags=re.IGNORECASE)
    return {
        "id": character.id,
        "name": character.name,
        "system_prompt": persona_prompt(character, user_name, settings),
        "greeting": greetings[0] if greetings else "",
        "greetings": greetings,
        "stop": stop,
        "post_history_instructions": render(instructions).strip(),
    }


__all__ = ["CARD_SUFFIXES", "CardError", "CardProblem", "CardSettings", "Character", "Dialogue", "LoreEntry",
           "Roster", "SETTINGS", "Turn", "character_record", "load_character", "load_roster",
           "persona_prompt", "slug", "substitute"]
