"""Shared-prefix attention (builder.prefix_attention) against the plainest reference there is: each whole sequence,
system prompt included, run alone through the stock model with no cache and no padding."""
from __future__ import annotations

import pytest
import torch

from builder import lm
from builder.basemodel import load_model
from builder.prefix_attention import NAME, suffix_mask

SYSTEM = "You are Magda, the blacksmith of Dunmere. You speak bluntly and you love your anvil."
TURNS = [[("user", "Hello there!"), ("assistant", "Aye. What do you want?")],
         [("user", "What do you sell, smith? Tell me everything."), ("assistant", "Blades, nails, horseshoes.")],
         [("user", "Bye."), ("assistant", "Hm.")]]


@pytest.fixture()
def model_tok(tiny_base):
    model, tok = load_model(tiny_base)
    return model, tok


def _rows(tok):
    prefix, _ = lm.chat_seq(tok, SYSTEM, [])
    return prefix, [lm.chat_seq(tok, SYSTEM, turns)[1].ids for turns in TURNS]


def _every(ids: list[int]) -> lm.Seq:
    """Every token but the first a target: target_forward then gives the logits of positions 0..len-2."""
    return lm.Seq(ids, [False] + [True] * (len(ids) - 1))


def _alone(model, ids: list[int]) -> torch.Tensor:
    """Logits of one unpadded sequence through the stock attention (sdpa), no cache: (S, V)."""
    model.set_attn_implementation("sdpa")
    return model(input_ids=torch.tensor([ids])).logits[0]


def test_suffix_mask_is_causal_over_valid_keys_and_never_empty():
    m = suffix_mask(torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]]), 2)[:, 0]  # (B, Q, S): the last two are queries
    assert m[0].tolist() == [[False, True, True, False], [False, True, True, True]]
    assert m[1].tolist() == [[True, True, True, False], [True, True, True, True]]  # right padding sees itself too
    left = suffix_mask(torch.tensor([[0, 0, 1, 1]]), 4)[0, 0]
    assert left.tolist() == [[True, False, False, False], [False, True, False, False],  # left padding: itself only
                             [False, False, True, False], [False, False, True, True]]


def test_prefix_batch_matches_each_sequence_run_alone(model_tok):
    model, tok = model_tok
    prefix, rows = _rows(tok)
    with torch.no_grad():
        expected = [_alone(model, prefix + r)[len(prefix):-1] for r in rows]
        logits = lm.target_forward(model, lm.prefix_kv(model, prefix), [_every(r) for r in rows], tok.pad_token_id)
        unprefixed = lm.target_forward(model, None, [_every(prefix + r) for r in rows], tok.pad_token_id)
        hidden = lm.hidden_states(model, lm.prefix_kv(model, prefix), rows, tok.pad_token_id)
    assert model.config._attn_implementation == NAME
    assert len({len(r) for r in rows}) == 3  # right padding is exercised
    assert torch.allclose(logits, torch.cat(expected), atol=1e-4)
    first = len(prefix) + len(rows[0]) - 1
    assert torch.allclose(unprefixed[len(prefix):first], expected[0], atol=1e-4)
    # hidden states of every layer, without the vocabulary projection: the last one projects to the same logits
    assert len(hidden) == model.config.num_hidden_layers + 1
    assert torch.allclose(model.lm_head(hidden[-1][0, :len(rows[0]) - 1]), expected[0], atol=1e-4)


def test_gradients_through_the_prefix_batch_match_the_reference(model_tok):
    model, tok = model_tok
    prefix, rows = _rows(tok)
    weight = model.model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        kv = lm.prefix_kv(model, prefix)
    lm.target_forward(model, kv, [_every(r) for r in rows], tok.pad_token_id).logsumexp(-1).sum().backward()
    ours, weight.grad = weight.grad.clone(), None
    # the reference trains the prefix positions too; their gradient is what the builder leaves out on purpose
    # (lm.prefix_kv), so the reference runs the prefix without grad as well
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        past = model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
    total = 0
    for r in rows:
        cache = type(past)()
        for i, layer in enumerate(past.layers):
            cache.update(layer.keys.clone(), layer.values.clone(), i)
        out = model(input_ids=torch.tensor([r]), past_key_values=cache, use_cache=True,
                    position_ids=torch.arange(len(prefix), len(prefix) + len(r))[None])
        total = total + out.logits[0, :-1].logsumexp(-1).sum()
    total.backward()
    assert torch.allclose(ours, weight.grad, atol=1e-4, rtol=1e-3)


def test_generation_from_the_prefix_equals_generation_of_the_whole_prompt(model_tok):
    model, tok = model_tok
    prefix, _ = lm.chat_seq(tok, SYSTEM, [])
    prompts = [lm.chat_seq(tok, SYSTEM, [("user", q)], generation_prompt=True)[1].ids for q in ("Hi.", "Any work?")]
    g = torch.Generator()
    shared = lm.generate(model, tok, lm.prefix_kv(model, prefix), prompts, 2, 10, 0.0, 1.0, g)
    whole = lm.generate(model, tok, None, [prefix + p for p in prompts], 1, 10, 0.0, 1.0, g)
    assert shared == [whole[0], whole[0], whole[1], whole[1]]
    assert any(shared)  # something was generated: the comparison is not between empty lists
    for p, reply in zip(prompts, whole):  # and greedy over the model run alone gives the same tokens
        ids = prefix + p
        for t in reply:
            with torch.no_grad():
                assert int(_alone(model, ids)[-1].argmax()) == t
            ids = ids + [t]


def test_target_rows_pick_the_rows_before_each_target_in_order_and_pass_gradients():
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3).requires_grad_()
    seqs = [lm.Seq([5, 6, 7, 8], [False, True, False, True]), lm.Seq([5, 6, 7], [False, False, True])]
    picked = lm.target_rows(logits, seqs)  # targets at (0, 1), (0, 3), (1, 2): predicted from one position before
    assert picked.tolist() == [logits[0, 0].tolist(), logits[0, 2].tolist(), logits[1, 1].tolist()]
    picked.sum().backward()
    assert logits.grad.sum(-1).tolist() == [[3, 0, 3, 0], [0, 3, 0, 0]]
    assert lm.target_rows(logits, [lm.Seq([5], [False])]).shape == (0, 3)


def test_by_length_batches_like_lengths_together_and_keeps_every_index_once():
    lengths = [30, 5, 17, 5, 29, 11, 40]
    chunks = lm.by_length(lengths, 3)
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    assert [[lengths[i] for i in c] for c in chunks] == [[5, 5, 11], [17, 29, 30], [40]]
    seqs = [lm.Seq([7] * n, [True] * n) for n in lengths]
    assert [[len(s.ids) for s in b] for b in lm.seq_batches(seqs, 3)] == [[5, 5, 11], [17, 29, 30], [40]]
