"""Writing files so that a crash or a full disk never leaves half of one under its final name, nor a
temporary file that keeps the disk full: temporary names, leftovers of killed runs, free space, reserved space."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from transfer_lightning.errors import UserInputError


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to, renamed to ``path`` when the block succeeds.

    The file's data is flushed to disk (fsync) before the rename, and the rename itself after it, so
    that after a power cut readers see the old file or the whole new one, never an empty file under
    the final name. On an error the temporary file is removed and ``path`` is left as it was.
    ``durable`` false skips both flushes: the file is still whole or absent, but not guaranteed to survive a
    power cut (what Lightning's checkpoint writer does too).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_path(path)
    try:
        yield partial
        if durable:
            _fsync(partial)
        os.replace(partial, path)
        if durable:
            _fsync(path.parent)
    except OSError as error:
        if error.errno == errno.ENOSPC and error.filename is None:  # a write() names no file: name the one meant
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from error
        raise
    finally:
        partial.unlink(missing_ok=True)


def write_torch_file(value: object, path: Path, durable: bool = True) -> None:
    """``torch.save`` ``value`` to ``path`` with :func:`atomic_path`. Serialised in memory first (as Lightning
    does), then written from Python: torch's own file writer reports a full disk as a RuntimeError of its
    stream, this way it is an OSError with errno ENOSPC that callers can name."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    with atomic_path(path, durable) as partial:
        partial.write_bytes(buffer.getbuffer())


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


#: When this process started, for telling leftovers of earlier runs (without a process id) from this run's own.
RUN_STARTED = time.time()
#: ``.NAME.pidPID-XXXXXX.tmp``: a temporary file or folder beside ``NAME``, and the process writing it.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.pid(?P<pid>\d+)-[0-9a-f]+\.tmp$")


def temporary_path(path: Path) -> Path:
    """A new temporary name beside ``path`` that names this process, so that :func:`remove_leftovers` can tell
    a killed run's leftover from a file that another running process is still writing."""
    return path.with_name(f".{path.name}.pid{os.getpid()}-{secrets.token_hex(3)}.tmp")


def remove_leftovers(folder: Path) -> None:
    """Remove the temporary files and folders in ``folder`` whose process is gone (a run killed while writing,
    or a disk that filled), and say so in one line: they would keep the disk full for every later run.
    Temporary names of older versions, which name no process, go when they are older than this run."""
    removed, freed = [], 0
    for path in folder.glob(".*.tmp") if folder.is_dir() else []:
        match = _TEMPORARY.match(path.name)
        if match is not None:
            pid = int(match["pid"])
            if pid == os.getpid() or _running(pid):
                continue
        elif path.stat().st_mtime >= RUN_STARTED:
            continue
        freed += _size(path)
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        removed.append(path.name)
    if removed:
        rank_zero_info(
            f"Removed {len(removed)} temporary file(s) of earlier runs that stopped while writing, "
            f"{human_size(freed)}, from {folder}: {', '.join(removed[:3])}{' ...' if len(removed) > 3 else ''}."
        )


def check_free_space(folder: Path, needed: int, what: str, option: str) -> None:
    """Stop with one line before writing ``needed`` bytes into ``folder`` when its file system has less free,
    naming the option that moves the files elsewhere."""
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise UserInputError(
            f"{what} needs {human_size(needed)} in {folder}, but only {human_size(free)} is free there. "
            f"Free some space, or put it on another disk with {option}."
        )


def reserve(path: Path, size: int) -> None:
    """Allocate ``size`` bytes of the file at ``path`` now (``posix_fallocate``), so that writing through a
    memory map can never meet a full disk: that would kill the process with SIGBUS, with no message. File
    systems without it are left as they are."""
    descriptor = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(descriptor, 0, size)
    except OSError as error:
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(descriptor)


def human_size(count: float) -> str:
    """Bytes as people read them: 812 bytes, 4.5 MB, 1.2 GB."""
    if count < 1000:
        return f"{int(count)} bytes"
    for unit in ("KB", "MB"):
        count /= 1000
        if count < 1000:
            return f"{count:.3g} {unit}"
    return f"{count / 1000:.3g} GB"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())
    return path.stat().st_size
