"""dspark datagen: target-generated responses, recorded sampling, resume, shards and bad input."""

from __future__ import annotations

import json

import pytest

from dspark.cli import main


@pytest.fixture()
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(3):
        (root / f"m{i}.py").write_text("\n".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(8)))
    return root


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generates_resumes_and_shards(qwen3_ckpt, corpus, tmp_path):
    out = tmp_path / "data.jsonl"
    args = ["datagen", "--model", str(qwen3_ckpt.path), "--corpus", str(corpus), "--corpus-split", "all",
            "--num-prompts", "6", "--max-tokens", "5", "--batch-size", "4", "--temperature", "0.7"]
    assert main([*args, "--out", str(out), "--shard", "0/2"]) == 0
    rows = read(out)
    assert sorted(r["id"] for r in rows) == [0, 2, 4]
    for r in rows:
        assert r["prompt_ids"] and 1 <= len(r["output_ids"]) <= 5
        assert r["sampling"]["temperature"] == 0.7 and r["sampling"]["max_tokens"] == 5
    # Simulate a kill mid-write: a torn last line is dropped and its prompt generated again.
    text = out.read_text()
    out.write_text(text + '{"id": 99, "prom')
    assert main([*args, "--out", str(out)]) == 0
    rows = read(out)
    assert sorted(r["id"] for r in rows) == [0, 1, 2, 3, 4, 5]
    # Seeded per prompt: the same prompt gives the same response in a fresh run.
    again = tmp_path / "again.jsonl"
    assert main([*args, "--out", str(again)]) == 0
    first = {r["id"]: r["output_ids"] for r in rows}
    assert {r["id"]: r["output_ids"] for r in read(again)} == first


