"""One character's model in memory: its ONNX Runtime session, tokenizer, template and persona prefix cache.

`init_env(threads, global_pool)` sets up the process-wide ORT environment once: one shared arena allocator and,
optionally, one global intra-op thread pool instead of a pool per session (FACTS §4: both keep per-session memory
small; the global pool binds every ORT session of the process, so it is opt-in).
`TensorShare` memory-maps each `shared_tensors` entry once (keyed by sha256) and hands the same OrtValue to every
session through `SessionOptions.add_initializer`. `Model.load(artifact, config, share)` opens the session and
prefills the persona prefix once; `Model.forward(ids, kv)` runs one step and returns the last position's logits and
the cache (`KV`), updated in place in preallocated OrtValue buffers (or, with `kv_buffers=False`, as new arrays).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from runtime.artifact import Artifact, SharedTensor, packed_weight_names, read_character, read_shared_tensor
from runtime.config import RuntimeConfig
from runtime.conversation import ChatTemplate, persona_ids
from runtime.errors import ArtifactError

log = logging.getLogger(__name__)

_env_lock = threading.Lock()
_env: tuple[bool, int] | None = None  # (global thread pool in effect, its size)


def init_env(threads: int, global_pool: bool) -> tuple[bool, int]:
    """Set up the process's ORT environment once: the shared arena allocator every session uses and, if asked and
    still possible (no ORT environment yet), one global intra-op thread pool. Returns (global pool?, threads)."""
    global _env
    with _env_lock:
        if _env is None:
            made_global = False
            if global_pool:
                try:
                    ort.set_global_thread_pool_sizes(threads, 1)
                    made_global = True
                except Exception as e:  # another ORT user created the environment first
                    log.warning("cannot create ORT's global thread pool (%s); sessions get their own threads", e)
            info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))
            _env = (made_global, threads)
        elif _env[0] and (not global_pool or threads != _env[1]):
            log.warning("ORT's global thread pool of %d threads serves every session of this process", _env[1])
        return _env if _env[0] else (False, threads)


class TensorShare:
    """sha256 -> one OrtValue over a memory map, reference-counted by the models that use it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, tuple[ort.OrtValue, int]] = {}
        self._refs: dict[str, int] = {}

    def acquire(self, t: SharedTensor) -> ort.OrtValue:
        with self._lock:
            if t.sha256 not in self._values:
                self._values[t.sha256] = (ort.OrtValue.ortvalue_from_numpy(read_shared_tensor(t)), t.length)
                self._refs[t.sha256] = 0
            self._refs[t.sha256] += 1
            return self._values[t.sha256][0]

    def release(self, sha256: str) -> None:
        with self._lock:
            self._refs[sha256] -= 1
            if self._refs[sha256] == 0:
                del self._refs[sha256], self._values[sha256]

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
                    "references": sum(self._refs.values())}


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


_OPT_LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
               "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
               "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def shareable(artifact: Artifact, config: RuntimeConfig) -> tuple[SharedTensor, ...]:
    """The shared tensors worth sharing: all of them, except those MLAS pre-packs when pre-packing is on."""
    if not config.share_tensors:
        return ()
    if not config.prepack(artifact.precision):
        return artifact.shared_tensors
    packed = packed_weight_names(artifact.model_file)
    return tuple(t for t in artifact.shared_tensors if t.name not in packed)


def estimate_bytes(artifact: Artifact, config: RuntimeConfig) -> int:
    """Memory a loaded model is expected to add, for the budget: its weights not shared with other characters
    (memory-mapped, counted once touched) or, with pre-packing, MLAS's packed copies of them (ORT then lets go of
    the originals), plus bookkeeping. The persona prefix cache is added once it is known."""
    own = artifact.model_bytes - sum(t.length for t in shareable(artifact, config))
    factor = config.prepack_factor if config.prepack(artifact.precision) else 1.0
    return int(own * factor + config.session_overhead_mb * 2**20)


