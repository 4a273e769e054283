"""builder.buildcache: entries outlive the process, any change of key or salt misses, damage is recomputed; and
a rebuild with other settings skips calibration and the dense side of evaluation (tiny model, real files)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from builder.basemodel import ensure_base_model
from builder.buildcache import DiskCache
from builder.cards import load_roster
from builder.prune import RosterContext, prune_character
from tests.prunekit import tiny_config


def test_entries_survive_the_process_and_any_change_misses(tmp_path: Path, caplog) -> None:
    first = DiskCache(tmp_path, "base-a")
    key = ("magda", "card-sha", 64, (0.2, 0.85), ("a prompt",))
    first[key] = {"answers": ["Hm. Forty crowns.", "Nay."], "score": 0.5}
    again = DiskCache(tmp_path, "base-a")  # a later build: nothing in memory
    assert key in again and again[key] == {"answers": ["Hm. Forty crowns.", "Nay."], "score": 0.5}
    assert ("magda", "card-sha", 65, (0.2, 0.85), ("a prompt",)) not in again
    assert key not in DiskCache(tmp_path, "base-b")  # other base model, dtype or device
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json"]  # no temporary file left behind

    first.path(key).write_text('{"answers": ["Hm. For', encoding="utf-8")  # a torn write from elsewhere
    with caplog.at_level(logging.WARNING):
        assert key not in DiskCache(tmp_path, "base-a")
    assert "unreadable cache entry" in caplog.text


def test_a_rebuild_with_other_settings_reuses_calibration_and_dense_evaluation(tiny_base: Path, roster_dir: Path,
                                                                                tmp_path: Path) -> None:
    base = ensure_base_model(tiny_base)
    characters = sorted(load_roster(roster_dir).characters, key=lambda c: c.id)
    cache = tmp_path / "cache"

    def build(config, chars=characters):
        ctx = RosterContext.create(chars, base, config, cache)  # a fresh process's context each time
        lines: list[str] = []
        result = prune_character(chars[0], ctx, base, config, tmp_path / f"w{len(list(tmp_path.iterdir()))}",
                                 lines.append)
        return result, {line.split(":")[0] for line in lines}

    first, stages = build(tiny_config(ffn_keep=0.5))
    assert "calibration" in stages
    assert {p.parent.name for p in cache.rglob("*.json")} == {"calibration", "dense-eval"}

    second, stages = build(tiny_config(ffn_keep=0.75, heal_steps=1))  # another width and budget
    assert "calibration" not in stages and second.metrics["stage_cpu_seconds"].get("calibration") is None
    dense = {k: v for k, v in first.metrics.items() if k.endswith("_dense")}
    assert dense and {k: second.metrics[k] for k in dense} == dense  # the dense side came from the cache
    assert second.samples[0]["dense"] == first.samples[0]["dense"]
    assert second.metrics["intermediate_size"] != first.metrics["intermediate_size"]

    # a calibration setting, or another roster to contrast with, is a different calibration
    assert "calibration" in build(tiny_config(ffn_keep=0.5, n_train_queries=3))[1]
    renamed = [characters[0]] + [dataclasses.replace(c, description=c.description + " Hates mornings.")
                                 for c in characters[1:]]
    assert "calibration" in build(tiny_config(ffn_keep=0.5), renamed)[1]
