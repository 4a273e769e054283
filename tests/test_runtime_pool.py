"""NPCPool loading, verification, budget/LRU/pin, sessions, stats — real ORT sessions of tiny artifacts."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import runtime
from runtime import ArtifactError, BudgetError, NPCPool, RuntimeConfig, SessionBusy, UnknownCharacter
from tests.tinymodel import ROOT

GREEDY = dict(temperature=0, repetition_penalty=1.5)


@pytest.fixture()
def dist(tmp_path: Path, tiny_dist: Path) -> Path:
    """A writable copy of the tiny dist folder."""
    return Path(shutil.copytree(tiny_dist, tmp_path / "dist"))


def test_import_without_torch_or_transformers():
    code = ("import sys\n"
            "for m in ('torch', 'transformers', 'onnx'): sys.modules[m] = None\n"
            "import runtime\n"
            "assert runtime.NPCPool\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx')"
            " and sys.modules[m] is not None))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_characters_lazy_load_unload_pin(dist: Path):
    with NPCPool(dist, threads=1) as pool:
        ids = [c["id"] for c in pool.characters()]
        assert len(ids) == 3 and not any(c["loaded"] for c in pool.characters())
        assert all(c["greeting"] and c["name"] for c in pool.characters())
        r = pool.chat(ids[0], "s", "Hello!", max_tokens=5, **GREEDY).wait()
        assert r.completion_tokens >= 1
        assert pool.stats()["loaded"] == [ids[0]]  # only the character used was loaded
        pool.load(ids[1])
        pool.pin(ids[2])
        assert {c["id"]: (c["loaded"], c["pinned"]) for c in pool.characters()} == {
            ids[0]: (True, False), ids[1]: (True, False), ids[2]: (True, True)}
        assert pool.unload(ids[1]) is True and pool.unload(ids[1]) is False
        with pytest.raises(UnknownCharacter, match="nobody"):
            pool.chat("nobody", "s", "hi")
        with pytest.raises(UnknownCharacter):
            pool.load("nobody")


def test_a_character_that_failed_its_gate_is_served_with_a_warning(dist: Path, caplog):
    victim = sorted(p.name for p in dist.iterdir())[0]
    path = dist / victim / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["quality"].update(passed_gate=False, gate_reasons=["KL(dense||pruned) 0.332 nats/token > max_kl 0.3"])
    path.write_text(json.dumps(manifest))
    with caplog.at_level("WARNING", logger="runtime.pool"), NPCPool(dist, threads=1) as pool:
        gates = {c["id"]: c["passed_gate"] for c in pool.characters()}
        assert gates.pop(victim) is False and all(gates.values())
        assert pool.chat(victim, "s", "Hello!", max_tokens=3, **GREEDY).wait().completion_tokens >= 1
    assert any(victim in r.message and "0.332" in r.message for r in caplog.records)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_tampered_artifact_refused_others_served(dist: Path, damage: str):
    victim, *others = sorted(p.name for p in dist.iterdir())
    data = dist / victim / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    if damage == "flip":
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "truncate":
        data.write_bytes(bytes(raw[:-100]))
    else:
        (dist / victim / "tokenizer.json").unlink()
    with NPCPool(dist, threads=1) as pool:
        name = "tokenizer.json" if damage == "delete" else "model.onnx.data"
        with pytest.raises(ArtifactError, match=name):
            pool.load(victim)
        with pytest.raises(ArtifactError, match=name):
            pool.chat(victim, "s", "hi")
        for cid in others:
            assert pool.chat(cid, "s", "Hello!", max_tokens=4, **GREEDY).wait().completion_tokens >= 1
        assert victim not in pool.stats()["loaded"]


def test_shared_tensor_bytes_checked_on_their_own(dist: Path):
    """A builder bug (shared-tensor bytes not matching their sha256) is caught even when the file hash agrees."""
    import hashlib
    victim = sorted(p.name for p in dist.iterdir())[0]
    manifest = json.loads((dist / victim / "manifest.json").read_text())
    t = max(manifest["shared_tensors"], key=lambda t: t["length"])
    data = dist / victim / t["file"]
    raw = bytearray(data.read_bytes())
    raw[t["offset"] + 5] ^= 0x01
    data.write_bytes(bytes(raw))
    manifest["files"][t["file"]].update(size=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    (dist / victim / "manifest.json").write_text(json.dumps(manifest))
    with NPCPool(dist, threads=1) as pool:
        with pytest.raises(ArtifactError, match=t["name"]):
            pool.load(victim)
        assert pool.stats()["shared_tensors"]["count"] == 0  # nothing leaked from the failed load


def test_quantised_artifact_shares_packed_weights_through_the_container(tmp_path: Path, tiny_base: Path,
                                                                         roster_dir: Path):
    from builder.artifact import write_artifact
    from builder.basemodel import ensure_base_model
    from builder.cards import load_roster
    from builder.config import resolve_config
    from runtime.artifact import packed_weight_names, read_artifact
    from runtime.model import shareable

    chars = sorted(load_roster(roster_dir).characters, key=lambda c: c.id)[:2]
    for char in chars:
        write_artifact(tiny_base, char, tmp_path / "dist" / char.id, resolve_config("fast", {"precision": "int8"}),
                       ensure_base_model(tiny_base))
    artifact = read_artifact(tmp_path / "dist" / chars[0].id)
    packed = packed_weight_names(artifact.model_file)
    assert {t.name for t in artifact.shared_tensors} & packed  # attention and lm_head weights are packed and shared
    # exported from the base itself (a character widened to ffn_keep 1.0): the FFN is the base's, shared as well
    ffn = {t.name: t.sha256 for t in artifact.shared_tensors if ".mlp." in t.name}
    assert set(ffn) & packed and ffn.items() <= {t.name: t.sha256
                                                 for t in read_artifact(tmp_path / "dist" / chars[1].id).shared_tensors
                                                 }.items()
    assert shareable(artifact, RuntimeConfig()) == artifact.shared_tensors
    assert shareable(artifact, RuntimeConfig(share_tensors=False)) == ()
    with NPCPool(tmp_path / "dist", threads=1) as pool:
        for char in chars:
            assert pool.chat(char.id, "s", "Hello!", max_tokens=8, **GREEDY).wait().completion_tokens >= 1
        shared = pool.stats()["shared_tensors"]
        assert shared["prepacked_container"] and shared["count"] == len({t.sha256 for t in artifact.shared_tensors})
        assert shared["references"] == 2 * len(artifact.shared_tensors)
        pool.unload(chars[0].id)
        pool.unload(chars[1].id)
        assert pool.stats()["shared_tensors"] == {"count": 0, "mb": 0, "references": 0, "prepacked_container": False}


def test_broken_manifest_listed_as_problem(dist: Path):
    victim = sorted(p.name for p in dist.iterdir())[0]
    (dist / victim / "manifest.json").write_text("{not json")
    with NPCPool(dist, threads=1) as pool:
        assert victim not in [c["id"] for c in pool.characters()]
        assert "manifest.json" in pool.stats()["problems"][victim]


def test_budget_evicts_least_recently_used_and_keeps_pinned(dist: Path):
    a, b, c = sorted(p.name for p in dist.iterdir())
    with NPCPool(dist, threads=1) as probe:
        probe.load(a)
        s = probe.stats()
        one, shared = s["models"][a]["estimated_mb"], s["shared_tensors"]["mb"]
    budget = shared + 2.5 * one  # room for two characters, not three
    with NPCPool(dist, memory_budget_mb=budget, threads=1) as pool:
        pool.pin(a)
        pool.load(b)
        pool.chat(b, "s", "hi", max_tokens=3, **GREEDY).wait()
        pool.load(c)  # b is the least recently used idle, unpinned character
        assert sorted(pool.stats()["loaded"]) == [a, c]
        assert pool.history(b, "s")  # histories survive eviction
        r = pool.chat(b, "s", "again", max_tokens=3, **GREEDY).wait()  # reloads b, evicting c
        assert r.completion_tokens >= 1 and sorted(pool.stats()["loaded"]) == [a, b]
        assert pool.stats()["estimated_mb"] <= budget
        pool.pin(b)
        with pytest.raises(BudgetError, match=c):
            pool.load(c)  # everything else is pinned
        pool.pin(b, False)
        pool.load(c)
        assert sorted(pool.stats()["loaded"]) == [a, c]


def test_save_and_load_session(pool: NPCPool, tmp_path: Path):
    cid = pool.characters()[0]["id"]
    pool.reset(cid, "saved")
    for text in ("Hello!", "Tell me more."):
        pool.chat(cid, "saved", text, max_tokens=6, **GREEDY).wait()
    history = pool.history(cid, "saved")
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    path = pool.save_session(cid, "saved", tmp_path / "game" / "save1.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["character"] == cid and data["messages"] == history and path.stat().st_size < 4096
    assert not list(path.parent.glob(".*.tmp"))
    pool.reset(cid, "saved")
    assert pool.history(cid, "saved") == []
    assert pool.load_session(path) == (cid, "saved")
    assert pool.history(cid, "saved") == history
    r = pool.chat(cid, "saved", "And then?", max_tokens=4, **GREEDY).wait()
    assert r.prompt_tokens > r.cached_tokens > 0  # the restored history was prefilled on top of the persona
    (tmp_path / "bad.json").write_text('{"format": "npcforge-session", "version": 1, "character": "x"}')
    with pytest.raises(ValueError, match="bad.json"):
        pool.load_session(tmp_path / "bad.json")


def test_session_busy_reset_and_stats(pool: NPCPool):
    cid = pool.characters()[1]["id"]
    stream = pool.chat(cid, "busy", "Hello!", max_tokens=400, temperature=1.0, seed=1)
    with pytest.raises(SessionBusy):
        pool.chat(cid, "busy", "Again!")
    with pytest.raises(SessionBusy):
        pool.reset(cid, "busy")
    stream.cancel()
    stream.wait()
    pool.reset(cid, "busy")
    assert pool.history(cid, "busy") == []
    s = pool.stats()
    assert s["pss_mb"] > 0 and cid in s["loaded"] and s["models"][cid]["persona_tokens"] > 0
    assert s["shared_tensors"]["count"] > 0 and s["active_generations"] == 0
    with pytest.raises(ValueError, match="temperature"):
        pool.chat(cid, "busy", "hi", temperature=-1)


def test_other_ort_sessions_keep_working(pool: NPCPool, tiny_dist: Path):
    """By default the runtime does not bind the process to a global thread pool: the builder (or anyone) can still
    open plain sessions in the same process."""
    import onnxruntime as ort
    cid = pool.characters()[0]["id"]
    pool.load(cid)
    sess = ort.InferenceSession(str(tiny_dist / cid / "model.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].name == "input_ids"


def test_global_thread_pool_in_its_own_process(tiny_dist: Path):
    code = ("import sys, runtime\n"
            f"pool = runtime.NPCPool({str(tiny_dist)!r}, threads=2, "
            "config=runtime.RuntimeConfig(global_thread_pool=True))\n"
            "cid = pool.characters()[0]['id']\n"
            "r = pool.chat(cid, 's', 'Hello!', max_tokens=3, temperature=0).wait()\n"
            "s = pool.stats()\n"
            "print(s['global_thread_pool'], s['threads'], r.completion_tokens >= 1)\n"
            "pool.close()\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "2", "True"]


def test_public_names():
    assert {"NPCPool", "RuntimeConfig", "ChatStream", "ChatResult", "ArtifactError"} <= set(runtime.__all__)


def test_persona_caches_are_bounded_lru_and_come_back_after_a_turn(tiny_dist: Path):
    a, b = sorted(p.name for p in tiny_dist.iterdir())[:2]
    with NPCPool(tiny_dist, threads=1) as free:
        expected = free.chat(a, "s", "Hello there!", max_tokens=12, **GREEDY).wait().text
        one = max(free._models[a].persona_kv.nbytes, 1)
    budget = 1.5 * one / 2**20  # room for one persona cache, not two
    with NPCPool(tiny_dist, threads=1, config=RuntimeConfig(persona_cache_mb=budget)) as pool:
        pool.load(a)
        pool.load(b)
        models = pool.stats()["models"]
        assert not models[a]["persona_cached"] and models[b]["persona_cached"]
        r = pool.chat(a, "s", "Hello there!", max_tokens=12, **GREEDY).wait()
        assert r.text == expected and r.cached_tokens == 0  # the persona was prefilled with the turn
        models = pool.stats()["models"]
        assert models[a]["persona_cached"] and not models[b]["persona_cached"]  # a's came back, b's was dropped
        assert pool.stats()["persona_cache_mb"] <= budget
        r = pool.chat(a, "t", "Hello there!", max_tokens=12, **GREEDY).wait()
        assert r.text == expected and r.cached_tokens > 0
    with pytest.raises(ValueError, match="persona_cache_mb"):
        RuntimeConfig(persona_cache_mb=-1)
