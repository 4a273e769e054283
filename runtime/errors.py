"""Errors the runtime raises. Each message names the character, file or field and says what to do."""
from __future__ import annotations


class NPCRuntimeError(Exception):
    """Base of every runtime error (the bridge maps subclasses to protocol error codes)."""


class UnknownCharacter(NPCRuntimeError, KeyError):
    """No artifact with this id in the dist folder."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class ArtifactError(NPCRuntimeError):
    """An artifact cannot be written, or is malformed, truncated or tampered with; the message names the file."""


class BudgetError(NPCRuntimeError):
    """A character cannot be loaded within the memory budget (everything else is pinned or busy)."""


class SessionBusy(NPCRuntimeError):
    """A conversation already has a reply in progress; cancel it or wait for it to finish."""


class ContextOverflow(NPCRuntimeError):
    """The new message alone does not fit the model's context, even with all earlier exchanges dropped."""
