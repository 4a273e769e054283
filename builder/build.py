"""Roster build: every character file of a folder → `OUT/<id>/` artifacts, `OUT/index.json`, `OUT/report.html`.

`build_roster(...)` loads the roster, resolves each character's BuildConfig (preset → card `build:` → command line),
skips characters whose artifact is up to date (same card, base model, builder version and config fingerprint, and
every file matches its manifest), and for the others runs `builder.prune.prune_character` then
`builder.artifact.write_artifact`. Each character builds in `OUT/.tmp-<id>-<pid>` (work files in
`OUT/.work-<id>-<pid>`) renamed into place, so a killed build leaves no partial artifact and the next run resumes;
stale temp folders of dead processes are removed at start. One failing character does not stop the others.
Calibrations and the dense side of evaluation are kept in `OUT/.cache` (builder.buildcache), so a character
rebuilt with other settings reuses them.
Output: a `BuildSummary` (per character: built / skipped / failed, reason, seconds).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import queue
import shutil
import time
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from builder.artifact import builder_version, check_artifact, read_manifest, ArtifactError
from builder.config import BuildConfig, ConfigError, resolve_config

log = logging.getLogger(__name__)
CACHE_DIR = ".cache"  # under OUT: what later builds may reuse (builder.buildcache); safe to delete

Progress = Callable[[str, str], None]  # (character id, message)


class BuildError(RuntimeError):
    """The build as a whole cannot start (bad folder, unknown --only id, no base model)."""


@dataclass
class Outcome:
    id: str
    status: str  # "built" | "skipped" | "failed"
    reason: str = ""
    seconds: float = 0.0
    passed_gate: bool | None = None
    path: str = ""
    note: str = ""  # e.g. the FFN was widened after the requested width failed the quality gate


@dataclass
class BuildSummary:
    out_dir: str
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(o.status != "failed" for o in self.outcomes)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "out_dir": self.out_dir, "seconds": round(self.seconds, 2),
                "characters": [asdict(o) for o in self.outcomes]}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out_dir: Path) -> list[Path]:
    """Remove `.tmp-*`, `.work-*`, `.old-*` folders left by processes that no longer run."""
    removed = []
    for p in out_dir.iterdir():
        if p.is_dir() and p.name.startswith((".tmp-", ".work-", ".old-")):
            pid = p.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or not _pid_alive(int(pid)) or int(pid) == os.getpid():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def up_to_date(folder: Path, character: Any, config: BuildConfig, base_sha256: str) -> tuple[bool, dict | None]:
    """True when the artifact was built from exactly these inputs and every file still matches its manifest."""
    try:
        m = read_manifest(folder)
    except ArtifactError:
        return False, None
    same = (m.get("card_sha256") == character.card_sha256 and m["base_model"].get("sha256") == base_sha256
            and m["builder"].get("version") == builder_version()
            and m["builder"].get("config_hash") == config.fingerprint())
    return (same and not check_artifact(folder)), m


# Per worker process: the dense model and caches shared by the characters this process builds.
_CONTEXT: dict[str, Any] = {}


def _build_one(character: Any, characters: list[Any], base: Any, config: BuildConfig, out_dir: Path,
               say: Callable[[str], None], cache_dir: Path | None = None) -> Outcome:
    from builder.artifact import write_artifact
    from builder.prune import RosterContext, prune_character

    t0 = time.perf_counter()
    work = out_dir / f".work-{character.id}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    ladder = config.keep_ladder()
    failed_widths: list[dict[str, Any]] = []  # the widths that failed the gate, wider ones tried after them
    try:
        for i, keep in enumerate(ladder):
            if keep >= 1.0:
                say("ffn_keep 1.0: exporting the dense base model")
                prune, checkpoint = None, base.path
                break
            key = f"{base.sha256}:{config.dtype}:{config.threads}:{config.device}:{cache_dir}"
            if key not in _CONTEXT:
                say("loading the dense model")
                _CONTEXT.clear()
                _CONTEXT[key] = RosterContext.create(characters, base, config, cache_dir)
            prune = prune_character(character, _CONTEXT[key], base, dataclasses.replace(config, ffn_keep=keep),
                                    work / f"keep-{keep}", progress=say)
            checkpoint = prune.checkpoint
            if prune.passed_gate or keep == ladder[-1]:
                break
            failed_widths.append(failed_width(prune))
            shutil.rmtree(work / f"keep-{keep}", ignore_errors=True)
            say(f"quality gate failed at ffn_keep {keep} ({'; '.join(prune.gate_reasons)}): trying {ladder[i + 1]}")
        write_artifact(checkpoint, character, out_dir / character.id, config, base, prune, progress=say,
                       failed_widths=failed_widths)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    passed = prune.passed_gate if prune is not None else True
    reason = "" if passed else "quality gate: " + "; ".join(prune.gate_reasons)
    return Outcome(character.id, "built" if passed else "failed", reason, round(time.perf_counter() - t0, 1), passed,
                   str(out_dir / character.id), widened_note(keep, failed_widths))


def widened_note(keep: float, failed_widths: list[dict[str, Any]]) -> str:
    """The summary's line for a character the width fallback widened ("" when its first width passed)."""
    if not failed_widths:
        return ""
    return (f"FFN widened to {keep} after the quality gate failed at "
            f"{', '.join(str(w['ffn_keep']) for w in failed_widths)}")


