"""Plumbing shared by the resumable trainers (`pretrain`, `train_drafter`): process group info, the
learning-rate schedule, the optimiser, checkpoint save/resume and the command line a run records.

Both trainers checkpoint `{"model", "optimizer", "log", "config"}` to OUT/.work/checkpoint.pt and
resume from it, so a killed run started again continues exactly where its last checkpoint left off.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shlex
import signal
import sys
import threading
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch

from dspark.train.checkpoint import atomic_torch_save


SAVE_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class RunConfig:
    """Options every resumable trainer has (each a command-line flag of the same name). Trainer
    configs are `@dataclass(kw_only=True)` subclasses; they redeclare a field to change its default."""

    out: str                             # output directory; its .work/ holds the checkpoint
    val_percent: float = 5.0             # held out for validation
    steps: int = 1000
    batch_size: int = 8                  # global batch, in sequences
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 100
    ckpt_every: int = 50
    seed: int = 0
    threads: int | None = None
    save_dtype: str = "float32"
    stop_after: int | None = None        # stop (as if killed) after this step; for tests
    command: str = field(default="", repr=False)

    def validate(self) -> None:
        """Raise ValueError naming the flag; subclasses extend this with their own options."""
        self.require_positive("steps", "batch_size", "eval_every", "ckpt_every")
        if not 0 < self.val_percent < 100:
            raise ValueError(f"--val-percent must be in (0, 100), got {self.val_percent}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"--save-dtype must be float32, bfloat16 or float16, got {self.save_dtype!r}")

    def require_positive(self, *names: str) -> None:
        for name in names:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


class Schedule(Protocol):
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    steps: int


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# glibc's mallopt parameters
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


def _glibc():
    """The C library when it is glibc (it has `mallopt` and `malloc_trim`), else None."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def reuse_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of handing big blocks back to the OS.

    A training step allocates and frees the same vocabulary-sized temporaries ([positions, 49,152]
    floats, ~100 MB each) every step. glibc serves blocks over 32 MB with a fresh mmap and unmaps them on
    free, so every step page-faults (and zeroes) gigabytes again: measured on SmolLM2, 8.6 s a step of
    which most was system time, against 2.9 s once freed memory is reused. Off-glibc this does nothing.
    Returns whether it took effect."""
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_MAX, 0)) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


@contextlib.contextmanager
def freed_memory_returned():
    """Within the block, glibc's malloc defaults again (blocks over 128 KB mapped and unmapped, free
    memory at the top of the heap trimmed); `reuse_freed_memory` again after it.

    For work that allocates large temporaries of a new size every time between small long-lived ones:
    kept for reuse, those fragment the heap until the process runs out of memory (the log-normalisers of
    SmolLM2's stored data: 24 GB after 3,300 sequences). Off-glibc this does nothing."""
    libc = _glibc()
    try:
        if libc is not None:
            libc.mallopt(_M_MMAP_MAX, 65536)
            libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
            libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        yield
    finally:
        if libc is not None:
            libc.malloc_trim(0)
            reuse_freed_memory()


def lr_at(step: int, cfg: Schedule) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases), betas (0.9, 0.95)."""
    params = list(params)
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


# Settings that may differ between a run and its resumption: they change how it is run, not what
# it trains. `steps` may be changed too (raised to train on), as long as it is not below the step the
# checkpoint has reached.
RESUMABLE_CHANGES = frozenset({"out", "threads", "eval_every", "ckpt_every", "stop_after", "command",
                               "save_dtype", "eval_seqs", "precision"})
_PATH_SETTINGS = frozenset({"target", "data", "corpus", "tokenizer"})


def previous_checkpoint(ckpt_path: Path) -> Path:
    """The checkpoint kept from the save before the last one (a fallback when the last is damaged)."""
    return ckpt_path.with_name(ckpt_path.stem + ".prev" + ckpt_path.suffix)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _norm(name: str, value: Any) -> Any:
    if name in _PATH_SETTINGS and isinstance(value, str) and value:
        return str(Path(value).expanduser().resolve())
    return list(value) if isinstance(value, tuple) else value


def check_settings(saved: dict, current: dict, ckpt_path: Path, step: int, defaults: dict | None = None) -> None:
    """Raise CheckpointError naming every setting that differs from the checkpoint's run. A setting
    the checkpoint lacks (added to the trainer since) counts as its default in `defaults`."""
    from dspark.errors import CheckpointError

    work = ckpt_path.parent
    saved = {**{k: v for k, v in (defaults or {}).items() if k not in saved}, **saved}
    diffs = [f"{_flag(k)} {current.get(k)!r} (checkpoint: {saved.get(k)!r})"
             for k in sorted(set(saved) | set(current))
             if k not in RESUMABLE_CHANGES and k != "steps" and _norm(k, saved.get(k)) != _norm(k, current.get(k))]
    if diffs:
        raise CheckpointError(
            f"{ckpt_path} was made with other settings: {'; '.join(diffs)}. Rerun with the checkpoint's "
            f"settings to resume, or delete {work} to start fresh (changing --steps, --threads or the "
            "evaluation/checkpoint intervals is allowed)")
    if current.get("steps") is not None and current["steps"] < step:
        raise CheckpointError(f"{ckpt_path} has already trained {step} steps, more than --steps "
                              f"{current['steps']}; raise --steps, or delete {work} to start fresh")


def _load_state(ckpt_path: Path) -> tuple[dict, Path]:
    """The last good checkpoint: `ckpt_path`, else the previous one; a clear error when neither loads."""
    from dspark.errors import CheckpointError

    errors = []
    for path in (ckpt_path, previous_checkpoint(ckpt_path)):
        if not path.exists():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=False)
            if not isinstance(state, dict) or not {"model", "optimizer", "log"} <= set(state):
                raise ValueError("not a training checkpoint (no model/optimizer/log)")
            if path != ckpt_path:
                print(f"warning: {ckpt_path} is damaged ({errors[-1]}); resuming from the previous checkpoint "
                      f"{path}", file=sys.stderr)
            return state, path
        except Exception as e:  # a truncated file raises from deep inside torch.load / pickle
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    raise CheckpointError(f"{ckpt_path} is damaged ({errors[0] if errors else 'unreadable'}) and there is no good "
                          f"previous checkpoint; delete {ckpt_path.parent} to start fresh")


def resume(ckpt_path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, log: dict, rank: int,
           world: int, cfg: Any = None) -> dict:
    """Load model and optimiser state from `ckpt_path` (or the previous checkpoint when it is damaged)
    and return its log (with this run's world size and threads); `log` unchanged when there is none.
    With `cfg`, the run's settings must match the checkpoint's (see `check_settings`)."""
    from dspark.errors import CheckpointError

    if not ckpt_path.exists() and not previous_checkpoint(ckpt_path).exists():
        return log
    state, path = _load_state(ckpt_path)
    if cfg is not None and isinstance(state.get("config"), dict):
        defaults = {f.name: f.default for f in fields(cfg) if f.default is not MISSING}
        check_settings(state["config"], asdict(cfg), path, int(state["log"].get("step", 0)), defaults)
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path} does not fit this model ({str(e).splitlines()[0]}); delete "
                              f"{ckpt_path.parent} to start fresh") from None
    log = state["log"]
    log["world_size"], log["threads"] = world, torch.get_num_threads()
    if rank == 0:
        print(f"resuming from {path} at step {log['step']}", file=sys.stderr)
    return log


def save_checkpoint(ckpt_path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, log: dict,
                    cfg: Any) -> None:
    """Write what `resume` reads (plus the run's config, checked on resume), atomically; the one
    before is kept as the fallback."""
    if ckpt_path.exists():
        # A hard link, then a rename: the last checkpoint never disappears, even for a moment.
        prev, tmp = previous_checkpoint(ckpt_path), ckpt_path.with_suffix(".link.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(ckpt_path, tmp)
        except OSError:
            import shutil
            shutil.copyfile(ckpt_path, tmp)
        os.replace(tmp, prev)
    atomic_torch_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "log": log,
                       "config": asdict(cfg)}, ckpt_path)


def data_parallel(model: torch.nn.Module, world: int) -> torch.nn.Module:
    """The module to run forwards through: DDP-wrapped in a multi-process run (gradients averaged
    over ranks during backward), else `model` itself."""
    return torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model


def progress_bar(total: int, initial: int, desc: str, rank: int) -> Any:
    """A step progress bar, shown by rank 0 only."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=rank != 0, dynamic_ncols=True)


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, model: torch.nn.Module, cfg: Any,
                   step: int) -> None:
    """One update of `model` from `loss` at the schedule's lr for `step`, gradients clipped to
    cfg.grad_clip."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()


def due(step: int, every: int, done: bool) -> bool:
    """Evaluate / checkpoint after `step` steps: every `every` steps and at the end."""
    return step % every == 0 or done


class Terminated(KeyboardInterrupt):
    """SIGTERM during a training run (`kill PID`, a scheduler stopping the job): the trainers treat it
    as Ctrl-C (checkpoint between updates, a one-line message, resume by rerunning the command)."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterable[None]:
    """While training, SIGTERM raises `Terminated` in the main thread instead of ending the process
    at once, so the trainer saves what it has (a run started in the background ignores Ctrl-C, and
    `kill` is how it is stopped). Elsewhere than the main thread nothing changes; the previous
    handler comes back on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"terminated (signal {signum})")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training, after the checkpoint (if the state allowed one) was saved;
    the message says how to resume, `exit_status` is what the command exits with (130 Ctrl-C, 143 SIGTERM)."""

    def __init__(self, message: str, exit_status: int = 130) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def training_interrupted(e: KeyboardInterrupt, step: int, steps: int, ckpt_path: Path,
                         save: Callable[[], None] | None) -> TrainingInterrupted:
    """What a trainer raises once Ctrl-C or SIGTERM (`e`) stopped it after `step` of `steps` updates:
    `save` writes the checkpoint first (None where the state is mid-update, or on a rank that does not
    save), and the message says where the run stopped and how to resume."""
    status = 128 + int(signal.SIGTERM) if isinstance(e, Terminated) else 130
    how = str(e) or "interrupted"
    if save is None:
        return TrainingInterrupted(f"{how} during step {step + 1}; rerun the same command to resume from the last "
                                   "checkpoint", status)
    save()
    return TrainingInterrupted(f"{how} at step {step} of {steps}; checkpoint saved to {ckpt_path}; rerun the same "
                               "command to resume", status)


def stop_requested(cfg: Any, step: int, done: bool) -> bool:
    """--stop-after: end the run after `step` as if it had been killed (tests of resume)."""
    return cfg.stop_after is not None and step >= cfg.stop_after and not done


def card_header(cfg: RunConfig, intro: list[str]) -> list[str]:
    """The opening lines of a trained model's README: its name, `intro`, and the command that made it."""
    return [f"# {Path(cfg.out).name}", "", *intro, "", "## How it was made", "", "```", cfg.command, "```", ""]


def command_line(module: str, subcommand: str, argv: list[str] | None) -> str:
    """The command that started this run, for the model card: `dspark SUBCOMMAND ARGS`, or the
    torchrun line when it runs in several processes."""
    args_str = " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    world = dist_info()[1]
    prefix = f"torchrun --nproc-per-node {world} -m {module}" if world > 1 else f"dspark {subcommand}"
    return f"{prefix} {args_str}"


# Command-line options every trainer has, as (config field, help); `add_config_options` turns them
# into flags, so the two trainers spell and document them alike.
OPTIMISER_OPTIONS = [
    ("lr", "peak learning rate"), ("min_lr_ratio", "final lr as a fraction of peak"),
    ("warmup_steps", "warm-up steps"), ("weight_decay", "AdamW weight decay"), ("grad_clip", "gradient norm clip"),
]
RUN_OPTIONS = [
    ("ckpt_every", "checkpoint every N steps"), ("seed", "random seed"),
    ("threads", "torch threads per process (default: cores / processes)"),
]


def add_config_options(p: argparse.ArgumentParser, defaults: Any, options: list[tuple[str, str]]) -> None:
    """`--field-name` for each (field, help): type and default from the config dataclass `defaults`
    (an int option where the default is None)."""
    for name, help_ in options:
        default = getattr(defaults, name)
        typ = type(default) if default is not None else int
        stated = "(default" in help_  # a default described in words ("cores / processes") is not repeated
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=default,
                       help=help_ if stated else f"{help_} (default: {default})")


def add_output_options(p: argparse.ArgumentParser, defaults: Any, what: str) -> None:
    """--save-dtype of the written `what`, and the hidden --stop-after that tests use to kill a run."""
    p.add_argument("--save-dtype", default=defaults.save_dtype, choices=list(SAVE_DTYPES),
                   help=f"dtype of the saved {what} (default: {defaults.save_dtype})")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
