"""Character files: every format loads and maps faithfully, every refusal names file, field and cause, export-card
round-trips, and the validate/export-card commands exit 0/1/2 as documented."""
from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from builder.cardfiles import PNG_SIGNATURE
from builder.cards import (CardError, CardSettings, Character, LoreEntry, Turn, character_record, load_character,
                           load_roster, persona_prompt)
from builder.tavern import to_tavern_v2
from npcforge.cli import main
from tests.tinymodel import ROOT

BRENNA = """\
name: Brenna Ironhand
description: |
  {{char}} is the blacksmith of Emberfall, broad-shouldered and soot-stained.
personality: "gruff, proud, secretly kind"
scenario: "{{user}} walks into the forge at dusk."
speaking_style: "short sentences, forge metaphors, calls people 'spark'"
greeting: "Mind the sparks, {{user}}."
examples:
  - user: "What do you sell?"
    char: "Blades. Horseshoes. Nails by the pound."
  - - user: "Can you fix this?"
      char: "Maybe. Leave it."
    - user: "When?"
      char: "Tomorrow, spark."
lore:
  - "The silver mine closed last winter."
  - keys: [mine, silver]
    content: "Brenna's brother died in the silver mine."
stop: ["\\nTraveler:"]
tags: [blacksmith]
creator_notes: "SECRET-NOTE for modders only"
extensions: {talkativeness: "0.5", world: {region: north}}
build:
  ffn_keep: 0.5
"""


def _chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def make_png(texts: dict[str, bytes]) -> bytes:
    """A valid 1x1 PNG with the given tEXt chunks (written independently of builder.cardfiles)."""
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    body = b"".join(_chunk(b"tEXt", k.encode() + b"\0" + v) for k, v in texts.items())
    return (PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + body + _chunk(b"IDAT", zlib.compress(b"\0\0\0\0"))
            + _chunk(b"IEND", b""))


def b64(card: dict) -> bytes:
    return base64.b64encode(json.dumps(card).encode("utf-8"))


def v2_card(**data) -> dict:
    base = {"name": "Mira", "description": "A fisher of Saltmere.", "first_mes": "Hello, {{user}}."}
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": {**base, **data}}


def problems_of(path: Path, settings: CardSettings | None = None) -> list[str]:
    with pytest.raises(CardError) as e:
        load_character(path, settings) if settings else load_character(path)
    return [str(p) for p in e.value.problems]


# --- each format loads, faithfully ---------------------------------------------------------------------------------

def test_yaml_maps_every_field(tmp_path: Path) -> None:
    path = tmp_path / "brenna.yaml"
    path.write_text(BRENNA)
    ch = load_character(path)
    assert (ch.id, ch.name, ch.source_format) == ("brenna", "Brenna Ironhand", "yaml")
    assert ch.description.startswith("{{char}} is the blacksmith")  # macros stay until rendering
    assert ch.greetings == ["Mind the sparks, {{user}}."]
    assert ch.examples == [[Turn("user", "What do you sell?"), Turn("char", "Blades. Horseshoes. Nails by the pound.")],
                           [Turn("user", "Can you fix this?"), Turn("char", "Maybe. Leave it."),
                            Turn("user", "When?"), Turn("char", "Tomorrow, spark.")]]
    assert ch.lore == [LoreEntry(keys=[], content="The silver mine closed last winter.", constant=True),
                       LoreEntry(keys=["mine", "silver"], content="Brenna's brother died in the silver mine.")]
    assert ch.stop == ["\nTraveler:"]  # not stripped: the newline is the point
    assert ch.build == {"ffn_keep": 0.5} and ch.tags == ["blacksmith"]
    assert ch.extensions == {"talkativeness": "0.5", "world": {"region": "north"}}
    assert ch.card_sha256 == __import__("hashlib").sha256(path.read_bytes()).hexdigest()


