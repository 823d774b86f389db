"""Single input rows that each once stopped a whole factory job (on every restart), for the
tests that show they are quarantined instead."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

NESTING = 5000


def deeply_nested_line(depth: int = NESTING) -> str:
    """A JSONL line of arrays inside arrays, deeper than Python's parser recurses."""
    return "[" * depth + "]" * depth


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A valid PNG of a few dozen bytes that declares width x height pixels (a decompression
    bomb: 10 GiB of RGB at the default size): a 1x1 PNG with its IHDR size and CRC rewritten."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    png = bytearray(buf.getvalue())
    # 8-byte signature, then the IHDR chunk: length (4), type (4), width (4), height (4), ..., CRC of type + data.
    assert png[12:16] == b"IHDR"
    png[16:24] = struct.pack(">II", width, height)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    return bytes(png)


def bomb_chat() -> dict:
    """A chat whose image is a decompression bomb, as a data URI."""
    uri = "data:image/png;base64," + base64.b64encode(bomb_png()).decode()
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                      {"type": "image_url", "image_url": {"url": uri}}]},
                         {"role": "assistant", "content": "A very large picture."}]}


def lone_surrogate_line() -> str:
    """Valid JSON whose text holds a lone UTF-16 surrogate: Python reads it, the tokenizer refuses it."""
    return json.dumps({"messages": [{"role": "user", "content": "PLACEHOLDER"},
                                    {"role": "assistant", "content": "Fine."}]}).replace("PLACEHOLDER", "a\\ud800b")
