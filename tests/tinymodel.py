"""A tiny, seeded, random Llama-architecture model with a real ChatML tokenizer, for fast tests.

`make_tiny_base(out_dir)` writes a stock Hugging Face folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) in about a second: a byte-level BPE trained on the sample roster and corpora, with the ChatML
special tokens the default base model uses, and a 2-layer Llama whose shapes exercise every code path of the real
one (GQA with 4 query / 2 KV heads, tied embeddings, gated MLP).
"""
from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
ROOT = Path(__file__).resolve().parent.parent


def _training_text() -> list[str]:
    """Text the tokenizer learns merges from: whatever the repo ships, plus non-ASCII so UTF-8 paths get tested."""
    lines = ["Hello, traveler! Welcome to the forge. What brings you here?", "Grüße, café, naïve — ¿qué? 日本語 🙂"]
    for pattern in ("characters/*.yaml", "builder/data/*.txt"):
        for path in sorted(ROOT.glob(pattern)):
            lines.extend(path.read_text(encoding="utf-8").splitlines())
    return lines


def make_tiny_base(out_dir: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_text(), trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>", "unk_token": None, "add_bos_token": False, "chat_template": CHATML_TEMPLATE,
        "model_max_length": 2048}))
    (out_dir / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"}))

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Larger-than-default weights give peaked, seed-dependent distributions: greedy text differs per model.
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.generation_config.eos_token_id = 2
    model.generation_config.pad_token_id = 2
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir
