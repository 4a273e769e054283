"""Slicing keeps outputs exact, the written checkpoint is stock, and healing trains only what it should."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from builder import lm
from builder.basemodel import load_model
from builder.heal import heal
from builder.shrink import save_checkpoint, slice_ffn
from tests.prunekit import tiny_config


@pytest.fixture(scope="module")
def models(tiny_base):
    model, tok = load_model(tiny_base)
    return model, tok


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _data(tok):
    system = "You are Pip, a cheeky street urchin who runs errands for coin."
    qa = [("Who are you?", "Pip! Best runner in Dunmarrow, cheapest too."),
          ("Can you carry a letter?", "For two coppers I'd carry the whole post office."),
          ("Where is the smithy?", "Anvil Yard, follow the smoke and the swearing.")]
    prefix, _ = lm.chat_seq(tok, system, [])
    return lm.SeqSet(prefix, [lm.chat_seq(tok, system, [("user", q), ("assistant", a)])[1] for q, a in qa])


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
    with pytest.raises(ValueError, match="uniform width"):
        slice_ffn(copy.deepcopy(model), [torch.arange(64), torch.arange(48)])


@pytest.mark.parametrize("scope", ["ffn", "all"])
def test_heal_lowers_kl_and_respects_scope(models, scope):
    dense, tok = models
    student = copy.deepcopy(dense)
    slice_ffn(student, [torch.arange(48), torch.arange(48)])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    data = _data(tok)
    config = tiny_config(heal_steps=25, heal_batch=3, heal_lr=3e-3, heal_scope=scope)
    stats = heal(student, dense, data, config, tok.pad_token_id)
    assert stats["steps"] == 25 and stats["loss_end"] < stats["loss_start"]
    for name, p in student.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert p.dtype == torch.float32
        assert changed == (scope == "all" or ".mlp." in name), name
