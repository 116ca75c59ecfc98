"""Benchmark prompt sets: reading them, mapping them to domains, and fitting them to the target.

    from dspark.eval.prompts import load_prompt_set, prepare_prompts
    texts = load_prompt_set("../shared/benchmarks", "humaneval", num_prompts=20)   # first turns
    batch = prepare_prompts(texts, llm.tokenizer, context_length=2048, max_tokens=256)
    batch.token_ids, batch.truncated

Sets are JSONL files `<name>.jsonl` in a data directory, one `{"turns": [...]}` object a line (the
DeepSpec format); only the first turn is used, as in the paper's accepted-length tables. The files
are never copied into the project: every command takes the directory as `--data-dir`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

from dspark.errors import DSparkError

# The paper's Table 1 grouping. Sets outside it still load, under the domain "other".
DOMAINS: dict[str, str] = {
    "humaneval": "code", "mbpp": "code", "livecodebench": "code",
    "gsm8k": "math", "math500": "math", "aime25": "math",
    "mt-bench": "chat", "arena-hard-v2": "chat",
}
DOMAIN_ORDER = ("code", "math", "chat", "other")

# Generic Python openings for `dspark bench` without --data-dir: code is what the demo target was
# trained on, and these leave room for both prompt lookup and learned drafters to help.
BUILTIN_PROMPTS: tuple[str, ...] = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n",
    "def read_lines(path):\n    with open(path) as f:\n",
    "import json\n\n\ndef load_config(path):\n    \"\"\"Load a JSON config file.\"\"\"\n",
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n",
    "from dataclasses import dataclass\n\n\n@dataclass\nclass Point:\n",
    "def parse_args(argv=None):\n    import argparse\n\n    parser = argparse.ArgumentParser(",
)


class PromptSetError(DSparkError, ValueError):
    """A prompt set cannot be read: missing directory, unknown set, malformed line."""


def domain_of(set_name: str) -> str:
    return DOMAINS.get(set_name, "other")


def available_sets(data_dir: str | Path) -> list[str]:
    return sorted(p.stem for p in Path(data_dir).glob("*.jsonl"))


def load_prompt_set(data_dir: str | Path, name: str, num_prompts: int | None = None) -> list[str]:
    """The first turn of the first `num_prompts` rows of `<data_dir>/<name>.jsonl`."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise PromptSetError(f"--data-dir {data_dir}: no such directory (it should hold the benchmark "
                             "prompt sets, e.g. humaneval.jsonl)")
    path = data_dir / f"{name}.jsonl"
    if not path.is_file():
        have = ", ".join(available_sets(data_dir)) or "none"
        raise PromptSetError(f"prompt set {name!r}: no file {path} (sets in {data_dir}: {have})")
    texts: list[str] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if num_prompts is not None and len(texts) >= num_prompts:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                turn = row["turns"][0]
            except (ValueError, KeyError, IndexError, TypeError):
                raise PromptSetError(f"{path}:{lineno}: expected a JSON object with a non-empty "
                                     "'turns' list") from None
            if not isinstance(turn, str) or not turn:
                raise PromptSetError(f"{path}:{lineno}: the first turn is not a non-empty string")
            texts.append(turn)
    if not texts:
        raise PromptSetError(f"prompt set {name!r}: {path} holds no prompts")
    return texts


class _Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...
    @property
    def has_chat_template(self) -> bool: ...
    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str: ...


@dataclass
class PreparedPrompts:
    token_ids: list[list[int]]  # one token list per prompt, ready for the engine
    truncated: int              # prompts cut from the left to fit the context


def prepare_prompts(texts: Sequence[str], tokenizer: _Tokenizer, context_length: int, max_tokens: int,
                    chat: bool | None = None) -> PreparedPrompts:
    """Tokenize prompts, wrapped in the chat template when the target has one (`chat=None`).

    A prompt that would leave fewer than `max_tokens` positions of the context is cut from the left:
    the end of an instruction (the question, the generation prompt) matters most for what follows,
    and the cut keeps every set's full num_prompts in the averages.
    """
    if chat is None:
        chat = bool(getattr(tokenizer, "has_chat_template", False))
    keep = max(1, context_length - max_tokens)
    out, truncated = [], 0
    for text in texts:
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
        ids = tokenizer.encode(text)
        if len(ids) > keep:
            ids = ids[-keep:]
            truncated += 1
        out.append(ids)
    return PreparedPrompts(out, truncated)
