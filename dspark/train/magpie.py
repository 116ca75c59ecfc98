"""Training prompts written by the target itself (Magpie-style), never overlapping evaluation sets.

Usage:
    dspark make-prompts --out runs/prompts.jsonl --num-prompts 3000 --exclude-dir ../shared/benchmarks
    dspark datagen --prompts runs/prompts.jsonl --corpus-split none --out runs/data.jsonl --store-hidden

The chat template is rendered up to the start of a user turn and the model writes the request
itself, stopping at its end-of-turn token (Magpie, Xu et al. 2024). A small instruct model left
alone mostly writes chat requests, so each attempt draws a domain from --mix (chat, code, math) and,
for code and math, starts the user turn with a short generic opener from `OPENERS` that the model
continues ("Write a Python function" -> "... that returns the n-th prime."). Chat attempts start
from an empty user turn (pure Magpie) or a chat opener.

Filters: the request must end at the end-of-turn token (not cut by --max-tokens), have 4 to 120
words, contain letters, not repeat one word for most of its length, and not be a duplicate
(lower-cased, punctuation and whitespace collapsed) of one already kept, nor share its first 8
words with one. With --exclude-dir every prompt set there (`*.jsonl`, DeepSpec `turns` format) is
read and any request equal to one of their turns, or sharing a run of 10 consecutive words with
one, is dropped: evaluation prompts never leak into training.

Output: one JSON object a line, `{"id", "prompt", "domain", "opener", "attempt"}`, appended and
flushed batch by batch; a killed run resumes at the next attempt (state in OUT.state.json).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from dspark.entry import module_main
from dspark.errors import DSparkError

# Generic openers only (not taken from any evaluation set): the model writes the rest of the request.
OPENERS: dict[str, tuple[str, ...]] = {
    "chat": ("", "", "", "Can you explain", "What are some", "Give me advice on", "Tell me about",
             "How can I", "Write a short", "Why do", "Describe"),
    "code": ("Write a Python function", "Write a Python program", "How do I", "Write a function in",
             "Implement a", "Explain what this code does:", "Fix the bug in this code:", "Write a SQL query",
             "Write a JavaScript function", "Create a class", "What is the difference between",
             "Write a C++ program"),
    "math": ("Solve", "Calculate", "A store sells", "If a train", "Find the value of", "What is the sum of",
             "Prove that", "A rectangle has", "How many ways", "Simplify", "Tom has", "What is the probability"),
}
DOMAINS = tuple(OPENERS)
NGRAM_OVERLAP = 10  # words in a row shared with an evaluation prompt that disqualify a request
PREFIX_WORDS = 8    # requests sharing their first words are near-duplicates


class PromptGenError(DSparkError, ValueError):
    pass


_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def normalise(text: str) -> str:
    return " ".join(words(text))


@dataclass
class ExclusionIndex:
    """Evaluation prompts a training prompt must not match: normalised texts and their 10-grams."""

    texts: set[str] = field(default_factory=set)
    ngrams: set[tuple[str, ...]] = field(default_factory=set)

    def add(self, text: str) -> None:
        w = words(text)
        self.texts.add(" ".join(w))
        for i in range(len(w) - NGRAM_OVERLAP + 1):
            self.ngrams.add(tuple(w[i:i + NGRAM_OVERLAP]))

    def matches(self, text: str) -> bool:
        w = words(text)
        if " ".join(w) in self.texts:
            return True
        return any(tuple(w[i:i + NGRAM_OVERLAP]) in self.ngrams for i in range(len(w) - NGRAM_OVERLAP + 1))

    @classmethod
    def from_dir(cls, path: str | Path) -> "ExclusionIndex":
        path = Path(path)
        if not path.is_dir():
            raise PromptGenError(f"--exclude-dir {path}: no such directory")
        idx = cls()
        files = sorted(path.glob("*.jsonl"))
        if not files:
            raise PromptGenError(f"--exclude-dir {path}: no *.jsonl prompt sets in it")
        for f in files:
            for i, line in enumerate(f.read_text(encoding="utf-8").split("\n"), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise PromptGenError(f"{f}:{i}: not valid JSON") from None
                turns = obj.get("turns") if isinstance(obj, dict) else None
                if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
                    turns = [obj["prompt"]]
                for t in turns or []:
                    if isinstance(t, str):
                        idx.add(t)
        return idx


def acceptable(text: str) -> str | None:
    """Why a generated request is rejected by the quality filters, or None when it is kept."""
    w = words(text)
    if not re.search(r"[A-Za-z]", text):
        return "no letters"
    if not 4 <= len(w) <= 120:
        return "length"
    top = max(w.count(x) for x in set(w))
    if len(w) >= 8 and top > 0.4 * len(w):
        return "repetitive"
    return None


@dataclass
class Kept:
    """What is already in the output: for deduplication on resume."""

    texts: set[str] = field(default_factory=set)
    prefixes: set[str] = field(default_factory=set)

    def is_duplicate(self, text: str) -> bool:
        w = words(text)
        return " ".join(w) in self.texts or " ".join(w[:PREFIX_WORDS]) in self.prefixes

    def add(self, text: str) -> None:
        w = words(text)
        self.texts.add(" ".join(w))
        self.prefixes.add(" ".join(w[:PREFIX_WORDS]))


def parse_mix(text: str) -> dict[str, float]:
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in OPENERS:
            raise PromptGenError(f"--mix: unknown domain {name!r} (known: {', '.join(DOMAINS)})")
        try:
            mix[name] = float(value)
        except ValueError:
            raise PromptGenError(f"--mix: weight of {name!r} must be a number, got {value!r}") from None
        if mix[name] < 0:
            raise PromptGenError(f"--mix: weight of {name!r} must be >= 0")
    if sum(mix.values()) <= 0:
        raise PromptGenError("--mix: the weights must not all be zero")
    return mix


def attempt_plan(seed: int, attempt: int, mix: dict[str, float]) -> tuple[str, str]:
    """(domain, opener) of one attempt: a pure function of (seed, attempt), so resume is exact."""
    rng = random.Random(seed * 1_000_003 + attempt)
    names = list(mix)
    domain = rng.choices(names, weights=[mix[n] for n in names])[0]
    return domain, rng.choice(OPENERS[domain])


def user_turn_prefix(llm) -> str:
    """The chat template rendered up to where the user's words begin."""
    if not llm.tokenizer.has_chat_template:
        raise PromptGenError("the model has no chat template: Magpie prompts need one")
    marker = "\x00DSPARK_USER\x00"
    text = llm.render_chat([{"role": "user", "content": marker}], add_generation_prompt=False)
    if marker not in text:
        raise PromptGenError("the chat template does not place the user's message in the prompt")
    return text[:text.index(marker)]


