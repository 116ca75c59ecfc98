"""Text/code corpus discovery, deterministic train/validation split, and tokenised streams.

The default corpus is the running Python's standard library source, which every machine has.
Tests, IDLE's tests, site-packages and vendored third-party code are left out so that the model
learns the library's own code and held-out files stay meaningful.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dspark.errors import DSparkError

# Directory names that hold tests or vendored third-party code in CPython's Lib/.
_EXCLUDED_DIRS = {
    "test", "tests", "idle_test", "site-packages", "dist-packages", "_vendor", "__pycache__",
    "ensurepip", "lib2to3", "turtledemo", "idlelib", "pydoc_data",
}


class CorpusError(DSparkError, ValueError):
    """The corpus directory is missing, empty or holds a file that cannot be read."""


def default_corpus_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class CorpusSplit:
    root: Path
    train: list[Path]
    val: list[Path]


def _is_excluded(rel: Path) -> bool:
    return any(p in _EXCLUDED_DIRS or p.startswith("test_") for p in rel.parts)


def is_validation_file(rel_path: str, val_percent: float) -> bool:
    """Deterministic split by file: a hash of the relative path, independent of machine and order."""
    h = int.from_bytes(hashlib.sha256(rel_path.encode("utf-8")).digest()[:8], "big")
    return (h % 10_000) < val_percent * 100


def discover(root: str | os.PathLike | None = None, extensions: tuple[str, ...] = (".py",),
             val_percent: float = 3.0) -> CorpusSplit:
    """List the corpus files under ``root`` and split them into train and validation by file."""
    root_path = Path(root) if root is not None else default_corpus_dir()
    if not root_path.is_dir():
        raise CorpusError(f"corpus directory {str(root_path)!r} does not exist or is not a directory")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root_path):
        rel_dir = Path(dirpath).relative_to(root_path)
        # Prune excluded directories in place so os.walk does not descend into them.
        dirnames[:] = sorted(d for d in dirnames if not _is_excluded(rel_dir / d))
        for name in sorted(filenames):
            if name.endswith(extensions) and not name.startswith("test_"):
                files.append(Path(dirpath) / name)
    if not files:
        raise CorpusError(
            f"corpus directory {str(root_path)!r} holds no files ending in {', '.join(extensions)} "
            "(tests and vendored code are left out)")
    train, val = [], []
    for f in files:
        rel = f.relative_to(root_path).as_posix()
        (val if is_validation_file(rel, val_percent) else train).append(f)
    if not train:
        raise CorpusError(f"corpus {str(root_path)!r}: every file fell into the validation split; "
                          f"lower --val-percent (now {val_percent})")
    if not val:
        # Small corpora (tests, tiny directories): hold out the last file so validation exists.
        if len(train) < 2:
            raise CorpusError(f"corpus {str(root_path)!r} needs at least 2 files for a train/validation split")
        val = [train.pop()]
    return CorpusSplit(root=root_path, train=train, val=val)


def read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"cannot read corpus file {str(path)!r}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"corpus file {str(path)!r} is not valid UTF-8 (byte {e.start})") from None


def iter_texts(files: list[Path]):
    for f in files:
        yield read_text(f)


def tokenize_files(tokenizer, files: list[Path], eos_id: int) -> np.ndarray:
    """Encode files into one stream of token ids, each file followed by end-of-text."""
    ids: list[int] = []
    texts = [read_text(f) for f in files]
    for enc in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return np.asarray(ids, dtype=np.int32)
