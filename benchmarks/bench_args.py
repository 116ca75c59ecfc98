"""Command-line options the side-by-side benchmarks share (benchmarks/ is on the path when they run)."""

from __future__ import annotations

import argparse


def add_prompt_arguments(ap: argparse.ArgumentParser, *, count: str = "--num-prompts", count_default: int = 8,
                         count_help: str = "prompts") -> None:
    """--data-dir, --set, the prompt count (--num-prompts or another name), --max-tokens and --threads."""
    ap.add_argument("--data-dir", required=True, help="directory of the benchmark sets (*.jsonl with `turns`)")
    ap.add_argument("--set", default="humaneval", help="benchmark set (default: humaneval)")
    ap.add_argument(count, type=int, default=count_default, help=f"{count_help} (default: {count_default})")
    ap.add_argument("--max-tokens", type=int, default=64, help="new tokens per prompt, eos ignored (default: 64)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