def read_existing(out: Path) -> tuple[Kept, int]:
    kept, n = Kept(), 0
    if out.exists():
        text = out.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # a line torn by a kill
            text = text[:text.rfind("\n") + 1]
            out.write_text(text, encoding="utf-8")
        for line in text.splitlines():
            try:
                kept.add(json.loads(line)["prompt"])
                n += 1
            except (ValueError, KeyError, TypeError):
                continue
    return kept, n


def generate_prompts(llm, out: Path, num_prompts: int, mix: dict[str, float], seed: int, batch_size: int,
                     max_tokens: int, temperature: float, top_p: float, exclude: ExclusionIndex | None,
                     max_attempts: int | None = None, progress: bool = True) -> dict[str, int]:
    """Append accepted requests to `out` until it holds `num_prompts`; returns rejection counts."""
    from tqdm import tqdm

    from dspark.sampling import SamplingParams
    from dspark.train.checkpoint import atomic_write_text

    state_path = out.with_name(out.name + ".state.json")
    kept, n_kept = read_existing(out)
    state = {"next_attempt": 0, "rejected": {}}
    if state_path.is_file():
        try:
            state.update(json.loads(state_path.read_text(encoding="utf-8")))
        except ValueError:
            pass
    prefix = user_turn_prefix(llm)
    limit = max_attempts if max_attempts is not None else 20 * num_prompts + 100
    rejected: dict[str, int] = dict(state["rejected"])
    bar = tqdm(total=num_prompts, initial=min(n_kept, num_prompts), desc="make-prompts", unit="prompt",
               disable=not progress)
    attempt = int(state["next_attempt"])
    with out.open("a", encoding="utf-8") as fh:
        while n_kept < num_prompts:
            if attempt >= limit:
                raise PromptGenError(f"only {n_kept} of {num_prompts} prompts kept after {attempt} attempts "
                                     f"(rejected: {rejected}); raise --temperature or lower --num-prompts")
            # Several batches per call: continuous batching refills the slots of finished requests.
            per_call = batch_size * 4
            plans = [(a, *attempt_plan(seed, a, mix)) for a in range(attempt, attempt + per_call)]
            texts = [prefix + (opener + " " if opener and not opener.endswith(":") else opener)
                     if opener else prefix for _, _, opener in plans]
            params = [SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                     seed=seed * 1_000_003 + a) for a, _, _ in plans]
            outs = llm.generate(texts, params, speculative=False)
            for (a, domain, opener), o in zip(plans, outs):
                body = o.text.strip()
                request = (opener + (" " if opener and not opener.endswith(":") else "\n") + body).strip() \
                    if opener else body
                why = None
                if o.finish_reason != "stop":
                    why = "unfinished"
                elif "<|" in body or "\x00" in body:
                    why = "special text"
                else:
                    why = acceptable(request)
                if why is None and kept.is_duplicate(request):
                    why = "duplicate"
                if why is None and exclude is not None and exclude.matches(request):
                    why = "evaluation overlap"
                if why is not None:
                    rejected[why] = rejected.get(why, 0) + 1
                    continue
                if n_kept >= num_prompts:
                    break
                kept.add(request)
                fh.write(json.dumps({"id": n_kept, "prompt": request, "domain": domain, "opener": opener,
                                     "attempt": a}) + "\n")
                n_kept += 1
                bar.update(1)
            fh.flush()
            attempt += per_call
            atomic_write_text(state_path, json.dumps({"next_attempt": attempt, "rejected": rejected}) + "\n")
            bar.set_postfix(attempts=attempt, kept=f"{n_kept / max(attempt, 1):.0%}")
    bar.close()
    return rejected


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dspark.bundled import MODEL_HELP

    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--out", required=True, help="output JSONL (appended to; a killed run resumes)")
    p.add_argument("--num-prompts", type=int, default=1000, help="prompts to keep (default: 1000)")
    p.add_argument("--mix", default="chat=0.4,code=0.35,math=0.25",
                   help="domain weights of the attempts (default: chat=0.4,code=0.35,math=0.25)")
    p.add_argument("--exclude-dir", default=None,
                   help="directory of evaluation prompt sets (*.jsonl) the prompts must not overlap "
                        "(default: none; pass ../shared/benchmarks)")
    p.add_argument("--max-tokens", type=int, default=96, help="tokens per written request (default: 96)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default: 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seeds each attempt's domain, opener and sampler (default: 0)")
    p.add_argument("--batch-size", type=int, default=16, help="attempts decoded together (default: 16)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    from dspark.config import add_runtime_arguments
    add_runtime_arguments(p)


def run(args: argparse.Namespace) -> Path:
    from dspark.engine import LLM
    from dspark.train.checkpoint import check_writable

    if args.num_prompts < 1 or args.batch_size < 1 or args.max_tokens < 1:
        raise PromptGenError("--num-prompts, --batch-size and --max-tokens must be >= 1")
    mix = parse_mix(args.mix)
    exclude = ExclusionIndex.from_dir(args.exclude_dir) if args.exclude_dir else None
    out = Path(args.out)
    check_writable(out, "--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    llm = LLM(model=args.model, drafter=None, max_num_seqs=args.batch_size, num_threads=args.threads,
              cpu_gemm=args.cpu_gemm, attention=args.attention,
              kv_cache_dtype=args.kv_cache_dtype)
    rejected = generate_prompts(llm, out, args.num_prompts, mix, args.seed, args.batch_size, args.max_tokens,
                                args.temperature, args.top_p, exclude)
    print(f"wrote {out} ({args.num_prompts} prompts; rejected: {rejected or 'none'})", file=sys.stderr)
    return out


def check_no_overlap(prompts: Iterable[str], exclude: ExclusionIndex) -> list[str]:
    """The prompts that match an evaluation prompt (empty when the data is clean)."""
    return [p for p in prompts if exclude.matches(p)]


def main(argv: list[str] | None = None) -> int:
    return module_main(argv, prog="dspark make-prompts", description=__doc__, add_arguments=add_arguments,
                       run=lambda args: run(args) and 0, label="dspark make-prompts: error")


if __name__ == "__main__":
    sys.exit(main())
