"""Channel selection: the straight-through mask learns, and every method returns k valid channels per layer."""
from __future__ import annotations

import pytest
import torch

from builder import lm, selection
from builder.basemodel import load_model
from builder.config import METHODS, round_channels
from tests.prunekit import tiny_config


@pytest.fixture(scope="module")
def setup(tiny_base):
    model, tok = load_model(tiny_base)
    for p in model.parameters():
        p.requires_grad_(False)
    system = "You are Magda Kettleburn, the blacksmith of Dunmarrow. Gruff, warm, proud of her craft."
    turns = [("What do you sell?", "Blades, hinges, horseshoes. Good steel, fair price."),
             ("Who are you?", "Magda. I keep the forge hot and the town in nails."),
             ("Any news?", "The mine is closed and the watch is thin. Bad times for honest work."),
             ("Can you fix my sword?", "Leave it on the anvil. Come back at dusk.")]
    prefix, _ = lm.chat_seq(tok, system, [])
    persona = lm.SeqSet(prefix, [lm.chat_seq(tok, system, [("user", q), ("assistant", a)])[1] for q, a in turns])
    generic = lm.SeqSet([], [lm.text_seq(tok, t, 64) for t in (
        "The weather tomorrow will be dry with light winds from the west.",
        "Cook the garlic until it turns pale gold, then add the tomatoes.")])
    return model, tok, selection.SelectionData(persona, generic)


def test_straight_through_mask_is_hard_and_passes_gradients():
    z = torch.tensor([0.3, 2.0, 1.0, -1.0], requires_grad=True)
    (m,) = selection.hard_masks([z], 2)
    assert m.tolist() == [0.0, 1.0, 1.0, 0.0]
    (m * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    assert z.grad.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_learned_mask_moves_toward_lower_loss(setup):
    model, tok, data = setup
    k = round_channels(model.config.intermediate_size, 0.5, 16)
    config = tiny_config(mask_steps=30, mask_batch=4, mask_lr=0.001, mask_probe=0)  # the last step's mask
    init = selection._normalise(selection.activation_score(model, data.persona, 4, tok.pad_token_id))
    learned, stats = selection.learn_mask(model, data.persona, init, k, config, tok.pad_token_id)
    assert stats == {}

    def loss(scores):
        masks = [m.detach() for m in selection.hard_masks(scores, k)]
        with torch.no_grad():
            dense_kv = lm.prefix_kv(model, data.persona.prefix)
            return float(selection.masked_kl(model, data.persona, data.persona.seqs, masks, dense_kv,
                                             tok.pad_token_id))

    before, after = loss(init), loss(learned)
    assert after < 0.95 * before, (before, after)
    assert [t.tolist() for t in selection.topk(learned, k)] != [t.tolist() for t in selection.topk(init, k)]
    assert not any(p.requires_grad for p in model.parameters())  # weights stayed frozen, flags restored


def test_mask_keeps_its_best_probe_checkpoint_when_training_drifts(setup):
    model, tok, data = setup
    k = round_channels(model.config.intermediate_size, 0.5, 16)
    # a step size 250x the default reshuffles the mask into noise: the probe must catch it
    config = tiny_config(mask_steps=24, mask_batch=2, mask_lr=0.5, mask_probe=1, mask_eval_every=4)
    init = selection._normalise(selection.activation_score(model, data.persona, 4, tok.pad_token_id))
    learned, stats = selection.learn_mask(model, data.persona, init, k, config, tok.pad_token_id)
    steps, kls = zip(*stats["probe_kl"])
    assert steps == (0, 4, 8, 12, 16, 20, 24) and stats["probe_sequences"] == 1
    assert kls[-1] > min(kls)  # it drifted past its best...
    assert stats["chosen_step"] == steps[kls.index(min(kls))]  # ...and the best checkpoint was returned
    probe, train = selection.split_probe(data.persona.seqs, config)
    assert len(probe) == 1 and len(train) == 3 and probe[0] not in train
    with torch.no_grad():
        dense_kv = lm.prefix_kv(model, data.persona.prefix)
    checks = selection.probe_batches(model, data.persona, probe, dense_kv, 4, tok.pad_token_id)
    kl = selection.probe_kl(model, data.persona, checks, learned, k, tok.pad_token_id)
    assert kl == pytest.approx(min(kls), abs=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_keeps_k_valid_channels(setup, method):
    model, tok, data = setup
    before = {n: p.clone() for n, p in model.state_dict().items()}
    kept, _ = selection.select_channels(method, model, data, 48, tiny_config(mask_steps=2), tok.pad_token_id)
    assert len(kept) == model.config.num_hidden_layers
    for idx in kept:
        assert len(idx) == 48 and idx.tolist() == sorted(set(idx.tolist()))
        assert 0 <= int(idx.min()) and int(idx.max()) < model.config.intermediate_size
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # the dense model is untouched


def test_baselines_respond_to_the_weights(setup, tiny_base):
    model, tok, data = setup
    dead = torch.arange(0, 128, 2)  # silence half the channels of every layer
    model2, _ = load_model(tiny_base)
    with torch.no_grad():
        for mlp in lm.mlps(model2):
            mlp.gate_proj.weight[dead] = 0.0
            mlp.up_proj.weight[dead] = 0.0
            mlp.down_proj.weight[:, dead] = 0.0
    for method in ("magnitude", "wanda-sp", "taylor", "persona-activation"):
        kept, _ = selection.select_channels(method, model2, data, 64, tiny_config(), tok.pad_token_id)
        for idx in kept:
            assert not set(idx.tolist()) & set(dead.tolist()), method
