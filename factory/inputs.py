"""Prompt data sets in: files -> source rows -> normalised chats, or a reason to quarantine.

Accepted, per row (JSONL line or Parquet row):

- OpenAI messages: `{"messages": [{"role", "content"}]}`; content a string or a list of
  parts `{"type": "text", "text"}`, `{"type": "image_url", "image_url": {"url"}}` (a
  data URI or a file path) or `{"type": "input_audio", "input_audio": {"data", "format"}}`
  (base64 WAV);
- ShareGPT: `{"conversations": [{"from", "value"}]}` (human/user, gpt/assistant, system);
- a plain prompt column named in the job (`input.prompt_column`), made one user turn.

Files are read lazily in a fixed order (directories sorted, recursively), so a row's
location `(file, row)` and its place in the input never change between runs. A row that
cannot be used raises `InputError` naming the field and what was expected; the pipeline
quarantines it with its location, and the job goes on.

A media part may name a file by path. Which files a job may open that way is a `MediaPaths`
policy the job is run with: `factory run` reads the user's own files (any path, `~`
expanded); the job service confines them to its roots (see `MediaPaths`).

Chats stay in OpenAI form (JSON, what the id is computed from and what a server is sent);
`to_renderer_messages` turns media parts into what `factory.render.Renderer` takes
(PIL images, waveforms) only where they are rendered.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.job import InputConfig
from factory.rows import machine_trouble
from factory.targets import ImageTooLarge, open_image

log = logging.getLogger("specmill.factory.inputs")

JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "model": "assistant"}
_PARQUET_BATCH_ROWS = 256


class InputError(ValueError):
    """A row that cannot be used; the message names the field and what was expected."""


@dataclass(frozen=True, slots=True)
class SourceRow:
    """One input row and where it came from. `data` is None when the row did not parse;
    `error` then says why."""

    file: str
    row: int  # 0-based row (JSONL: line) within the file
    index: int  # 0-based position in the whole input
    data: dict[str, Any] | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class MediaPaths:
    """Which files a row's media paths (an `image_url.url` that is not a data URI) may name.

    `MediaPaths()`, what `factory run` uses: the user's own files, any path, `~` expanded.
    `MediaPaths.confined(roots, base)`, what the job service uses: a path must resolve,
    symlinks included, to a readable file inside one of `roots`; a relative path starts at
    `base`, and `~` is never expanded (the service's home directory is not the client's). A
    path refused for where it leads gets the same reason as a missing one, so a job cannot
    probe which files the service's machine holds."""

    roots: tuple[Path, ...] | None = None  # None: not confined
    base: Path | None = None  # where a relative path starts, when confined

    @classmethod
    def confined(cls, roots: Sequence[str | Path], base: str | Path) -> MediaPaths:
        if not roots:
            raise ValueError("confined media paths need at least one root")
        return cls(roots=tuple(Path(r).resolve() for r in roots), base=Path(base).resolve())

    def file(self, url: str, at: str, kind: str = "image") -> Path:
        """The file a media part at field `at` names, to be opened; InputError if this job may
        not open it."""
        if self.roots is None:
            try:
                path = Path(url).expanduser()
                found = path.is_file()
            # No permission, a name too long, ~someone unknown: the row's path, not the machine.
            except (OSError, RuntimeError) as e:
                if machine_trouble(e):
                    raise
                raise InputError(f"field {at}: {kind} file {url} cannot be read "
                                 f"({getattr(e, 'strerror', None) or e})") from None
            if not found:
                raise InputError(f"field {at}: {kind} file {url} does not exist")
            return path
        # One reason for every refusal: missing, outside the roots, a symlink out of them, unreadable.
        refused = InputError(f"field {at}: {kind} file {url} is not readable by this job (missing, or outside "
                             f"the service's data and input roots)")
        path = Path(url)
        try:
            real = (path if path.is_absolute() else self.base / path).resolve(strict=True)
        except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: a symlink loop; ValueError: a NUL byte
            if machine_trouble(e):
                raise
            raise refused from None
        if not any(real.is_relative_to(root) for root in self.roots) or not real.is_file() \
                or not os.access(real, os.R_OK):
            raise refused
        return real


# --------------------------------------------------------------------------- files


