"""One character's model in memory: its ONNX Runtime session, tokenizer, template and persona prefix cache.

Sessions run through ORT's C API (`runtime/ortc.py`), whose pre-packed weights container lets MLAS's packed copies
of the weights every character shares with the base exist once per process (the Python binding cannot do that).
`TensorShare` memory-maps each `shared_tensors` entry once (keyed by sha256), hands the same OrtValue to every
session (`AddInitializer`) and owns the container; once a session has packed a shared weight, the mapped pages of
the original are given back to the OS. `Model.load(artifact, config, share)` opens the session and prefills the
persona prefix once; `Model.forward(ids, kv)` runs one step and returns the last position's logits and the cache
(`KV`), updated in place in preallocated buffers (or, with `kv_buffers=False`, as new arrays).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import mmap
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from runtime import ortc
from runtime.artifact import Artifact, SharedTensor, packed_weight_names, read_character, read_shared_tensor
from runtime.config import RuntimeConfig
from runtime.conversation import ChatTemplate, persona_ids
from runtime.errors import ArtifactError

log = logging.getLogger(__name__)


def init_env(config: RuntimeConfig) -> ortc.Env:
    """The process's ORT environment: made on first call, which decides whether it has one global intra-op pool and
    its size for every later caller."""
    if config.malloc_mmap_threshold_kb:
        _fix_mmap_threshold(config.malloc_mmap_threshold_kb)
    threads = config.resolved_threads()
    env = ortc.Env.get(threads, config.global_thread_pool)
    if env.global_pool and (not config.global_thread_pool or threads != env.threads):
        log.warning("ORT's global thread pool of %d threads serves every session of this process", env.threads)
    return env


@functools.cache
def _fix_mmap_threshold(kb: int) -> None:
    """glibc raises its mmap threshold each time a large block is freed, after which large blocks (a session's load
    buffers, a finished conversation's KV) come from the heap and are kept by the process after free: loading 8
    characters cost 63-99 MB each instead of a steady 63-73. A fixed threshold keeps large blocks in mmap, returned
    to the OS when freed. Other C libraries have no mallopt and keep their own behaviour."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, kb * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class TensorShare:
    """sha256 -> one OrtValue over a memory map, reference-counted by the models that use it; and the container
    holding the packed copies of those that MLAS packs."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, tuple[ortc.Tensor, int]] = {}
        self._refs: dict[str, int] = {}
        self._container: ortc.Container | None = None

    def acquire(self, t: SharedTensor, env: ortc.Env) -> ortc.Tensor:
        with self._lock:
            if t.sha256 not in self._values:
                self._values[t.sha256] = (ortc.Tensor(env, read_shared_tensor(t)), t.length)
                self._refs[t.sha256] = 0
            self._refs[t.sha256] += 1
            return self._values[t.sha256][0]

    def container(self, env: ortc.Env) -> ortc.Container:
        with self._lock:
            if self._container is None:
                self._container = ortc.Container(env)
            return self._container

    def settle(self, packed: list[str]) -> None:
        """Give back the mapped pages of shared weights now packed in the container: ORT computes with the packed
        copies, and a page it does read again (an embedding row) is simply mapped back in from the page cache."""
        with self._lock:
            for sha in packed:
                if sha in self._values:
                    _drop_pages(self._values[sha][0].array)

    def release(self, sha256: str) -> None:
        with self._lock:
            self._refs[sha256] -= 1
            if self._refs[sha256] == 0:
                del self._refs[sha256], self._values[sha256]
            if not self._refs:
                self._container = None  # freed with the last session that holds it

    def new_bytes(self, tensors: tuple[SharedTensor, ...]) -> int:
        """Bytes a model would add: its shared tensors not mapped yet."""
        with self._lock:
            return sum(t.length for t in {t.sha256: t for t in tensors}.values() if t.sha256 not in self._values)

    def bytes(self) -> int:
        with self._lock:
            return sum(n for _, n in self._values.values())

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"count": len(self._values), "mb": round(sum(n for _, n in self._values.values()) / 2**20, 2),
                    "references": sum(self._refs.values()), "prepacked_container": self._container is not None}


def _drop_pages(array: np.ndarray) -> None:
    """madvise(DONTNEED) the file mapping under a memory-mapped array (a no-op where the OS has no madvise)."""
    base = array
    while base is not None and not isinstance(getattr(base, "_mmap", None), mmap.mmap):
        base = getattr(base, "base", None)
    if base is not None and hasattr(mmap, "MADV_DONTNEED"):
        base._mmap.madvise(mmap.MADV_DONTNEED)


_tokenizers: dict[str, Tokenizer] = {}  # sha256 of tokenizer.json -> one instance (~17 MB each for SmolLM2)
_tokenizers_lock = threading.Lock()


def load_tokenizer(artifact: Artifact) -> Tokenizer:
    """Characters of one base share one tokenizer object (the Rust tokenizer is safe to use from many threads)."""
    key = str(artifact.files[artifact.manifest["tokenizer"].get("file", "tokenizer.json")]["sha256"])
    with _tokenizers_lock:
        if key not in _tokenizers:
            try:
                _tokenizers[key] = Tokenizer.from_file(str(artifact.tokenizer_file))
            except Exception as e:
                raise ArtifactError(f"{artifact.tokenizer_file}: cannot load tokenizer ({e})") from e
        return _tokenizers[key]


def shareable(artifact: Artifact, config: RuntimeConfig) -> tuple[SharedTensor, ...]:
    """The shared tensors handed to sessions once for all: every one, when sharing is on (with pre-packing, the
    container then shares the packed copies too)."""
    return artifact.shared_tensors if config.share_tensors else ()


def estimate_bytes(artifact: Artifact, config: RuntimeConfig) -> int:
    """Memory a loaded model is expected to add, for the budget: its weights not shared with other characters
    (mapped from its file, or replaced by MLAS's packed copies of the same size), plus bookkeeping. Shared tensors
    are counted once by the pool; persona and conversation caches have budgets of their own."""
    own = artifact.model_bytes - sum(t.length for t in shareable(artifact, config))
    return int(own + config.session_overhead_mb * 2**20)


@dataclass
class KV:
    """A KV cache: per layer key and value arrays (1, kv_heads, capacity, head_dim); the first n positions hold data.
    In buffer mode `values` are zero-copy OrtValues over the arrays, which ORT fills in place."""
    arrays: list[np.ndarray]
    values: list[ortc.Tensor] | None
    n: int

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2] if self.arrays else 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


@dataclass
class Model:
    artifact: Artifact
    session: ortc.Session
    tokenizer: Tokenizer
    template: ChatTemplate
    character: dict[str, Any]
    config: RuntimeConfig
    shared: list[str]  # sha256 of the shared tensors this session uses (released on unload)
    env: ortc.Env
    estimate: int
    load_s: float = 0.0
    persona: list[int] = field(default_factory=list)
    persona_kv: KV | None = None
    persona_s: float = 0.0
    pinned: bool = False
    active: int = 0  # generations in progress; a busy model is never evicted
    last_used: float = field(default_factory=time.monotonic)
    unloaded: bool = False
    past_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    _in_names: Any = None  # C arrays of the input and output names, built once
    _out_names: Any = None

    @property
    def id(self) -> str:
        return self.artifact.id

    @property
    def max_context(self) -> int:
        cap = self.config.max_context
        return min(self.artifact.max_context, cap) if cap else self.artifact.max_context

    @property
    def stops(self) -> tuple[str, ...]:
        return tuple(s for s in self.character.get("stop") or () if isinstance(s, str) and s)

    @classmethod
    def load(cls, artifact: Artifact, config: RuntimeConfig, share: TensorShare | None) -> "Model":
        t0 = time.perf_counter()
        env = init_env(config)
        prepack = config.prepack(artifact.precision)
        tensors = shareable(artifact, config) if share is not None else ()
        shared: list[str] = []
        try:
            initializers = {}
            for t in tensors:
                initializers[t.name] = share.acquire(t, env)
                shared.append(t.sha256)
            container = share.container(env) if share is not None and prepack and shared else None
            settings = ortc.SessionSettings(threads=config.resolved_threads(), optimization=config.graph_optimization,
                                            prepacking=prepack, initializers=initializers, container=container)
            try:
                session = ortc.Session(env, artifact.model_file, settings)
            except ortc.OrtError as e:
                raise ArtifactError(f"{artifact.model_file}: ONNX Runtime cannot load it ({e})") from e
            if container is not None:
                packed = packed_weight_names(artifact.model_file)
                share.settle([t.sha256 for t in tensors if t.name in packed])
            tokenizer = load_tokenizer(artifact)
            character = read_character(artifact)
            model = cls(artifact=artifact, session=session, tokenizer=tokenizer,
                        template=ChatTemplate(artifact.chat_template, tokenizer), character=character,
                        config=config, shared=shared, env=env, estimate=estimate_bytes(artifact, config))
            model.past_names = [f"past_key_values.{i}.{k}" for i in range(artifact.num_layers)
                                for k in ("key", "value")]
            model.output_names = ["logits"] + [f"present.{i}.{k}" for i in range(artifact.num_layers)
                                               for k in ("key", "value")]
            missing = set(model.past_names + ["input_ids", "attention_mask"]) - set(session.input_names)
            if missing:
                raise ArtifactError(f"{artifact.model_file}: inputs {sorted(missing)} missing (docs/internals.md)")
            model._in_names = ortc.Session.names(["input_ids", "attention_mask"] + model.past_names)
            model._out_names = ortc.Session.names(model.output_names)
            model.persona = persona_ids(model.template, character.get("system_prompt") or "",
                                        character.get("greeting") or "")
            if config.prefix_cache:
                t1 = time.perf_counter()
                model.persona_kv = model.prefill(model.persona)
                model.persona_s = time.perf_counter() - t1
        except BaseException:
            if share is not None:
                for sha in shared:
                    share.release(sha)
            raise
        model.load_s = time.perf_counter() - t0
        return model

    def close(self, share: TensorShare | None) -> None:
        self.unloaded = True
        self.persona_kv = None
        if share is not None:
            for sha in self.shared:
                share.release(sha)
        self.shared = []

    def kv(self, n: int = 0, capacity: int = 0, like: KV | None = None) -> KV:
        """A cache holding the first n positions of `like` (zeros without it), with room for `capacity` positions
        in buffer mode. The copy is owned by the caller: buffers are written in place."""
        a = self.artifact
        cap = max(capacity, n) if self.config.kv_buffers else n
        arrays = []
        for i in range(len(self.past_names)):
            arr = np.zeros((1, a.num_kv_heads, cap, a.head_dim), np.float32)
            if like is not None and n:
                arr[:, :, :n] = like.arrays[i][:, :, :n]
            arrays.append(arr)
        values = [ortc.Tensor(self.env, x) for x in arrays] if self.config.kv_buffers else None
        return KV(arrays, values, n)

    def forward(self, ids: list[int], kv: KV) -> tuple[np.ndarray, KV]:
        """Logits of the last position (vocab,) and the cache after feeding `ids` on top of `kv.n` positions.

        Buffer mode writes the new keys/values in place (GroupQueryAttention's static cache: past and present
        are one buffer, the mask's ones marking the valid positions), so no step copies the cache; it needs
        kv.capacity >= kv.n + len(ids). Otherwise the graph writes a new, longer cache into fresh arrays."""
        env, a = self.env, self.artifact
        total = kv.n + len(ids)
        logits = np.empty((1, 1, a.vocab_size), np.float32)
        if self.config.kv_buffers:
            if total > kv.capacity:
                raise ValueError(f"KV buffer of {kv.capacity} positions cannot take {total}")
            mask = np.zeros((1, kv.capacity), np.int64)
            mask[0, :total] = 1
            past = present = kv.values
            out = kv
        else:
            mask = np.ones((1, total), np.int64)
            past = [ortc.Tensor(env, x) for x in kv.arrays]
            out = KV([np.empty((1, a.num_kv_heads, total, a.head_dim), np.float32) for _ in kv.arrays], None, total)
            present = [ortc.Tensor(env, x) for x in out.arrays]
        inputs = [ortc.Tensor(env, np.array([ids], np.int64)), ortc.Tensor(env, mask), *past]
        self.session.run(self._in_names, inputs, self._out_names, [ortc.Tensor(env, logits), *present])
        out.n = total
        return logits[0, -1], out

    def prefill(self, ids: list[int]) -> KV:
        """KV cache of `ids` from scratch, in chunks of `prefill_chunk` tokens, sized exactly."""
        kv = self.kv(0, len(ids))
        for i in range(0, len(ids), self.config.prefill_chunk):
            _, kv = self.forward(ids[i:i + self.config.prefill_chunk], kv)
        return kv
