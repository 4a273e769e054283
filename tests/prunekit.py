"""Helpers shared by the pruning tests: a small, fast BuildConfig and a roster context on the tiny model."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import torch

from builder.basemodel import ensure_base_model
from builder.cards import load_roster
from builder.config import BuildConfig, resolve_config
from builder.prune import RosterContext

# The tiny model gains nothing from threads, and on a shared 2-core machine extra threads oversubscribe (30x slower).
torch.set_num_threads(1)

# Small enough that a whole prune of the tiny model takes seconds; every stage still runs.
TINY = dict(threads=1, query_pool=40, n_train_queries=12, n_heldout_queries=8, n_card_questions=2,
            teacher_candidates=2, teacher_max_tokens=16, n_reference_personas=2, judge_references=1,
            multi_turn_sequences=4, mask_steps=4, heal_steps=4, n_generic_calibration=4, n_generic_eval=4,
            max_seq_len=128, teacher_max_repetition=1.0, width_step=16)


def tiny_config(**overrides) -> BuildConfig:
    return resolve_config("fast", {**TINY, **overrides})


def tiny_context(tiny_base: Path, roster_dir: Path, **overrides) -> RosterContext:
    roster = load_roster(roster_dir)
    return RosterContext.create(sorted(roster.characters, key=lambda c: c.id), ensure_base_model(tiny_base),
                                tiny_config(**overrides))


class Teacher(BaseHTTPRequestHandler):
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Teacher.seen.append({"path": self.path, "body": body})
        if body["model"] == "broken":
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"model exploded")
            return
        text = f"Aye, {body['messages'][1]['content'].rstrip('?')}. Mind the sparks."
        if body["model"] == "two-voices" and len(Teacher.seen) % 2:  # every other candidate in another voice
            text = f"Hmph. {body['messages'][1]['content'].rstrip('?')}, you say? Ask the miller, not me."
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture()
def teacher_server():
    """A real OpenAI-compatible HTTP teacher on a free port that answers every query in a fixed voice."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Teacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    Teacher.seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()
