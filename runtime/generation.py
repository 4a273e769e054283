"""The decoding loop: one reply of one conversation as a resumable sequence of steps, scheduled fairly.

A `Generation` advances by `step()`: the first steps prefill what the cache lacks (in chunks), every later step
feeds the last sampled token and samples the next. Text leaves through a `ChatStream` (iterate str deltas; never a
split UTF-8 character, never stop-sequence text), which also carries `cancel()` (honoured before the next step) and,
at the end, `result` (a `ChatResult`). The `Scheduler` runs steps on a few worker threads, round-robin over every
active generation, so many conversations of many characters advance together (ORT releases the GIL in `run`).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from runtime.conversation import Conversation, Message, common_prefix
from runtime.model import KV, Model
from runtime.sampling import SamplingParams, sample
from runtime.text import Detokenizer, StopMatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: str  # "stop" (EOS or a stop sequence) | "length" (max_tokens) | "cancelled"
    prompt_tokens: int  # the whole context of this reply
    completion_tokens: int
    ttft_s: float  # chat() call to the first sampled token
    tokens_per_s: float  # decode rate after the first token
    truncated_history: bool  # oldest exchanges were dropped to fit the context
    cached_tokens: int = 0  # prompt tokens whose KV was reused (persona prefix or earlier turns)


_DONE = object()


class ChatStream:
    """Iterate for text deltas; `cancel()` stops within one decoding step; `result` is set when iteration ends.
    A reader that falls `backlog` deltas behind pauses the generation until it has read half of them."""

    def __init__(self, backlog: int = 0) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._closed = False
        self.backlog = backlog  # 0 = never pause
        self._resume: Callable[[], None] | None = None  # set by the Scheduler while the generation is paused
        self.result: ChatResult | None = None

    def __iter__(self) -> "ChatStream":
        return self

    def __next__(self) -> str:
        if self._closed:
            raise StopIteration
        item = self._queue.get()
        resume = self._resume
        if resume is not None and self.unread() <= self.backlog // 2:
            resume()
        if item is _DONE:
            self._closed = True
            raise StopIteration
        if isinstance(item, BaseException):
            self._closed = True
            raise item
        return item

    def cancel(self) -> None:
        self._cancelled.set()
        resume = self._resume
        if resume is not None:  # a paused generation must take one more step to see it
            resume()

    def unread(self) -> int:
        return self._queue.qsize()

    def behind(self) -> bool:
        return self.backlog > 0 and self.unread() >= self.backlog and not self.cancelled

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def wait(self) -> ChatResult:
        """Consume the rest of the stream and return the result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def _emit(self, text: str) -> None:
        if text:
            self._queue.put(text)

    def _finish(self, result: ChatResult | None, error: BaseException | None = None) -> None:
        self.result = result
        self._queue.put(error if error is not None else _DONE)


