"""Atomic writes: a crash or kill mid-write never leaves a half-written checkpoint behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def current_umask() -> int:
    """The process's umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    # mkstemp makes the file 0600; files users keep get the permissions of any other tool's (umask).
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        write(tmp)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    _atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))
    os.chmod(path, 0o666 & ~current_umask())  # safetensors writes a new file of its own (0600)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic(Path(path), write)


def check_writable(path: str | os.PathLike, flag: str, is_dir: bool = False) -> None:
    """Fail before any work when `path` (a directory with is_dir, else a file) cannot be written:
    one line naming the flag and the path, not a traceback after the first hour of training."""
    from dspark.errors import DSparkError

    path = Path(path)
    folder = path if is_dir else path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DSparkError(f"{flag} {path}: cannot write there ({e.strerror or type(e).__name__}: "
                          f"{e.filename or folder})") from None

