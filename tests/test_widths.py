"""Per-layer FFN widths: the grid, the greedy allocation at a fixed total, and the selection that uses them."""
from __future__ import annotations

import pytest

from builder import widths
from tests.prunekit import tiny_config


def test_grid_steps_around_k_and_ends_at_the_full_width():
    assert widths.grid(1152, 1536, 128, 1) == ([1024, 1152, 1280, 1408, 1536], [1024, 1152, 1280])
    assert widths.grid(1344, 1536, 128, 1) == ([1216, 1344, 1472, 1536], [1216, 1344, 1472])
    # never below one step: k = 128 cannot give channels away
    assert widths.grid(128, 1536, 128, 2)[0][0] == 128
    assert widths.grid(64, 128, 16, 1) == ([48, 64, 80, 96, 112, 128], [48, 64, 80])


def test_interpolate_puts_the_full_width_at_zero_and_is_linear_between():
    curve = widths.interpolate({48: 0.4, 64: 0.3, 80: 0.2}, [48, 64, 80, 96, 112, 128])
    assert curve[48] == 0.4 and curve[80] == 0.2 and curve[128] == 0.0
    assert curve[96] == pytest.approx(0.2 * 2 / 3) and curve[112] == pytest.approx(0.2 / 3)


def test_allocation_keeps_the_total_and_feeds_the_costly_layers():
    grid = [48, 64, 80, 96, 112, 128]
    cheap = widths.interpolate({48: 0.04, 64: 0.03, 80: 0.02}, grid)
    costly = widths.interpolate({48: 0.40, 64: 0.30, 80: 0.20}, grid)
    chosen = widths.allocate([cheap, costly, cheap, cheap], grid, 4 * 64)
    assert sum(chosen) == 4 * 64
    assert chosen[1] > 64 and all(w <= 64 for i, w in enumerate(chosen) if i != 1)
    # alike layers with falling gains stay uniform
    assert widths.allocate([cheap] * 4, grid, 4 * 64) == [64] * 4


def test_layer_widths_measures_each_layer_alone():
    seen = []

    def measure(layer, width):  # layer 0 costs ten times what the others do, per channel cut
        seen.append((layer, width))
        return (10.0 if layer == 0 else 1.0) * (128 - width) ** 1.5

    config = tiny_config(width_step=16, width_reach=1)
    chosen, stats = widths.layer_widths(measure, 3, 128, 64, config)
    assert sum(chosen) == 3 * 64 and chosen[0] > 64 and stats["ffn_widths"] == chosen
    assert sorted(seen) == [(i, w) for i in range(3) for w in (48, 64, 80)]
    assert len(stats["width_curves"]) == 3
    assert widths.layer_widths(measure, 3, 128, 64, tiny_config(ffn_widths="uniform")) == ([64] * 3, {})
    assert widths.layer_widths(measure, 3, 128, 128, config) == ([128] * 3, {})  # nothing cut


def test_persona_selection_allocates_and_baselines_stay_uniform(tiny_base):
    import torch

    from builder import lm, selection
    from builder.basemodel import load_model

    model, tok = load_model(tiny_base)
    for p in model.parameters():
        p.requires_grad_(False)
    system = "You are Magda Kettleburn, the blacksmith of Dunmarrow."
    qa = [(f"Question {i} about the forge?", f"Answer {i}: steel, sparks and honest work.") for i in range(12)]
    prefix, _ = lm.chat_seq(tok, system, [])
    persona = lm.SeqSet(prefix, [lm.chat_seq(tok, system, [("user", q), ("assistant", a)])[1] for q, a in qa])
    data = selection.SelectionData(persona, lm.SeqSet([], [lm.text_seq(tok, "Plain generic text here.", 32)]))
    torch.manual_seed(0)
    config = tiny_config(mask_steps=2, mask_probe=4, width_probe=4)
    kept, stats = selection.select_channels("persona-pruner", model, data, 64, config, tok.pad_token_id)
    assert sum(len(k) for k in kept) == 2 * 64 and stats["ffn_widths"] == [len(k) for k in kept]
    kept, stats = selection.select_channels("wanda-sp", model, data, 64, config, tok.pad_token_id)
    assert [len(k) for k in kept] == [64, 64] and "ffn_widths" not in stats


def test_probe_measure_runs_from_the_cut_layer_and_matches_a_full_pass(tiny_base):
    import torch

    from builder import lm
    from builder.basemodel import load_model

    model, tok = load_model(tiny_base)
    system = "You are Rosie, who keeps the Lamplighter inn."
    prefix, _ = lm.chat_seq(tok, system, [])
    seqs = lm.SeqSet(prefix, [lm.chat_seq(tok, system, [("user", q), ("assistant", a)])[1] for q, a in (
        ("A room?", "Two silver, and mind the stairs."), ("Any stew?", "Mutton, hot since noon, love."),
        ("Who drinks here?", "Miners, mostly, and the odd lost bard."))])
    scores = [torch.rand(128, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    measure = widths.probe_measure(model, seqs, seqs.seqs, scores, 2, tok.pad_token_id)
    assert measure(0, 128) == pytest.approx(0.0, abs=1e-6) and measure(1, 128) == pytest.approx(0.0, abs=1e-6)

    # the reference: a whole forward pass with layer 1 masked after the dense system prompt
    mask = torch.zeros(128)
    mask[scores[1].topk(48).indices] = 1.0
    with torch.no_grad():
        kv = lm.prefix_kv(model, seqs.prefix)
        teacher = lm.target_forward(model, kv, seqs.seqs, tok.pad_token_id)
        with lm.channel_hook(model, lambda i, h: h * mask if i == 1 else None):
            student = lm.target_forward(model, kv, seqs.seqs, tok.pad_token_id)
    expected = float(lm.kl_per_token(teacher, student).mean())
    assert expected > 1e-4 and measure(1, 48) == pytest.approx(expected, rel=1e-4)
    assert measure(1, 32) > measure(1, 96)
