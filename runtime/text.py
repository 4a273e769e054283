"""Text out of tokens: incremental detokenisation that never splits a UTF-8 character, and stop sequences.

`Detokenizer(tokenizer).push(id) -> str` returns only whole characters: byte-level BPE tokens may hold part of a
multi-byte character, so text is held back while the decoded tail is incomplete (the scheme vLLM uses, which also
suits SentencePiece-style decoders that drop a leading space at the start of a decode window).
`StopMatcher(stops).push(text) -> (safe_text, stopped)` holds back any tail that could begin a stop sequence, so a
stop string split over several tokens is caught and never emitted.
"""
from __future__ import annotations

from tokenizers import Tokenizer

_INCOMPLETE = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the decode window (a character boundary)
        self.read = 0  # ids before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:])
        if len(text) > len(done) and not text.endswith(_INCOMPLETE):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Whatever complete text is left at the end; a trailing partial character is dropped."""
        done = self._decode(self.ids[self.prefix:self.read])
        text = self._decode(self.ids[self.prefix:]).rstrip(_INCOMPLETE)
        self.prefix = self.read = len(self.ids)
        return text[len(done):] if len(text) > len(done) else ""


class StopMatcher:
    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        buf = self.pending + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.pending = ""
            return buf[:min(hits)], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self.pending = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return text
