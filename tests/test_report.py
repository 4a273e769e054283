"""builder.report: per-character and roster pages, the kept-channel SVG, and a real headless-Chromium render."""
from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest

from builder.artifact import write_artifact
from builder.basemodel import ensure_base_model
from builder.cards import load_roster
from builder.config import resolve_config
from builder.prune import PruneResult
from builder.report import BINS, kept_channels_svg, write_roster_report
from tests.slicing import slice_ffn

SVG = "{http://www.w3.org/2000/svg}"


def test_svg_marks_kept_channels_per_layer() -> None:
    kept = [list(range(0, 64)), list(range(64, 128)), []]
    root = ET.fromstring(kept_channels_svg(kept, 128, bins=BINS))
    rects = root.findall(f"{SVG}rect")
    assert len(rects) == 3 * BINS
    fills = [r.get("fill") for r in rects]
    dark, light = "rgb(45,36,27)", "rgb(245,196,147)"
    assert fills[:BINS // 2] == [dark] * (BINS // 2) and fills[BINS // 2:BINS] == [light] * (BINS // 2)
    assert fills[BINS:BINS + BINS // 2] == [light] * (BINS // 2) and fills[2 * BINS:] == [light] * BINS
    assert [t.text for t in root.findall(f"{SVG}text")][-2:] == ["L2", "0"]  # each row ends with its width
    assert [t.text for t in root.findall(f"{SVG}text")][1:3] == ["L0", "64"]


@pytest.fixture(scope="module")
def pruned_dist(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, roster_dir: Path) -> Path:
    """Two artifacts from sliced checkpoints with a PruneResult holding metrics and samples as builder.evaluate
    writes them (names suffixed _dense/_pruned), including text with control bytes a tiny model emits."""
    dist = tmp_path_factory.mktemp("rdist")
    base = ensure_base_model(tiny_base)
    for seed, ch in enumerate(sorted(load_roster(roster_dir).characters, key=lambda c: c.id)[:2]):
        ckpt, kept = slice_ffn(tiny_base, dist.parent / f"ck-{ch.id}", keep=64, seed=seed)
        metrics = {"kl": np.float32(0.21), "ppl_generic_dense": 26.7, "ppl_generic_pruned": 57.6, "judge_accuracy_dense": 0.9,
                   "judge_accuracy_pruned": 0.8, "baselines": {"magnitude": {"ppl_generic_pruned": 113.0}},
                   "method": "persona-pruner", "stage_cpu_seconds": {"calibration": 30.0, "heal": 10.0}}
        samples = [{"query": "Who are you?", "dense": f"I am {ch.name} <b>", "pruned": "I am\x00 <script>x"}]
        prune = PruneResult(ckpt, kept, metrics, seed == 0, [] if seed == 0 else ["KL too high"], samples, 1.0)
        write_artifact(ckpt, ch, dist / ch.id, resolve_config("fast"), base, prune)
    return dist


def test_character_report_contents(pruned_dist: Path) -> None:
    folder = sorted(p for p in pruned_dist.iterdir() if p.is_dir())[0]
    data = json.loads((folder / "report.json").read_text())
    assert data["size"]["ffn_channels"] == 64 and data["size"]["base_ffn_channels"] == 128
    assert data["size"]["artifact_bytes"] < data["size"]["dense_artifact_bytes"]
    assert len(data["kept_channels"]) == 2 and data["verification"]["probe_tokens"] == 64
    assert abs(data["quality"]["kl"] - 0.21) < 1e-6  # numpy scalars in metrics become JSON numbers
    page = (folder / "report.html").read_text()
    assert "<svg" in page and "<script" not in page and "&lt;script&gt;" in page and "\x00" not in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing to fetch
    assert "baseline magnitude" in page and "113" in page and "ppl_generic" in page
    cost = page[page.index("Build cost"):]
    assert '<td>heal</td><td class="num">10</td><td>25%</td>' in cost and '<td>total</td><td class="num">40</td>' in cost
    assert "stage_cpu_seconds" not in page  # its own table, not a row of the scalars
    ET.fromstring(page[page.index("<svg"):page.index("</svg>") + 6])


def _png_stats(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct byte values of the decompressed image data) from the PNG's own chunks."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", (0, 0)
    while pos < len(raw):
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        body = raw[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    return size[0], size[1], len(set(zlib.decompress(idat)))


def _screenshot(chromium: str, page: Path, png: Path) -> None:
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--no-first-run", "--window-size=1000,1400",
                    f"--screenshot={png}", page.as_uri()], check=True, capture_output=True, timeout=120)


def test_roster_report_renders_in_headless_chromium(pruned_dist: Path, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    ids = sorted(p.name for p in pruned_dist.iterdir() if p.is_dir())
    page = write_roster_report(pruned_dist, ids, {"ghost": "cards: broken.yaml: name: missing"})
    text = page.read_text()
    assert all(f'<section id="{i}">' in text for i in ids) and "ghost" in text and text.count("<svg") == 2
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    _screenshot(chromium, page, tmp_path / "report.png")
    _screenshot(chromium, blank, tmp_path / "blank.png")
    w, h, distinct = _png_stats(tmp_path / "report.png")
    _, _, blank_distinct = _png_stats(tmp_path / "blank.png")
    assert (w, h) == (1000, 1400)
    assert blank_distinct < 10 < distinct  # text, tables and the heat strip vs one flat colour
    assert (tmp_path / "report.png").stat().st_size > 5 * (tmp_path / "blank.png").stat().st_size
