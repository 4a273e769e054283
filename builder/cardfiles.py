"""Container formats of Tavern character cards: PNG chunks and CHARX zips, read and written with the stdlib only.

Reading: `png_card_text(data)` returns the card JSON text carried by a PNG (`ccv3` preferred over `chara`);
`charx_card_text(data, ...)` returns `card.json` from the bytes of a CHARX zip after checking every entry name and the
uncompressed sizes declared in the zip directory (nothing is extracted). Both raise `ContainerError(field,
message)`, which builder.cards turns into a `CardProblem`.
Writing: `write_png_card(card, seed_text)` returns PNG bytes: a 256x256 portrait generated from `seed_text`
plus a `chara` tEXt chunk holding the card (base64 of UTF-8 JSON), as Tavern front-ends expect.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import struct
import zipfile
import zlib
from pathlib import PurePosixPath
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ContainerError(ValueError):
    """A card container is malformed or unsafe; `field` names where, the message says what."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of every chunk up to IEND, with signature, lengths and CRCs checked."""
    if not data.startswith(PNG_SIGNATURE):
        raise ContainerError("png", "not a PNG file (bad signature)")
    chunks, pos = [], len(PNG_SIGNATURE)
    while True:
        if pos + 8 > len(data):
            raise ContainerError("png", f"truncated at byte {pos} (no IEND chunk)")
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length + 4
        if end > len(data):
            raise ContainerError("png", f"chunk {ctype!r} at byte {pos} runs past the end of the file (truncated?)")
        payload = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4:end])
        if zlib.crc32(ctype + payload) != crc:
            raise ContainerError("png", f"chunk {ctype.decode('latin-1')!r} at byte {pos} has a bad CRC (corrupt file)")
        chunks.append((ctype, payload))
        pos = end
        if ctype == b"IEND":
            return chunks


def png_card_text(data: bytes) -> tuple[str, str]:
    """(keyword, JSON text) of the card in a PNG: the `ccv3` tEXt chunk if present, else `chara`."""
    texts: dict[str, bytes] = {}
    for ctype, payload in png_chunks(data):
        if ctype == b"tEXt" and b"\0" in payload:
            keyword, _, value = payload.partition(b"\0")
            key = keyword.decode("latin-1").lower()
            if key in ("chara", "ccv3"):
                texts.setdefault(key, value)
    if not texts:
        raise ContainerError("png", "no character card inside (no tEXt chunk 'chara' or 'ccv3'); "
                                    "is this a plain image rather than a Tavern card?")
    keyword = "ccv3" if "ccv3" in texts else "chara"
    try:
        raw = base64.b64decode(b"".join(texts[keyword].split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ContainerError(keyword, f"corrupt base64 in the PNG text chunk ({e})") from None
    try:
        return keyword, raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ContainerError(keyword, f"card text is not UTF-8 (byte {e.start} of the decoded chunk)") from None


def _unsafe_name(name: str) -> bool:
    """Entry names a careless extractor would write outside its folder."""
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":")


def charx_card_text(data: bytes, max_uncompressed: int, max_ratio: float, max_card_bytes: int) -> str:
    """`card.json` of a CHARX zip. Names and declared sizes of ALL entries are checked before anything is read."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError) as e:
        raise ContainerError("zip", f"not a readable zip archive ({e})") from None
    with zf:
        infos = zf.infolist()
        for info in infos:
            if _unsafe_name(info.filename):
                raise ContainerError(info.filename,
                                     "unsafe entry path (absolute or containing '..'); refusing the archive")
        total = sum(i.file_size for i in infos)
        packed = sum(i.compress_size for i in infos)
        if total > max_uncompressed:
            raise ContainerError("zip", f"archive would unpack to {total} bytes, more than the limit of "
                                        f"{max_uncompressed} (zip bomb?)")
        if total > 1 << 20 and total > max_ratio * max(packed, 1):
            raise ContainerError("zip", f"compression ratio {total / max(packed, 1):.0f}:1 exceeds {max_ratio:.0f}:1 "
                                        "(zip bomb?)")
        try:
            info = zf.getinfo("card.json")
        except KeyError:
            raise ContainerError("card.json", "CHARX archive has no card.json at its root") from None
        if info.file_size > max_card_bytes:
            raise ContainerError("card.json", f"{info.file_size} bytes, more than the limit of {max_card_bytes}")
        try:
            with zf.open(info) as f:
                raw = f.read(max_card_bytes + 1)  # the directory's size may lie; never read past the cap
        except (zipfile.BadZipFile, zlib.error, OSError) as e:
            raise ContainerError("card.json", f"cannot be decompressed ({e})") from None
        if len(raw) > max_card_bytes:
            raise ContainerError("card.json", f"unpacks past the limit of {max_card_bytes} bytes")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ContainerError("card.json", f"not UTF-8 (byte {e.start})") from None


def _chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def portrait_rows(seed_text: str, size: int = 256) -> list[bytes]:
    """RGB rows of a simple portrait: a two-colour gradient and a head-and-shoulders silhouette, both from a hash."""
    h = hashlib.sha256(seed_text.encode("utf-8")).digest()
    top, bottom, figure = h[0:3], h[3:6], bytes(c // 4 for c in h[6:9])
    cx, head_y, head_r = size / 2, size * 0.40, size * 0.17
    body_y, body_rx, body_ry = size * 1.02, size * 0.38, size * 0.36
    rows = []
    for y in range(size):
        t = y / (size - 1)
        bg = bytes(int(a + (b - a) * t) for a, b in zip(top, bottom))
        row = bytearray(bg * size)
        for cy, rx, ry in ((head_y, head_r, head_r), (body_y, body_rx, body_ry)):
            dy = (y + 0.5 - cy) / ry
            if dy * dy < 1:
                half = rx * (1 - dy * dy) ** 0.5
                x0, x1 = max(0, int(cx - half)), min(size, int(cx + half) + 1)
                row[3 * x0:3 * x1] = figure * (x1 - x0)
        rows.append(bytes(row))
    return rows


def write_png_card(card: dict[str, Any], seed_text: str, size: int = 256) -> bytes:
    """PNG bytes: generated portrait + `chara` tEXt chunk (base64 of the card's UTF-8 JSON)."""
    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    raw = b"".join(b"\0" + row for row in portrait_rows(seed_text, size))  # filter type 0 on every row
    text = base64.b64encode(json.dumps(card, ensure_ascii=False).encode("utf-8"))
    return (PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"tEXt", b"chara\0" + text)
            + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b""))
