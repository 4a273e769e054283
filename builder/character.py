"""The character record: `Character` and its parts, the problems a character file can have, and their checker.

Every card format (builder.yamlcard, builder.tavern) fills a `Character` through a `Checker`, which reads typed
values out of parsed YAML/JSON and collects a `CardProblem(file, field, message)` for each bad one instead of
stopping, so a user sees every problem of a file at once. `CardSettings` holds the caps and prompt budget.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from builder.config import ConfigError, resolve_config


@dataclass(frozen=True)
class CardSettings:
    max_text_bytes: int = 32 * 1024  # per text field: room for any description, none can swamp a prompt
    max_text_file_bytes: int = 5 * 1024 * 1024  # .yaml/.json; V3 JSON may embed small data-URI assets
    max_png_bytes: int = 20 * 1024 * 1024  # portraits from card sites are 0.2-8 MiB
    max_charx_bytes: int = 50 * 1024 * 1024  # CHARX carries assets (images, sounds)
    max_charx_unpacked: int = 200 * 1024 * 1024  # declared total of all entries, checked before reading any
    max_charx_ratio: float = 100.0  # zip bombs compress 1000:1 and more; images and JSON stay far below 100:1
    prompt_budget_chars: int = 1400  # ≈ 350 SmolLM2 tokens at ~4 chars/token: one cheap prefix-cache prefill
    max_prompt_examples: int = 3  # a 135M model imitates 1-3 exchanges; more only cost context
    redundant_fact_overlap: float = 0.85  # an always-on fact whose words the description already holds is dropped


SETTINGS = CardSettings()
SourceFormat = Literal["yaml", "v1", "v2", "v3", "png-v2", "png-v3", "charx"]
CARD_SUFFIXES = (".yaml", ".yml", ".json", ".png", ".charx")
ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


@dataclass(frozen=True)
class Turn:
    role: Literal["user", "char"]
    text: str


Dialogue = list[Turn]


@dataclass
class LoreEntry:
    keys: list[str]  # keyword triggers; empty for always-on facts
    content: str
    constant: bool = False  # always in the prompt (our plain-string lore), regardless of keys
    insertion_order: int = 100  # the Tavern default; lower comes first
    name: str = ""
    priority: int | None = None
    selective: bool = False  # Tavern: also needs one of secondary_keys
    secondary_keys: list[str] = field(default_factory=list)
    position: str = ""  # Tavern: before_char | after_char
    extensions: dict[str, Any] = field(default_factory=dict)


@dataclass
class Character:
    """One NPC. Equality compares content only: the same character from a YAML and a PNG file is equal."""

    id: str
    name: str
    description: str
    personality: str = ""
    scenario: str = ""
    speaking_style: str = ""
    greetings: list[str] = field(default_factory=list)
    examples: list[Dialogue] = field(default_factory=list)
    lore: list[LoreEntry] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    system_prompt: str = ""  # card override template; {{original}} stands for our default prompt
    post_history_instructions: str = ""
    tags: list[str] = field(default_factory=list)
    creator: str = ""
    creator_notes: str = ""  # for humans; never enters a prompt
    character_version: str = ""
    extensions: dict[str, Any] = field(default_factory=dict)  # Tavern extensions, kept verbatim
    build: dict[str, Any] = field(default_factory=dict)  # BuildConfig overrides
    source: Path | None = field(default=None, compare=False)
    source_format: SourceFormat = field(default="yaml", compare=False)
    card_sha256: str = field(default="", compare=False)


@dataclass(frozen=True)
class CardProblem:
    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


class CardError(ValueError):
    """A character file cannot be used; `problems` lists every reason found."""

    def __init__(self, problems: list[CardProblem]):
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


@dataclass
class Roster:
    characters: list[Character]
    problems: list[CardProblem]


class Checker:
    """Reads typed values out of parsed YAML/JSON, collecting a problem for each bad one instead of stopping."""

    def __init__(self, file: str, settings: CardSettings):
        self.file, self.settings, self.problems = file, settings, []

    def add(self, where: str, message: str) -> None:
        self.problems.append(CardProblem(self.file, where, message))

    def text(self, value: Any, where: str, required: bool = False, strip: bool = True) -> str:
        if value is None:
            value = ""
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)  # character_version: 1.2 is a number to YAML
        elif not isinstance(value, str):
            self.add(where, f"expected text, got {kind_of(value)}")
            return ""
        if strip:
            value = value.strip()
        size = len(value.encode("utf-8"))
        if size > self.settings.max_text_bytes:
            self.add(where, f"{size} bytes, more than the limit of {self.settings.max_text_bytes}; shorten it")
            return ""
        if required and not value:
            self.add(where, "missing or empty; every character needs one")
        return value

    def texts(self, value: Any, where: str, strip: bool = True) -> list[str]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.add(where, f"expected a list of text, got {kind_of(value)}")
            return []
        out = []
        for i, item in enumerate(value):
            before = len(self.problems)
            text = self.text(item, f"{where}[{i}]", strip=strip)
            if text == "" and len(self.problems) == before:
                self.add(f"{where}[{i}]", "empty entry; remove it")
            out.append(text)
        return out

    def flag(self, value: Any, where: str, default: bool = False) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.add(where, f"expected true or false, got {kind_of(value)}")
            return default
        return value

    def integer(self, value: Any, where: str, default: int | None) -> int | None:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
            self.add(where, f"expected a whole number, got {value!r}")
            return default
        return int(value)

    def mapping(self, value: Any, where: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.add(where, f"expected a mapping of keys to values, got {kind_of(value)}")
            return {}
        return value

    def build(self, value: Any, where: str) -> dict[str, Any]:
        build = self.mapping(value, where)
        try:
            resolve_config("default", build)
        except ConfigError as e:
            key, _, message = str(e).partition(": ")
            self.add(f"{where}.{key}", message)
        return build


def kind_of(value: Any) -> str:
    return {dict: "a mapping", list: "a list", bool: f"{value!r}".lower()}.get(type(value), type(value).__name__)


def slug(stem: str) -> str:
    """File stem → id: ASCII-folded, lower case, runs of other characters become '-'."""
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9_-]+", "-", ascii_stem.lower()).strip("-_")[:64]
