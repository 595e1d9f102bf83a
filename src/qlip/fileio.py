"""How every qlip command writes a file: atomically, with the permissions the user's umask gives.

A file is written under a temporary name in its own folder and renamed into place, so a crash or a kill leaves
either the old file or the new complete one. ``tempfile.mkstemp`` / ``mkdtemp`` create 0600 files and 0700
folders whatever the umask; the helpers here set the mode the user would get from ``open()`` / ``mkdir`` instead,
so colleagues can read model directories, token files and checkpoints like any other output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask (read without changing it for longer than one call)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``mkdir`` would give a new folder."""
    return 0o777 & ~current_umask()


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], Any], durable: bool = False) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it over ``path``.

    Args:
        path: the final file.
        write: writes the content to the path it is given (safetensors ``save_file``, ``torch.save``, ...).
        durable: fsync the file and its folder, so the rename survives a power cut (checkpoints).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())
        if durable:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes_atomic(path: str | Path, data: bytes, durable: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), durable=durable)


def write_text_atomic(path: str | Path, text: str, durable: bool = False) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable=durable)


def write_json_atomic(path: str | Path, payload: Any, durable: bool = False) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=1) + "\n", durable=durable)


def make_temp_dir(parent: str | Path, prefix: str) -> Path:
    """A new temporary folder inside ``parent`` with the umask's permissions (``mkdtemp`` gives 0700)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, dir_mode())
    return tmp


@contextlib.contextmanager
def replace_files(directory: str | Path, *, prefix: str = ".staged-", last: Sequence[str] = (),
                  durable: bool = False) -> Iterator[Path]:  # fmt: skip
    """Write several files of one folder together: fill the yielded temporary folder, and when the block ends
    without error every file in it replaces its namesake in ``directory`` by an atomic rename.

    The renames all happen after every file is complete (``last`` names are renamed last), so a crash while writing
    leaves all the old files; other files of ``directory`` are never touched. On error nothing is replaced. The
    temporary folder (named ``prefix``...) lives inside ``directory`` (same filesystem) and is removed at the end.

    Args:
        directory: the folder the files belong to (created when missing).
        prefix: name prefix of the temporary folder.
        last: names renamed after all the others (e.g. the file that marks the set as complete).
        durable: fsync every file and the folder, so the renames survive a power cut.
    """
    directory = Path(directory)
    stage = make_temp_dir(directory, prefix)
    try:
        yield stage
        names = sorted(p.name for p in stage.iterdir())
        names = [n for n in names if n not in last] + [n for n in last if n in names]
        for name in names:
            staged = stage / name
            if not staged.is_file() or staged.is_symlink():
                raise ValueError(f"{staged} is not a regular file; only files are written into {directory}")
            os.chmod(staged, file_mode())
            if durable:
                with open(staged, "rb") as f:
                    os.fsync(f.fileno())
        for name in names:
            os.replace(stage / name, directory / name)
        if durable:
            fsync_dir(directory)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_model_target(directory: str | Path, *, is_ours: Callable[[Path], bool], error: type[Exception], what: str,
                       staging_prefix: str, overwrite: bool = False, overwrite_hint: str = "") -> None:  # fmt: skip
    """Refuse to save a model of kind ``what`` to ``directory`` when it is a file, or a non-empty folder that
    ``is_ours`` does not recognize (unless ``overwrite``): what the program did not write is never replaced.
    Leftover staging folders (``staging_prefix``) of an interrupted save do not count. Raises ``error``."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise error(f"{directory} is a file; choose a directory path for the {what}")
    if overwrite or not directory.is_dir() or is_ours(directory):
        return
    others = sorted(p.name for p in directory.iterdir() if not p.name.startswith(staging_prefix))
    if others:
        raise error(f"{directory} is not empty and is not a {what} directory (it holds {', '.join(others[:5])}); "
                    f"choose a new or empty directory{overwrite_hint}")
