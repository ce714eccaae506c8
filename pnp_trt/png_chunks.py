"""A PNG file's chunks, read and written as bytes: the one walker of PNG structure (a result's sealed record, a
guidance's first chunk)."""

from __future__ import annotations

import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG's chunks as (type, whole chunk bytes), the last one cut short if `data` is (a file's head); bytes
    after IEND count as a chunk of type b''."""
    found, at = [], len(SIGNATURE)
    while at + 8 <= len(data):
        length = int.from_bytes(data[at:at + 4], "big")
        kind, end = data[at + 4:at + 8], at + 12 + length
        found.append((kind, data[at:end]))
        at = end
        if kind == b"IEND":
            break
    if at < len(data):
        found.append((b"", data[at:]))
    return found


def text_chunk(keyword: str, text: str) -> bytes:
    """A tEXt chunk (Latin-1 keyword and text) with its CRC."""
    data = keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    return len(data).to_bytes(4, "big") + b"tEXt" + data + zlib.crc32(b"tEXt" + data).to_bytes(4, "big")
