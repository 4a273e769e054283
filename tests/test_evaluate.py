"""Evaluation metrics on constructed cases: identical, perturbed, echoing and repeating models; the gate."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from builder import judge, lm
from builder.basemodel import load_model
from builder.evaluate import answers, drop_reduction, evaluate, gate, teacher_forced
from tests.prunekit import tiny_config

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
    echo = answers(_Parrot(model, echo_ids["input_ids"] + [2]), tok, SYSTEM, queries, config, 2)
    loop = answers(_Parrot(model, loop_ids["input_ids"]), tok, SYSTEM, queries, config, 2)
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
    # with the judge's standard errors (evaluate adds them) the reason says how sure one sample of answers is
    passed, reasons = gate({**base, "judge_accuracy_pruned": 0.6, "repetition_pruned": 0.0, "echo_rate_pruned": 0.0,
                            "judge_accuracy_se_dense": 0.06, "judge_accuracy_se_pruned": 0.08, "judged_answers": 80},
                           config)
    assert not passed and reasons[0].endswith("(standard error of the difference 0.10 at 80 answers each)")
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
    judges every answer and computes the standard error over all of them."""
    model, tok = dense
    queries = ["Do you have a cure?", "Who is sick?", "Where is the mine?"]
    one = answers(model, tok, SYSTEM, queries, tiny_config(judge_samples=1), 2)
    three = answers(model, tok, SYSTEM, queries, tiny_config(judge_samples=3), 2)
    assert len(three) == 9 and three[:3] == one
    assert three[3:6] != one  # later rounds are fresh samples, not copies

    config = tiny_config(judge_samples=2)
    heldout = [(q, "Willowbark tea, twice a day.") for q in queries]
    other = "You are HALO-7, the cheerful station AI of the orbital research station Perihelion!"
    empty = lm.SeqSet([])
    cache: dict = {}
    m = evaluate(model, copy.deepcopy(model), tok, judge.PersonaJudge(model, tok, 2), SYSTEM, [other], heldout,
                 empty, empty, config, 2, cache)
    assert m["heldout_queries"] == 3 and m["judged_answers"] == 6
    # the same weights sample the same answers with the same seed: dense and pruned are judged alike
    assert m["judge_accuracy_pruned"] == m["judge_accuracy_dense"] and m["repetition_pruned"] == m["repetition_dense"]
    p = m["judge_accuracy_dense"]
    assert m["judge_accuracy_se_dense"] == pytest.approx(math.sqrt(p * (1 - p) / 6))
    assert len(cache) == 1 and len(next(iter(cache.values()))["_texts"]) == 6


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
