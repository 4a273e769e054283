"""Slicing keeps outputs exact, the written checkpoint is stock (or lists its per-layer widths and loads), and
healing trains only what it should."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from builder import lm
from builder.basemodel import BaseModelError, load_model
from builder.config import ConfigError
from builder.heal import heal, on_policy_step, reply_source
from builder.refit import gram_matrices, refit_down
from builder.shrink import save_checkpoint, slice_ffn
from tests.prunekit import tiny_config


@pytest.fixture(scope="module")
def models(tiny_base):
    model, tok = load_model(tiny_base)
    return model, tok


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


SYSTEM = "You are Pip, a cheeky street urchin who runs errands for coin."


def _data(tok):
    qa = [("Who are you?", "Pip! Best runner in Dunmarrow, cheapest too."),
          ("Can you carry a letter?", "For two coppers I'd carry the whole post office."),
          ("Where is the smithy?", "Anvil Yard, follow the smoke and the swearing.")]
    prefix, _ = lm.chat_seq(tok, SYSTEM, [])
    return lm.SeqSet(prefix, [lm.chat_seq(tok, SYSTEM, [("user", q), ("assistant", a)])[1] for q, a in qa])


def test_slicing_everything_keeps_outputs_identical(models):
    model, tok = models
    pruned = copy.deepcopy(model)
    n = model.config.intermediate_size
    order = [torch.randperm(n, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    slice_ffn(pruned, [o.sort().values for o in order])
    ids = torch.tensor([tok("Hello there, smith. What do you sell?")["input_ids"]])
    assert (_logits(model, ids) - _logits(pruned, ids)).abs().max() < 1e-5


def test_checkpoint_is_stock_and_matches_the_sliced_model(models, tiny_base, tmp_path):
    model, tok = models
    pruned = copy.deepcopy(model)
    kept = [torch.arange(0, 128, 2), torch.arange(1, 128, 2)[:64]]
    slice_ffn(pruned, kept)
    assert pruned.model.layers[0].mlp.gate_proj.weight.shape == (64, 64)
    down = model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(pruned.model.layers[1].mlp.down_proj.weight, down[:, kept[1]])
    out = save_checkpoint(pruned, tiny_base, tmp_path / "ckpt")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.intermediate_size == 64
    assert AutoTokenizer.from_pretrained(out).encode("Hello") == tok.encode("Hello")
    ids = torch.tensor([tok("Where is the forge?")["input_ids"]])
    assert (_logits(loaded, ids) - _logits(pruned, ids)).abs().max() < 1e-6
    assert "ffn_widths" not in json.loads((out / "config.json").read_text())  # uniform: a stock config
    with pytest.raises(ValueError, match="all 2 layers"):
        slice_ffn(copy.deepcopy(model), [torch.arange(64)])


def test_checkpoint_with_widths_per_layer_round_trips(models, tiny_base, tmp_path):
    """builder.widths gives layers different widths: config.json lists them, load_model rebuilds the model."""
    model, tok = models
    pruned = copy.deepcopy(model)
    kept = [torch.arange(0, 128, 2)[:48], torch.arange(1, 128, 2)[:16].tolist() + list(range(32, 96))]
    slice_ffn(pruned, [torch.as_tensor(k) for k in kept])
    out = save_checkpoint(pruned, tiny_base, tmp_path / "ckpt")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["ffn_widths"] == [48, 80] and cfg["intermediate_size"] == 80
    loaded, _ = load_model(out)
    assert [m.gate_proj.out_features for m in lm.mlps(loaded)] == [48, 80]
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.tensor([tok("Where is the forge?")["input_ids"]])
    assert (_logits(loaded, ids) - _logits(pruned, ids)).abs().max() < 1e-6
    (out / "model.safetensors").rename(out / "gone.bin")
    with pytest.raises(BaseModelError, match="weights missing"):
        load_model(out)


@pytest.mark.parametrize("scope,dtype", [("ffn", "bf16"), ("all", "bf16"), ("ffn", "fp32")])
def test_heal_lowers_kl_and_respects_scope(models, scope, dtype):
    dense, tok = models
    student = copy.deepcopy(dense)
    slice_ffn(student, [torch.arange(48), torch.arange(48)])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    data = _data(tok)
    config = tiny_config(heal_steps=25, heal_batch=3, heal_lr=3e-3, heal_scope=scope, dtype=dtype)
    stats = heal(student, dense, data, config, tok.pad_token_id)
    assert stats["steps"] == 25 and stats["loss_end"] < stats["loss_start"]
    for name, p in student.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert p.dtype == torch.float32
        assert changed == (scope == "all" or ".mlp." in name), name


def _kl(dense, student, data, pad):
    with torch.no_grad():
        t = lm.target_forward(dense, lm.prefix_kv(dense, data.prefix), data.seqs, pad)
        s = lm.target_forward(student, lm.prefix_kv(student, data.prefix), data.seqs, pad)
    return lm.kl_per_token(t, s).mean().item()


def test_gram_counts_each_real_token_once(models):
    dense, tok = models
    data = _data(tok)
    parts, tokens = gram_matrices(dense, data, 2, tok.pad_token_id, folds=2)  # batch 2: a batch is padded
    grams = [sum(p.values()) for p in parts]
    assert sorted(sorted(k) for k in parts[0]) == [[], [0], [1]]  # the prompt, then sequences by fold
    assert tokens == len(data.prefix) + sum(len(s.ids) for s in data.seqs)
    expected = [torch.zeros_like(g, dtype=torch.float64) for g in grams]
    captured: list[torch.Tensor] = []
    with lm.channel_hook(dense, lambda i, h: captured.append((i, h[0].double()))), torch.no_grad():
        for s in data.seqs:  # each whole sequence alone, unpadded; the prompt once
            dense(input_ids=torch.tensor([data.prefix + s.ids]))
    for n, (i, h) in enumerate(captured):
        h = h if n < len(grams) else h[len(data.prefix):]
        expected[i] += h.T @ h
    for g, e in zip(grams, expected):
        assert torch.allclose(g.double(), e, rtol=1e-4, atol=1e-4)
    first = [torch.zeros_like(e) for e in expected]  # fold 0 holds sequences 0 and 2, not the prompt
    captured.clear()
    with lm.channel_hook(dense, lambda i, h: captured.append((i, h[0].double()))), torch.no_grad():
        for s in data.seqs[0::2]:
            dense(input_ids=torch.tensor([data.prefix + s.ids]))
    for i, h in captured:
        first[i] += h[len(data.prefix):].T @ h[len(data.prefix):]
    for p, e in zip(parts, first):
        assert torch.allclose(p[frozenset({0})].double(), e, rtol=1e-4, atol=1e-4)


def test_refit_keeps_full_width_and_lowers_the_error_of_a_cut(models):
    dense, tok = models
    data, pad = _data(tok), tok.pad_token_id
    grams, _ = gram_matrices(dense, data, 3, pad, folds=2)
    n = dense.config.intermediate_size
    same = copy.deepcopy(dense)
    stats = refit_down(same, [torch.arange(n)] * 2, grams, (0.01,))
    assert stats["error_after"] < 1e-6
    for a, b in zip(same.parameters(), dense.parameters()):
        assert (a - b).abs().max() < 1e-3 * b.abs().max()

    kept = [torch.arange(0, n, 2), torch.arange(1, n, 2)]
    plain, refit = copy.deepcopy(dense), copy.deepcopy(dense)
    stats = refit_down(refit, kept, grams, (0.01,))
    assert stats["error_after"] < 0.8 * stats["error_before"]
    for (name, a), b in zip(refit.named_parameters(), dense.parameters()):
        assert torch.equal(a, b) == ("down_proj" not in name), name  # only the character's FFN output moves
    slice_ffn(plain, kept)
    slice_ffn(refit, kept)
    assert _kl(dense, refit, data, pad) < 0.8 * _kl(dense, plain, data, pad)


@pytest.mark.parametrize("predictable", [True, False])
def test_refit_cross_validation_fits_only_what_generalises(models, predictable):
    """Constructed activations: when the cut channels are a linear function of the kept ones, any fit generalises
    and the smallest ridge wins; when they are noise and each fold has fewer tokens than kept channels, a fit
    memorises its fold and the largest ridge (keep the weights) must win."""
    dense, _ = models
    n = dense.config.intermediate_size
    kept = torch.arange(n // 2)
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(n // 2, n // 2, generator=g) / 8

    def fold(tokens: int) -> torch.Tensor:
        h_s = torch.randn(tokens, n // 2, generator=g)
        h_r = h_s @ mix if predictable else torch.randn(tokens, n // 2, generator=g)
        h = torch.cat([h_s, h_r], dim=1)
        return h.T @ h

    tokens = 400 if predictable else 40
    parts = {frozenset(): torch.zeros(n, n), frozenset({0}): fold(tokens), frozenset({1}): fold(tokens)}
    student = copy.deepcopy(dense)
    stats = refit_down(student, [kept, kept], [parts, parts], (0.01, 100.0))
    assert stats["ridge_per_layer"] == ([0.01, 0.01] if predictable else [100.0, 100.0])


def test_refit_with_nothing_to_validate_on_keeps_to_the_largest_ridge(models):
    dense, tok = models
    data = _data(tok)
    one = lm.SeqSet([], data.seqs[:1])  # one sequence, no prompt: a single fold, nothing left to fit without it
    grams, _ = gram_matrices(dense, one, 1, tok.pad_token_id, folds=2)
    n = dense.config.intermediate_size
    stats = refit_down(copy.deepcopy(dense), [torch.arange(n // 2)] * 2, grams, (0.01, 10.0))
    assert stats["ridge_per_layer"] == [10.0, 10.0]


def test_on_policy_steps_train_on_the_students_own_replies(models):
    dense, tok = models
    data = _data(tok)
    queries = ["Who are you?", "Can you carry a letter?", "Where is the smithy?", "What's new?"]
    assert [sum(on_policy_step(i, share) for i in range(24)) for share in (0.0, 0.25, 0.5, 1.0)] == [0, 6, 12, 24]

    def run(**overrides):
        config = tiny_config(heal_batch=2, heal_lr=3e-3, on_policy_pool=3, generation_rows=2, teacher_max_tokens=8,
                             **overrides)
        source, pools = reply_source(tok, SYSTEM, queries, config), []

        def replies(model):
            pools.append(source(model))
            return pools[-1]
        student = copy.deepcopy(dense)
        slice_ffn(student, [torch.arange(48), torch.arange(48)])
        return heal(student, dense, data, config, tok.pad_token_id, replies=replies), pools

    stats, pools = run(heal_steps=8, heal_on_policy=0.5, on_policy_refresh=4)
    assert stats["on_policy_steps"] == 4 and len(pools) == 2  # steps 1, 3, 5, 7; fresh pools at 1 and 5
    assert stats["on_policy_replies"] == sum(len(p) for p in pools) > 0
    for seq in pools[0]:  # the reply is the target, the query is context
        assert any(seq.target) and not seq.target[0]
    # one pool for every step: the student learns the teacher's view of its own replies
    stats, pools = run(heal_steps=20, heal_on_policy=1.0, on_policy_refresh=100)
    assert len(pools) == 1 and stats["on_policy_steps"] == 20 and stats["loss_end"] < stats["loss_start"]
    stats, pools = run(heal_steps=6, heal_on_policy=0.0)
    assert pools == [] and stats["on_policy_steps"] == 0


def test_auto_dtype_is_bf16_only_where_native():
    assert lm.train_dtype("auto", "cpu") == (torch.bfloat16 if lm.native_bf16("cpu") else torch.float32)
    assert lm.train_dtype("auto", "cuda") == torch.bfloat16
    assert lm.train_dtype("bf16", "cpu") == torch.bfloat16 and lm.train_dtype("fp32", "cuda") == torch.float32
    with pytest.raises(ConfigError, match="dtype"):
        tiny_config(dtype="fp16")
