"""Where files live: local paths or storage URIs, and writes that readers never see half done.

Every place that reads or writes under a location that may be a URI (``file://``, ``s3://``, ``gs://``, NFS paths
named as ``file:///mnt/...``) goes through this module, which leaves the choice of file system to
``pyarrow.fs``. Local paths stay plain ``pathlib`` paths; the only decision made here is which one a string is.

Atomic writes: a file is written under a hidden temporary name in its target folder and renamed into place, so a
reader sees the previous file or the complete new one. On object stores an upload becomes visible only when it
is complete, which gives the same guarantee. A write that fails names its file even where the operating system does
not (a full disk's ``[Errno 28] No space left on device``), and the next complete write of a file removes what
writes of it that were killed (a lost worker, ``kill -9``) left under temporary names.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pyarrow.fs

LOCAL_SCHEME = "file://"


def is_uri(location: str | os.PathLike) -> bool:
    """True for ``scheme://...`` storage URIs, ``file://`` included; False for plain paths."""
    return "://" in str(location)


def is_local(location: str | os.PathLike) -> bool:
    """A plain path or a ``file://`` URI: something this machine's file system holds."""
    return not is_uri(location) or str(location).startswith(LOCAL_SCHEME)


def local_path(location: str | os.PathLike) -> Path:
    """The absolute local path of a plain path or a ``file://`` URI. Raises ValueError for remote URIs."""
    text = str(location)
    if not is_local(text):
        raise ValueError(f"{text} is not on this machine's file system")
    path = pyarrow.fs.FileSystem.from_uri(text)[1] if is_uri(text) else text
    return Path(path).expanduser().resolve()


def absolute(location: str | os.PathLike) -> str:
    """Relative paths made absolute (they mean the directory the command runs in); URIs unchanged."""
    return str(location) if is_uri(location) else str(Path(location).expanduser().resolve())


def filesystem_of(location: str | os.PathLike) -> tuple[pyarrow.fs.FileSystem, str]:
    """The pyarrow file system that holds ``location`` and the path inside it. Raises ValueError for a remote URI
    that names no bucket (``s3://``): pyarrow would hand back an empty path, which reads as the local folder
    ``s3:``."""
    if is_uri(location):
        filesystem, path = pyarrow.fs.FileSystem.from_uri(str(location))
        if not path.strip("/") and not is_local(location):
            raise ValueError(f"{location} names no bucket: give scheme://bucket/folder")
        return filesystem, path
    return pyarrow.fs.LocalFileSystem(), str(Path(location).expanduser().resolve())


def uri_of(filesystem: pyarrow.fs.FileSystem, path: str) -> str:
    """The location of ``path`` inside a pyarrow ``filesystem`` (as Ray hands out checkpoints): a plain path for
    the local file system, a ``scheme://`` URI otherwise."""
    if isinstance(filesystem, pyarrow.fs.LocalFileSystem):
        return path
    scheme = {"gcs": "gs"}.get(filesystem.type_name, filesystem.type_name)
    return f"{scheme}://{path}"


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location/part/...`` for paths and URIs alike (the ``//`` of ``scheme://`` kept)."""
    if not is_uri(location):
        return str(Path(location, *parts))
    scheme, _, rest = str(location).partition("://")
    stripped = rest.rstrip("/")
    # rest[:1] keeps the root of file:/// and nothing of s3://
    return f"{scheme}://{stripped}/{'/'.join(parts)}" if stripped else f"{scheme}://{rest[:1]}{'/'.join(parts)}"


def exists(location: str | os.PathLike) -> bool:
    filesystem, path = filesystem_of(location)
    return filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_bytes(location: str | os.PathLike) -> bytes:
    """The whole file. Raises FileNotFoundError naming ``location`` when it does not exist."""
    filesystem, path = filesystem_of(location)
    try:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise FileNotFoundError(2, "no such file", str(location)) from None
    except OSError:
        if filesystem.get_file_info(path).type == pyarrow.fs.FileType.NotFound:
            raise FileNotFoundError(2, "no such file", str(location)) from None
        raise


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode("utf-8")


def list_folders(location: str | os.PathLike) -> list[pyarrow.fs.FileInfo]:
    """The folders directly under ``location`` (none when it does not exist)."""
    filesystem, path = filesystem_of(location)
    infos = filesystem.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))
    return [info for info in infos if info.type == pyarrow.fs.FileType.Directory]


@contextlib.contextmanager
def naming(location: str | os.PathLike) -> Iterator[None]:
    """An OSError raised in the block that names no file (``[Errno 28] No space left on device``, ``[Errno 27] File
    too large``) is raised again naming ``location``, its errno kept, the original as its cause."""
    try:
        yield
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror or str(error), str(location)) from error


def require_writable_folder(path: str | os.PathLike, what: str) -> None:
    """Checks that a file can be written in the local folder ``path`` by doing it: the folders missing on the way are
    created, a temporary file written, and all of it removed again. A command checks where its results go before its
    expensive work, and leaves nothing behind when another check fails later. Raises OSError naming ``what`` (a config
    key, an option) and the path."""
    folder = Path(path).absolute()
    created: list[Path] = []
    try:
        for step in [*reversed(folder.parents), folder]:
            if step.is_file():
                raise NotADirectoryError(f"{step} is a file")
            if not step.is_dir():
                step.mkdir()
                created.append(step)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OSError(f"{what} {path} cannot be written ({error.strerror or error})") from None
    finally:
        for step in reversed(created):
            step.rmdir()


def temporaries_in(folder: Path, name: str) -> list[Path]:
    """The temporaries :func:`atomic_path` left in ``folder`` for the files whose names fully match the regular
    expression ``name`` (``.NAME.<random>.tmp``, the random part without dots, as ``tempfile.mkstemp`` makes it, so
    that ``.a.b.<random>.tmp``, a write of ``a.b``, is not one of ``a``'s). None when the folder does not exist."""
    pattern = re.compile(rf"\.(?:{name})\.[^.]+\.tmp")
    if not folder.is_dir():
        return []
    with os.scandir(folder) as entries:
        return [Path(entry.path) for entry in entries if pattern.fullmatch(entry.name)]


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """A temporary local path beside ``target`` to write a file or a folder to; renamed onto ``target`` when the
    block ends without an exception, removed otherwise. Parent folders are created. Once renamed, the temporaries
    of earlier writes of ``target`` that were killed before they ended are removed (a file has one writer at a
    time here: a checkpoint is rank 0's, a shard part its task's, a manifest the driver's). OSErrors that name no
    file name ``target`` (:func:`naming`)."""
    target = local_path(target)
    with naming(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(handle)
        temporary = Path(name)
        temporary.unlink()
        try:
            yield temporary
            if temporary.is_file():
                with open(temporary, "rb") as written:
                    os.fsync(written.fileno())
            os.replace(temporary, target)
        finally:
            remove(temporary)
        for leftover in temporaries_in(target.parent, re.escape(target.name)):
            remove(leftover)


def remove(path: Path) -> None:
    """Removes a local file or folder; nothing when there is none."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(location: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file whose content replaces ``location`` only once the block ends without an exception."""
    if is_local(location):
        with atomic_path(location) as temporary, open(temporary, "wb") as file:
            yield file
        return
    filesystem, path = filesystem_of(location)
    with naming(location):
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(path) as stream:
            yield stream


def write_bytes(location: str | os.PathLike, data: bytes) -> None:
    with atomic_write(location) as file:
        file.write(data)


def write_text(location: str | os.PathLike, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))
