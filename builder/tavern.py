"""Tavern character cards (V1, V2 `chara_card_v2`, V3 `chara_card_v3`) ↔ our Character fields.

`from_tavern(card, checker) -> (fields, version)`: the parsed card JSON → keyword arguments of `Character` (all but
id and source facts), problems collected in the `Checker`. The mapping (docs/character-format.md): first_mes and
alternate_greetings → greetings; mes_example split on `<START>` lines into dialogues; character_book entries →
lore (disabled ones dropped); `extensions` kept verbatim except `extensions.npcforge` (build, speaking_style,
stop), which holds what our format has and Tavern's lacks.
`to_tavern_v2(character) -> dict`: the inverse, a V2 card that loads back to an equal Character.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from builder.character import Character, Checker, Dialogue, LoreEntry, Turn

log = logging.getLogger(__name__)

V1_FIELDS = ("name", "description", "personality", "scenario", "first_mes", "mes_example")
NPCFORGE_KEYS = ("speaking_style", "stop", "build")
_USER_SPEAKERS = ("{{user}}", "<user>", "user", "you")


def parse_mes_example(text: str, char_name: str) -> list[Dialogue]:
    """`<START>`-separated example chats → dialogues. A line opening with a speaker prefix starts a turn
    ({{user}}/<USER>/User/You or {{char}}/<BOT>/the character's name or first name); other lines continue it."""
    names = sorted({char_name, *char_name.split()[:1]} - {""}, key=len, reverse=True)
    speakers = [re.escape(s) for s in (*_USER_SPEAKERS, "{{char}}", "<bot>", *names)]
    prefix = re.compile(rf"\s*({'|'.join(speakers)})\s*:[ \t]?(.*)", re.IGNORECASE | re.DOTALL)
    dialogues: list[Dialogue] = []
    turns: list[tuple[str, list[str]]] = []

    def flush() -> None:
        dialogue = [Turn(role, "\n".join(lines).strip()) for role, lines in turns]
        dialogue = [t for t in dialogue if t.text]
        if dialogue:
            dialogues.append(dialogue)
        turns.clear()

    for line in text.splitlines():
        if line.strip().lower() == "<start>":
            flush()
        elif m := prefix.fullmatch(line):
            turns.append(("user" if m[1].lower() in _USER_SPEAKERS else "char", [m[2]]))
        elif turns:
            turns[-1][1].append(line)
        elif line.strip():
            log.debug("mes_example: narration outside any turn dropped: %r", line[:60])
    flush()
    return dialogues


def format_mes_example(examples: list[Dialogue]) -> str:
    return "\n".join("<START>\n" + "\n".join(f"{{{{{t.role}}}}}: {t.text}" for t in dialogue)
                     for dialogue in examples)


def _present(value: Any) -> Any:
    """Tavern editors leave empty strings in lists (keys, greetings); they mean nothing."""
    return [v for v in value if v != ""] if isinstance(value, list) else value


def _lore(book_value: Any, where: str, c: Checker) -> list[LoreEntry]:
    if book_value is None:
        return []
    book = c.mapping(book_value, where)
    entries = book.get("entries", [])
    if not isinstance(entries, list):
        c.add(f"{where}.entries", "expected a list of entries")
        return []
    lore = []
    for i, e in enumerate(entries):
        at = f"{where}.entries[{i}]"
        if not isinstance(e, dict):
            c.add(at, "expected an entry mapping")
            continue
        if not c.flag(e.get("enabled"), f"{at}.enabled", True):
            continue
        content = c.text(e.get("content"), f"{at}.content")
        if not content:
            log.debug("%s: %s has no content; skipped", c.file, at)
            continue
        lore.append(LoreEntry(
            keys=c.texts(_present(e.get("keys")), f"{at}.keys"),
            content=content,
            constant=c.flag(e.get("constant"), f"{at}.constant"),
            insertion_order=c.integer(e.get("insertion_order"), f"{at}.insertion_order", 100),
            name=c.text(e.get("name") or e.get("comment"), f"{at}.name"),
            priority=c.integer(e.get("priority"), f"{at}.priority", None),
            selective=c.flag(e.get("selective"), f"{at}.selective"),
            secondary_keys=c.texts(_present(e.get("secondary_keys")), f"{at}.secondary_keys"),
            position=c.text(e.get("position"), f"{at}.position"),
            extensions=c.mapping(e.get("extensions"), f"{at}.extensions"),
        ))
    return lore


def from_tavern(card: dict[str, Any], c: Checker) -> tuple[dict[str, Any], str]:
    """Fields of a Character from a Tavern card, and the card version ("v1" | "v2" | "v3")."""
    spec = card.get("spec")
    if spec is None:
        version, data, p = "v1", {k: card.get(k) for k in V1_FIELDS}, ""
    elif spec in ("chara_card_v2", "chara_card_v3"):
        version, data, p = spec[-2:], card.get("data"), "data."
        if not isinstance(data, dict):
            c.add("data", f"missing or not a mapping: a {spec} card keeps its fields under 'data'")
            return {}, version
    else:
        c.add("spec", f"unknown card spec {spec!r}; expected chara_card_v2, chara_card_v3, or a V1 card without spec")
        return {}, "v2"
    name = c.text(data.get("name"), f"{p}name", required=True)
    greetings = [c.text(data.get("first_mes"), f"{p}first_mes")]
    greetings += c.texts(_present(data.get("alternate_greetings")), f"{p}alternate_greetings")
    extensions = dict(c.mapping(data.get("extensions"), f"{p}extensions"))
    ours = c.mapping(extensions.pop("npcforge", None), f"{p}extensions.npcforge")
    for key in ours:
        if key not in NPCFORGE_KEYS:
            c.add(f"{p}extensions.npcforge.{key}", f"unknown key; known keys: {', '.join(NPCFORGE_KEYS)}")
    stop = ours.get("stop")
    fields = dict(
        name=name,
        description=c.text(data.get("description"), f"{p}description", required=True),
        personality=c.text(data.get("personality"), f"{p}personality"),
        scenario=c.text(data.get("scenario"), f"{p}scenario"),
        speaking_style=c.text(ours.get("speaking_style"), f"{p}extensions.npcforge.speaking_style"),
        greetings=[g for g in greetings if g],
        examples=parse_mes_example(c.text(data.get("mes_example"), f"{p}mes_example"), name),
        lore=_lore(data.get("character_book"), f"{p}character_book", c),
        stop=c.texts([stop] if isinstance(stop, str) else stop, f"{p}extensions.npcforge.stop", strip=False),
        system_prompt=c.text(data.get("system_prompt"), f"{p}system_prompt"),
        post_history_instructions=c.text(data.get("post_history_instructions"), f"{p}post_history_instructions"),
        tags=c.texts(_present(data.get("tags")), f"{p}tags"),
        creator=c.text(data.get("creator"), f"{p}creator"),
        creator_notes=c.text(data.get("creator_notes"), f"{p}creator_notes"),
        character_version=c.text(data.get("character_version"), f"{p}character_version"),
        extensions=extensions,
        build=c.build(ours.get("build"), f"{p}extensions.npcforge.build"),
    )
    return fields, version


def _book_entry(e: LoreEntry) -> dict[str, Any]:
    entry: dict[str, Any] = {"keys": e.keys, "content": e.content, "extensions": e.extensions, "enabled": True,
                             "insertion_order": e.insertion_order, "constant": e.constant}
    optional = {"name": e.name, "priority": e.priority, "selective": e.selective,
                "secondary_keys": e.secondary_keys, "position": e.position}
    entry.update((k, v) for k, v in optional.items() if v not in ("", None, False, []))
    return entry


def to_tavern_v2(ch: Character) -> dict[str, Any]:
    """A Character as a Tavern V2 card (what other tools import); our extra fields ride in extensions.npcforge."""
    extensions = dict(ch.extensions)
    ours = {"speaking_style": ch.speaking_style, "stop": ch.stop, "build": ch.build}
    if any(ours.values()):
        extensions["npcforge"] = {k: v for k, v in ours.items() if v}
    data: dict[str, Any] = {
        "name": ch.name, "description": ch.description, "personality": ch.personality, "scenario": ch.scenario,
        "first_mes": ch.greetings[0] if ch.greetings else "", "mes_example": format_mes_example(ch.examples),
        "creator_notes": ch.creator_notes, "system_prompt": ch.system_prompt,
        "post_history_instructions": ch.post_history_instructions, "alternate_greetings": ch.greetings[1:],
        "tags": ch.tags, "creator": ch.creator, "character_version": ch.character_version, "extensions": extensions,
    }
    if ch.lore:
        data["character_book"] = {"entries": [_book_entry(e) for e in ch.lore], "extensions": {}}
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}
