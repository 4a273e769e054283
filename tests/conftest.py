"""Shared fixtures: a tiny random model, the sample roster, and tiny artifacts built from them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.tinymodel import ROOT, make_tiny_base


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded 2-layer random Llama HF folder with a ChatML byte-level BPE tokenizer."""
    return make_tiny_base(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(scope="session")
def roster_dir() -> Path:
    """The sample roster shipped in characters/ (read-only: copy it before changing anything)."""
    return ROOT / "characters"


@pytest.fixture(scope="session")
def tiny_dist(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, roster_dir: Path) -> Path:
    """Artifacts of three sample characters exported from the tiny model (dense, fp32 so outputs are exact)."""
    from builder.artifact import write_artifact
    from builder.basemodel import ensure_base_model
    from builder.cards import load_roster
    from builder.config import resolve_config

    dist = tmp_path_factory.mktemp("tiny-dist")
    base = ensure_base_model(tiny_base)
    roster = load_roster(roster_dir)
    for character in sorted(roster.characters, key=lambda c: c.id)[:3]:
        config = resolve_config("fast", {"precision": "fp32", "ffn_keep": 1.0})
        write_artifact(tiny_base, character, dist / character.id, config, base)
    return dist


@pytest.fixture(scope="module")
def pool(tiny_dist: Path):
    """A runtime pool over the tiny artifacts, one per test module (one thread: tests run side by side)."""
    from runtime import NPCPool

    p = NPCPool(tiny_dist, threads=1)
    yield p
    p.close()


@pytest.fixture()
def tmp_roster(tmp_path: Path, roster_dir: Path) -> Path:
    """A writable copy of the sample roster."""
    return Path(shutil.copytree(roster_dir, tmp_path / "characters"))
