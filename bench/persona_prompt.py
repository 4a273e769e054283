"""Persona prompt benchmark: how well each section of `builder.cards.persona_prompt` conditions the base model.

Usage: python bench/persona_prompt.py [--characters DIR] [--base PATH] [--threads N] [--json]
For every character, the example exchanges after the first are held out (the prompt keeps only the first) and the
base model's teacher-forced negative log-likelihood per token of each held-out answer is measured under prompt
variants: ours, ours without one section (facts, example, speaking style), the Persona-Pruner paper's one-line
prompt (FACTS.md §5), and no system prompt. Lower is better: the prompt makes the character's own voice and
knowledge more likely. Prints one table (NLL per token, mean prompt tokens) and `--json` prints it as JSON.
The held-out answers are written by the card author who wrote the facts, so the facts' gain is an upper bound.
Cost: one forward pass per (answer, variant); about 12 CPU-minutes for the sample roster on one busy core.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from builder.cards import Character, CardSettings, load_roster, persona_prompt, substitute  # noqa: E402

USER = "Traveler"
ONE_EXAMPLE = CardSettings(max_prompt_examples=1)  # the held-out examples must never be in the prompt


def _without(**changes: object) -> Callable[[Character], str]:
    return lambda c: persona_prompt(dataclasses.replace(c, **changes), USER, ONE_EXAMPLE)


VARIANTS: dict[str, Callable[[Character], str]] = {
    "ours": lambda c: persona_prompt(c, USER, ONE_EXAMPLE),
    "ours - facts": _without(lore=[]),
    "ours - example": _without(examples=[]),
    "ours - speaking style": _without(speaking_style=""),
    "paper one-liner": lambda c: (f"You are roleplaying as the following character: {c.name}. {c.description} "
                                  "Answer the question, roleplay as the given persona."),
    "no system prompt": lambda c: "",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--characters", type=Path, default=ROOT / "characters")
    ap.add_argument("--base", help="HF folder of the base model (default: the provisioned default model)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch
    from builder.basemodel import ensure_base_model, load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model(ensure_base_model(args.base))
    roster = load_roster(args.characters)
    for problem in roster.problems:
        print(f"skipped: {problem}", file=sys.stderr)

    def nll(system: str, user: str, answer: str) -> tuple[float, int, int]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")[0]
        target = torch.tensor(tok.encode(answer + "<|im_end|>", add_special_tokens=False))
        with torch.no_grad():
            logits = model(torch.cat([prompt, target])[None]).logits[0, len(prompt) - 1:-1].float()
        return torch.nn.functional.cross_entropy(logits, target, reduction="sum").item(), len(target), len(prompt)

    totals = {name: [0.0, 0, 0, 0] for name in VARIANTS}  # nll sum, answer tokens, prompt tokens, answers
    start = time.perf_counter()
    for c in roster.characters:
        prompts = {name: make(c) for name, make in VARIANTS.items()}
        for dialogue in c.examples[1:]:
            for question, answer in zip(dialogue, dialogue[1:]):
                if (question.role, answer.role) != ("user", "char"):
                    continue
                q, a = substitute(question.text, c.name, USER), substitute(answer.text, c.name, USER)
                for name, system in prompts.items():
                    s, n, p = nll(system, q, a)
                    t = totals[name]
                    t[0], t[1], t[2], t[3] = t[0] + s, t[1] + n, t[2] + p, t[3] + 1
    rows = [{"variant": name, "nll_per_token": s / max(n, 1), "mean_prompt_tokens": p / max(k, 1)}
            for name, (s, n, p, k) in totals.items()]
    if args.json:
        print(json.dumps({"characters": len(roster.characters), "answers": totals["ours"][3],
                          "answer_tokens": totals["ours"][1], "rows": rows}, indent=2))
        return
    print(f"{len(roster.characters)} characters, {totals['ours'][3]} held-out answers "
          f"({totals['ours'][1]} tokens), {time.perf_counter() - start:.0f} s")
    print(f"{'variant':<22} {'NLL/token':>9} {'prompt tokens':>13}")
    for r in rows:
        print(f"{r['variant']:<22} {r['nll_per_token']:9.3f} {r['mean_prompt_tokens']:13.0f}")


if __name__ == "__main__":
    main()
