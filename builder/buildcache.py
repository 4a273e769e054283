"""What a rebuild may reuse, on disk: a character's calibration (its queries and the teacher's answers) and the
dense model's side of its evaluation. Neither depends on the width, the method, healing or the export, so a
character rebuilt with other build settings skips them (about 40 % of a `fast` build on the default model).

`DiskCache` is a mapping the pruning code uses like a dict: keys are tuples of JSON-able values, values whatever
`encode`/`decode` turn into JSON. An entry's file name is the sha256 of the key, the builder version and a salt
naming what else the values depend on (base model, training dtype, device), so changing any of them misses
instead of reusing. Entries are written to a temporary file and renamed, so parallel `--jobs` workers and an
interrupted build never leave half an entry; an unreadable entry counts as missing. Deleting the folder is
always safe.

Input: a folder and a salt. Output: `<folder>/<sha256>.json` files.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, Callable, Iterator

from builder.artifact import builder_version, jsonable

log = logging.getLogger(__name__)


class DiskCache(MutableMapping):
    """A dict whose entries also live in `folder` and outlive the process (see the module docstring)."""

    def __init__(self, folder: Path, salt: str, encode: Callable[[Any], Any] = lambda v: v,
                 decode: Callable[[Any], Any] = lambda v: v) -> None:
        self.folder, self.salt, self.encode, self.decode = Path(folder), salt, encode, decode
        self.memory: dict[Any, Any] = {}

    def path(self, key: Any) -> Path:
        text = json.dumps([builder_version(), self.salt, key], sort_keys=True, ensure_ascii=False)
        return self.folder / f"{hashlib.sha256(text.encode()).hexdigest()}.json"

    def _load(self, key: Any) -> bool:
        if key in self.memory:
            return True
        try:
            self.memory[key] = self.decode(json.loads(self.path(key).read_text(encoding="utf-8")))
        except FileNotFoundError:
            return False
        except (OSError, ValueError, TypeError, KeyError) as e:  # a damaged entry is recomputed, never fatal
            log.warning("ignoring the unreadable cache entry %s: %s", self.path(key), e)
            return False
        return True

    def __contains__(self, key: object) -> bool:
        return self._load(key)

    def __getitem__(self, key: Any) -> Any:
        if not self._load(key):
            raise KeyError(key)
        return self.memory[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.memory[key] = value
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
        tmp.write_text(json.dumps(self.encode(value), ensure_ascii=False, default=jsonable), encoding="utf-8")
        os.replace(tmp, path)

    def __delitem__(self, key: Any) -> None:
        self.memory.pop(key, None)
        self.path(key).unlink(missing_ok=True)

    def __iter__(self) -> Iterator[Any]:  # the keys of this process; on-disk names cannot be turned back into keys
        return iter(self.memory)

    def __len__(self) -> int:
        return len(self.memory)
