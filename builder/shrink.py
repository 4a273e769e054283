"""Physically remove FFN channels and write a stock, smaller Hugging Face checkpoint.

Keeping channels `idx` of a layer means keeping rows `idx` of gate_proj and up_proj and columns `idx` of down_proj
(FACTS §3). With the same k in every layer, `config.intermediate_size = k` describes the result exactly, so
`AutoModelForCausalLM.from_pretrained` (and every exporter) loads it without custom code.

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
    """Keep only `kept[i]` intermediate channels in layer i (same count in every layer)."""
    sizes = {len(k) for k in kept}
    if len(sizes) != 1 or len(kept) != len(lm.mlps(model)):
        raise ValueError(f"slice_ffn: need one uniform width for all {len(lm.mlps(model))} layers, got {sorted(sizes)}")
    for mlp, idx in zip(lm.mlps(model), kept):
        idx = torch.as_tensor(idx, dtype=torch.long)
        mlp.gate_proj = _slice_linear(mlp.gate_proj, idx, 0)
        mlp.up_proj = _slice_linear(mlp.up_proj, idx, 0)
        mlp.down_proj = _slice_linear(mlp.down_proj, idx, 1)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(idx)
    model.config.intermediate_size = sizes.pop()


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
