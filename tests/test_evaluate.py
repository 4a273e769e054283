"""Evaluation metrics on constructed cases: identical, perturbed, echoing and repeating models; the gate."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from builder import judge, lm
from builder.basemodel import load_model
from builder.buildcache import DiskCache
from builder.evaluate import (JudgedAnswers, answer_round, drop_reduction, drop_se, evaluate, gate, sampler,
                              teacher_forced)
from tests.prunekit import tiny_config

OTHER = "You are HALO-7, the cheerful station AI of the orbital research station Perihelion!"
SYSTEM = ("You are Ottilie Marsh, the herbalist of Dunmarrow. She brews remedies from marsh plants, speaks softly, "
          "and worries about the sickness spreading through the mining families since the Lantern Mine closed.")


@pytest.fixture(scope="module")
def dense(tiny_base):
    return load_model(tiny_base)


def _heldout(tok):
    qa = [("Do you have a cure?", "Willowbark tea, twice a day. It eases the fever."),
          ("Who is sick?", "The Pruitt children, and old Hollis. The damp gets into the lungs.")]
    return lm.SeqSet(lm.chat_seq(tok, SYSTEM, [])[0],
                     [lm.chat_seq(tok, SYSTEM, [("user", q), ("assistant", a)])[1] for q, a in qa])


def test_teacher_forced_kl_is_zero_for_the_same_model_and_ce_is_exact(dense):
    model, tok = dense
    held = _heldout(tok)
    same = teacher_forced(model, copy.deepcopy(model), held, 4, tok.pad_token_id)
    assert abs(same["kl"]) < 1e-6 and same["top1_agreement"] == 1.0
    assert same["ce_dense"] == pytest.approx(same["ce_pruned"], abs=1e-6)
    # CE by hand on the first sequence: full forward over prefix + suffix
    s = held.seqs[0]
    ids = torch.tensor([held.prefix + s.ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    p = len(held.prefix)
    nll = [-float(logp[p + j - 1, s.ids[j]]) for j in range(1, len(s.ids)) if s.target[j]]
    one = teacher_forced(model, model, lm.SeqSet(held.prefix, [s]), 4, tok.pad_token_id)
    assert one["ce_dense"] == pytest.approx(sum(nll) / len(nll), rel=1e-4)
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        noisy.model.layers[0].mlp.down_proj.weight.mul_(-1.0)
    worse = teacher_forced(model, noisy, held, 4, tok.pad_token_id)
    assert worse["kl"] > 0.01 and worse["ce_pruned"] != worse["ce_dense"]


def test_degeneration_metrics_on_constructed_answers():
    healthy = ["Willowbark tea, twice a day.", "The damp gets into the lungs of the miners' children."]
    echoing = ["She brews remedies from marsh plants, speaks softly, and worries about the sickness.",
               "I am Ottilie Marsh, the herbalist of Dunmarrow. She brews remedies from marsh plants, speaks softly"]
    looping = ["I'm a herbalist. I'm a herbalist. I'm a herbalist. I'm a herbalist.",
               "the fever the fever the fever the fever the fever"]
    h, e, r = (judge.degeneration(t, SYSTEM) for t in (healthy, echoing, looping))
    assert h["echo_rate"] == 0.0 and e["echo_rate"] == 1.0 and r["echo_rate"] == 0.0
    assert h["repetition"] == 0.0 and r["repetition"] > 0.6
    assert r["distinct_2"] < 0.4 < h["distinct_2"] == 1.0
    assert judge.repetition_rate("a b c a b c") == pytest.approx(1 / 4)
    assert judge.distinct_2(["a b a b"]) == pytest.approx(2 / 3)


class _Parrot(torch.nn.Module):
    """A 'model' that always emits a fixed token sequence (cycled): an echoing or looping pruned model."""

    def __init__(self, real, script: list[int]):
        super().__init__()
        self.real, self.script, self.step = real, script, 0
        self.config, self.generation_config = real.config, real.generation_config
        self.model = real.model  # the decoder stack: prompt caches are the real model's

    def set_attn_implementation(self, name: str) -> None:
        self.real.set_attn_implementation(name)

    @property
    def device(self) -> torch.device:
        return self.real.device

    def forward(self, input_ids, logits_to_keep=0, **kwargs):
        out = self.real(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
        if logits_to_keep == 1:  # a decoding step (the prompt's own prefill is left alone)
            out.logits = torch.full_like(out.logits, -1e4)
            out.logits[..., self.script[self.step % len(self.script)]] = 0.0
            self.step += 1
        return out


def test_echoing_and_looping_models_fail_the_gate(dense):
    model, tok = dense
    config = tiny_config(teacher_max_tokens=48, teacher_temperature=0.0)
    queries = ["Do you have a cure?", "Who is sick?"]
    echo_ids = tok(" She brews remedies from marsh plants, speaks softly, and worries about", add_special_tokens=False)
    loop_ids = tok(" the fever", add_special_tokens=False)
    echo = answer_round(_Parrot(model, echo_ids["input_ids"] + [2]), tok, SYSTEM, queries, config, 2, sampler(config))
    loop = answer_round(_Parrot(model, loop_ids["input_ids"]), tok, SYSTEM, queries, config, 2, sampler(config))
    assert all(judge.echoes(t, SYSTEM) for t in echo), echo
    assert all(judge.repetition_rate(t) > 0.5 for t in loop)
    base = {"kl": 0.05, "judge_accuracy_dense": 0.8, "judge_accuracy_pruned": 0.8,
            "repetition_dense": 0.02, "echo_rate_dense": 0.0}
    for texts, bad in ((echo, "echo_rate"), (loop, "repetition")):
        d = judge.degeneration(texts, SYSTEM)
        passed, reasons = gate({**base, "repetition_pruned": d["repetition"], "echo_rate_pruned": d["echo_rate"]},
                               config)
        assert not passed and any(r.startswith(bad) for r in reasons)
    ok, reasons = gate({**base, "repetition_pruned": 0.05, "echo_rate_pruned": 0.0}, config)
    assert ok and reasons == []
    passed, reasons = gate({**base, "kl": 9.0, "judge_accuracy_pruned": 0.5, "repetition_pruned": 0.0,
                            "echo_rate_pruned": 0.0}, config)
    assert not passed and len(reasons) == 2
    # with the judge's standard error (evaluate adds it) the reason says how sure the answers drawn are
    passed, reasons = gate({**base, "judge_accuracy_pruned": 0.6, "repetition_pruned": 0.0, "echo_rate_pruned": 0.0,
                            "judge_drop_se": 0.055, "judged_answers": 80}, config)
    assert not passed and reasons[0].endswith("(standard error of the difference 0.06 over 80 paired answers)")
    # a drop of exactly max_judge_drop passes, one answer more fails: accuracies as the judge counts them
    for dense, pruned in ((34, 30), (32, 28), (36, 32)):
        accuracy = [judge.identification(torch.tensor([[0.0, -1.0]] * n + [[-1.0, 0.0]] * (40 - n)))["judge_accuracy"]
                    for n in (dense, pruned, pruned - 1)]
        assert accuracy[0] == dense / 40
        row = {**base, "repetition_pruned": 0.0, "echo_rate_pruned": 0.0, "judge_accuracy_dense": accuracy[0]}
        assert gate({**row, "judge_accuracy_pruned": accuracy[1]}, config) == (True, [])
        assert not gate({**row, "judge_accuracy_pruned": accuracy[2]}, config)[0]


def test_judge_samples_rounds_extend_the_first(dense):
    """More judged answers per query add rounds after the first, which stays what one round gives; evaluate
    judges every answer and computes the standard errors over all of them."""
    model, tok = dense
    queries = ["Do you have a cure?", "Who is sick?", "Where is the mine?"]
    config = tiny_config(judge_samples=2, judge_max_samples=2)
    rows = config.generation_rows  # as evaluate draws them
    one = answer_round(model, tok, SYSTEM, queries, config, rows, sampler(config))
    gen = sampler(config)
    three = [t for _ in range(3) for t in answer_round(model, tok, SYSTEM, queries, config, rows, gen)]
    assert len(three) == 9 and three[:3] == one
    assert three[3:6] != one  # later rounds are fresh samples, not copies

    heldout = [(q, "Willowbark tea, twice a day.") for q in queries]
    empty = lm.SeqSet([])
    cache: dict = {}
    m = evaluate(model, copy.deepcopy(model), tok, judge.PersonaJudge(model, tok, 2), SYSTEM, [OTHER], heldout,
                 empty, empty, config, 2, cache)
    assert m["heldout_queries"] == 3 and m["judged_answers"] == 6 and m["judge_rounds"] == 2
    # the same weights sample the same answers with the same seed: dense and pruned are judged alike
    assert m["judge_accuracy_pruned"] == m["judge_accuracy_dense"] and m["repetition_pruned"] == m["repetition_dense"]
    assert m["judge_drop_se"] == 0.0  # every paired answer agrees
    p = m["judge_accuracy_dense"]
    assert m["judge_accuracy_se_dense"] == pytest.approx(math.sqrt(p * (1 - p) / 6))
    (side,) = cache.values()
    assert isinstance(side, JudgedAnswers) and side.texts == three[:6] and side.scores.shape == (6, 2)


def test_a_borderline_judge_draws_more_rounds(dense, tmp_path):
    """A dense - pruned difference within judge_confidence standard errors of max_judge_drop draws more rounds,
    up to judge_max_samples; a clear one does not. The dense side's rounds are kept and reused."""
    model, tok = dense
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for p in pruned.model.layers[0].mlp.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    queries = ["Do you have a cure?", "Who is sick?", "Where is the mine?", "Can I trust you?", "What do you sell?",
               "Tell me about the Lantern Mine.", "Is the fever spreading?", "Who runs this town?"]
    heldout = [(q, "Willowbark tea, twice a day.") for q in queries]
    empty = lm.SeqSet([])
    persona_judge = judge.PersonaJudge(model, tok, 4)

    def run(cache, lines=None, **over):
        config = tiny_config(**{"teacher_max_tokens": 12, **over})
        return evaluate(model, pruned, tok, persona_judge, SYSTEM, [OTHER], heldout, empty, empty, config, 4, cache,
                        None if lines is None else lines.append)

    cache: dict = {}
    first = run(cache, judge_samples=1, judge_max_samples=1)
    drop = first["judge_accuracy_dense"] - first["judge_accuracy_pruned"]
    assert first["judge_rounds"] == 1 and first["judge_drop_se"] > 0, "the perturbation must change some verdicts"
    # the gate's line at the measured difference and a wide margin: too close to call until the cap
    lines: list[str] = []
    wide = run(cache, lines, judge_samples=1, judge_max_samples=3, max_judge_drop=drop, judge_confidence=100.0)
    assert wide["judge_rounds"] == 3 and wide["judged_answers"] == 3 * len(queries)
    # the progress says each round as it is drawn (dense's first comes from the cache) and why another is drawn
    assert lines[0].startswith("evaluate: held-out KL ")
    assert [line for line in lines if "judge round" in line] == [
        f"evaluate: judge round {r}, {name}: 8 answers scored under 2 personas"
        for r, name in [(1, "pruned"), (2, "dense"), (2, "pruned"), (3, "dense"), (3, "pruned")]]
    assert [line.rsplit(": ", 1)[1] for line in lines if "too close" in line] == ["drawing round 2", "drawing round 3"]
    assert wide["samples"] == first["samples"]  # the first round is the one a single round draws
    # the statistics are those of all answers drawn
    (side,) = cache.values()
    assert len(side.texts) == 3 * len(queries)
    assert wide["judge_accuracy_dense"] == judge.identification(side.scores)["judge_accuracy"]
    hits = judge.identified(side.scores)
    assert wide["judge_drop_se"] == pytest.approx(drop_se(hits, judge.identified(
        _pruned_scores(pruned, tok, persona_judge, queries, 3))))
    # far from the line, or with no margin asked for, one round decides
    assert run(cache, judge_samples=1, judge_max_samples=3, max_judge_drop=drop + 1.0)["judge_rounds"] == 1
    assert run(cache, judge_samples=1, judge_max_samples=3, max_judge_drop=drop, judge_confidence=0.0)[
        "judge_rounds"] == 1
    assert len(side.texts) == 3 * len(queries)  # nothing drawn twice for dense

    # the build cache on disk keeps the dense rounds and the generator's state: a later build (a new process)
    # that needs more rounds draws the ones a single run would have drawn
    disk = lambda: DiskCache(tmp_path, "salt", JudgedAnswers.to_json, JudgedAnswers.from_json)  # noqa: E731
    run(disk(), judge_samples=1, judge_max_samples=1)
    later = run(disk(), judge_samples=1, judge_max_samples=3, max_judge_drop=drop, judge_confidence=100.0)
    assert later == wide
    (entry,) = tmp_path.glob("*.json")
    restored = JudgedAnswers.from_json(json.loads(entry.read_text()))
    assert restored.texts == side.texts and torch.equal(restored.scores, side.scores)


