"""builder.build and `npcforge build` / `npcforge inspect`: incremental, atomic (kill -9), isolated failures, --jobs,
index.json, the roster report, and a real prune_character run on the tiny model."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from builder.artifact import check_artifact, read_manifest
from builder.build import build_roster
from tests.prunekit import TINY
from tests.tinymodel import ROOT

DENSE = {"ffn_keep": 1.0}
CLI_DENSE = ("--preset", "fast", "--ffn-keep", "1.0", "--precision", "fp32")


@pytest.fixture()
def small_roster(tmp_path: Path, roster_dir: Path) -> Path:
    folder = tmp_path / "roster"
    folder.mkdir()
    for name in ("magda.yaml", "pip.yaml", "rosie.yaml"):
        shutil.copyfile(roster_dir / name, folder / name)
    return folder


def _cli(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "npcforge", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _statuses(summary) -> dict[str, str]:
    return {o.id: o.status for o in summary.outcomes}


def test_incremental_rebuilds_only_what_changed(small_roster: Path, tmp_path: Path, tiny_base: Path) -> None:
    out = tmp_path / "dist"
    first = build_roster(small_roster, out, "fast", DENSE, base_model=tiny_base)
    assert _statuses(first) == {"magda": "built", "pip": "built", "rosie": "built"} and first.ok
    index = json.loads((out / "index.json").read_text())
    assert [c["id"] for c in index["characters"]] == ["magda", "pip", "rosie"] and index["failed"] == []
    assert (out / "report.html").is_file() and all(check_artifact(out / c) == [] for c in ("magda", "pip", "rosie"))
    # unpruned, the default "auto" FFN precision is the trunk's: the base FFN is not rounded to int4 a second time
    assert read_manifest(out / "magda")["model"]["ffn_precision"] == "int8"

    second = build_roster(small_roster, out, "fast", DENSE, base_model=tiny_base)
    assert set(_statuses(second).values()) == {"skipped"}

    card = small_roster / "pip.yaml"
    card.write_text(card.read_text().replace("Pip", "Pipp", 1))
    (out / "rosie" / "character.json").write_text("{}")  # tampered: must not count as up to date
    third = build_roster(small_roster, out, "fast", DENSE, base_model=tiny_base)
    assert _statuses(third) == {"magda": "skipped", "pip": "built", "rosie": "built"}
    assert check_artifact(out / "rosie") == []

    other_config = build_roster(small_roster, out, "fast", {**DENSE, "precision": "fp32"}, only=["magda"],
                                base_model=tiny_base)
    assert _statuses(other_config) == {"magda": "built"}
    forced = build_roster(small_roster, out, "fast", {**DENSE, "precision": "fp32"}, only=["magda"],
                          base_model=tiny_base, force=True)
    assert _statuses(forced) == {"magda": "built"} and read_manifest(out / "magda")["model"]["precision"] == "fp32"
    # --only leaves the rest of dist/ listed in the index
    assert [c["id"] for c in json.loads((out / "index.json").read_text())["characters"]] == ["magda", "pip", "rosie"]


def test_failures_are_isolated_named_and_exit_1(small_roster: Path, tmp_path: Path, tiny_base: Path) -> None:
    (small_roster / "broken.yaml").write_text("name: [unclosed\n")
    bad = (small_roster / "rosie.yaml").read_text() + "\nbuild:\n  precision: int9\n"
    (small_roster / "rosie.yaml").write_text(bad)
    out = tmp_path / "dist"
    r = _cli("build", small_roster, "-o", out, "--base-model", tiny_base, *CLI_DENSE, "--json")
    assert r.returncode == 1, r.stderr
    summary = json.loads(r.stdout)
    status = {c["id"]: c for c in summary["characters"]}
    assert status["magda"]["status"] == "built" and status["pip"]["status"] == "built"
    assert status["broken"]["status"] == "failed" and "broken.yaml" in status["broken"]["reason"]
    assert status["rosie"]["status"] == "failed" and "precision" in status["rosie"]["reason"]
    assert "broken.yaml" in r.stderr and "[magda] export" in r.stderr  # progress per character and stage
    assert not (out / "rosie").exists() and check_artifact(out / "magda") == []
    index = json.loads((out / "index.json").read_text())
    assert {f["id"] for f in index["failed"]} == {"broken", "rosie"}


def test_usage_errors_exit_2(small_roster: Path, tmp_path: Path, tiny_base: Path) -> None:
    r = _cli("build", small_roster, "-o", tmp_path / "d", "--base-model", tiny_base, "--only", "nobody")
    assert r.returncode == 2 and "nobody" in r.stderr
    r = _cli("build", small_roster, "-o", tmp_path / "d", "--ffn-keep", "1.5")
    assert r.returncode == 2 and "ffn_keep" in r.stderr
    if not torch.cuda.is_available():  # CI has no GPU: asking for one is a usage error that says what to do
        r = _cli("build", small_roster, "-o", tmp_path / "d", "--base-model", tiny_base, "--device", "cuda")
        assert r.returncode == 2 and "device: cuda" in r.stderr and "--device cpu" in r.stderr


def test_kill_9_mid_build_leaves_no_partial_artifact_and_resumes(small_roster: Path, tmp_path: Path,
                                                                 tiny_base: Path) -> None:
    out = tmp_path / "dist"
    args = [sys.executable, "-m", "npcforge", "build", str(small_roster), "-o", str(out), "--base-model",
            str(tiny_base), *CLI_DENSE]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    victim = None
    try:
        while time.time() < deadline and victim is None:
            # kill while the second character is half written: one artifact done, one in a temp folder
            tmps = [p for p in out.glob(".tmp-*") if (p / "model.onnx.data").is_file()] if out.is_dir() else []
            done = [p for p in out.iterdir() if (p / "manifest.json").is_file()] if out.is_dir() else []
            if tmps and done:
                victim = tmps[0]
            else:
                time.sleep(0.05)
        assert victim is not None and proc.poll() is None, "the build finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    visible = [p for p in out.iterdir() if not p.name.startswith(".")]
    for p in visible:
        assert not p.is_dir() or check_artifact(p) == [], f"partial artifact {p}"
    assert any(p.name.startswith(".tmp-") for p in out.iterdir())
    completed = {p.name for p in visible if p.is_dir()}
    r = _cli("build", small_roster, "-o", out, "--base-model", tiny_base, *CLI_DENSE, "--json")
    assert r.returncode == 0, r.stderr
    status = {c["id"]: c["status"] for c in json.loads(r.stdout)["characters"]}
    assert all(status[c] == "skipped" for c in completed) and set(status) == {"magda", "pip", "rosie"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert all(check_artifact(out / c) == [] for c in status)


def test_jobs_build_in_parallel_processes(small_roster: Path, tmp_path: Path, tiny_base: Path) -> None:
    out = tmp_path / "dist"
    summary = build_roster(small_roster, out, "fast", DENSE, only=["magda", "pip"], base_model=tiny_base, jobs=2)
    assert _statuses(summary) == {"magda": "built", "pip": "built"}
    assert all(check_artifact(out / c) == [] for c in ("magda", "pip"))
    assert read_manifest(out / "magda")["builder"]["config"]["threads"] >= 1


def test_pruned_build_runs_the_pruning_pipeline(roster_dir: Path, tmp_path: Path, tiny_base: Path) -> None:
    out = tmp_path / "dist"
    messages: list[tuple[str, str]] = []
    summary = build_roster(roster_dir, out, "fast", {**TINY, "ffn_keep": 0.5, "ffn_keep_fallback": ""},
                           only=["magda"], base_model=tiny_base, progress=lambda cid, msg: messages.append((cid, msg)))
    outcome = summary.outcomes[0]
    assert outcome.status in ("built", "failed") and (out / "magda" / "manifest.json").is_file()
    m = read_manifest(out / "magda")
    assert m["model"]["intermediate_size"] == 64 and m["model"]["base_intermediate_size"] == 128
    assert m["quality"]["method"] == "persona-pruner" and "kl" in m["quality"]
    assert (outcome.status == "built") == m["quality"]["passed_gate"]
    report = json.loads((out / "magda" / "report.json").read_text())
    # per-layer widths (builder.widths) at the same total; the export took each layer's shape from its weights
    widths = [len(k) for k in report["kept_channels"]]
    assert m["model"]["ffn_widths"] == widths and sum(widths) == 2 * 64
    stages = [msg.split(":")[0] for cid, msg in messages if cid == "magda"]
    assert {"selection", "heal", "export", "verify"} <= set(stages)
    # only the cache of what a rebuild may reuse stays beside the artifacts (none with cache=False)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [".cache"]
    assert list((out / ".cache" / "calibration").glob("*.json"))
    other = tmp_path / "nocache"
    build_roster(roster_dir, other, "fast", {**TINY, "ffn_keep": 0.5}, only=["magda"],
                 base_model=tiny_base, cache=False)
    assert (other / "magda" / "manifest.json").is_file() and not [p for p in other.iterdir() if p.name[0] == "."]


def test_a_character_failing_the_gate_is_rebuilt_wider(roster_dir: Path, tmp_path: Path, tiny_base: Path) -> None:
    """max_kl 0 fails every pruned width: the build tries each fallback in turn and ships the base FFN, saying so,
    at the trunk's precision (an int4 FFN was asked for the pruned widths only), shared like the trunk."""
    out = tmp_path / "dist"
    messages: list[str] = []
    settings = {**TINY, "ffn_keep": 0.5, "ffn_keep_fallback": "0.75,1.0", "max_kl": 0.0, "ffn_precision": "int4"}
    summary = build_roster(roster_dir, out, "fast", settings, only=["magda"], base_model=tiny_base,
                           progress=lambda cid, msg: messages.append(msg))
    outcome = summary.outcomes[0]
    assert outcome.status == "built" and summary.ok and "widened to 1.0" in outcome.note
    m = read_manifest(out / "magda")
    assert m["model"]["intermediate_size"] == m["model"]["base_intermediate_size"] == 128
    assert m["model"]["ffn_precision"] == m["model"]["precision"] == "int8"
    assert m["builder"]["config"]["ffn_precision"] == "int4"
    assert {f"model.layers.{i}.mlp.{n}_proj.qweight" for i in range(2) for n in ("gate", "up", "down")} <= {
        t["name"] for t in m["shared_tensors"]}
    widths = m["quality"]["failed_widths"]
    assert [w["ffn_keep"] for w in widths] == [0.5, 0.75] and [w["intermediate_size"] for w in widths] == [64, 96]
    assert all(w["kl"] > 0 and any("KL" in r for r in w["gate_reasons"]) for w in widths)
    assert m["quality"]["passed_gate"] and m["builder"]["config"]["ffn_keep"] == 0.5  # the request, for up_to_date
    assert any("quality gate failed at ffn_keep 0.5" in msg and "trying 0.75" in msg for msg in messages)
    assert "Widened" in (out / "magda" / "report.html").read_text()
    assert "<td>1, widened</td>" in (out / "report.html").read_text()  # the roster page's FFN kept column
    assert not [p for p in out.iterdir() if p.name.startswith(".work")]  # failed widths' checkpoints are gone
    again = build_roster(roster_dir, out, "fast", settings, only=["magda"], base_model=tiny_base)
    assert again.outcomes[0].status == "skipped" and "0.5, 0.75" in again.outcomes[0].note

    # the ladder stops at the first width that passes: with a gate every model passes, 0.5 ships
    passing = build_roster(roster_dir, tmp_path / "d2", "fast", {**settings, "max_kl": 99.0,
                                                                 "max_degeneration_increase": 99.0,
                                                                 "max_judge_drop": 99.0},
                           only=["magda"], base_model=tiny_base)
    assert passing.outcomes[0].note == ""
    assert read_manifest(tmp_path / "d2" / "magda")["model"]["intermediate_size"] == 64


def test_inspect_reports_and_detects_tampering(small_roster: Path, tmp_path: Path, tiny_base: Path) -> None:
    out = tmp_path / "dist"
    build_roster(small_roster, out, "fast", {**DENSE, "ffn_precision": "int4"},
                 only=["magda"], base_model=tiny_base)
    assert read_manifest(out / "magda")["model"]["ffn_precision"] == "int4"
    r = _cli("inspect", out / "magda")
    assert r.returncode == 0 and "Magda Kettleburn" in r.stdout and "top-1" in r.stdout
    assert "int8, FFN int4" in r.stdout
    r = _cli("inspect", out / "magda", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["ok"] is True
    with open(out / "magda" / "tokenizer.json", "ab") as f:
        f.write(b" ")
    r = _cli("inspect", out / "magda")
    assert r.returncode == 1 and "tokenizer.json" in r.stderr and "BAD" in r.stdout
    r = _cli("inspect", tmp_path)
    assert r.returncode == 1 and "manifest.json: missing" in r.stderr
