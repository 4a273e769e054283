"""The C API binding (runtime/ortc.py): its function table, its results against numpy and the Python binding,
and the memory the pre-packed weights container saves (measured in fresh processes)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime import ortc

ROOT = Path(__file__).resolve().parents[1]


def test_table_positions_match_ort_abi_checkpoints():
    # onnxruntime_c_api.cc static_asserts the last function of each API version at these offsets
    expected = {"ReleaseCustomOpDomain": 101, "ReleaseModelMetadata": 118, "AddFreeDimensionOverrideByName": 124,
                "ReleaseAvailableProviders": 126, "SetGlobalSpinControl": 149, "ReleaseArenaCfg": 157,
                "GetCurrentGpuDeviceId": 161, "CreateSessionFromArrayWithPrepackedWeightsContainer": 169}
    assert {name: ortc.API_INDEX[name] for name in expected} == expected
    assert set(ortc._SIGNATURES) <= set(ortc.API_INDEX)


def matmul_nbits_model(path: Path, k: int, n: int, block: int = 32, seed: int = 0) -> tuple[np.ndarray, dict]:
    """A one-node MatMulNBits (8 bits) model Y = X W^T with W quantised; returns W dequantised and its tensors."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    q = rng.integers(0, 256, (n, k // block, block), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, (n, k // block)).astype(np.float32)
    zero = np.full((n, (k // block)), 128, np.uint8)
    w = ((q.astype(np.float32) - 128.0) * scales[..., None]).reshape(n, k)
    node = helper.make_node("MatMulNBits", ["X", "W_q", "W_scales", "W_zp"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=8, block_size=block, accuracy_level=4)
    tensors = {"W_q": q, "W_scales": scales.reshape(-1), "W_zp": zero.reshape(-1)}
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])],
                              [numpy_helper.from_array(v, name) for name, v in tensors.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return w, tensors


def test_session_runs_into_preallocated_outputs_and_matches_numpy(tmp_path: Path):
    w, tensors = matmul_nbits_model(tmp_path / "m.onnx", k=128, n=64)
    env = ortc.Env.get(1, False)
    inits = {name: ortc.Tensor(env, np.ascontiguousarray(v)) for name, v in tensors.items()}
    x = np.random.default_rng(1).standard_normal((1, 128)).astype(np.float32)
    for container in (None, ortc.Container(env)):
        session = ortc.Session(env, tmp_path / "m.onnx", ortc.SessionSettings(1, "all", True, inits, container))
        assert session.input_names == ["X"]
        y = np.zeros((1, 64), np.float32)
        session.run(ortc.Session.names(["X"]), [ortc.Tensor(env, x)], ortc.Session.names(["Y"]),
                    [ortc.Tensor(env, y)])
        ref = x @ w.T
        assert np.abs(y - ref).max() < 0.02 * np.abs(ref).max()  # activations are quantised too (accuracy_level 4)
        assert np.corrcoef(y[0], ref[0])[0, 1] > 0.999


def test_errors_carry_ort_message(tmp_path: Path):
    env = ortc.Env.get(1, False)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(ortc.OrtError, match="(?i)protobuf|parse|load"):
        ortc.Session(env, tmp_path / "bad.onnx", ortc.SessionSettings(1, "all", True, {}, None))
    with pytest.raises(ValueError, match="dtype"):
        ortc.Tensor(env, np.zeros(3, np.complex64))


def test_runtime_forward_matches_python_binding(tiny_dist: Path):
    import onnxruntime as ort

    from runtime import NPCPool

    cid = sorted(p.name for p in tiny_dist.iterdir() if p.is_dir())[0]
    with NPCPool(tiny_dist, threads=1) as pool:
        model = pool._model(cid)
        ids = model.persona[:12]
        logits, _ = model.forward(ids, model.kv(0, 16))
        a = model.artifact
        feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
        feed.update({n: np.zeros((1, a.num_kv_heads, 0, a.head_dim), np.float32) for n in model.past_names})
        ref = ort.InferenceSession(str(a.model_file), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
        np.testing.assert_allclose(logits, ref[0, -1], rtol=1e-4, atol=1e-4)


_MEASURE = """
import json, sys
import numpy as np
from pathlib import Path
from runtime import ortc
from runtime.model import _fix_mmap_threshold
sys.path.insert(0, {tests!r})
from test_ortc import matmul_nbits_model
def pss():
    return next(int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.startswith("Pss:")) / 1024
_fix_mmap_threshold(256)  # as the runtime does: freed load buffers go back to the OS instead of staying in PSS
env = ortc.Env.get(1, False)
path = Path({tmp!r}) / "big.onnx"
_, tensors = matmul_nbits_model(path, k=4096, n=4096)
inits = {{name: ortc.Tensor(env, np.ascontiguousarray(v)) for name, v in tensors.items()}}
container = ortc.Container(env) if {share} else None
sessions = [ortc.Session(env, path, ortc.SessionSettings(1, "all", True, inits, container))]
before = pss()
sessions += [ortc.Session(env, path, ortc.SessionSettings(1, "all", True, inits, container)) for _ in range(3)]
print(json.dumps(pss() - before))
"""


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="PSS is read from /proc (Linux)")
def test_container_shares_packed_weights_between_sessions(tmp_path: Path):
    growth = {}
    for share in (False, True):
        code = _MEASURE.format(tests=str(ROOT / "tests"), tmp=str(tmp_path), share=share)
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        growth[share] = json.loads(out.stdout.strip().splitlines()[-1])
    # 3 more sessions of a 16 MB int8 weight: each packs its own copy (~17 MB) unless the container shares one
    assert growth[False] > 40, growth
    assert growth[True] < growth[False] / 4, growth
