"""Where a data set lives: a local directory, or a directory on a pyarrow/fsspec filesystem.

A local path (or a `file://` URI) keeps the fast path: memory maps, O_DIRECT streaming,
fsync + rename for atomic writes. Any other URI (`s3://bucket/prefix`, `gs://...`,
`hdfs://...`, or an fsspec scheme such as `memory://`) goes through a
`pyarrow.fs.FileSystem`: random-access file handles instead of maps, and writes that are
atomic as far as an object store allows (an object appears whole or not at all, so a
shard is listed in the manifest only after its object is complete, and the manifest
object is written last).

S3 options travel in the URI's query, as pyarrow reads them, e.g.
`s3://bucket/data?endpoint_override=localhost:9000&scheme=http`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

_COPY_CHUNK = 8 << 20


@dataclass(frozen=True, slots=True)
class Location:
    """A data set directory. Exactly one of `local` (a real directory) and `fs` is set."""

    uri: str  # as the user wrote it, for messages
    local: Path | None = None
    fs: pafs.FileSystem | None = None
    path: str = ""  # the directory inside `fs`

    @classmethod
    def parse(cls, where: str | os.PathLike | Location) -> Location:
        if isinstance(where, Location):
            return where
        if isinstance(where, str) and "://" in where:
            fs, path = _filesystem_from_uri(where)
            if isinstance(fs, pafs.LocalFileSystem):
                return cls(uri=where, local=Path(path))
            return cls(uri=where.split("?", 1)[0].rstrip("/"), fs=fs, path=path.rstrip("/"))
        return cls(uri=str(where), local=Path(where))

    @property
    def is_local(self) -> bool:
        return self.local is not None

    def __str__(self) -> str:
        return str(self.local) if self.local is not None else self.uri

    def name(self, file: str) -> str:
        """`file` inside this directory, as a user would write it (for messages)."""
        return str(self.local / file) if self.local is not None else f"{self.uri}/{file}"

    def _key(self, file: str) -> str:
        return f"{self.path}/{file}" if self.path else file

    # -- the operations a data set needs

    def make_dirs(self) -> None:
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)
        else:
            self.fs.create_dir(self.path, recursive=True)

    def size(self, file: str) -> int | None:
        """Bytes in `file`, or None when it does not exist."""
        if self.local is not None:
            try:
                return (self.local / file).stat().st_size
            except FileNotFoundError:
                return None
        info = self.fs.get_file_info(self._key(file))
        return None if info.type == pafs.FileType.NotFound else info.size

    def read_bytes(self, file: str) -> bytes:
        """Raises FileNotFoundError naming the file when it does not exist."""
        if self.local is not None:
            return (self.local / file).read_bytes()
        if self.size(file) is None:
            raise FileNotFoundError(self.name(file))
        with self.fs.open_input_stream(self._key(file)) as f:
            return f.read()

    def write_bytes_atomic(self, file: str, data: bytes) -> None:
        """Replace `file` so that a crash leaves the old or the new content, never a mix."""
        if self.local is not None:
            atomic_write_bytes(self.local / file, data)
            return
        # One object PUT: object stores make it visible whole or not at all.
        with self.fs.open_output_stream(self._key(file)) as f:
            f.write(data)

    def upload(self, source: Path, file: str) -> None:
        """Copy a finished local file into place as `file` (object stores: one complete object)."""
        with open(source, "rb") as src, self.fs.open_output_stream(self._key(file)) as dst:
            while chunk := src.read(_COPY_CHUNK):
                dst.write(chunk)

    def list_files(self) -> list[str]:
        if self.local is not None:
            return [p.name for p in self.local.iterdir()]
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [i.base_name for i in infos if i.type == pafs.FileType.File]

    def delete(self, file: str) -> None:
        if self.local is not None:
            (self.local / file).unlink(missing_ok=True)
        else:
            self.fs.delete_file(self._key(file))

    def open_random_access(self, file: str) -> pa.NativeFile:
        return self.fs.open_input_file(self._key(file))

    def sha256(self, file: str) -> tuple[str, int]:
        """(hex digest, bytes) of the file's content as stored."""
        if self.local is not None:
            with open(self.local / file, "rb") as f:
                return hashlib.file_digest(f, "sha256").hexdigest(), f.tell()
        digest, size = hashlib.sha256(), 0
        with self.fs.open_input_stream(self._key(file)) as f:
            while chunk := f.read(_COPY_CHUNK):
                digest.update(chunk)
                size += len(chunk)
        return digest.hexdigest(), size


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk gets its space back at once
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _filesystem_from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's own filesystems first (s3, gs, hdfs, abfs, file); any other scheme through
    fsspec, if it knows it."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid as arrow_error:
        try:
            import fsspec
        except ImportError:
            raise ValueError(f"{uri}: pyarrow does not know this filesystem ({arrow_error}) and fsspec "
                             f"is not installed") from None
        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except (ValueError, ImportError) as e:
            raise ValueError(f"{uri}: neither pyarrow ({arrow_error}) nor fsspec ({e}) can open it") from None
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
