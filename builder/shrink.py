"""Physically remove FFN channels and write a stock, smaller Hugging Face checkpoint.

Keeping channels `idx` of a layer means keeping rows `idx` of gate_proj and up_proj and columns `idx` of down_proj
(FACTS §3). With the same k in every layer, `config.intermediate_size = k` describes the result exactly, so
`AutoModelForCausalLM.from_pretrained` (and every exporter) loads it without custom code. With widths per layer
(builder.widths), config.json also lists them as `ffn_widths` and `intermediate_size` is the widest layer:
`builder.basemodel.load_model` reads such a checkpoint (`resize_ffn`), as does the export, which takes every
shape from the weights.

Input: an HF model with Llama-shaped MLPs, kept indices per layer, the base folder (for tokenizer files).
Output: the model sliced in place; `save_checkpoint` writes safetensors + config + tokenizer files atomically.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from builder import lm

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model")


def _slice_linear(linear: torch.nn.Linear, idx: torch.Tensor, dim: int) -> torch.nn.Linear:
    weight = linear.weight.detach().index_select(dim, idx).clone()
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                          dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        out.weight.copy_(weight)
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach() if dim == 1 else linear.bias.detach().index_select(0, idx))
    return out


def slice_ffn(model, kept: list[torch.Tensor]) -> None:
    """Keep only `kept[i]` intermediate channels in layer i."""
    if len(kept) != len(lm.mlps(model)) or not all(len(k) for k in kept):
        raise ValueError(f"slice_ffn: need kept channels for all {len(lm.mlps(model))} layers, got "
                         f"{[len(k) for k in kept]}")
    for mlp, idx in zip(lm.mlps(model), kept):
        idx = torch.as_tensor(idx, dtype=torch.long)
        mlp.gate_proj = _slice_linear(mlp.gate_proj, idx, 0)
        mlp.up_proj = _slice_linear(mlp.up_proj, idx, 0)
        mlp.down_proj = _slice_linear(mlp.down_proj, idx, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(idx)
    _describe_widths(model.config, [len(k) for k in kept])


def _describe_widths(config, widths: list[int]) -> None:
    config.intermediate_size = max(widths)
    if len(set(widths)) > 1:
        config.ffn_widths = widths
    elif hasattr(config, "ffn_widths"):
        del config.ffn_widths


def resize_ffn(model, widths: list[int]) -> None:
    """Give layer i an FFN of widths[i] channels (uninitialised weights), so a checkpoint with per-layer widths
    can be loaded into a model built from its config."""
    for mlp, width in zip(lm.mlps(model), widths):
        like = mlp.gate_proj.weight
        hidden = mlp.gate_proj.in_features
        mlp.gate_proj, mlp.up_proj = (torch.nn.Linear(hidden, width, bias=False, dtype=like.dtype,
                                                      device=like.device) for _ in range(2))
        mlp.down_proj = torch.nn.Linear(width, hidden, bias=False, dtype=like.dtype, device=like.device)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width
    _describe_widths(model.config, widths)


def save_checkpoint(model, base_dir: Path, out_dir: Path) -> Path:
    """Write the model (fp32 safetensors) and the base's tokenizer files to out_dir via a temp folder + rename."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (Path(base_dir) / name).is_file():
                shutil.copy2(Path(base_dir) / name, tmp / name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
