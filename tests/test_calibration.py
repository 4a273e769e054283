"""Calibration: sensitivity filtering, the held-out split, answer checks, and the HTTP teacher (a real server)."""
from __future__ import annotations

import random

import pytest
import torch

from builder import calibration, judge
from builder.teacher import TeacherError, ask
from tests.prunekit import Teacher, teacher_server, tiny_config, tiny_context  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def ctx(tiny_base, roster_dir):
    return tiny_context(tiny_base, roster_dir)


def test_sensitivity_is_zero_against_itself_and_positive_against_others(ctx):
    character = ctx.characters[0]
    queries = ctx.queries[:6]
    config = tiny_config()
    saved = ctx.characters, ctx.builtin_personas
    try:
        ctx.characters, ctx.builtin_personas = [character], [calibration.persona_of(character)]
        same = calibration.sensitivity(ctx, character, queries, config)
        ctx.characters, ctx.builtin_personas = saved
        other = calibration.sensitivity(ctx, character, queries, config)
    finally:
        ctx.characters, ctx.builtin_personas = saved
    assert same.abs().max() < 1e-4
    assert (other > 1e-4).all()


def test_references_prefer_roster_then_builtins(ctx):
    character = ctx.characters[0]
    refs = calibration.references(character, ctx, len(ctx.characters) + 1)
    assert character not in refs
    assert refs[:len(ctx.characters) - 1] == ctx.characters[1:]
    assert refs[len(ctx.characters) - 1:] == ctx.builtin_personas[:2]


def test_dense_teacher_candidates(ctx):
    config = tiny_config(teacher_candidates=3, teacher_max_tokens=12)
    system = "You are Pip, a cheeky street urchin."
    got = calibration.candidates(ctx, system, ["Who are you?", "Got any news?"], config, torch.Generator())
    assert len(got) == 2 and all(len(c) == 3 for c in got)
    for raw, trimmed in got[0] + got[1]:
        assert isinstance(raw, str) and (trimmed is None or raw.startswith(trimmed))


def test_heldout_split_never_overlaps_training(ctx, teacher_server):
    character = ctx.characters[0]
    config = tiny_config(teacher_url=teacher_server)  # the random tiny model only babbles
    cal = calibration.calibrate(character, ctx, config)
    train = {" ".join(judge.words(e.query)) for e in cal.train}
    held = {" ".join(judge.words(e.query)) for e in cal.heldout}
    assert cal.heldout and cal.train
    assert not train & held
    assert all(e.source != "example" for e in cal.heldout)
    seqs = calibration.persona_seqs(ctx.tok, cal, character, config, random.Random(0))
    text = "\n".join(ctx.tok.decode(s.ids) for s in seqs.seqs)
    for e in cal.heldout:
        assert f"user\n{e.query}<|im_end|>" not in text
    # the split is made from sensitivity ranks: the held-out queries are among the most sensitive
    assert min(e.sensitivity for e in cal.heldout) >= 0.0


def test_split_prefers_sensitive_queries_and_keeps_examples_in_training():
    config = tiny_config(n_train_queries=3, n_heldout_queries=2)
    pool = [("a?", "corpus"), ("b?", "example"), ("c?", "corpus"), ("d?", "card"), ("e?", "corpus"), ("f?", "corpus")]
    scores = torch.tensor([0.9, 0.95, 0.8, 0.7, 0.1, 0.6])
    train, held = calibration.split_queries(pool, scores, config)
    # ranked: b (example), a, c, d, f, e; five are eligible, so every second one of them is held out
    assert held == [0, 3]
    assert train == [1, 2, 5]  # the most sensitive of the rest, the example included


def test_held_out_split_does_not_depend_on_the_training_budget():
    pool = [(f"q{i}?", "example" if i % 7 == 0 else "corpus") for i in range(200)]
    scores = torch.linspace(1, 0, 200)
    splits = [calibration.split_queries(pool, scores, tiny_config(n_train_queries=n, n_heldout_queries=20))
              for n in (8, 40, 80)]
    assert splits[0][1] == splits[1][1] == splits[2][1]
    eligible = [i for i in range(200) if i % 7]
    assert splits[0][1] == eligible[::3][:20]  # every third of the ranked pool: as sensitive as the training queries
    assert [len(train) for train, _ in splits] == [8, 40, 80]
    assert splits[1][0][:8] == splits[0][0]  # a larger budget adds less sensitive queries, keeps the first ones


def test_trim_and_reject():
    system = "You are Magda Kettleburn, the blacksmith of Dunmarrow, who forges blades for the town watch."
    assert calibration.trim_answer("Aye. The forge is hot today. And the", True) == "Aye. The forge is hot today."
    assert calibration.trim_answer("no sentence end here at all", True) is None
    assert calibration.trim_answer("Short, but finished", False) == "Short, but finished"
    config = tiny_config(teacher_max_repetition=0.25)
    assert calibration.acceptable("Steel needs patience. Come back at dusk.", system, config)
    assert not calibration.acceptable("I am the smith. I am the smith. I am the smith. I am the smith.", system, config)
    assert not calibration.acceptable("I am Magda Kettleburn, the blacksmith of Dunmarrow, who forges blades.",
                                      system, config)
    assert not calibration.acceptable(None, system, config)


def test_http_teacher_answers_and_errors(teacher_server):
    config = tiny_config(teacher_max_tokens=20)
    got = ask(teacher_server, "smith-70b", "You are Magda.", "Can you fix my sword?", 2, config)
    assert got == ["Aye, Can you fix my sword. Mind the sparks."] * 2
    sent = Teacher.seen[0]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["body"]["max_tokens"] == 20 and sent["body"]["messages"][0]["content"] == "You are Magda."
    with pytest.raises(TeacherError, match=r"HTTP 500: model exploded"):
        ask(teacher_server, "broken", "s", "q", 1, config)
    with pytest.raises(TeacherError, match="cannot reach"):
        ask("http://127.0.0.1:9/v1", None, "s", "q", 1, config, timeout=2)


def test_calibration_uses_the_http_teacher(ctx, teacher_server):
    config = tiny_config(teacher_url=teacher_server, teacher_model="smith-70b")
    cal = calibration.calibrate(ctx.characters[1], ctx, config)
    assert len(cal.heldout) == config.n_heldout_queries
    for e in cal.train + cal.heldout:
        assert e.answers[0] == f"Aye, {e.query.rstrip('?')}. Mind the sparks."


def test_accepted_candidates_are_ranked_by_their_persona_judge_margin(ctx, teacher_server):
    character = ctx.characters[1]
    config = tiny_config(teacher_url=teacher_server, teacher_model="two-voices", teacher_candidates=2)
    cal = calibration.calibrate(character, ctx, config)
    refs = [calibration.judge_prompt(r, config.user_name)
            for r in calibration.references(character, ctx, config.judge_references)]
    ranked = [e for e in cal.train + cal.heldout if len(e.answers) == 2]
    assert len(ranked) >= 4 and {e.answers[0].startswith("Aye") for e in ranked} == {True, False}
    for e in ranked:  # one judge call ranked them all: each query's answers must still be in its own order
        ll = ctx.judge.loglik([cal.system] + refs, [(e.query, a) for a in e.answers])
        margin = ll[:, 0] - ll[:, 1:].max(dim=1).values
        assert margin[0] >= margin[1] - 1e-4