def failed_width(prune: Any) -> dict[str, Any]:
    """What the report keeps of a width that failed the gate: its width, reasons and headline metrics."""
    m = prune.metrics
    return {"ffn_keep": m["ffn_keep"], "intermediate_size": m["intermediate_size"], "gate_reasons": prune.gate_reasons,
            **{k: m[k] for k in ("kl", "top1_agreement", "judge_accuracy_dense", "judge_accuracy_pruned",
                                 "repetition_dense", "repetition_pruned", "echo_rate_pruned") if k in m},
            "cpu_seconds": round(prune.cpu_seconds, 1)}


def _worker(character: Any, characters: list[Any], base: Any, config: BuildConfig, out_dir: Path,
            messages: Any, cache_dir: Path | None) -> Outcome:
    """Entry point of a --jobs process: progress goes back through a queue; errors become a failed Outcome."""
    try:
        return _build_one(character, characters, base, config, out_dir,
                          lambda msg: messages.put((character.id, msg)), cache_dir)
    except Exception as e:  # noqa: BLE001 - one character's failure is reported, never fatal to the roster
        log.debug("build of %s failed", character.id, exc_info=True)
        return Outcome(character.id, "failed", f"{type(e).__name__}: {e}")


def write_index(out_dir: Path, ids: list[str], outcomes: list[Outcome]) -> Path:
    """OUT/index.json: every roster character with an artifact in OUT, and this run's failures."""
    status = {o.id: o.status for o in outcomes}
    entries = []
    for cid in sorted(ids):
        folder = out_dir / cid
        if (folder / "manifest.json").is_file():
            m = read_manifest(folder)
            entries.append({"id": cid, "name": m["name"], "path": cid, "precision": m["model"]["precision"],
                            "intermediate_size": m["model"]["intermediate_size"],
                            "bytes": sum(f["size"] for f in m["files"].values()),
                            "passed_gate": m["quality"].get("passed_gate"), "status": status.get(cid, "kept")})
    failed = [{"id": o.id, "reason": o.reason} for o in outcomes if o.status == "failed"]
    index = {"format": "npcforge-index", "format_version": 1, "builder_version": builder_version(),
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "characters": entries,
             "failed": failed}
    path, tmp = out_dir / "index.json", out_dir / "index.json.part"
    tmp.write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def build_roster(chardir: Path, out_dir: Path, preset: str = "default", overrides: dict[str, Any] | None = None,
                 only: list[str] | None = None, base_model: str | Path | None = None, jobs: int = 1,
                 force: bool = False, progress: Progress | None = None, cache: bool = True) -> BuildSummary:
    """With `cache`, calibrations and the dense side of evaluation are kept in OUT/.cache and reused by later
    builds whose inputs to them are unchanged (builder.buildcache)."""
    from builder.basemodel import ensure_base_model
    from builder.cards import load_roster
    from builder.report import write_roster_report

    t0 = time.perf_counter()
    say = progress or (lambda cid, msg: log.info("%s: %s", cid, msg))
    out_dir = Path(out_dir)
    roster = load_roster(chardir)
    known = {c.id for c in roster.characters}
    missing = [i for i in only or [] if i not in known]
    if missing:
        raise BuildError(f"--only: unknown character id(s) {', '.join(missing)}; the roster has "
                         f"{', '.join(sorted(known)) or 'none'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    for p in clean_stale(out_dir):
        say("-", f"removed stale {p.name}")
    summary = BuildSummary(str(out_dir))
    by_file: dict[str, list[str]] = {}
    for problem in roster.problems:  # a card with problems is not built; every problem is named
        by_file.setdefault(problem.file, []).append(str(problem))
    for file, problems in by_file.items():
        summary.outcomes.append(Outcome(Path(file).stem, "failed", "; ".join(problems)))
    base = ensure_base_model(base_model, progress=lambda msg: say("-", msg))

    todo: list[tuple[Any, BuildConfig]] = []
    for ch in sorted(roster.characters, key=lambda c: c.id):
        if only and ch.id not in only:
            continue
        try:
            config = resolve_config(preset, ch.build, overrides)
        except ConfigError as e:
            summary.outcomes.append(Outcome(ch.id, "failed", f"{ch.source}: build: {e}"))
            continue
        if jobs > 1 and not config.threads:
            config = resolve_config(preset, ch.build, overrides, {"threads": max(1, (os.cpu_count() or 1) // jobs)})
        fresh, manifest = up_to_date(out_dir / ch.id, ch, config, base.sha256)
        if fresh and not force:
            quality = manifest["quality"]
            passed = quality.get("passed_gate")
            summary.outcomes.append(Outcome(
                ch.id, "skipped" if passed else "failed", "" if passed else "quality gate failed (unchanged inputs): "
                + "; ".join(quality.get("gate_reasons", [])), 0.0, passed, str(out_dir / ch.id),
                widened_note(quality.get("ffn_keep", config.ffn_keep), quality.get("failed_widths", []))))
            say(ch.id, "up to date")
            continue
        todo.append((ch, config))

    characters = list(roster.characters)
    cache_dir = out_dir / CACHE_DIR if cache else None
    if jobs <= 1:
        for ch, config in todo:
            say(ch.id, "building")
            try:
                outcome = _build_one(ch, characters, base, config, out_dir, lambda msg, cid=ch.id: say(cid, msg),
                                     cache_dir)
            except Exception as e:  # noqa: BLE001 - reported per character; the roster goes on
                log.debug("build of %s failed", ch.id, exc_info=True)
                outcome = Outcome(ch.id, "failed", f"{type(e).__name__}: {e}")
            say(ch.id, outcome.status + (f": {outcome.reason}" if outcome.reason else ""))
            summary.outcomes.append(outcome)
    elif todo:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            messages = manager.Queue()
            futures: list[Future] = [pool.submit(_worker, ch, characters, base, config, out_dir, messages,
                                                 cache_dir) for ch, config in todo]
            while True:
                try:
                    say(*messages.get(timeout=0.2))
                except queue.Empty:
                    if all(f.done() for f in futures):
                        break
            for f in futures:
                outcome = f.result()
                say(outcome.id, outcome.status + (f": {outcome.reason}" if outcome.reason else ""))
                summary.outcomes.append(outcome)
    _CONTEXT.clear()
    summary.outcomes.sort(key=lambda o: o.id)
    ids = sorted(known | {o.id for o in summary.outcomes})
    write_index(out_dir, ids, summary.outcomes)
    write_roster_report(out_dir, ids, {o.id: o.reason for o in summary.outcomes if o.status == "failed"})
    summary.seconds = time.perf_counter() - t0
    return summary


__all__ = ["BuildError", "BuildSummary", "Outcome", "build_roster", "clean_stale", "up_to_date", "write_index"]
