"""Conversations: the chat template, the token sequence of a history, context overflow, saved sessions.

A `Conversation` (one per character and session) holds its exchanges and the KV cache of the tokens it fed last
(`fed`). Each turn the runtime renders the whole history to token ids (`prompt_ids`) and prefills only what differs
from `fed` (the longest common prefix is reused), so a follow-up turn prefills just the new message and a new
conversation starts from the character's persona prefix: the system prompt (+ greeting as the first assistant
turn), prefilled once per loaded character. Replies keep the token ids that were sampled, so the cache and a fresh
render of the history agree token for token.
`fit_history` drops the oldest exchanges (never the persona prefix) when the prompt plus `max_tokens` no longer
fits the context. `save_session` / `load_session_file` write and read a small JSON of the messages (no KV cache).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from runtime.errors import ContextOverflow

SESSION_FORMAT = "npcforge-session"
SESSION_VERSION = 1


@dataclass
class Message:
    role: str  # "user" | "assistant"
    content: str
    token_ids: list[int] | None = None  # sampled ids of a reply whose text they decode to exactly


@dataclass
class Conversation:
    character: str
    session: str
    messages: list[Message] = field(default_factory=list)
    fed: list[int] = field(default_factory=list)  # tokens whose keys/values `kv` holds
    kv: Any = None  # runtime.model.KV of `fed`, or None when evicted (never the persona's shared cache)
    busy: bool = False


class ChatTemplate:
    """The manifest's `chat_template` (strings with {content}) rendered straight to token ids."""

    def __init__(self, template: dict[str, str], tokenizer: Tokenizer) -> None:
        self.template, self.tokenizer = template, tokenizer
        self.specials = [t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special]
        self.assistant_head, self.assistant_tail = template["assistant"].split("{content}", 1)
        self.generation_prompt = self.encode(template["generation_prompt"])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def clean(self, text: str) -> str:
        """Player text may not smuggle in control tokens such as <|im_end|>."""
        for s in self.specials:
            text = text.replace(s, "")
        return text

    def block(self, role: str, content: str) -> list[int]:
        return self.encode(self.template[role].replace("{content}", content))

    def message(self, m: Message) -> list[int]:
        if m.role == "assistant" and m.token_ids is not None:
            return self.encode(self.assistant_head) + m.token_ids + self.encode(self.assistant_tail)
        return self.block(m.role, m.content)


def persona_ids(template: ChatTemplate, system_prompt: str, greeting: str) -> list[int]:
    ids = template.block("system", system_prompt)
    return ids + template.block("assistant", greeting) if greeting else ids


def prompt_ids(template: ChatTemplate, persona: list[int], messages: list[Message],
               post_history: str = "") -> list[int]:
    """The whole context of the next reply: persona prefix, history, optional instructions, generation prompt."""
    ids = list(persona)
    for m in messages:
        ids += template.message(m)
    if post_history:
        ids += template.block("system", post_history)
    return ids + template.generation_prompt


def fit_history(template: ChatTemplate, persona: list[int], messages: list[Message], post_history: str,
                room: int, target: float) -> tuple[list[Message], list[int], bool]:
    """Drop the oldest exchanges until the prompt fits `room` tokens (then down to `target` of it, so the next
    turns do not overflow again at once). The last message (the new user text) is never dropped."""
    ids = prompt_ids(template, persona, messages, post_history)
    if len(ids) <= room:
        return messages, ids, False
    goal = int(room * target)
    kept = list(messages)
    while len(kept) > 1:
        drop = 2 if len(kept) > 2 and kept[0].role == "user" and kept[1].role == "assistant" else 1
        kept = kept[drop:]
        ids = prompt_ids(template, persona, kept, post_history)
        if len(ids) <= goal:
            break
    if len(ids) > room:
        raise ContextOverflow(f"the message needs {len(ids)} prompt tokens but only {room} fit the context "
                              f"with max_tokens reserved; send a shorter message or ask for fewer max_tokens")
    return kept, ids, True


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def save_session(conv: Conversation, path: str | Path) -> Path:
    """Write the conversation's messages as JSON (temp file + rename: never half-written)."""
    path = Path(path)
    data = {"format": SESSION_FORMAT, "version": SESSION_VERSION, "character": conv.character,
            "session": conv.session, "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "messages": [{"role": m.role, "content": m.content} for m in conv.messages]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def load_session_file(path: str | Path) -> tuple[str, str, list[Message]]:
    """(character id, session, messages) from a saved session; ValueError naming the file and field otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read saved session ({e})") from None
    if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
        raise ValueError(f"{path}: format: not an {SESSION_FORMAT} file")
    if data.get("version") != SESSION_VERSION:
        raise ValueError(f"{path}: version: {data.get('version')!r} is not {SESSION_VERSION}")
    for key in ("character", "session"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ValueError(f"{path}: {key}: missing or not a string")
    messages = []
    for i, m in enumerate(data.get("messages") or []):
        if not (isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)):
            raise ValueError(f"{path}: messages[{i}]: needs role user|assistant and a string content")
        messages.append(Message(m["role"], m["content"]))
    return data["character"], data["session"], messages
