"""A stronger teacher over OpenAI-compatible HTTP (`teacher_url`): the paper's "rewrite in the persona's voice" step.

FACTS 4d/§5: teacher quality is the first-order lever (the paper's 70B rewriting step mattered most), and the 135M
dense model drifts and loops. Any server that speaks `/v1/chat/completions` (llama.cpp's server, vLLM, Ollama, a
hosted API) can answer in character instead. Plain urllib: no new dependency.

Input: the endpoint URL (`http://host:port/v1` or the full `.../chat/completions`), a model name, the character's
system prompt, a query. Output: `n` answer texts. An API key, when the server wants one, comes from the
environment variable NPCFORGE_TEACHER_API_KEY (never from the build config, which is hashed into artifacts).
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

from builder.config import BuildConfig


class TeacherError(RuntimeError):
    """The teacher endpoint failed; the message names the URL and what came back."""


def endpoint(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def ask(url: str, model: str | None, system: str, query: str, n: int, config: BuildConfig,
        timeout: float = 120.0) -> list[str]:
    """n sampled answers, one request each (many servers ignore the `n` field)."""
    target = endpoint(url)
    headers = {"Content-Type": "application/json"}
    if os.environ.get("NPCFORGE_TEACHER_API_KEY"):
        headers["Authorization"] = f"Bearer {os.environ['NPCFORGE_TEACHER_API_KEY']}"
    body = {"model": model or "default", "max_tokens": config.teacher_max_tokens,
            "temperature": config.teacher_temperature, "top_p": config.teacher_top_p,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": query}]}
    answers = []
    for i in range(n):
        body["seed"] = config.seed * 1000 + i
        request = urllib.request.Request(target, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")[:300]
            raise TeacherError(f"teacher_url {target}: HTTP {e.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise TeacherError(f"teacher_url {target}: cannot reach the teacher ({e}); "
                               "is the server running?") from None
        except json.JSONDecodeError:
            raise TeacherError(f"teacher_url {target}: the reply is not JSON") from None
        try:
            answers.append(str(reply["choices"][0]["message"]["content"]))
        except (KeyError, IndexError, TypeError):
            raise TeacherError(f"teacher_url {target}: reply has no choices[0].message.content: "
                               f"{json.dumps(reply)[:300]}") from None
    return answers