class Generation:
    def __init__(self, model: Model, conv: Conversation, target: list[int], params: SamplingParams,
                 truncated: bool, stream: ChatStream, on_finish: Callable[["Generation"], None], t0: float) -> None:
        self.model, self.conv, self.target, self.params = model, conv, target, params
        self.truncated, self.stream, self.on_finish = truncated, stream, on_finish
        self.rng = np.random.default_rng(params.seed)
        self.detok = Detokenizer(model.tokenizer)
        self.stopper = StopMatcher(model.stops + params.stop)
        self.eos = set(model.artifact.eos_token_ids)
        self.t0 = t0  # when chat() was called: a load it needed counts toward the first token's latency
        self.t_first: float | None = None
        self.started = False
        self.fed: list[int] = []
        self.kv: KV | None = None
        self.todo: list[int] = []
        self.cached = 0
        self.generated: list[int] = []
        self.next_token: int | None = None
        self.parts: list[str] = []
        self.reply: Message | None = None  # set when the reply ends normally (not on an error)
        self.result: ChatResult | None = None

    def _start(self) -> None:
        """Reuse the longest cached prefix: this conversation's last turn, else the character's persona prefix."""
        conv, model = self.conv, self.model
        own = conv.kv is not None
        fed, base = (conv.fed, conv.kv) if own else (model.persona, model.persona_kv)
        if base is None:
            fed = []
        n = min(common_prefix(fed, self.target), len(self.target) - 1)  # at least one token must run for logits
        need = len(self.target) + self.params.max_tokens  # fit_history kept this within max_context
        if base is None:
            self.kv = model.kv(0, need)
        elif own and model.config.kv_buffers and base.capacity >= need:
            base.n = n  # the conversation's own buffer: later positions are simply overwritten
            self.kv = base
        elif not model.config.kv_buffers and n == base.n:
            self.kv = base  # arrays the graph never writes to
        else:
            self.kv = model.kv(n, need, like=base)  # the persona's cache is shared: copy it
        self.fed, self.todo, self.cached = self.target[:n], self.target[n:], n
        self.started = True

    def step(self) -> bool:
        """Advance by one model call; True once finished (the stream has its result)."""
        try:
            if self.stream.cancelled:
                self._finish("cancelled")
                return True
            if not self.started:
                self._start()
            if self.todo:
                k = self.model.config.prefill_chunk
                chunk, self.todo = self.todo[:k], self.todo[k:]
                logits, self.kv = self.model.forward(chunk, self.kv)
                self.fed += chunk
                if self.todo:
                    return False
            else:
                logits, self.kv = self.model.forward([self.next_token], self.kv)
                self.fed.append(self.next_token)
            return self._take(logits)
        except Exception as e:  # a broken step ends this reply only, never the worker
            log.exception("generation for %s/%s failed", self.conv.character, self.conv.session)
            self._hand_over()
            self.stream._finish(None, e)
            return True

    def _take(self, logits: np.ndarray) -> bool:
        recent = np.array(self.fed[-self.model.config.repetition_window:], np.int64)
        token = sample(logits, recent, self.params, self.rng)
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if token in self.eos:
            self._finish("stop")
            return True
        self.generated.append(token)
        self.next_token = token
        text, stopped = self.stopper.push(self.detok.push(token))
        self._say(text)
        if stopped:
            self._finish("stop")
            return True
        if len(self.generated) >= self.params.max_tokens:
            text, stopped = self.stopper.push(self.detok.flush())
            self._say(text)
            if not stopped:
                self._say(self.stopper.flush())
            self._finish("stop" if stopped else "length")
            return True
        return False

    def _say(self, text: str) -> None:
        if text:
            self.parts.append(text)
            self.stream._emit(text)

    def _finish(self, reason: str) -> None:
        now = time.perf_counter()
        text = "".join(self.parts)
        n = len(self.generated)
        decode_s = now - self.t_first if self.t_first is not None else 0.0
        # The sampled ids stay the reply's tokens only if they spell exactly the text kept (not after a stop string).
        exact = self.model.tokenizer.decode(self.generated, skip_special_tokens=True) == text
        self.reply = Message("assistant", text, list(self.generated) if exact else None)
        if self.kv is not None and self.kv.capacity - self.kv.n > self.model.config.kv_slack:
            self.kv = self.model.kv(self.kv.n, like=self.kv)  # an idle conversation keeps no unused room
        self.result = ChatResult(
            text=text, finish_reason=reason, prompt_tokens=len(self.target), completion_tokens=n,
            ttft_s=(self.t_first - self.t0) if self.t_first is not None else now - self.t0,
            tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            truncated_history=self.truncated, cached_tokens=self.cached)
        self._hand_over()
        self.stream._finish(self.result)

    def _hand_over(self) -> None:
        """Give the cache to the pool (`on_finish`) and let go of it: one the pool evicts is freed then, not
        whenever the worker thread next drops this generation (a race the reader of the stream would see as a
        whole cache of memory, 25 MB at 550 tokens of SmolLM2, still held after `wait()` returned)."""
        self.on_finish(self)
        self.kv = None


class Scheduler:
    """Worker threads taking turns over the active generations: one step each, then back of the queue; a
    generation whose reader has fallen behind is set aside (paused) until the reader catches up or cancels. While no
    other generation waits, a worker takes the next step of its own: handing it to another worker would wake a
    thread per token, and move the step to another core."""

    def __init__(self, workers: int) -> None:
        self._ready: deque[Generation] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._live: set[Generation] = set()
        self._paused: set[Generation] = set()
        self._threads = [threading.Thread(target=self._work, name=f"npc-worker-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, gen: Generation) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError("the NPCPool is closed")
            self._ready.append(gen)
            self._live.add(gen)
            self._cv.notify()

    def _work(self) -> None:
        gen: Generation | None = None  # the generation this worker steps next
        while True:
            if gen is None:
                with self._cv:
                    while not self._ready and not self._stopping:
                        self._cv.wait()
                    if self._stopping and not self._ready:
                        return
                    gen = self._ready.popleft()
            done = gen.step()
            with self._cv:
                if done:
                    self._live.discard(gen)
                    gen = None
                    continue
                if gen.stream.behind():  # rare: only then is a resume hook made
                    # the hook goes in before the second check: a reader draining meanwhile finds it (and waits
                    # for this lock), and a paused stream holds `backlog` unread deltas, so its reader comes back
                    gen.stream._resume = lambda gen=gen: self._unpause(gen)
                    if gen.stream.behind():
                        self._paused.add(gen)
                        gen = None
                        continue
                    gen.stream._resume = None
                if self._ready:  # others wait: this one goes to the back of the queue, the first one is next
                    self._ready.append(gen)
                    gen = self._ready.popleft()

    def _unpause(self, gen: Generation) -> None:
        with self._cv:
            if gen in self._paused:
                self._paused.discard(gen)
                gen.stream._resume = None
                self._ready.append(gen)
                self._cv.notify()

    @property
    def active(self) -> int:
        with self._cv:
            return len(self._live)

    @property
    def paused(self) -> int:
        with self._cv:
            return len(self._paused)

    def close(self) -> None:
        """Cancel what is still running, let each finish its current step, and stop the workers."""
        with self._cv:
            for gen in self._live:
                gen.stream.cancel()
            self._stopping = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()