def test_yaml_explicit_id_and_greetings_list(tmp_path: Path) -> None:
    path = tmp_path / "Some File.yml"
    path.write_text("id: smith_2\nname: A\ndescription: B\ngreetings: [one, two]\n")
    ch = load_character(path)
    assert ch.id == "smith_2" and ch.greetings == ["one", "two"]
    path.write_text("name: A\ndescription: B\n")
    assert load_character(path).id == "some-file"


def test_v1_json_with_v1_macros_and_literal_names(tmp_path: Path) -> None:
    card = {"name": "Tom Ferris", "description": "A ferryman.", "personality": "slow", "scenario": "At the river.",
            "first_mes": "Need a crossing?",
            "mes_example": "<START>\n<USER>: How much?\n<BOT>: Two copper.\nAnd a song.\n"
                           "<START>\nYou: Is it safe?\nTom Ferris: Safer than swimming.\nTom: Mostly."}
    path = tmp_path / "old_tom.json"
    path.write_text(json.dumps(card))
    ch = load_character(path)
    assert (ch.id, ch.source_format, ch.personality, ch.scenario) == ("old_tom", "v1", "slow", "At the river.")
    assert ch.greetings == ["Need a crossing?"]
    assert ch.examples == [[Turn("user", "How much?"), Turn("char", "Two copper.\nAnd a song.")],
                           [Turn("user", "Is it safe?"), Turn("char", "Safer than swimming."),
                            Turn("char", "Mostly.")]]


def test_v2_json_maps_every_field(tmp_path: Path) -> None:
    book = {"name": "Saltmere", "entries": [
        {"keys": ["storm", ""], "content": "Storms come from the west.", "enabled": True, "insertion_order": 5,
         "comment": "weather", "selective": True, "secondary_keys": ["sea"], "position": "after_char",
         "priority": 3, "extensions": {"depth": 4}},
        {"keys": [], "content": "Mira is thirty.", "enabled": True, "insertion_order": 1, "constant": True},
        {"keys": ["secret"], "content": "DISABLED-ENTRY", "enabled": False, "insertion_order": 2},
    ]}
    card = v2_card(personality="patient", scenario="On the pier.", alternate_greetings=["Fish?", ""],
                   mes_example="<START>\n{{user}}: Hi\n{{char}}: Hi yourself.\n<START>\n{{user}}: Bye\n{{char}}: Go.",
                   system_prompt="Be {{char}}. {{original}}", post_history_instructions="Stay terse.",
                   tags=["fisher"], creator="ana", creator_notes="notes", character_version=2,
                   character_book=book,
                   extensions={"depth_prompt": {"depth": 4}, "npcforge": {"build": {"ffn_keep": 0.6},
                                                                          "speaking_style": "terse", "stop": ["##"]}})
    path = tmp_path / "Mira Fisher.json"
    path.write_text(json.dumps(card))
    ch = load_character(path)
    assert (ch.id, ch.source_format) == ("mira-fisher", "v2")
    assert ch.greetings == ["Hello, {{user}}.", "Fish?"]
    assert ch.examples == [[Turn("user", "Hi"), Turn("char", "Hi yourself.")],
                           [Turn("user", "Bye"), Turn("char", "Go.")]]
    assert ch.lore == [LoreEntry(keys=["storm"], content="Storms come from the west.", insertion_order=5,
                                 name="weather", priority=3, selective=True, secondary_keys=["sea"],
                                 position="after_char", extensions={"depth": 4}),
                       LoreEntry(keys=[], content="Mira is thirty.", constant=True, insertion_order=1)]
    assert (ch.system_prompt, ch.post_history_instructions) == ("Be {{char}}. {{original}}", "Stay terse.")
    assert (ch.tags, ch.creator, ch.creator_notes, ch.character_version) == (["fisher"], "ana", "notes", "2")
    assert ch.extensions == {"depth_prompt": {"depth": 4}}  # verbatim, ours taken out
    assert (ch.build, ch.speaking_style, ch.stop) == ({"ffn_keep": 0.6}, "terse", ["##"])


