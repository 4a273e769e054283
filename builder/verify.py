"""Verification of an exported ONNX model against the torch checkpoint it came from.

Input: the checkpoint folder, the exported `model.onnx`, and probe prompts (chat-formatted text). For each prompt
torch decodes `config.verify_tokens` greedy tokens; ONNX Runtime then runs the same sequence through its KV-cache
path (prefill, then one token at a time, teacher-forced) and, separately, decodes greedily on its own.
Output: a `Verification` record (KL(torch ‖ ONNX) per probe token, max |logit diff|, teacher-forced top-1
agreement, greedy agreement) that goes into the manifest; `passed` is false above `config.max_verify_kl`.

Why KL decides and top-1 does not: a pruned 135M model often has two nearly equally likely next tokens, and int8
rounding picks the other one of a near tie. Top-1 over 64 probe tokens moved between 56 and 64 for default builds
whose KL stayed small (docs/artifact.md), so it failed good artifacts at random; KL weighs each difference by how
much probability moved, and a wrong graph or a precision too narrow for the model moves a lot.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builder.config import BuildConfig

log = logging.getLogger(__name__)


@dataclass
class Verification:
    kl: float  # mean KL(torch ‖ ONNX) over the probe tokens, teacher-forced, nats: what passes or fails
    max_abs_logit_diff: float
    top1_agreement: float  # teacher-forced: ONNX argmax == torch's greedy token, over all probe tokens
    greedy_agreement: float  # ONNX's own greedy decode: share of tokens before it first leaves torch's
    probe_tokens: int
    passed: bool
    reason: str = ""
    prefill_ms: float = 0.0  # median over the probe prompts (a few hundred tokens), config.threads threads
    decode_tokens_per_s: float = 0.0  # single-token steps of the teacher-forced pass

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class OnnxDecoder:
    """A minimal KV-cache loop over one session with the artifact's I/O contract (docs/internals.md)."""

    def __init__(self, model_file: Path, threads: int = 1) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(model_file), so, providers=["CPUExecutionProvider"])
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.out_names = [o.name for o in self.session.get_outputs()]
        shape = next(i.shape for i in self.session.get_inputs() if i.name == self.past_names[0])  # (B, kv, P, hd)
        self.empty = np.zeros((1, shape[1], 0, shape[3]), np.float32)
        self.reset()

    def reset(self) -> None:
        self.past = {name: self.empty for name in self.past_names}
        self.length = 0

    def step(self, ids: list[int]) -> np.ndarray:
        """Feed new tokens on top of the cache; returns the logits (vocab,) of the last one."""
        feed: dict[str, np.ndarray] = {"input_ids": np.array([ids], np.int64),
                                       "attention_mask": np.ones((1, self.length + len(ids)), np.int64)}
        feed.update(self.past)
        outs = dict(zip(self.out_names, self.session.run(None, feed)))
        self.past = {name: outs[name.replace("past_key_values.", "present.")] for name in self.past_names}
        self.length += len(ids)
        return outs["logits"][0, -1]


def _torch_greedy(model: Any, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation (eos ignored: we compare numerics, not text) and the logits at each fed position."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        tokens, rows = [], [out.logits[0, -1].float().numpy()]
        for _ in range(n):
            tokens.append(int(np.argmax(rows[-1])))
            if len(tokens) == n:
                break
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            rows.append(out.logits[0, -1].float().numpy())
    return tokens, np.stack(rows)


def verify_export(checkpoint: Path, model_file: Path, prompts: list[str], config: BuildConfig) -> Verification:
    import torch

    from builder.basemodel import load_model
    from builder.lm import kl_per_token

    if config.threads:
        torch.set_num_threads(config.threads)
    model, tokenizer = load_model(Path(checkpoint), torch.float32)
    decoder = OnnxDecoder(model_file, threads=config.threads or 1)
    n = config.verify_tokens
    max_diff, kl, agree, greedy_agree, total = 0.0, 0.0, 0, 0, 0
    prefill_s: list[float] = []
    decode_s = 0.0
    for text in prompts:
        prompt = tokenizer(text, add_special_tokens=False).input_ids
        ref_tokens, ref_logits = _torch_greedy(model, prompt, n)
        decoder.reset()
        feed = prompt
        for j, token in enumerate(ref_tokens):
            t0 = time.perf_counter()
            logits = decoder.step(feed)
            if j:
                decode_s += time.perf_counter() - t0
            else:
                prefill_s.append(time.perf_counter() - t0)
            max_diff = max(max_diff, float(np.abs(logits - ref_logits[j]).max()))
            kl += float(kl_per_token(torch.from_numpy(ref_logits[j][None]), torch.from_numpy(logits[None]))[0])
            agree += int(np.argmax(logits)) == token
            feed = [token]
        decoder.reset()
        logits = decoder.step(prompt)
        for token in ref_tokens:  # the common prefix: after one divergence the texts are different texts
            if int(np.argmax(logits)) != token:
                break
            greedy_agree += 1
            logits = decoder.step([token])
        total += len(ref_tokens)
    top1, kl = agree / total, kl / total
    passed = kl <= config.max_verify_kl
    wider = {"int4": "int8", "int8": "fp32"}.get(config.precision, "fp32; the export itself is wrong: report it")
    ffn = config.ffn_setting("precision")
    advice = f"--ffn-precision {config.precision}" if ffn != config.precision else f"--precision {wider}"
    reason = "" if passed else (f"ONNX ({config.precision}, FFN {ffn}) differs from torch by KL {kl:.4f} nats per "
                                f"probe token (> max_verify_kl {config.max_verify_kl}; top-1 agreement "
                                f"{agree}/{total}); use a wider precision ({advice})")
    result = Verification(round(kl, 6), round(max_diff, 6), round(top1, 4), round(greedy_agree / total, 4), total,
                          passed, reason,
                          round(float(np.median(prefill_s)) * 1e3, 2),
                          round((total - len(prompts)) / decode_s, 1) if decode_s else 0.0)
    log.info("verification: %s", result)
    return result


__all__ = ["OnnxDecoder", "Verification", "verify_export"]
