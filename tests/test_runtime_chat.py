"""Generation through NPCPool on real ORT sessions of tiny artifacts: caches, stops, cancel, overflow, concurrency."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from runtime import ContextOverflow, NPCPool, RuntimeConfig

GREEDY = dict(temperature=0, repetition_penalty=1.5)
TURNS = ["Hello there! Who are you?", "What do you know about the caravan?", "Thanks. Anything else?"]


def ids(pool: NPCPool) -> list[str]:
    return [c["id"] for c in pool.characters()]


def converse(pool: NPCPool, cid: str, session: str, turns=TURNS, **kw) -> list:
    pool.reset(cid, session)
    return [pool.chat(cid, session, t, max_tokens=12, **GREEDY, **kw).wait() for t in turns]


def test_stream_deltas_and_result(pool: NPCPool):
    cid = ids(pool)[0]
    pool.reset(cid, "s")
    stream = pool.chat(cid, "s", "Hello!", max_tokens=20, temperature=0.9, seed=3)
    deltas = list(stream)
    r = stream.result
    assert r is not None and "".join(deltas) == r.text and all(deltas)
    assert r.finish_reason in ("stop", "length") and 1 <= r.completion_tokens <= 20
    assert r.ttft_s > 0 and r.prompt_tokens > r.cached_tokens > 0 and r.truncated_history is False
    assert list(stream) == []  # a finished stream stays finished
    assert pool.history(cid, "s") == [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": r.text}]


@pytest.mark.parametrize("variant", [dict(prefix_cache=False, reuse_kv=False), dict(kv_buffers=False),
                                     dict(prefill_chunk=7), dict(kv_cache_mb=0), dict(prepacking="on"),
                                     dict(share_tensors=False)])
def test_cached_turns_match_full_prefill(pool: NPCPool, tiny_dist: Path, variant: dict):
    """Follow-ups reuse the cache (prefilling only the new tokens) and give the same greedy tokens as a pool that
    prefills everything from scratch; numpy KV and chunked prefill give the same tokens too."""
    cid = ids(pool)[1]
    cached = converse(pool, cid, "cmp")
    with NPCPool(tiny_dist, threads=1, config=RuntimeConfig(**variant)) as other:
        fresh = converse(other, cid, "cmp")
    assert [r.text for r in cached] == [r.text for r in fresh]
    assert [r.completion_tokens for r in cached] == [r.completion_tokens for r in fresh]
    assert len({r.text for r in cached}) > 1  # the replies differ, so the comparison means something
    persona = pool.stats()["models"][cid]["persona_tokens"]
    assert cached[0].cached_tokens == persona
    for prev, r in zip(cached, cached[1:]):
        # only the end of the last reply, the new message and the generation prompt were prefilled
        assert r.cached_tokens >= prev.prompt_tokens + prev.completion_tokens - 1
        assert r.prompt_tokens - r.cached_tokens < 40
    if not variant.get("reuse_kv", True):
        assert all(r.cached_tokens == 0 for r in fresh)
    if variant.get("kv_cache_mb") == 0:  # no conversation cache: every turn starts from the persona prefix
        assert all(r.cached_tokens == persona for r in fresh)


def test_stop_sequence_split_across_tokens(pool: NPCPool):
    cid = ids(pool)[2]
    pool.reset(cid, "stop")
    stream = pool.chat(cid, "stop", "Hello!", max_tokens=40, temperature=0.9, seed=11)
    deltas = list(stream)
    full = stream.result.text
    # a stop string made of the end of one token's text and the start of the next one's
    i = next(i for i in range(len(deltas) - 1) if len(deltas[i]) >= 2 and len(deltas[i + 1]) >= 2 and
             full.find(deltas[i][-2:] + deltas[i + 1][:2]) == len("".join(deltas[:i + 1])) - 2)
    stop = deltas[i][-2:] + deltas[i + 1][:2]
    pool.reset(cid, "stop")
    stream = pool.chat(cid, "stop", "Hello!", max_tokens=40, temperature=0.9, seed=11, stop=[stop])
    got = list(stream)
    assert "".join(got) == stream.result.text == full[:full.find(stop)]
    assert stream.result.finish_reason == "stop"
    assert pool.history(cid, "stop")[-1]["content"] == full[:full.find(stop)]


def test_cancel_mid_stream(pool: NPCPool):
    cid = ids(pool)[0]
    pool.reset(cid, "c")
    stream = pool.chat(cid, "c", "Tell me a long story.", max_tokens=500, temperature=1.0, top_k=0, seed=2,
                       stop=[])
    first = next(stream)
    stream.cancel()
    rest = list(stream)
    r = stream.result
    assert r.finish_reason == "cancelled" and 1 <= r.completion_tokens < 500
    assert r.text == first + "".join(rest)
    assert pool.history(cid, "c")[-1] == {"role": "assistant", "content": r.text}
    # cancelled before its first step: nothing generated, and the session is free again at once
    stream = pool.chat(cid, "c", "Never mind.", max_tokens=50)
    stream.cancel()
    assert stream.wait().finish_reason == "cancelled"
    assert pool.chat(cid, "c", "Hello?", max_tokens=3, **GREEDY).wait().completion_tokens >= 1


def test_context_overflow_drops_oldest_exchanges(tiny_dist: Path):
    with NPCPool(tiny_dist, threads=1) as probe:
        cid = ids(probe)[0]
        probe.load(cid)
        persona = probe.stats()["models"][cid]["persona_tokens"]
    cfg = RuntimeConfig(max_context=persona + 160)
    with NPCPool(tiny_dist, threads=1, config=cfg) as pool, \
            NPCPool(tiny_dist, threads=1, config=RuntimeConfig(max_context=persona + 160, reuse_kv=False)) as fresh:
        results = []
        for i in range(8):
            text = f"Question number {i}: what happened at the gate?"
            r = pool.chat(cid, "o", text, max_tokens=16, **GREEDY).wait()
            f = fresh.chat(cid, "o", text, max_tokens=16, **GREEDY).wait()
            assert (r.text, r.truncated_history) == (f.text, f.truncated_history)  # rebuilt cache is right
            results.append(r)
            assert r.prompt_tokens + 16 <= persona + 160
        assert any(r.truncated_history for r in results) and not results[0].truncated_history
        history = pool.history(cid, "o")
        assert history[0]["content"] != "Question number 0: what happened at the gate?"
        assert history[-2]["content"] == "Question number 7: what happened at the gate?"
        assert results[-1].cached_tokens >= persona  # the persona prefix is never dropped
        with pytest.raises(ContextOverflow):
            pool.chat(cid, "o", "word " * 400, max_tokens=16)
        assert pool.history(cid, "o") == history  # a refused message changes nothing


def test_concurrent_conversations_match_sequential(tiny_dist: Path):
    """Six conversations over three characters at once, two workers: same greedy replies as one by one, and
    round-robin scheduling starts every reply before any finishes."""
    with NPCPool(tiny_dist, threads=1) as seq:
        chars = ids(seq)
        jobs = [(chars[i % 3], f"s{i}", f"Hello, I am visitor {i}.") for i in range(6)]
        want = [seq.chat(c, s, t, max_tokens=30, **GREEDY).wait().text for c, s, t in jobs]
    with NPCPool(tiny_dist, threads=1, config=RuntimeConfig(workers=2)) as pool:
        for c in chars:
            pool.load(c)
        streams = [pool.chat(c, s, t, max_tokens=30, **GREEDY) for c, s, t in jobs]
        got, done_at = [None] * 6, [0.0] * 6
        t0 = time.perf_counter()

        def consume(k: int) -> None:
            got[k] = streams[k].wait().text
            done_at[k] = time.perf_counter() - t0

        threads = [threading.Thread(target=consume, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == want
        firsts = [s.result.ttft_s for s in streams]
        assert max(firsts) < min(done_at) + 0.05 or all(s.result.completion_tokens < 3 for s in streams)
        assert pool.stats()["active_generations"] == 0


def test_a_lone_reply_stays_on_one_worker(tiny_dist: Path, monkeypatch: pytest.MonkeyPatch):
    """With nothing else to run, every step of a reply runs on the worker that took it (a hand-over per token
    would wake another thread each time); with two replies on two workers, both advance."""
    from runtime.generation import Generation

    steps: list[tuple[str, str]] = []
    step = Generation.step

    def recorded(gen: Generation) -> bool:
        steps.append((gen.conv.session, threading.current_thread().name))
        return step(gen)

    monkeypatch.setattr(Generation, "step", recorded)
    with NPCPool(tiny_dist, threads=1, config=RuntimeConfig(workers=2)) as pool:
        cid = ids(pool)[0]
        pool.load(cid)
        r = pool.chat(cid, "alone", "Talk.", max_tokens=40, temperature=1.0, top_k=0, seed=4).wait()
        assert r.completion_tokens > 5
        assert len({name for s, name in steps if s == "alone"}) == 1
        steps.clear()
        both = [pool.chat(cid, s, "Talk.", max_tokens=40, temperature=1.0, top_k=0, seed=4) for s in ("a", "b")]
        assert [s.wait().completion_tokens for s in both] == [r.completion_tokens] * 2
        first_done = min(max(i for i, (s, _) in enumerate(steps) if s == name) for name in ("a", "b"))
        assert {s for s, _ in steps[:first_done]} == {"a", "b"}  # neither waited for the other to finish


def test_a_dropped_cache_is_freed_before_wait_returns(tiny_dist: Path, monkeypatch: pytest.MonkeyPatch):
    """With no room for idle conversations' caches (kv_cache_mb=0), a finished reply's cache is already freed when
    wait() returns, even while the worker thread that ran it has not come back for its next step."""
    import weakref

    from runtime.generation import Generation
    from runtime.model import Model

    made: list[weakref.ref] = []
    kv, step = Model.kv, Generation.step

    def recorded_kv(model: Model, *args, **kwargs):
        out = kv(model, *args, **kwargs)
        made.append(weakref.ref(out))
        return out

    def slow_to_return(gen: Generation) -> bool:
        done = step(gen)
        if done:
            time.sleep(0.5)  # the worker descheduled right after the reply ended, still holding `gen`
        return done

    monkeypatch.setattr(Model, "kv", recorded_kv)
    monkeypatch.setattr(Generation, "step", slow_to_return)
    with NPCPool(tiny_dist, threads=1, config=RuntimeConfig(kv_cache_mb=0)) as pool:
        cid = ids(pool)[0]
        r = pool.chat(cid, "s", "Hello!", max_tokens=8, **GREEDY).wait()
        persona = pool._models[cid].persona_kv
        alive = [c for c in (ref() for ref in made) if c is not None and c is not persona]
        assert r.completion_tokens > 0 and persona is not None and len(made) >= 2
        assert alive == []


def test_chat_loads_a_character_while_others_generate(tiny_dist: Path):
    with NPCPool(tiny_dist, threads=1, config=RuntimeConfig(workers=2)) as pool:
        a, b = ids(pool)[:2]
        long = pool.chat(a, "x", "Talk.", max_tokens=300, temperature=1.0, top_k=0, seed=5)
        next(long)
        r = pool.chat(b, "y", "Hi!", max_tokens=5, **GREEDY).wait()  # b was not loaded: loaded on demand
        assert r.completion_tokens >= 1 and b in pool.stats()["loaded"]
        long.cancel()
        assert long.wait().finish_reason in ("cancelled", "stop", "length")


def test_close_cancels_running_replies(tiny_dist: Path):
    pool = NPCPool(tiny_dist, threads=1)
    cid = ids(pool)[0]
    stream = pool.chat(cid, "z", "Talk.", max_tokens=900, temperature=1.0, top_k=0, seed=9)
    next(stream)
    pool.close()
    assert stream.wait().finish_reason in ("cancelled", "stop")
    assert pool.stats()["loaded"] == []
    with pytest.raises(RuntimeError, match="closed"):
        pool.chat(cid, "z", "Still there?")
    assert pool.stats()["loaded"] == []


def test_failing_step_ends_only_that_reply(tiny_dist: Path):
    with NPCPool(tiny_dist, threads=1) as pool:
        a, b = ids(pool)[:2]
        pool.load(a)
        model = pool._model(a)
        real_forward = model.forward
        model.forward = lambda *args: (_ for _ in ()).throw(RuntimeError("broken step"))
        stream = pool.chat(a, "s", "Hello!", max_tokens=5)
        with pytest.raises(RuntimeError, match="broken step"):
            list(stream)
        assert pool.history(a, "s") == []  # the unanswered message is forgotten
        assert pool.chat(b, "s", "Hello!", max_tokens=3, **GREEDY).wait().completion_tokens >= 1  # workers live
        model.forward = real_forward
        assert pool.chat(a, "s", "Hello!", max_tokens=3, **GREEDY).wait().completion_tokens >= 1


def _until(check, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_slow_reader_pauses_only_its_own_generation(tiny_dist: Path):
    with NPCPool(tiny_dist, threads=1, config=RuntimeConfig(stream_backlog=6)) as pool:
        a, b = ids(pool)[:2]
        long = dict(max_tokens=300, temperature=1.0, top_k=0, seed=2, stop=[])
        slow = pool.chat(a, "slow", "Tell me a long story.", **long)
        _until(lambda: pool.stats()["paused_generations"] == 1)
        behind = slow.unread()
        assert 6 <= behind <= 7
        other = pool.chat(b, "other", "Tell me a long story.", **long).wait()  # not held up by the unread one
        assert other.completion_tokens > behind
        assert slow.unread() == behind and pool.stats()["paused_generations"] == 1  # no decoding while unread
        text = "".join(slow)  # reading resumes it, to the end
        assert slow.result.text == text and slow.result.completion_tokens > behind
        assert pool.stats()["paused_generations"] == 0

        again = pool.chat(a, "slow2", "Tell me a long story.", **long)
        _until(lambda: pool.stats()["paused_generations"] == 1)
        again.cancel()  # a paused generation still ends at once
        assert again.wait().finish_reason == "cancelled" and pool.stats()["active_generations"] == 0