@dataclass
class KV:
    """A KV cache: per layer key and value arrays (1, kv_heads, capacity, head_dim); the first n positions hold data.
    In buffer mode `values` are zero-copy OrtValues over the arrays, which ORT fills in place."""
    arrays: list[np.ndarray]
    values: list[ort.OrtValue] | None
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
    session: ort.InferenceSession
    tokenizer: Tokenizer
    template: ChatTemplate
    character: dict[str, Any]
    config: RuntimeConfig
    shared: list[str]  # sha256 of the shared tensors this session uses (released on unload)
    values: list[ort.OrtValue]  # keeps the shared OrtValues alive as long as the session
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
        global_pool, threads = init_env(config.resolved_threads(), config.global_thread_pool)
        so = ort.SessionOptions()
        if global_pool:
            so.use_per_session_threads = False
        else:
            so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
        so.graph_optimization_level = _OPT_LEVELS[config.graph_optimization]
        so.add_session_config_entry("session.use_env_allocators", "1")
        so.add_session_config_entry("session.disable_prepacking", "0" if config.prepack(artifact.precision) else "1")
        shared, values = [], []
        try:
            if share is not None:
                for t in shareable(artifact, config):
                    values.append(share.acquire(t))
                    shared.append(t.sha256)
                    so.add_initializer(t.name, values[-1])
            try:
                session = ort.InferenceSession(str(artifact.model_file), sess_options=so,
                                               providers=["CPUExecutionProvider"])
            except Exception as e:
                raise ArtifactError(f"{artifact.model_file}: ONNX Runtime cannot load it ({e})") from e
            tokenizer = load_tokenizer(artifact)
            character = read_character(artifact)
            model = cls(artifact=artifact, session=session, tokenizer=tokenizer,
                        template=ChatTemplate(artifact.chat_template, tokenizer), character=character,
                        config=config, shared=shared, values=values, estimate=estimate_bytes(artifact, config))
            model.past_names = [f"past_key_values.{i}.{k}" for i in range(artifact.num_layers)
                                for k in ("key", "value")]
            model.output_names = ["logits"] + [f"present.{i}.{k}" for i in range(artifact.num_layers)
                                               for k in ("key", "value")]
            missing = set(model.past_names + ["input_ids", "attention_mask"]) - {i.name for i in session.get_inputs()}
            if missing:
                raise ArtifactError(f"{artifact.model_file}: inputs {sorted(missing)} missing (docs/internals.md)")
            model.persona = persona_ids(model.template, character.get("system_prompt") or "",
                                        character.get("greeting") or "")
            if config.prefix_cache:
                t1 = time.perf_counter()
                model.persona_kv = model.prefill(model.persona)
                model.persona_s = time.perf_counter() - t1
                model.estimate += model.persona_kv.nbytes
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
        values = [ort.OrtValue.ortvalue_from_numpy(x) for x in arrays] if self.config.kv_buffers else None
        return KV(arrays, values, n)

    def forward(self, ids: list[int], kv: KV) -> tuple[np.ndarray, KV]:
        """Logits of the last position (vocab,) and the cache after feeding `ids` on top of `kv.n` positions.

        Buffer mode writes the new keys/values in place (GroupQueryAttention's static cache: past and present
        bound to one buffer, the mask's ones marking the valid positions), so no step copies the cache; it needs
        kv.capacity >= kv.n + len(ids). Otherwise the graph returns a new, longer cache each step."""
        input_ids = np.array([ids], np.int64)
        total = kv.n + len(ids)
        if self.config.kv_buffers:
            if total > kv.capacity:
                raise ValueError(f"KV buffer of {kv.capacity} positions cannot take {total}")
            mask = np.zeros((1, kv.capacity), np.int64)
            mask[0, :total] = 1
            io = self.session.io_binding()
            io.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(input_ids))
            io.bind_ortvalue_input("attention_mask", ort.OrtValue.ortvalue_from_numpy(mask))
            io.bind_output("logits")
            for past, present, value in zip(self.past_names, self.output_names[1:], kv.values):
                io.bind_ortvalue_input(past, value)
                io.bind_ortvalue_output(present, value)
            self.session.run_with_iobinding(io)
            kv.n = total
            return io.get_outputs()[0].numpy()[0, -1], kv
        feed = {"input_ids": input_ids, "attention_mask": np.ones((1, total), np.int64)}
        feed.update(zip(self.past_names, kv.arrays))
        out = self.session.run(self.output_names, feed)
        return out[0][0, -1], KV(out[1:], None, total)

    def prefill(self, ids: list[int]) -> KV:
        """KV cache of `ids` from scratch, in chunks of `prefill_chunk` tokens, sized exactly."""
        kv = self.kv(0, len(ids))
        for i in range(0, len(ids), self.config.prefill_chunk):
            _, kv = self.forward(ids[i:i + self.config.prefill_chunk], kv)
        return kv