def test_v3_json_png_and_charx(tmp_path: Path) -> None:
    v3 = {"spec": "chara_card_v3", "spec_version": "3.0", "data": {**v2_card()["data"], "name": "Mira Three",
                                                                   "nickname": "M", "assets": []}}
    (tmp_path / "three.json").write_text(json.dumps(v3))
    assert load_character(tmp_path / "three.json").source_format == "v3"

    (tmp_path / "two.png").write_bytes(make_png({"chara": b64(v2_card())}))
    ch = load_character(tmp_path / "two.png")
    assert (ch.id, ch.name, ch.source_format) == ("two", "Mira", "png-v2")

    # both chunks: ccv3 wins
    (tmp_path / "both.png").write_bytes(make_png({"chara": b64(v2_card()), "ccv3": b64(v3)}))
    ch = load_character(tmp_path / "both.png")
    assert (ch.name, ch.source_format) == ("Mira Three", "png-v3")

    with zipfile.ZipFile(tmp_path / "zipped.charx", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("card.json", json.dumps(v3))
        zf.writestr("assets/icon/images/main.png", make_png({}))
    ch = load_character(tmp_path / "zipped.charx")
    assert (ch.id, ch.name, ch.source_format) == ("zipped", "Mira Three", "charx")


# --- prompts -------------------------------------------------------------------------------------------------------

def test_persona_prompt_sections_and_macros(tmp_path: Path) -> None:
    path = tmp_path / "brenna.yaml"
    path.write_text(BRENNA)
    ch = load_character(path)
    prompt = persona_prompt(ch, "Ada")
    assert prompt.splitlines()[0] == "You are Brenna Ironhand, speaking with Ada."
    for part in ("Brenna Ironhand is the blacksmith", "gruff, proud", "Ada walks into the forge", "forge metaphors",
                 "The silver mine closed last winter.", "Ada: What do you sell?",
                 "Brenna Ironhand: Blades.", "1 to 3 sentences"):
        assert part in prompt, part
    assert "{{" not in prompt and "SECRET-NOTE" not in prompt
    assert "brother died" not in prompt  # keyword lore is not always-on
    assert prompt.rstrip().endswith("in 1 to 3 sentences.")


def test_persona_prompt_example_budget_and_override() -> None:
    examples = [[Turn("user", f"question {i}"), Turn("char", f"answer {i} " + "x" * 300)] for i in range(6)]
    ch = Character(id="a", name="Ann", description="A scout.", examples=examples)
    assert persona_prompt(ch).count("question") == 3  # at most three
    tight = CardSettings(prompt_budget_chars=200)
    assert persona_prompt(ch, settings=tight).count("question") == 1  # the first always goes in
    ch.system_prompt = "Roleplay as {{char}} for {{user}}.\n{{original}}"
    prompt = persona_prompt(ch, "Bo")
    assert prompt.startswith("Roleplay as Ann for Bo.\nYou are Ann, speaking with Bo.")
    ch.system_prompt = "Just {{char}}."
    assert persona_prompt(ch) == "Just Ann."


def test_character_record(tmp_path: Path) -> None:
    path = tmp_path / "brenna.yaml"
    path.write_text(BRENNA + "post_history_instructions: \"{{original}} Never break character, {{char}}.\"\n")
    ch = load_character(path)
    rec = character_record(ch, "Ada")
    assert set(rec) == {"id", "name", "system_prompt", "greeting", "greetings", "stop", "post_history_instructions"}
    assert rec["system_prompt"] == persona_prompt(ch, "Ada")
    assert rec["greeting"] == "Mind the sparks, Ada." and rec["greetings"] == ["Mind the sparks, Ada."]
    assert rec["stop"] == ["\nTraveler:", "\nAda:"]
    assert rec["post_history_instructions"] == "Never break character, Brenna Ironhand."
    json.dumps(rec)


# --- refusals ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("description: x\n", "name: missing or empty"),
    ("name: ''\ndescription: x\n", "name: missing or empty"),
    ("name: A\ndescription: '   '\n", "description: missing or empty"),
    ("name: A\ndescription: B\npersonalty: typo\n", "personalty: unknown key"),
    ("name: A\ndescription: B\nbuild: {ffn_keep: 1.5}\n", "build.ffn_keep: 1.5 is not in (0, 1]"),
    ("name: A\ndescription: B\nbuild: {ffn_kep: 0.5}\n", "build.ffn_kep: unknown build setting"),
    ("name: A\ndescription: B\nid: Bad Id\n", "id: 'Bad Id' is not a valid id"),
    ("name: A\ndescription: B\nlore: [{keys: [], content: x}]\n", "lore[0].keys: no keywords"),
    ("name: A\ndescription: B\nexamples: [{user: hi, bot: yo}]\n", "examples[0].bot: unknown key"),
    ("name: A\ndescription: B\ngreetings: [hi, '']\n", "greetings[1]: empty entry"),
    ("name: A\ndescription: B\npersonality: [a, b]\n", "personality: expected text, got a list"),
    ("name: A\ndescription: B\nname: C\n", "yaml: invalid YAML at line 3, column 1: duplicate key 'name'"),
    ("name: A\ndescription: [unclosed\n", "yaml: invalid YAML at line 3"),
    ("- just\n- a list\n", "file: expected a mapping of fields at the top level, got a list"),
    ("name: &n A\ndescription: *n\n", "yaml: invalid YAML at line 2, column 14: aliases (*name) are not allowed"),
    ("name: A\ndescription: B\nlore: [{keys: [a], content: x, priority: .nan}]\n",
     "lore[0].priority: expected a whole number, got nan"),
    ("name: A\ndescription: B\nextensions: {x: " + "[" * 20000 + "]" * 20000 + "}\n",
     "yaml: invalid YAML: nested too deeply"),
])
def test_yaml_refusals(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "npc.yaml"
    path.write_text(text)
    assert any(p.startswith(f"{path}: {expected}") for p in problems_of(path)), problems_of(path)


def test_every_problem_of_a_file_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "npc.yaml"
    path.write_text("scenario: x\nbuild: {ffn_keep: 7}\n")
    fields = [p.split(": ")[1] for p in problems_of(path)]
    assert fields == ["name", "description", "build.ffn_keep"]


def test_non_utf8_and_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "npc.yaml"
    path.write_bytes(b"name: A\ndescription: caf\xe9\n")
    assert problems_of(path) == [f"{path}: encoding: not UTF-8 text (line 2, byte 24); save the file as UTF-8"]
    path = tmp_path / "npc.json"
    path.write_text('{"name": "A",\n "description": }')
    assert problems_of(path)[0].startswith(f"{path}: json: invalid JSON at line 2, column 17: Expecting value")
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert problems_of(path) == [f"{path}: json: invalid JSON: nested too deeply"]


def test_size_caps(tmp_path: Path) -> None:
    path = tmp_path / "npc.yaml"
    path.write_text("name: A\ndescription: " + "x" * 40_000 + "\n")
    assert problems_of(path) == [f"{path}: description: 40000 bytes, more than the limit of 32768; shorten it"]
    png = tmp_path / "big.png"
    png.write_bytes(make_png({"chara": b64(v2_card(description="y" * 5000))}))
    problem = problems_of(png, CardSettings(max_png_bytes=4000))[0]
    assert problem.startswith(f"{png}: file: ") and "more than the limit of 4000 for .png files" in problem


def test_png_refusals(tmp_path: Path) -> None:
    path = tmp_path / "npc.png"
    path.write_bytes(make_png({"Comment": b"hello"}))
    assert problems_of(path)[0].startswith(f"{path}: png: no character card inside")
    path.write_bytes(make_png({"chara": b"!!!not base64!!!"}))
    assert problems_of(path)[0].startswith(f"{path}: chara: corrupt base64")
    path.write_bytes(make_png({"chara": base64.b64encode(b'{"name": ')}))
    assert problems_of(path)[0].startswith(f"{path}: chara: invalid JSON at line 1")
    good = bytearray(make_png({"chara": b64(v2_card())}))
    good[40] ^= 0xFF  # inside the tEXt payload: the CRC no longer matches
    path.write_bytes(bytes(good))
    assert "bad CRC" in problems_of(path)[0]
    path.write_bytes(make_png({"chara": b64(v2_card())})[:-20])
    assert "truncated" in problems_of(path)[0]
    path.write_bytes(b"GIF89a" + b"\0" * 50)
    assert problems_of(path) == [f"{path}: png: not a PNG file (bad signature)"]


@pytest.mark.parametrize("entry", ["../evil.txt", "/etc/evil", "assets/../../evil", "C:/evil"])
def test_charx_unsafe_paths(tmp_path: Path, entry: str) -> None:
    path = tmp_path / "npc.charx"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("card.json", json.dumps(v2_card()))
        zf.writestr(zipfile.ZipInfo(entry), b"x")
    assert problems_of(path) == [f"{path}: {entry}: unsafe entry path (absolute or containing '..'); "
                                 "refusing the archive"]


def test_charx_zip_bombs(tmp_path: Path) -> None:
    path = tmp_path / "bomb.charx"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("card.json", json.dumps(v2_card()))
        zf.writestr("assets/other/zeros.bin", b"\0" * (8 << 20))
    assert "exceeds 100:1 (zip bomb?)" in problems_of(path)[0]
    assert "would unpack to" in problems_of(path, CardSettings(max_charx_unpacked=1 << 20))[0]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("assets/x.txt", "x")
    assert problems_of(path) == [f"{path}: card.json: CHARX archive has no card.json at its root"]


def test_roster_duplicates_and_isolation(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "brenna.yaml").write_text(BRENNA)
    (tmp_path / "brenna.png").write_bytes(make_png({"chara": b64(v2_card())}))
    (tmp_path / "broken.yaml").write_text("name: [\n")
    (tmp_path / "mira.json").write_text(json.dumps(v2_card()))
    (tmp_path / "README.md").write_text("# notes")
    caplog.set_level("INFO", logger="builder.cards")
    roster = load_roster(tmp_path)
    assert [c.id for c in roster.characters] == ["brenna", "mira"]
    lines = [str(p) for p in roster.problems]
    assert len(lines) == 2 and lines[1].startswith(f"{tmp_path / 'broken.yaml'}: yaml: invalid YAML at line")
    assert lines[0] == (f"{tmp_path / 'brenna.yaml'}: id: duplicate id 'brenna', already used by "
                        f"{tmp_path / 'brenna.png'}; rename one file or set another id")
    assert "README.md: skipped" in caplog.text
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no character files" in str(load_roster(empty).problems[0])


# --- the sample roster, the schema ---------------------------------------------------------------------------------

def test_sample_roster_is_clean_and_matches_the_schema(roster_dir: Path) -> None:
    roster = load_roster(roster_dir)
    assert roster.problems == [] and len(roster.characters) >= 6
    assert {c.source_format for c in roster.characters} >= {"yaml", "png-v2"}
    schema = json.loads((ROOT / "docs" / "character.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for path in sorted(roster_dir.glob("*.yaml")):
        jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "A", "description": "B", "personalty": "typo"}, schema)


# --- export-card and the commands ----------------------------------------------------------------------------------

def test_export_card_round_trip(tmp_path: Path) -> None:
    chars = tmp_path / "chars"
    chars.mkdir()
    (chars / "brenna.yaml").write_text(BRENNA)
    original = load_character(chars / "brenna.yaml")
    runner = CliRunner()
    for fmt in ("png", "json"):
        out = tmp_path / f"brenna.{fmt}"
        result = runner.invoke(main, ["export-card", "brenna", "--format", fmt, "--characters", str(chars),
                                      "-o", str(out)])
        assert result.exit_code == 0, result.output
        back = load_character(out)
        assert back == original and back.source_format == ("png-v2" if fmt == "png" else "v2")
    chunks = _png_chunk_types((tmp_path / "brenna.png").read_bytes())
    ihdr = chunks[b"IHDR"]
    assert struct.unpack(">II", ihdr[:8]) == (256, 256)
    assert len(zlib.decompress(chunks[b"IDAT"])) == 256 * (1 + 256 * 3)
    card = json.loads((tmp_path / "brenna.json").read_text())
    assert card["spec"] == "chara_card_v2" and card["data"]["first_mes"] == "Mind the sparks, {{user}}."
    result = runner.invoke(main, ["export-card", "nobody", "--characters", str(chars), "-o", str(tmp_path / "n.png")])
    assert result.exit_code == 1 and "no character 'nobody'" in result.output and "brenna" in result.output
    assert runner.invoke(main, ["export-card", "brenna", "--format", "gif"]).exit_code == 2


def _png_chunk_types(data: bytes) -> dict[bytes, bytes]:
    chunks, pos = {}, 8
    while pos < len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        chunks[ctype] = data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return chunks


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1,
                max_size=40).map(str.strip).filter(lambda s: s and ":" not in s and "<" not in s)


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=_text, description=_text, greetings=st.lists(_text, max_size=3),
       dialogues=st.lists(st.lists(st.tuples(st.sampled_from(["user", "char"]), _text), min_size=1, max_size=3),
                          max_size=3),
       facts=st.lists(_text, max_size=3), keyed=st.lists(st.tuples(st.lists(_text, min_size=1, max_size=2), _text),
                                                        max_size=2))
