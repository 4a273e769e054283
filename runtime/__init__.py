"""npcforge's runtime: many per-character ONNX models served from one lightweight process.

Imports only the standard library, numpy, onnxruntime and tokenizers (a game ships this without torch).
Entry point: `NPCPool(dist_dir, memory_budget_mb=None, threads=None)`; see docs/runtime.md.
"""
from runtime.config import RuntimeConfig
from runtime.errors import (ArtifactError, BudgetError, ContextOverflow, NPCRuntimeError, SessionBusy,
                            UnknownCharacter)
from runtime.generation import ChatResult, ChatStream
from runtime.pool import NPCPool, process_memory

__all__ = ["NPCPool", "RuntimeConfig", "ChatStream", "ChatResult", "process_memory", "NPCRuntimeError",
           "UnknownCharacter", "ArtifactError", "BudgetError", "SessionBusy", "ContextOverflow"]
