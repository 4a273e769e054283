"""Read and verify one character artifact (dist/<id>/) as docs/internals.md defines it.

`read_artifact(dir) -> Artifact` parses manifest.json (cheap: no model bytes are read) and checks the fields the
runtime relies on. `verify_artifact(artifact)` checks every listed file's size and sha256 and raises `ArtifactError`
naming the first file that does not match; `artifact_problems(artifact)` lists them all (`npcforge inspect`).
`read_character(artifact)` returns character.json once verified. The builder writes what this module reads and
checks its own output with it, so the format has one reader.
Hashes of unchanged files (same size, mtime, inode) are remembered for the process, so a character evicted and
loaded again is not hashed twice.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from runtime.errors import ArtifactError

FORMAT = "npcforge-artifact"
FORMAT_VERSION = 1
_HASH_CHUNK = 1 << 20

_verified: dict[tuple[str, int, int, int], str] = {}  # (path, size, mtime_ns, inode) -> sha256 seen
_verified_lock = threading.Lock()


@dataclass(frozen=True)
class SharedTensor:
    """An initializer bit-identical across characters of one base: its raw bytes lie at file[offset:offset+length]."""
    name: str
    sha256: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    length: int


@dataclass(frozen=True)
class Artifact:
    id: str
    name: str
    path: Path
    manifest: dict[str, Any]
    model_file: Path
    tokenizer_file: Path
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    eos_token_ids: tuple[int, ...]
    chat_template: dict[str, str]
    shared_tensors: tuple[SharedTensor, ...]
    files: dict[str, dict[str, Any]]

    @property
    def precision(self) -> str:
        return str(self.manifest["model"].get("precision", "fp32"))

    @property
    def passed_gate(self) -> bool:
        """The build's quality verdict (False: installed although it failed, the build's fallback turned off)."""
        return bool(self.manifest.get("quality", {}).get("passed_gate", True))

    @property
    def model_bytes(self) -> int:
        """Bytes of the ONNX graph and its external data file: what a session maps."""
        m = self.manifest["model"]
        names = {m.get("file", "model.onnx"), m.get("data_file", m.get("file", "model.onnx") + ".data")}
        return sum(int(f["size"]) for rel, f in self.files.items() if rel in names)


def _field(d: dict[str, Any], key: str, where: str, path: Path) -> Any:
    if key not in d:
        raise ArtifactError(f"{path}: {where}{key}: missing; rebuild the artifact with `npcforge build`")
    return d[key]


def _inside(root: Path, rel: str, manifest: Path) -> Path:
    p = (root / rel).resolve()
    if root.resolve() not in p.parents:
        raise ArtifactError(f"{manifest}: files: {rel!r} points outside the artifact folder")
    return p


def read_artifact(path: str | Path) -> Artifact:
    """Parse dist/<id>/manifest.json; raise ArtifactError naming the file and field on any problem."""
    root = Path(path)
    mpath = root / "manifest.json"
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{mpath}: missing; {root} is not an npcforge artifact") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{mpath}: unreadable manifest ({e}); rebuild the artifact") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: format: not {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: format_version: {manifest.get('format_version')!r} is not supported "
                            f"(this runtime reads version {FORMAT_VERSION}); rebuild with the matching npcforge")
    model = _field(manifest, "model", "", mpath)
    tok = _field(manifest, "tokenizer", "", mpath)
    files = _field(manifest, "files", "", mpath)
    template = _field(manifest, "chat_template", "", mpath)
    for key in ("system", "user", "assistant", "generation_prompt"):
        value = _field(template, key, "chat_template.", mpath)
        if key != "generation_prompt" and "{content}" not in value:
            raise ArtifactError(f"{mpath}: chat_template.{key}: has no {{content}} placeholder")
    if model.get("kv_layout", "BNSH") != "BNSH" or model.get("logits", "last") != "last":
        raise ArtifactError(f"{mpath}: model: kv_layout must be BNSH and logits 'last' (got "
                            f"{model.get('kv_layout')!r}, {model.get('logits')!r})")
    for rel in (model.get("file", "model.onnx"), tok.get("file", "tokenizer.json"), "character.json"):
        if rel not in files:
            raise ArtifactError(f"{mpath}: files: {rel!r} is not listed, so it cannot be verified")
    shared = []
    for i, t in enumerate(manifest.get("shared_tensors") or []):
        try:
            shared.append(SharedTensor(name=t["name"], sha256=t["sha256"], dtype=str(np.dtype(t["dtype"])),
                                       shape=tuple(int(s) for s in t["shape"]),
                                       file=_inside(root, t["file"], mpath), offset=int(t["offset"]),
                                       length=int(t["length"])))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{mpath}: shared_tensors[{i}]: malformed entry ({e!r})") from None
        st = shared[-1]
        if int(np.prod(st.shape)) * np.dtype(st.dtype).itemsize != st.length:
            raise ArtifactError(f"{mpath}: shared_tensors[{i}] ({st.name}): length {st.length} does not match "
                                f"shape {st.shape} of {st.dtype}")
    for rel in files:
        _inside(root, rel, mpath)
    eos = tok.get("eos_token_ids") or []
    if not eos:
        raise ArtifactError(f"{mpath}: tokenizer.eos_token_ids: empty; the runtime could never stop a reply")
    return Artifact(
        id=str(_field(manifest, "id", "", mpath)), name=str(manifest.get("name") or manifest["id"]), path=root,
        manifest=manifest, model_file=_inside(root, model.get("file", "model.onnx"), mpath),
        tokenizer_file=_inside(root, tok.get("file", "tokenizer.json"), mpath),
        num_layers=int(_field(model, "num_layers", "model.", mpath)),
        num_kv_heads=int(_field(model, "num_kv_heads", "model.", mpath)),
        head_dim=int(_field(model, "head_dim", "model.", mpath)),
        vocab_size=int(_field(model, "vocab_size", "model.", mpath)),
        max_context=int(_field(model, "max_context", "model.", mpath)),
        eos_token_ids=tuple(int(e) for e in eos), chat_template={k: str(v) for k, v in template.items()},
        shared_tensors=tuple(shared), files=files)


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered while its size, mtime and inode stay the same."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    with _verified_lock:
        if key in _verified:
            return _verified[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    with _verified_lock:
        _verified[key] = digest
    return digest


def _problems(artifact: Artifact) -> Iterator[str]:
    """Each file of the manifest that is missing or differs in size, then each whose sha256 differs.

    Sizes come first, so a truncated file is named before any hashing starts."""
    intact = []
    for rel, info in artifact.files.items():
        p = artifact.path / rel
        try:
            size = os.stat(p).st_size
        except FileNotFoundError:
            yield f"{p}: missing from artifact {artifact.id!r}; rebuild or re-copy it"
            continue
        if size != int(info["size"]):
            yield (f"{p}: size {size} bytes, manifest says {info['size']} (truncated or modified); "
                   f"rebuild or re-copy artifact {artifact.id!r}")
        else:
            intact.append((p, info))
    for p, info in intact:
        if file_sha256(p) != info["sha256"]:
            yield (f"{p}: sha256 does not match the manifest (file modified or corrupted); "
                   f"rebuild or re-copy artifact {artifact.id!r}")


def artifact_problems(artifact: Artifact) -> list[str]:
    """Every file of the manifest that is missing, of another size or another sha256; [] when intact."""
    return list(_problems(artifact))


def verify_artifact(artifact: Artifact) -> None:
    """Raise ArtifactError naming the first file that is missing or does not match the manifest."""
    problem = next(_problems(artifact), None)
    if problem is not None:
        raise ArtifactError(problem)


def read_character(artifact: Artifact) -> dict[str, Any]:
    path = artifact.path / "character.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("system_prompt", ""), str):
        raise ArtifactError(f"{path}: system_prompt: must be a string")
    return record


def read_shared_tensor(t: SharedTensor) -> np.ndarray:
    """The tensor as a read-only memory map of the artifact's data file (no copy; pages shared by the OS).

    Its bytes are checked against their sha256 through ordinary reads, not through the map: hashing via the map
    would fault every page into this process (and its PSS) although ORT may only ever touch a few rows."""
    h = hashlib.sha256()
    with open(t.file, "rb") as f:
        f.seek(t.offset)
        left = t.length
        while left > 0 and (chunk := f.read(min(_HASH_CHUNK, left))):
            h.update(chunk)
            left -= len(chunk)
    if left or h.hexdigest() != t.sha256:
        raise ArtifactError(f"{t.file}: bytes of shared tensor {t.name!r} at offset {t.offset} do not match their "
                            f"sha256 in the manifest (builder bug or modified file); rebuild the artifact")
    arr = np.memmap(t.file, dtype=np.dtype(t.dtype).newbyteorder("<"), mode="r", offset=t.offset,
                    shape=t.shape if t.shape else (1,))
    return arr.reshape(t.shape)


_PACKED_OPS = {"MatMul", "MatMulNBits", "Gemm", "MatMulInteger", "DynamicQuantizeMatMul", "FusedMatMul"}


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message: ints for varints, bytes for length-delimited."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            value, i = buf[i:i + (8 if wire == 1 else 4)], i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def packed_weight_names(model_file: Path) -> set[str]:
    """Initializers MLAS pre-packs into per-session copies: the weight inputs of MatMul-family nodes.

    Read straight from the ONNX protobuf (ModelProto.graph=7, GraphProto.node=1, NodeProto.input=1, op_type=4),
    since the runtime may not import `onnx`. Sharing such a tensor saves nothing when pre-packing is on: every
    session packs its own copy, and the shared mapping would only stay resident beside the copies."""
    try:
        model = model_file.read_bytes()
        names: set[str] = set()
        for field, _, graph in _fields(model):
            if field != 7:
                continue
            for gfield, _, node in _fields(graph):
                if gfield != 1:
                    continue
                inputs, op = [], ""
                for nfield, _, value in _fields(node):
                    if nfield == 1:
                        inputs.append(value.decode())
                    elif nfield == 4:
                        op = value.decode()
                if op in _PACKED_OPS:
                    names.update(inputs[1:])
        return names
    except (OSError, ValueError, IndexError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{model_file}: cannot read the ONNX graph ({e})") from None