def input_files(config: InputConfig) -> list[Path]:
    """The files a job reads, in reading order: each path as given, a directory's JSONL and
    Parquet files sorted by relative path."""
    files: list[Path] = []
    for path in config.paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"input directory {path} holds no {'/'.join(JSONL_SUFFIXES + PARQUET_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if path.suffix not in JSONL_SUFFIXES + PARQUET_SUFFIXES:
                raise ValueError(f"input file {path}: unknown format; name it *.jsonl or *.parquet")
            files.append(path)
        else:
            raise FileNotFoundError(f"input path {path} does not exist")
    return [f.resolve() for f in files]


def read_rows(config: InputConfig) -> Iterator[SourceRow]:
    """Every input row in order, lazily (a file is never loaded whole), up to max_samples."""
    index = 0
    for path in input_files(config):
        rows = _parquet_rows(path) if path.suffix in PARQUET_SUFFIXES else _jsonl_rows(path)
        for row, data, error in rows:
            if config.max_samples is not None and index >= config.max_samples:
                return
            yield SourceRow(file=str(path), row=row, index=index, data=data, error=error)
            index += 1


def count_rows(config: InputConfig) -> int:
    """How many rows `read_rows` yields (Parquet from metadata; JSONL by counting lines)."""
    import pyarrow.parquet as pq

    total = 0
    for path in input_files(config):
        if path.suffix in PARQUET_SUFFIXES:
            total += pq.ParquetFile(path).metadata.num_rows
        else:
            with open(path, "rb") as f:
                total += sum(1 for line in f if line.strip())
        if config.max_samples is not None and total >= config.max_samples:
            return config.max_samples
    return total


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    with open(path, "rb") as f:
        row = 0
        for line in f:
            if not line.strip():
                continue  # blank lines are not rows
            try:
                data = json.loads(line)
            except RecursionError:
                # Python's parser recurses once per nesting level; a deeper row is this row's problem.
                yield row, None, "not usable JSON: nested too deeply to parse (arrays or objects inside each other)"
            except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
                yield row, None, f"not valid JSON ({e})"
            else:
                if isinstance(data, dict):
                    yield row, data, None
                else:
                    yield row, None, f"a row must be a JSON object, got {type(data).__name__}"
            row += 1


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
        for data in batch.to_pylist():
            yield row, data, None
            row += 1


# --------------------------------------------------------------------------- rows -> chats


def normalize(data: dict[str, Any], config: InputConfig, media: MediaPaths = MediaPaths()) -> list[dict[str, Any]]:
    """A row's chat in OpenAI form: [{"role", "content"}], content a string or OpenAI parts.
    Raises InputError naming the field (a media file `media` does not let the job open too)."""
    fmt = config.format
    if fmt == "auto":
        if "messages" in data:
            fmt = "messages"
        elif "conversations" in data:
            fmt = "sharegpt"
        elif config.prompt_column and config.prompt_column in data:
            fmt = "prompt"
        else:
            wanted = ["messages", "conversations"] + ([config.prompt_column] if config.prompt_column else [])
            raise InputError(f"the row has none of the fields {wanted} (it has {sorted(data)[:8]})")
    if fmt == "messages":
        return _openai_messages(data.get("messages"), media)
    if fmt == "sharegpt":
        return _sharegpt(data.get("conversations"))
    prompt = data.get(config.prompt_column)
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"field {config.prompt_column} must be a non-empty string, got {_short(prompt)}")
    return [{"role": "user", "content": prompt}]


def _openai_messages(messages: Any, media: MediaPaths) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"field messages must be a non-empty list of {{role, content}}, got {_short(messages)}")
    out = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise InputError(f"field {where} must be an object with role and content, got {_short(msg)}")
        role = msg.get("role")
        if role not in ROLES:
            raise InputError(f"field {where}.role must be one of {ROLES}, got {_short(role)}")
        out.append({"role": role, "content": _content(msg.get("content"), f"{where}.content", media)})
    return _check_chat(out)


