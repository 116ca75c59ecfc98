"""`dspark bench`: every method timed on the same prompts, ours greedy-exact, JSON and PNG written."""

from __future__ import annotations

import json

import pytest

from dspark.eval import speed
from dspark.eval.speed import BenchConfig, benchmark
from helpers import eval_dspark, write_sets


def test_bench_ours_only(tmp_path, target):
    cfg = BenchConfig(drafters=[], out=tmp_path / "b.json", num_prompts=2, max_tokens=8, gamma=4, repeats=1,
                      transformers=False, data_dir=write_sets(tmp_path / "data"), set="humaneval",
                      policies=["static", "confidence", "fixed:2"])
    rep = benchmark(cfg, {"ngram": "ngram", "dspark": eval_dspark}, target=target, progress=False)
    data = json.loads(cfg.out.read_text())
    methods = {m["method"]: m for m in data["methods"]}
    # The confidence scheduler runs where there is a confidence head, and is noted where there is not.
    assert set(methods) == {"vanilla", "ngram", "dspark", "dspark+confidence", "ngram+fixed:2", "dspark+fixed:2"}
    assert any("ngram: no confidence head" in n for n in data["notes"])
    for name, m in methods.items():
        assert m["ours"] and m["same_tokens"], name
        assert m["num_tokens"] == 2 * 8  # ignore_eos: exactly max_tokens per prompt
        assert m["tokens_per_s"] > 0 and len(m["all_seconds"]) == 1
    assert methods["vanilla"]["accepted_length"] is None and methods["ngram"]["accepted_length"] >= 1.0
    assert methods["vanilla"]["speedup_vs_vanilla"] == pytest.approx(1.0)
    assert data["config"]["threads"] >= 1 and "threads:" in rep.table
    assert rep.ok and data["all_ours_same_tokens"]
    assert cfg.out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_bench_with_transformers_cli(tmp_path, qwen3_ckpt, capsys):
    out = tmp_path / "bench.json"
    argv = ["--drafters", "ngram", "--model", str(qwen3_ckpt.path), "--num-prompts", "2", "--max-tokens", "6",
            "--gamma", "3", "--repeats", "1", "--threads", "1", "--out", str(out), "--no-progress",
            "--draft-model", str(qwen3_ckpt.path)]  # the target as its own assistant: a valid small LM
    assert speed.main(argv) == 0
    data = json.loads(out.read_text())
    methods = {m["method"]: m for m in data["methods"]}
    assert set(methods) == {"vanilla", "ngram", "hf", "hf-prompt-lookup", "hf-assisted"}
    assert methods["ngram"]["same_tokens"] and methods["vanilla"]["same_tokens"]
    # The tiny random model in float32: transformers' greedy tokens agree with ours.
    assert methods["hf"]["same_tokens"] and methods["hf"]["num_tokens"] == 2 * 6
    assert methods["hf"]["speedup_vs_hf"] == pytest.approx(1.0)
    assert data["config"]["threads"] == 1 and data["config"]["prompt_source"] == "built-in Python openings"
    text = capsys.readouterr().out
    assert "| hf-prompt-lookup | 3 |" in text and "threads: 1" in text
    assert out.with_suffix(".png").is_file()


def test_bench_fails_when_ours_differs(tmp_path, target, monkeypatch, capsys):
    """The exit status must catch a lossless-decoding bug: corrupt one method's tokens."""
    real = speed.EngineMethod.run

    def broken(self, prompts, max_tokens):
        r = real(self, prompts, max_tokens)
        if self.name == "ngram":
            r.token_ids[0][-1] ^= 1
        return r

    monkeypatch.setattr(speed.EngineMethod, "run", broken)
    import dspark.models
    monkeypatch.setattr(dspark.models, "load_target", lambda path: target)
    argv = ["--drafters", "ngram", "--model", str(target.path), "--num-prompts", "1", "--max-tokens", "4",
            "--repeats", "1", "--out", str(tmp_path / "x.json"), "--no-transformers", "--no-progress"]
    assert speed.main(argv) == 1
    assert "ngram produced different tokens" in capsys.readouterr().err
    with pytest.raises(Exception, match="nope"):
        benchmark(BenchConfig(drafters=[], out=tmp_path / "y.json", data_dir=write_sets(tmp_path / "d"), set="nope"),
                  {}, target=target)
