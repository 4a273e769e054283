"""Unit tests of the runtime's text and sampling pieces with the real tiny tokenizer (no model needed)."""
from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer

from runtime.config import RuntimeConfig
from runtime.conversation import ChatTemplate, Message, fit_history, persona_ids, prompt_ids
from runtime.errors import ContextOverflow
from runtime.sampling import resolve_params, sample, top_k_desc
from runtime.text import Detokenizer, StopMatcher

TEMPLATE = {"system": "<|im_start|>system\n{content}<|im_end|>\n", "user": "<|im_start|>user\n{content}<|im_end|>\n",
            "assistant": "<|im_start|>assistant\n{content}<|im_end|>\n", "generation_prompt": "<|im_start|>assistant\n"}


@pytest.fixture(scope="module")
def tok(tiny_base) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_base / "tokenizer.json"))


def test_detokenizer_never_splits_utf8(tok):
    text = "Grüße, café — 日本語 🙂 naïve!"
    ids = tok.encode(text, add_special_tokens=False).ids
    # the test means something only if some token holds part of a character
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    d = Detokenizer(tok)
    deltas = [d.push(i) for i in ids] + [d.flush()]
    assert all("\ufffd" not in x for x in deltas)
    assert "".join(deltas) == text


def test_detokenizer_drops_a_trailing_partial_character(tok):
    ids = tok.encode("ok 🙂", add_special_tokens=False).ids
    d = Detokenizer(tok)
    out = "".join(d.push(i) for i in ids[:-1]) + d.flush()
    assert out == "ok " or out == "ok"


@pytest.mark.parametrize("pieces,stops,want,stopped", [
    (["Hel", "lo\nTrav", "eler: x"], ["\nTraveler:"], "Hello", True),
    (["Hi", " th", "ere"], ["\nTraveler:"], "Hi there", False),
    (["a", "b", "c", "d"], ["bc", "cd"], "a", True),
    (["tra", "vel"], ["traveler"], "travel", False),  # a prefix held back is released by flush
])
def test_stop_matcher_across_pieces(pieces, stops, want, stopped):
    m = StopMatcher(stops)
    out, hit = "", False
    for p in pieces:
        text, hit = m.push(p)
        out += text
        if hit:
            break
    if not hit:
        out += m.flush()
    assert (out, hit) == (want, stopped)


def test_sampling_greedy_topk_topp_seed():
    cfg = RuntimeConfig()
    logits = np.array([0.0, 5.0, 4.9, -1.0, 3.0], np.float32)
    greedy = resolve_params(cfg, temperature=0, repetition_penalty=1.0)
    assert sample(logits, np.array([], np.int64), greedy, np.random.default_rng(0)) == 1
    # the penalty on token 1 makes 2 the argmax
    pen = resolve_params(cfg, temperature=0, repetition_penalty=1.5)
    assert sample(logits, np.array([1]), pen, np.random.default_rng(0)) == 2
    top1 = resolve_params(cfg, temperature=1.0, top_k=1, repetition_penalty=1.0)
    assert {sample(logits, np.array([], np.int64), top1, np.random.default_rng(s)) for s in range(20)} == {1}
    nucleus = resolve_params(cfg, temperature=1.0, top_k=0, top_p=0.5, repetition_penalty=1.0)
    assert {sample(logits, np.array([], np.int64), nucleus, np.random.default_rng(s)) for s in range(50)} <= {1, 2}
    wide = resolve_params(cfg, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, seed=5)
    a = [sample(logits, np.array([], np.int64), wide, np.random.default_rng(5)) for _ in range(3)]
    rng = np.random.default_rng(5)
    seq1 = [sample(logits, np.array([], np.int64), wide, rng) for _ in range(30)]
    rng = np.random.default_rng(5)
    seq2 = [sample(logits, np.array([], np.int64), wide, rng) for _ in range(30)]
    assert seq1 == seq2 and len(set(seq1)) > 1 and len(set(a)) == 1


@pytest.mark.parametrize("n,k", [(49152, 40), (49152, 500), (1000, 7), (300, 3), (129, 2), (5, 9)])
def test_top_k_desc_is_exact(n, k):
    rng = np.random.default_rng(n + k)
    for case in range(6):
        x = rng.standard_normal(n).astype(np.float32)
        if case == 1:  # every large value in one block: the threshold must fall back to lower block maxima
            x[:128] += 50.0
        if case == 2:  # coarse values: many ties, broken by id
            x = np.round(x * 2).astype(np.float32)
        if case == 3:  # the largest values in the short last block
            x[-(n % 128 or 1):] += 50.0
        want = np.lexsort((np.arange(n), -x))[:min(k, n)]  # by value descending, then by id
        assert top_k_desc(x, k).tolist() == want.tolist()


def _reference_sample(logits, params, rng):
    """Sampling as written before the top-k threshold: full argpartition, full sort without top-k."""
    x = logits / params.temperature
    idx = np.argpartition(x, -params.top_k)[-params.top_k:] if 0 < params.top_k < x.size else np.arange(x.size)
    cand = x[idx]
    order = np.argsort(-cand, kind="stable")
    idx, cand = idx[order], cand[order]
    p = np.exp(cand - cand[0])
    p /= p.sum()
    keep = int(np.searchsorted(np.cumsum(p), params.top_p)) + 1
    idx, p = idx[:keep], p[:keep] / p[:keep].sum()
    cdf = np.cumsum(p)
    return int(idx[min(int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right")), idx.size - 1)])


@pytest.mark.parametrize("top_k,top_p", [(40, 0.9), (40, 1.0), (0, 0.9), (0, 0.3), (3, 0.5)])
def test_sampling_matches_the_plain_algorithm(top_k, top_p):
    """Same token as the straightforward full-vocabulary version for the same random draw (no ties)."""
    cfg = RuntimeConfig()
    params = resolve_params(cfg, temperature=0.8, top_k=top_k, top_p=top_p, repetition_penalty=1.0)
    rng = np.random.default_rng(top_k)
    for i in range(40):
        logits = (rng.standard_normal(5000) * (1 + i % 4)).astype(np.float32)
        assert sample(logits, np.array([], np.int64), params, np.random.default_rng(i)) == \
            _reference_sample(logits, params, np.random.default_rng(i))


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-2),
                                 dict(repetition_penalty=0)])
def test_sampling_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        resolve_params(RuntimeConfig(), **bad)


def test_template_history_and_overflow(tok):
    t = ChatTemplate(TEMPLATE, tok)
    persona = persona_ids(t, "You are Bob.", "Hi!")
    assert tok.decode(persona, skip_special_tokens=False).count("<|im_start|>") == 2
    reply = tok.encode("Fine, thanks.", add_special_tokens=False).ids
    msgs = [Message("user", "How are you?"), Message("assistant", "Fine, thanks.", reply), Message("user", "Good.")]
    ids = prompt_ids(t, persona, msgs)
    # sampled reply ids and a fresh render of the same text give the same sequence
    assert ids == prompt_ids(t, persona, [msgs[0], Message("assistant", "Fine, thanks."), msgs[2]])
    assert t.clean("hi <|im_end|><|im_start|>system") == "hi system"
    kept, fitted, cut = fit_history(t, persona, msgs, "", room=len(ids), target=0.75)
    assert (kept, cut) == (msgs, False)
    kept, fitted, cut = fit_history(t, persona, msgs, "", room=len(ids) - 1, target=0.75)
    assert cut and kept == msgs[2:] and fitted[:len(persona)] == persona
    with pytest.raises(ContextOverflow):
        fit_history(t, persona, msgs, "", room=len(persona) + 2, target=0.75)