def _sharegpt(turns: Any) -> list[dict[str, Any]]:
    if not isinstance(turns, list) or not turns:
        raise InputError(f"field conversations must be a non-empty list of {{from, value}}, got {_short(turns)}")
    out = []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise InputError(f"field {where} must be an object with from and value, got {_short(turn)}")
        speaker = turn.get("from")
        if speaker not in SHAREGPT_ROLES:
            raise InputError(f"field {where}.from must be one of {sorted(SHAREGPT_ROLES)}, got {_short(speaker)}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise InputError(f"field {where}.value must be a string, got {_short(value)}")
        out.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return _check_chat(out)


def _content(content: Any, where: str, media: MediaPaths) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise InputError(f"field {where} must be a string or a non-empty list of parts, got {_short(content)}")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise InputError(f"field {at}.image_url.url must be a data URI or a file path, got {_short(url)}")
            if not url.startswith("data:"):
                media.file(url, f"{at}.image_url.url")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "input_audio":
            audio = part.get("input_audio")
            if not isinstance(audio, dict) or not isinstance(audio.get("data"), str) or audio.get("format") != "wav":
                raise InputError(f"field {at}.input_audio must be {{data: base64 WAV, format: 'wav'}}, got "
                                 f"{_short(audio)}")
            parts.append({"type": "input_audio", "input_audio": {"data": audio["data"], "format": "wav"}})
        else:
            raise InputError(f"field {at} must be a text, image_url or input_audio part, got {_short(part)}")
    return parts


def _check_chat(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not any(m["role"] == "user" for m in messages):
        raise InputError("the chat has no user turn")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            raise InputError(f"field messages[{i}]: a system turn may only come first")
    return messages


def has_media(messages: list[dict[str, Any]]) -> bool:
    return any(isinstance(m["content"], list) and any(p["type"] != "text" for p in m["content"]) for m in messages)


def resample_turns(messages: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The chat as a resampler regenerates it: the non-assistant turns that come before each
    answer. The source's assistant turns mark where answers go (and are dropped); a chat
    that ends with a user turn gets an answer after it.

        [system, user1, assistant1, user2]  ->  [[system, user1], [user2]]"""
    groups: list[list[dict[str, Any]]] = [[]]
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            groups[-1].append(m)
        elif groups[-1]:
            if not any(g["role"] == "user" for g in groups[-1]):
                raise InputError(f"field messages[{i}]: an assistant turn before any user turn")
            groups.append([])
    if not groups[-1]:
        groups.pop()
    if not groups:
        raise InputError("the chat has no user turn to answer")
    return groups


def to_renderer_messages(messages: list[dict[str, Any]], media: MediaPaths = MediaPaths()) -> list[dict[str, Any]]:
    """OpenAI-form parts as `factory.render.Renderer` takes them: images decoded (data URI)
    or as the paths `media` lets the job open, audio as {array, sampling_rate}. Raises
    InputError naming the field."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m["content"], str):
            out.append(m)
            continue
        parts = []
        for j, part in enumerate(m["content"]):
            where = f"messages[{i}].content[{j}]"
            if part["type"] == "text":
                parts.append(part)
            elif part["type"] == "image_url":
                parts.append({"type": "image", "image": _image(part["image_url"]["url"], where, media)})
            else:
                parts.append({"type": "audio", "audio": _wav(part["input_audio"]["data"], where)})
        out.append({"role": m["role"], "content": parts})
    return out


def _image(url: str, where: str, media: MediaPaths) -> Any:
    if not url.startswith("data:"):
        # Checked again here, where it is opened: the file may have changed since the row was read.
        return media.file(url, f"{where}.image_url.url")
    from PIL import UnidentifiedImageError

    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise InputError(f"field {where}.image_url.url: a data URI must be data:image/...;base64,..., got {header[:40]!r}")
    try:
        return open_image(io.BytesIO(base64.b64decode(payload, validate=True)))
    except ImageTooLarge as e:
        raise InputError(f"field {where}.image_url.url: {e}") from None
    except (binascii.Error, UnidentifiedImageError, OSError) as e:
        raise InputError(f"field {where}.image_url.url: not a readable base64 image ({e})") from None


def _wav(data: str, where: str) -> dict[str, Any]:
    import wave

    import numpy as np

    try:
        with wave.open(io.BytesIO(base64.b64decode(data, validate=True))) as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            frames = w.readframes(w.getnframes())
    except (binascii.Error, wave.Error, EOFError) as e:
        raise InputError(f"field {where}.input_audio.data: not a readable base64 WAV ({e})") from None
    if width != 2:
        raise InputError(f"field {where}.input_audio.data: WAV must be 16-bit PCM, got {8 * width}-bit")
    if len(frames) % (2 * channels):
        raise InputError(f"field {where}.input_audio.data: the WAV holds {len(frames)} bytes of samples, not a "
                         f"whole number of 16-bit frames of {channels} channel(s)")
    samples = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    samples = samples.reshape(-1, channels).mean(axis=1)
    return {"array": samples, "sampling_rate": rate}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
