"""Test helper: an FFN-pruned checkpoint made by slicing a model's channels (what builder.shrink produces)."""
from __future__ import annotations

import shutil
from pathlib import Path


def slice_ffn(base: Path, out: Path, keep: int, seed: int = 0) -> tuple[Path, list[list[int]]]:
    """Keep `keep` random FFN channels per layer of `base`; writes a stock HF folder and returns it with the kept ids."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    kept = []
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            idx = torch.randperm(mlp.gate_proj.out_features, generator=gen)[:keep].sort().values
            kept.append(idx.tolist())
            for name in ("gate_proj", "up_proj"):
                lin = getattr(mlp, name)
                new = torch.nn.Linear(lin.in_features, keep, bias=False)
                new.weight.copy_(lin.weight[idx])
                setattr(mlp, name, new)
            new = torch.nn.Linear(keep, mlp.down_proj.out_features, bias=False)
            new.weight.copy_(mlp.down_proj.weight[:, idx])
            mlp.down_proj = new
    model.config.intermediate_size = keep
    model.save_pretrained(out, safe_serialization=True)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copyfile(f, out / f.name)
    return out, kept
