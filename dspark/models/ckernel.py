"""Small C kernels compiled at first use with the system C compiler and loaded with ctypes.

A kernel is one C source file beside this module. `CKernel` compiles it into the DSpark cache directory
(`kernels/`, keyed by the source, the compiler, the flags and the machine), trying each flag set in
turn, loads it, lets the caller declare its functions and self-test it, and remembers the result for the
process. Without a compiler, or when no flag set builds a library that passes its self-test, `library()`
is None and `unavailable_reason()` says why; callers then fall back to torch ops.

Libraries built with `-fopenmp` link `libgomp.so.1`, which torch's CPU build has already loaded: the
loader reuses it, so the kernels' threads are torch's own OpenMP threads (no second thread pool).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path


def compiler() -> str | None:
    """$CC, else the first of cc, gcc, clang on PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def cpu_flags() -> str:
    """The CPU's feature flags as Linux lists them (empty elsewhere): part of a built library's cache key."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


class CKernel:
    """One C source compiled on demand; `setup(lib)` declares argtypes and returns whether the
    library passes its self-test. `env`: an environment variable that turns the kernel off when "0"."""

    def __init__(self, source: Path, flag_sets: Sequence[Sequence[str]], setup: Callable[[ctypes.CDLL], bool],
                 env: str) -> None:
        self.source = source
        self.flag_sets = [list(f) for f in flag_sets]
        self.setup = setup
        self.env = env
        self._lock = threading.Lock()
        self._lib: ctypes.CDLL | None = None
        self._tried = False
        self._error: str | None = None
        self.flags: list[str] | None = None  # the flag set the loaded library was built with

    def compile(self, out_dir: Path) -> ctypes.CDLL:
        """Build (or reuse) the library in `out_dir` and load it; RuntimeError naming every failure."""
        cc = compiler()
        if not cc:
            raise RuntimeError("no C compiler found (set $CC or install cc/gcc/clang)")
        src = self.source.read_bytes()
        errors = []
        for flags in self.flag_sets:
            # -march=native: a library built on one CPU may not run on another sharing the cache directory
            key = hashlib.sha256(src + " ".join([cc, *flags, platform.machine(), cpu_flags()]).encode()).hexdigest()[:16]
            target = out_dir / f"{self.source.stem}-{key}.so"
            if not target.is_file():
                out_dir.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
                os.close(fd)
                try:
                    try:
                        r = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", tmp, str(self.source)],
                                           capture_output=True, text=True, timeout=120)
                    except (OSError, subprocess.SubprocessError) as e:
                        errors.append(f"{cc}: {e}")
                        continue
                    if r.returncode != 0:
                        errors.append(f"{cc} {' '.join(flags)}: {r.stderr.strip()[-300:]}")
                        continue
                    os.replace(tmp, target)  # atomic: a concurrent process sees the whole library or none
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            try:
                lib = ctypes.CDLL(str(target))
            except OSError as e:
                errors.append(f"{target}: {e}")
                continue
            if self.setup(lib):
                self.flags = flags
                return lib
            errors.append(f"{target}: self-test failed")
        raise RuntimeError(f"could not build {self.source.name}: " + "; ".join(errors))

    def library(self) -> ctypes.CDLL | None:
        """The loaded library (building it on first use), or None when it is off or cannot be built."""
        if os.environ.get(self.env, "1") == "0":
            return None
        if self._tried:
            return self._lib
        with self._lock:
            if not self._tried:
                from dspark.models.gguf import cache_root

                try:
                    self._lib = self.compile(cache_root() / "kernels")
                except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                    self._error = str(e)
                self._tried = True
        return self._lib

    @property
    def loaded(self) -> ctypes.CDLL | None:
        """The library if it has been built in this process (whatever the environment says now)."""
        return self._lib

    def available(self) -> bool:
        return self.library() is not None

    def unavailable_reason(self) -> str | None:
        """Why `available()` is False (None when it is True or has not been asked)."""
        if os.environ.get(self.env, "1") == "0":
            return f"{self.env}=0"
        return self._error