def _pruned_scores(pruned, tok, persona_judge, queries, rounds):
    """The pruned model's judged answers, drawn directly."""
    config = tiny_config(teacher_max_tokens=12)
    side = JudgedAnswers(sampler(config))
    for _ in range(rounds):
        side.draw(pruned, tok, persona_judge, [SYSTEM, OTHER], queries, config)
    return side.scores


def test_judge_identification_and_drop_reduction():
    scores = torch.tensor([[-1.0, -2.0, -3.0], [-2.5, -2.0, -3.0], [-1.0, -1.5, -0.9]])
    ident = judge.identification(scores)
    assert ident["judge_accuracy"] == pytest.approx(1 / 3)
    assert ident["judge_margin"] == pytest.approx((1.0 - 0.5 - 0.1) / 3)
    assert drop_reduction(83.35, 81.20, 48.43) == pytest.approx(0.938, abs=1e-3)  # the paper's headline
    assert drop_reduction(0.0, 0.15, 0.5) == pytest.approx(0.7)  # lower-is-better metrics work the same way
    assert drop_reduction(1.0, 0.5, 1.0) is None
    assert math.isfinite(drop_reduction(0.0, 0.6, 0.5))


def test_persona_judge_loglik_matches_a_full_forward(dense):
    model, tok = dense
    pj = judge.PersonaJudge(model, tok, batch=2)
    other = "You are HALO-7, the cheerful station AI of the orbital research station Perihelion!"
    # longest first, so batching by length reorders them: each result must still land in its own row
    pairs = [("Any work?", "Gather sedge by the mill, and mind the eels: they bite, and the marsh takes the slow."),
             ("Who are you?", "Ottilie."), ("Any work?", "Gather sedge by the mill.")]
    ll = pj.loglik([SYSTEM, other], pairs)
    assert ll.shape == (3, 2)
    for j, prompt in enumerate([SYSTEM, other]):
        for i, (q, a) in enumerate(pairs):
            prefix, seq = lm.chat_seq(tok, prompt, [("user", q), ("assistant", a)])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([prefix + seq.ids])).logits[0].float(), -1)
            p = len(prefix)
            want = [float(logp[p + t - 1, seq.ids[t]]) for t in range(1, len(seq.ids)) if seq.target[t]]
            assert float(ll[i, j]) == pytest.approx(sum(want) / len(want), abs=1e-4)
    assert ll[0, 0] != ll[0, 1]
