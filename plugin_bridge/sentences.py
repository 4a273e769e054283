"""Sentence chunking of a streamed reply, for text-to-speech.

Input: the reply's text deltas, in order (`feed`), then `flush` at the end. Output: whole sentences, trimmed, as
soon as each is known to be complete. A sentence ends at `.`, `!`, `?` or `…` (plus closing quotes/brackets)
followed by whitespace, or at a newline. A boundary is only known once the next character arrives, so the last
sentence comes from `flush`. Joining the sentences gives the reply back up to whitespace between them.
"""
from __future__ import annotations

import re

# Candidate ends: terminal punctuation run + closers, then whitespace (not consumed); or a newline.
_BOUNDARY = re.compile(r"[.!?…]+[\"'”’)\]»]*(?=\s)|\n")
# Words after which a period does not end a sentence (case-insensitive, without the period).
_ABBREVIATIONS = frozenset("mr mrs ms dr st sr jr prof mt ft no vs e.g i.e cf approx".split())
_WORD_BEFORE = re.compile(r"([\w.]+)\.$")


def _is_abbreviation(text: str) -> bool:
    m = _WORD_BEFORE.search(text)
    if not m:
        return False
    word = m.group(1).lower()
    # a single letter ("J. R. R. Tolkien") or a known abbreviation
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


class SentenceSplitter:
    """Accumulates deltas; returns completed sentences."""

    def __init__(self) -> None:
        self._buf = ""

    def feed(self, delta: str) -> list[str]:
        self._buf += delta
        out: list[str] = []
        start = 0
        for m in _BOUNDARY.finditer(self._buf):
            end = m.end()
            if m.group() != "\n" and m.group().endswith(".") and _is_abbreviation(self._buf[start:end]):
                continue
            sentence = self._buf[start:end].strip()
            if sentence:
                out.append(sentence)
            start = end
        self._buf = self._buf[start:]
        return out

    def flush(self) -> str | None:
        rest, self._buf = self._buf.strip(), ""
        return rest or None