def test_prompt_files_and_errors(qwen3_ckpt, tmp_path, capsys):
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"turns": ["def a():"]}) + "\n" + json.dumps({"prompt": "x = 1"}) + "\n")
    out = tmp_path / "o.jsonl"
    base = ["datagen", "--model", str(qwen3_ckpt.path), "--corpus-split", "none", "--max-tokens", "3"]
    assert main([*base, "--prompts", str(jl), "--out", str(out)]) == 0
    assert [r["prompt"] for r in read(out)] == ["def a():", "x = 1"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["ok"]}\n{"nope": 1}\n')
    assert main([*base, "--prompts", str(bad), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main([*base, "--prompts", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "y.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "z.jsonl")]) == 2
    assert "no prompts" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(qwen3_ckpt, tmp_path, capsys):
    import json as _json

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(_json.dumps({"prompt": f"hello {i}"}) + "\n" for i in range(3)))
    out = tmp_path / "d.jsonl"
    base = ["datagen", "--model", str(qwen3_ckpt.path), "--prompts", str(prompts), "--corpus-split", "none",
            "--max-tokens", "3", "--batch-size", "2"]
    assert main([*base, "--out", str(out)]) == 0
    assert (tmp_path / "d.jsonl.settings.json").is_file()
    assert main([*base, "--out", str(out), "--batch-size", "1"]) == 0  # how fast, not what: fine
    capsys.readouterr()
    assert main([*base, "--out", str(out), "--temperature", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "other settings: --temperature 0.5 (earlier: 1.0)" in err and "pick another --out" in err
    # The GEMM kernel changes the numerics a response is sampled under: a resume may not switch it.
    assert main([*base, "--out", str(out), "--cpu-gemm", "off"]) == 2
    assert "--cpu-gemm 'off' (earlier: 'auto')" in capsys.readouterr().err


def test_store_hidden_matches_the_target_and_trains_offline_like_online(qwen3_ckpt, corpus, tmp_path, capsys):
    """--store-hidden writes each sequence's taps + last layer (float16), recorded by the generating
    forwards, as a forward over the whole sequence computes them (every token but the last, which is
    never run), and train-drafter on that file reproduces the online losses (fp16 storage rounding only)."""
    import torch
    from safetensors import safe_open

    from dspark.models import load_target
    from dspark.train.train_drafter import TrainDrafterConfig, train

    out = tmp_path / "data.jsonl"
    base = ["datagen", "--model", str(qwen3_ckpt.path), "--corpus", str(corpus), "--corpus-split", "all",
            "--num-prompts", "6", "--max-tokens", "6", "--batch-size", "2", "--temperature", "0",
            "--out", str(out)]
    assert main([*base, "--store-hidden", "--hidden-layers", "0,1"]) == 0
    rows = read(out)
    assert {r["hidden_layers"] == [0, 1] for r in rows} == {True}
    target = load_target(qwen3_ckpt.path)
    L = target.config.num_layers
    cache = target.new_cache(1, 256)
    for r in rows[:3]:
        ids = r["prompt_ids"] + r["output_ids"]
        with safe_open(str(tmp_path / r["hidden_file"]), "pt") as f:
            got = f.get_tensor(f"seq_{r['id']}")
        assert got.dtype == torch.float16 and tuple(got.shape) == (len(ids) - 1, 3, target.config.hidden_size)
        slot = cache.allocate()
        want = target.forward(cache, [slot], [ids], hidden_layer_ids=[0, 1, L - 1], all_logits=False).hidden[0]
        cache.free(slot)
        assert torch.allclose(got.float(), want[:len(ids) - 1].float(), atol=2e-2, rtol=2e-3)
    # A settings change on resume is refused (stored layers are part of what a row is).
    assert main([*base, "--store-hidden", "--hidden-layers", "1"]) == 2
    assert "--hidden-layers" in capsys.readouterr().err
    # Offline training (stored features) == online training (target run every step) on the same taps.
    kw = dict(target=str(qwen3_ckpt.path), data=str(out), block_size=3, num_layers=1, markov_rank=8,
              anchors_per_seq=3, steps=3, batch_size=2, eval_every=3, ckpt_every=3, threads=1, val_percent=20.0)
    train(TrainDrafterConfig(out=str(tmp_path / "off"), **kw))
    train(TrainDrafterConfig(out=str(tmp_path / "on"), online=True, target_layer_ids=[0, 1], **kw))
    off, on = (json.loads((tmp_path / d / "training_log.json").read_text()) for d in ("off", "on"))
    assert off["drafter"]["target_layer_ids"] == [0, 1]
    assert off["train_losses"] == pytest.approx(on["train_losses"], rel=1e-3)
    # The missing last row is never read: the same files with a wild last row appended train to
    # exactly the same losses and validation figures.
    from dspark.train.checkpoint import atomic_save_safetensors
    full = tmp_path / "full.jsonl"
    (tmp_path / "full.jsonl.hidden").mkdir()
    for r in rows:
        with safe_open(str(tmp_path / r["hidden_file"]), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        grown = {k: torch.cat([v, torch.full_like(v[:1], 50.0)]) for k, v in tensors.items()}
        atomic_save_safetensors(grown, tmp_path / r["hidden_file"].replace("data.jsonl", "full.jsonl"), metadata=meta)
    full.write_text("".join(json.dumps({**r, "hidden_file": r["hidden_file"].replace("data.jsonl", "full.jsonl")})
                            + "\n" for r in rows))
    train(TrainDrafterConfig(**{**kw, "data": str(full)}, out=str(tmp_path / "off-full")))
    off_full = json.loads((tmp_path / "off-full" / "training_log.json").read_text())
    assert off_full["train_losses"] == off["train_losses"] and off_full["evals"] == off["evals"]
    # The same with a reduced draft vocabulary: offline runs the LM head over the draft rows only,
    # with cached log-normalisers, and must still give the full-vocabulary losses.
    train(TrainDrafterConfig(out=str(tmp_path / "off-r"), draft_vocab_size=40, **kw))
    train(TrainDrafterConfig(out=str(tmp_path / "on-r"), online=True, target_layer_ids=[0, 1], draft_vocab_size=40,
                             **kw))
    off_r, on_r = (json.loads((tmp_path / d / "training_log.json").read_text()) for d in ("off-r", "on-r"))
    assert off_r["drafter"]["draft_vocab_size"] == 40
    assert off_r["train_losses"] == pytest.approx(on_r["train_losses"], rel=1e-3)
    assert off_r["train_losses"] != pytest.approx(off["train_losses"], rel=1e-3)  # the reduction did change them
    # The log-normalisers are kept beside the stored hidden states for the next run on the same data and
    # target, which then trains to exactly the same losses; a damaged file is recomputed, with a warning.
    (store,) = (tmp_path / "data.jsonl.hidden").glob("lse-*.safetensors")
    capsys.readouterr()
    train(TrainDrafterConfig(out=str(tmp_path / "off-r2"), draft_vocab_size=40, **kw))
    assert "target log-normalisers" not in capsys.readouterr().err  # nothing left to compute
    store.write_bytes(b"not a safetensors file")
    train(TrainDrafterConfig(out=str(tmp_path / "off-r3"), draft_vocab_size=40, **kw))
    err = capsys.readouterr().err
    assert "unreadable" in err and "target log-normalisers" in err  # recomputed, with the bar
    for d in ("off-r2", "off-r3"):
        again = json.loads((tmp_path / d / "training_log.json").read_text())
        assert again["train_losses"] == off_r["train_losses"] and again["evals"] == off_r["evals"], d
    # Other taps than the stored ones: one line naming both.
    with pytest.raises(ValueError, match="stores layers 0,1"):
        train(TrainDrafterConfig(out=str(tmp_path / "bad"), target_layer_ids=[0], **kw))
    # A data file whose .hidden folder is gone: the error names the file.
    import shutil
    shutil.rmtree(tmp_path / "data.jsonl.hidden")
    with pytest.raises(ValueError, match="data.jsonl.hidden"):
        train(TrainDrafterConfig(out=str(tmp_path / "gone"), **kw))
