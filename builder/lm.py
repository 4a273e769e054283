"""Language-model plumbing shared by the pruning stages: chat sequences, prefix caches, batched forward, sampling,
the distillation loss and hooks on the FFN's channel activations.

Every persona sequence is `system prompt` + turns. The system prompt is the same for all of one character's
sequences, so it is run once into a KV cache (`prefix_kv`) and every batch continues from it (`forward`): the
prompt is the longest part of a sequence, and this sharing is what makes the builder affordable on a CPU.
Gradients flow through the prefix only when it was computed with grad enabled; training computes it without.

Inputs: an HF causal LM with Llama-shaped layers (`model.model.layers[i].mlp.down_proj`) and its tokenizer.
Outputs: token lists, logits, per-token KL, and `Seq` records (suffix ids + which tokens are answer targets).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from builder.config import ConfigError
from builder.prefix_attention import suffix_mask, use_prefix_attention

KV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Seq:
    """One training/evaluation sequence after a shared prefix: `target[i]` says token i is to be predicted."""
    ids: list[int]
    target: list[bool]
    sources: tuple[int, ...] = ()  # the calibration queries whose answers it holds (cross-validation folds)


@dataclass
class SeqSet:
    """Sequences sharing one prefix (a character's system prompt; empty for plain text)."""
    prefix: list[int]
    seqs: list[Seq] = field(default_factory=list)


def render(tok, messages: list[dict]) -> str:
    return tok.apply_chat_template(messages, tokenize=False)


def chat_seq(tok, system: str, turns: list[tuple[str, str]], generation_prompt: bool = False) -> tuple[list[int], Seq]:
    """(prefix ids, Seq) for a chat: turns are (role, text) with role "user" or "assistant"; assistant text is the
    target. Rendering goes through the tokenizer's chat template, piece by piece, so any template that renders
    prefixes consistently (ChatML does) works."""
    messages = [{"role": "system", "content": system}]
    head = render(tok, messages)
    prefix = tok(head, add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    target: list[bool] = []
    done = head
    for role, text in turns:
        if role == "assistant":
            opened = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            _append(tok, opened, done, ids, target, False)
            done = opened
        messages.append({"role": role, "content": text})
        full = render(tok, messages)
        if role == "assistant":
            piece = full[len(done):]
            body = piece.rstrip()
            _append(tok, done + body, done, ids, target, True)
            _append(tok, full, done + body, ids, target, False)
        else:
            _append(tok, full, done, ids, target, False)
        done = full
    if generation_prompt:
        opened = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        _append(tok, opened, done, ids, target, False)
    return prefix, Seq(ids, target)


def _append(tok, text: str, done: str, ids: list[int], target: list[bool], is_target: bool) -> None:
    if not text.startswith(done):
        raise ValueError("the tokenizer's chat template does not render conversations as growing prefixes; "
                         "use a base model with a ChatML-style template")
    piece = tok(text[len(done):], add_special_tokens=False)["input_ids"]
    ids.extend(piece)
    target.extend([is_target] * len(piece))


def text_seq(tok, text: str, max_len: int) -> Seq:
    """Plain text (no chat, no prefix): every token after the first is a target."""
    ids = tok(text, add_special_tokens=False)["input_ids"][:max_len]
    return Seq(ids, [False] + [True] * (len(ids) - 1))


def prefix_kv(model, prefix: list[int]) -> KV | None:
    """The KV cache of a prefix (batch 1); under torch.no_grad() it is a constant, else it carries grad.
    Training recomputes the student's prompt cache every step but without grad: a backward pass through the
    ~350-token system prompt cost more than the whole batch of answers, and the same FFN weights and channels
    are trained at the answer positions anyway (the prompt cache still reflects the current student exactly)."""
    if not prefix:
        return None
    out = model.model(input_ids=torch.tensor([prefix], device=model.device), use_cache=True)  # no vocab projection
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def _prefix_args(model, kv: KV | None) -> dict:
    """Model-call arguments that continue the batch from the shared prefix in `kv` (builder.prefix_attention)."""
    use_prefix_attention(model)
    return {} if kv is None else {"prefix_kv": kv}


def _batch(model, kv: KV | None, rows: list[list[int]], pad_id: int) -> dict:
    """Model-call arguments of a right-padded batch of suffixes after the prefix in `kv`."""
    batch, width = len(rows), max(len(r) for r in rows)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    past = 0 if kv is None else kv[0][0].shape[2]
    positions = (past + torch.arange(width)).unsqueeze(0).expand(batch, -1)
    dev = model.device
    return dict(input_ids=ids.to(dev), attention_mask=suffix_mask(mask.to(dev), width),
                position_ids=positions.to(dev), use_cache=False, **_prefix_args(model, kv))


def hidden_states(model, kv: KV | None, rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Embeddings and every layer's output, each (B, S, D), of a batch after the prefix in `kv`; no vocabulary
    projection is computed."""
    return model.model(**_batch(model, kv, rows, pad_id), output_hidden_states=True).hidden_states


def target_forward(model, kv: KV | None, seqs: list[Seq], pad_id: int) -> torch.Tensor:
    """Logits (N, V) at the positions that predict the target tokens of `seqs`, in order. The vocabulary
    projection, a fifth of a forward pass's FLOPs at 135M, runs only at those N positions."""
    h = model.model(**_batch(model, kv, [s.ids for s in seqs], pad_id)).last_hidden_state  # (B, S, D)
    return model.lm_head(target_rows(h, seqs))


def target_forward_from(model, layer: int, states: torch.Tensor, kv: KV | None, seqs: list[Seq],
                        pad_id: int) -> torch.Tensor:
    """`target_forward` from decoder layer `layer` up, given `states` (B, S, D), the residual stream entering it
    (`hidden_states(...)[layer]` of the same batch): the layers below are not run again."""
    args = _batch(model, kv, [s.ids for s in seqs], pad_id)
    del args["input_ids"]
    layers = model.model.layers
    model.model.layers = layers[layer:]  # each attention keeps its layer_idx, so its prefix cache is still its own
    try:
        h = model.model(inputs_embeds=states, **args).last_hidden_state  # (B, S, D)
    finally:
        model.model.layers = layers
    return model.lm_head(target_rows(h, seqs))


def target_rows(x: torch.Tensor, seqs: list[Seq]) -> torch.Tensor:
    """Rows of `x` (B, S, ...) at the positions that predict target tokens, in order: (N, ...). One gather:
    picking the rows one by one made the backward pass write a zero (B, S, V) gradient per row, 80 % of a
    training step (profiled)."""
    picks = [(i, j - 1) for i, s in enumerate(seqs) for j in range(1, len(s.ids)) if s.target[j]]
    rows, cols = torch.tensor(picks, dtype=torch.long, device=x.device).reshape(-1, 2).unbind(1)
    return x[rows, cols]


def target_ids(seqs: list[Seq], device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor([s.ids[j] for s in seqs for j in range(1, len(s.ids)) if s.target[j]], dtype=torch.long,
                        device=device)


def kl_per_token(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the full vocabulary, one value per row, in fp32."""
    lt = F.log_softmax(teacher.float(), dim=-1)
    ls = F.log_softmax(student.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1)


def eos_ids(model, tok) -> set[int]:
    ids = {tok.eos_token_id}
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list) else [extra] if extra is not None else [])
    ids.discard(None)
    return ids


@torch.no_grad()
def generate(model, tok, kv: KV | None, prompts: list[list[int]], n: int, max_new: int, temperature: float,
             top_p: float, generator: torch.Generator) -> list[list[int]]:
    """`n` sampled continuations per prompt (greedy when temperature is 0), each without its end token.
    Prompts are left-padded inside the suffix; positions follow the mask so padding changes nothing."""
    rows = [p for p in prompts for _ in range(n)]
    batch, width = len(rows), max(len(r) for r in rows)
    pad = tok.pad_token_id
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    past = 0 if kv is None else kv[0][0].shape[2]
    dev = model.device
    valid = mask.to(dev)  # (B, suffix so far): the prefix is not in it, the cache below holds the suffix only
    positions = (past + (mask.cumsum(1) - 1).clamp(min=0)).to(dev)
    ids = ids.to(dev)
    cache = DynamicCache()
    extra = _prefix_args(model, kv)
    stops = eos_ids(model, tok)
    out: list[list[int]] = [[] for _ in range(batch)]
    alive = torch.ones(batch, dtype=torch.bool)
    for _ in range(max_new):
        logits = model(input_ids=ids, attention_mask=suffix_mask(valid, ids.shape[1]), position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1, **extra).logits[:, -1].float()
        nxt = _sample(logits, temperature, top_p, generator).cpu()
        for i in torch.nonzero(alive).flatten().tolist():
            t = int(nxt[i])
            if t in stops:
                alive[i] = False
            else:
                out[i].append(t)
        if not alive.any():
            break
        ids = nxt.unsqueeze(1).to(dev)
        valid = torch.cat([valid, torch.ones((batch, 1), dtype=valid.dtype, device=dev)], dim=1)
        positions = positions[:, -1:] + 1
    return out


@torch.no_grad()
def sample_replies(model, tok, system: str, queries: list[str], max_new: int, temperature: float, top_p: float,
                   rows: int, generator: torch.Generator) -> list[str]:
    """One sampled reply per query under the system prompt (`rows` decoded together), as stripped text."""
    prefix, _ = chat_seq(tok, system, [])
    kv = prefix_kv(model, prefix)
    out = []
    for i in range(0, len(queries), rows):
        prompts = [chat_seq(tok, system, [("user", q)], generation_prompt=True)[1].ids for q in queries[i:i + rows]]
        ids = generate(model, tok, kv, prompts, 1, max_new, temperature, top_p, generator)
        out.extend(tok.decode(r, skip_special_tokens=True).strip() for r in ids)
    return out


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    # Only the head of the distribution can fall inside top_p: sorting 256 candidates instead of the whole
    # vocabulary made sampling 4x cheaper than the decode step it belongs to. Probabilities stay exact.
    top, order = scaled.topk(min(256, scaled.shape[-1]), dim=-1)
    sorted_p = (top - scaled.logsumexp(-1, keepdim=True)).exp()
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set whose mass reaches top_p
    sorted_p = sorted_p * keep
    # drawn on the CPU with the CPU generator: the same seed draws the same way on every device
    choice = torch.multinomial((sorted_p / sorted_p.sum(-1, keepdim=True)).cpu(), 1, generator=generator)
    return order.gather(-1, choice.to(order.device)).squeeze(-1)


def mlps(model) -> list:
    return [layer.mlp for layer in model.model.layers]


@contextmanager
def channel_hook(model, fn: Callable[[int, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Call fn(layer, h) on every layer's act(gate)*up product (the input of down_proj); a returned tensor
    replaces it. Hooks are removed on exit."""
    handles = []
    for i, mlp in enumerate(mlps(model)):
        def pre(module, args, i=i):
            new = fn(i, args[0])
            return None if new is None else (new,)
        handles.append(mlp.down_proj.register_forward_pre_hook(pre))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def real_tokens(lengths: list[int], h: torch.Tensor) -> torch.Tensor:
    """(B, S) mask of the real (unpadded) positions of a right-padded batch (B, S, ...) of these lengths."""
    return torch.arange(h.shape[1], device=h.device)[None, :] < torch.tensor(lengths, device=h.device)[:, None]


@torch.no_grad()
def channel_activations(model, seqset: SeqSet, batch: int, pad_id: int, fn: Callable[[int, torch.Tensor], None],
                        with_prefix: bool = False,
                        on_input: Callable[[int, torch.Tensor], None] | None = None) -> int:
    """Run `seqset` through the model and call fn(layer, h) with h (N, I): act(gate)*up at the real (unpadded)
    tokens of each batch, the shared prefix's tokens once when `with_prefix`; and on_input(layer, x) with x (N, D),
    the FFN's input at the same tokens. Returns the tokens seen."""
    lengths: list[int] = []

    def real(i: int, h: torch.Tensor) -> None:  # h: (B, S, I)
        fn(i, h[real_tokens(lengths, h)])

    def real_input(i: int, x: torch.Tensor) -> None:  # x: (B, S, D)
        if on_input is not None:
            on_input(i, x[real_tokens(lengths, x)])

    @contextmanager
    def hooks() -> Iterator[None]:
        inputs = [m.register_forward_pre_hook(lambda mod, args, i=i: real_input(i, args[0]))
                  for i, m in enumerate(mlps(model))] if on_input else []
        try:
            with channel_hook(model, real):
                yield
        finally:
            for handle in inputs:
                handle.remove()

    seen = 0
    if with_prefix and seqset.prefix:
        lengths[:] = [len(seqset.prefix)]
        with hooks():
            kv = prefix_kv(model, seqset.prefix)
        seen += len(seqset.prefix)
    else:
        kv = prefix_kv(model, seqset.prefix)
    with hooks():
        for chunk in seq_batches(seqset.seqs, batch):
            lengths[:] = [len(s.ids) for s in chunk]
            seen += sum(lengths)
            hidden_states(model, kv, [s.ids for s in chunk], pad_id)
    return seen


def by_length(lengths: list[int], size: int) -> list[list[int]]:
    """Indices in chunks of `size`, shortest first: a right-padded batch costs its longest row, so batching rows
    of like length cut the persona-sensitivity pass by 20 % (511 queries of 10-25 tokens). For passes whose
    results are summed or put back by index; training batches stay shuffled."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i:i + size] for i in range(0, len(order), size)]


def seq_batches(seqs: list[Seq], size: int) -> list[list[Seq]]:
    """`seqs` in batches of like length (`by_length`)."""
    return [[seqs[i] for i in idx] for idx in by_length([len(s.ids) for s in seqs], size)]


def batches(items: list, size: int, rng: torch.Generator) -> Iterator[list]:
    """Endless shuffled batches (reshuffled each epoch, seeded)."""
    while True:
        order = torch.randperm(len(items), generator=rng).tolist()
        for i in range(0, len(order) - size + 1 if len(order) >= size else 1, size):
            yield [items[j] for j in order[i:i + size]]


def require_device(device: str) -> None:
    """Raise ConfigError (naming the setting) when torch cannot use `device`."""
    if device == "cpu":
        return
    index = int(device.partition(":")[2] or 0)
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise ConfigError(f"device: {device} asked for, but this torch ({torch.__version__}) sees "
                          f"{torch.cuda.device_count()} CUDA devices; build with --device cpu")


def native_bf16(device: str) -> bool:
    """Whether `device` computes bf16 matmuls natively: CUDA, or a CPU with AVX512-BF16 or AMX. Elsewhere torch
    emulates bf16, and a (160, 576) x (576, 1536) product took 50 ms against fp32's 6.5 on an AVX2 EPYC."""
    if device != "cpu":
        return True
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def train_dtype(dtype: str, device: str) -> torch.dtype:
    """The training and scoring dtype of a `BuildConfig.dtype` ("auto": bf16 where it is native, else fp32)."""
    if dtype == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return torch.bfloat16 if dtype == "bf16" else torch.float32


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
