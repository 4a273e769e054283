"""npcforge's own character format (`characters/<id>.yaml`, docs/character-format.md) → Character fields.

`parse_yaml(text)` loads a document strictly (duplicate keys and aliases refused; errors carry line and column);
`from_yaml(doc, checker, stem) -> fields` maps it to the keyword arguments of `Character` (all but the source
facts), collecting problems in the `Checker`: unknown keys are errors so typos never pass silently.
"""
from __future__ import annotations

from typing import Any

import yaml

from builder.cardfiles import ContainerError
from builder.character import ID_PATTERN, Checker, Dialogue, LoreEntry, Turn, kind_of, slug

YAML_KEYS = ("id", "name", "description", "personality", "scenario", "speaking_style", "greeting", "greetings",
             "examples", "lore", "stop", "tags", "build", "system_prompt", "post_history_instructions", "creator",
             "creator_notes", "character_version", "extensions")
LORE_KEYS = ("keys", "content", "constant", "name", "insertion_order", "priority", "selective", "secondary_keys",
             "position")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one) and aliases (a few hundred
    bytes of nested aliases expand to gigabytes once anything serialises the result)."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in character files",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def from_yaml(doc: dict[str, Any], c: Checker, stem: str) -> dict[str, Any]:
    """Fields of a Character from a parsed YAML document; the id defaults to the slug of the file stem."""
    for key in doc:
        if key not in YAML_KEYS:
            c.add(str(key), f"unknown key; known keys: {', '.join(YAML_KEYS)}")
    if "id" in doc:
        cid = c.text(doc["id"], "id")
        if not ID_PATTERN.fullmatch(cid):
            c.add("id", f"{cid!r} is not a valid id (lower-case letters, digits, '_' or '-', at most 64, "
                        "starting with a letter or digit)")
    else:
        cid = slug(stem)
    if "greeting" in doc and "greetings" in doc:
        c.add("greeting", "give either greeting (one) or greetings (a list), not both")
    greetings = ([c.text(doc["greeting"], "greeting")] if "greeting" in doc
                 else c.texts(doc.get("greetings"), "greetings"))
    stop = doc.get("stop")
    extensions = c.mapping(doc.get("extensions"), "extensions")
    if "npcforge" in extensions:
        c.add("extensions.npcforge", "reserved for Tavern exports; use the top-level build/speaking_style/stop keys")
    return dict(
        id=cid,
        name=c.text(doc.get("name"), "name", required=True),
        description=c.text(doc.get("description"), "description", required=True),
        personality=c.text(doc.get("personality"), "personality"),
        scenario=c.text(doc.get("scenario"), "scenario"),
        speaking_style=c.text(doc.get("speaking_style"), "speaking_style"),
        greetings=[g for g in greetings if g],
        examples=_yaml_examples(doc.get("examples"), c),
        lore=_yaml_lore(doc.get("lore"), c),
        stop=c.texts([stop] if isinstance(stop, str) else stop, "stop", strip=False),
        system_prompt=c.text(doc.get("system_prompt"), "system_prompt"),
        post_history_instructions=c.text(doc.get("post_history_instructions"), "post_history_instructions"),
        tags=c.texts(doc.get("tags"), "tags"),
        creator=c.text(doc.get("creator"), "creator"),
        creator_notes=c.text(doc.get("creator_notes"), "creator_notes"),
        character_version=c.text(doc.get("character_version"), "character_version"),
        extensions=extensions,
        build=c.build(doc.get("build"), "build"),
    )


def _yaml_examples(value: Any, c: Checker) -> list[Dialogue]:
    if value is None:
        return []
    if not isinstance(value, list):
        c.add("examples", f"expected a list of exchanges, got {kind_of(value)}")
        return []
    dialogues = []
    for i, item in enumerate(value):
        exchanges = item if isinstance(item, list) else [item]
        turns: Dialogue = []
        for j, exchange in enumerate(exchanges):
            where = f"examples[{i}][{j}]" if isinstance(item, list) else f"examples[{i}]"
            if not isinstance(exchange, dict) or not exchange:
                c.add(where, f"expected {{user: ..., char: ...}}, got {kind_of(exchange)}")
                continue
            for key in exchange:
                if key not in ("user", "char"):
                    c.add(f"{where}.{key}", "unknown key; an exchange has only 'user' and 'char'")
            for role in ("user", "char"):
                if role in exchange:
                    turns.append(Turn(role, c.text(exchange[role], f"{where}.{role}", required=True)))
        if turns:
            dialogues.append(turns)
    return dialogues


def _yaml_lore(value: Any, c: Checker) -> list[LoreEntry]:
    if value is None:
        return []
    if not isinstance(value, list):
        c.add("lore", f"expected a list of facts, got {kind_of(value)}")
        return []
    entries = []
    for i, item in enumerate(value):
        where = f"lore[{i}]"
        if isinstance(item, str):
            entries.append(LoreEntry(keys=[], content=c.text(item, where, required=True), constant=True))
            continue
        if not isinstance(item, dict):
            c.add(where, f"expected a fact (text) or {{keys: [...], content: ...}}, got {kind_of(item)}")
            continue
        for key in item:
            if key not in LORE_KEYS:
                c.add(f"{where}.{key}", f"unknown key; known keys: {', '.join(LORE_KEYS)}")
        entry = LoreEntry(
            keys=c.texts(item.get("keys"), f"{where}.keys"),
            content=c.text(item.get("content"), f"{where}.content", required=True),
            constant=c.flag(item.get("constant"), f"{where}.constant"),
            insertion_order=c.integer(item.get("insertion_order"), f"{where}.insertion_order", 100),
            name=c.text(item.get("name"), f"{where}.name"),
            priority=c.integer(item.get("priority"), f"{where}.priority", None),
            selective=c.flag(item.get("selective"), f"{where}.selective"),
            secondary_keys=c.texts(item.get("secondary_keys"), f"{where}.secondary_keys"),
            position=c.text(item.get("position"), f"{where}.position"),
        )
        if not entry.keys and not entry.constant:
            c.add(f"{where}.keys", "no keywords: give keys, or write the fact as plain text to make it always on")
        entries.append(entry)
    return entries


def parse_yaml(text: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ContainerError("yaml", f"invalid YAML at {at}{problem}") from None
    except RecursionError:
        raise ContainerError("yaml", "invalid YAML: nested too deeply") from None