def test_tavern_round_trip_property(tmp_path: Path, name, description, greetings, dialogues, facts, keyed) -> None:
    ch = Character(id="npc", name=name, description=description, greetings=greetings,
                   examples=[[Turn(r, t) for r, t in d] for d in dialogues],
                   lore=[LoreEntry([], f, constant=True) for f in facts] + [LoreEntry(k, c) for k, c in keyed],
                   stop=["\n###"], build={"ffn_keep": 0.5})
    from builder.cardfiles import write_png_card
    (tmp_path / "npc.png").write_bytes(write_png_card(to_tavern_v2(ch), "npc"))
    assert load_character(tmp_path / "npc.png") == ch


def test_validate_command(tmp_path: Path, roster_dir: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["validate", str(roster_dir)])
    assert result.exit_code == 0 and result.output.strip().endswith("characters ok, 0 problems")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ok.yaml").write_text("name: A\ndescription: B\n")
    (bad / "nameless.yaml").write_text("description: B\n")
    result = runner.invoke(main, ["validate", str(bad)])
    assert result.exit_code == 1
    assert f"{bad / 'nameless.yaml'}: name: missing or empty" in result.output
    assert "1 character ok, 1 problem" in result.output
    result = runner.invoke(main, ["validate", str(bad), "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code == 1 and report["ok"] is False and report["characters"][0]["id"] == "ok"
    assert report["problems"] == [{"file": str(bad / "nameless.yaml"), "field": "name",
                                   "message": "missing or empty; every character needs one"}]
    assert runner.invoke(main, ["validate", "--bogus"]).exit_code == 2


def test_validate_console_script(tmp_path: Path, roster_dir: Path) -> None:
    script = Path(sys.executable).parent / "npcforge"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "npcforge"]
    ok = subprocess.run([*command, "validate", str(roster_dir)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "README.md" not in ok.stdout + ok.stderr, ok.stdout + ok.stderr
    noted = subprocess.run([*command, "-v", "validate", str(roster_dir)], capture_output=True, text=True, timeout=120)
    assert noted.returncode == 0 and "README.md: skipped" in noted.stderr
    (tmp_path / "dup.yaml").write_text("name: A\ndescription: B\n")
    (tmp_path / "dup.json").write_text(json.dumps(v2_card()))
    failed = subprocess.run([*command, "validate", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "duplicate id 'dup'" in failed.stdout
    assert "1 character ok, 1 problem" in failed.stderr
