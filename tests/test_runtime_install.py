"""The runtime a game ships must import with only onnxruntime, numpy and tokenizers (and what THEY need) present.

Rather than trusting a blocked-import trick, this builds a real site folder holding just those distributions
(linked from the current environment, with their own dependencies resolved from their metadata) and imports
`runtime` and the bridge in an isolated interpreter (`-I -S`: no user or system site-packages).
"""
from __future__ import annotations

import importlib.metadata as md
import re
import subprocess
import sys
from pathlib import Path

from tests.tinymodel import ROOT

RUNTIME_DISTRIBUTIONS = ("onnxruntime", "numpy", "tokenizers", "pyyaml", "click")


def _closure(names: tuple[str, ...]) -> set[str]:
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop().lower()
        if name in seen:
            continue
        seen.add(name)
        for req in md.distribution(name).requires or []:
            if "extra ==" in req:
                continue
            todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
    return seen


def _link_distributions(names: set[str], site: Path) -> None:
    for name in names:
        dist = md.distribution(name)
        for f in dist.files or []:
            top = f.parts[0]
            src = Path(dist.locate_file(top))
            dst = site / top
            if top.endswith(".dist-info") or top == ".." or dst.exists() or not src.exists():
                continue
            dst.symlink_to(src)


def test_runtime_imports_without_torch(tmp_path):
    names = _closure(RUNTIME_DISTRIBUTIONS)
    assert "torch" not in names and "transformers" not in names
    site = tmp_path / "site"
    site.mkdir()
    _link_distributions(names, site)
    code = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
        "import runtime, plugin_bridge.server\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "print('ok', runtime.NPCPool.__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(site), str(ROOT)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok NPCPool")
