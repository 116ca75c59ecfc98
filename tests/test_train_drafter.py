"""`dspark train-drafter`: loss falls, exact resume, DDP == one process, clear errors."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from dspark.drafters import load_drafter
from dspark.models import load_target
from dspark.sampling import SamplingParams, SamplingTensors
from dspark.train.train_drafter import TrainDrafterConfig, main, train

REPO = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_file(qwen3_ckpt, tmp_path_factory) -> Path:
    """Ten sequences whose outputs the tiny target generated itself (greedy), as `dspark datagen` would."""
    target = load_target(qwen3_ckpt.path)
    rng = random.Random(0)
    cache = target.new_cache(1, 64)
    lines = []
    for _ in range(10):
        prompt = [rng.randrange(4, 260) for _ in range(rng.randint(3, 8))]
        slot = cache.allocate()
        res = target.forward(cache, [slot], [prompt], all_logits=False)
        out = []
        for _ in range(rng.randint(12, 20)):
            out.append(int(res.logits[0, -1].argmax()))
            res = target.forward(cache, [slot], [[out[-1]]])
        cache.free(slot)
        lines.append(json.dumps({"prompt_ids": prompt, "output_ids": out}))
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny(qwen3_ckpt, data_file, out: Path, **kw) -> TrainDrafterConfig:
    base = dict(target=str(qwen3_ckpt.path), data=str(data_file), out=str(out), block_size=4, num_layers=1,
                markov_rank=16, anchors_per_seq=4, steps=12, batch_size=4, lr=3e-3, warmup_steps=3,
                eval_every=6, ckpt_every=4, threads=1, val_percent=20.0)
    base.update(kw)
    return TrainDrafterConfig(**base)


def losses(out: Path) -> list[float]:
    return json.loads((out / "training_log.json").read_text())["train_losses"]


def test_loss_falls_and_output_loads(qwen3_ckpt, data_file, tmp_path) -> None:
    out = train(tiny(qwen3_ckpt, data_file, tmp_path / "run", steps=30, eval_every=15))
    ls = losses(out)
    assert len(ls) == 30
    assert sum(ls[-5:]) / 5 < sum(ls[:5]) / 5 - 0.1, ls
    log = json.loads((out / "training_log.json").read_text())
    assert [e["step"] for e in log["evals"]] == [15, 30]
    assert all(1.0 <= e["val_tau"] <= 5.0 for e in log["evals"])
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["Qwen3DSparkModel"] and raw["block_size"] == 4 and raw["markov_rank"] == 16

    target = load_target(qwen3_ckpt.path)
    d = load_drafter(out, target, max_seqs=1, max_len=64)
    cache = target.new_cache(1, 64)
    slot = cache.allocate()
    prompt = [5, 6, 7, 8]
    res = target.forward(cache, [slot], [prompt], hidden_layer_ids=d.target_layer_ids)
    d.add_sequence(slot, prompt, res.hidden[0])
    prop = d.propose([slot], [9], 4, SamplingTensors.from_params([SamplingParams(temperature=0)]), [None])
    assert prop.token_ids.shape == (1, 4) and prop.confidence is not None


def test_resume_after_stop_reproduces_losses(qwen3_ckpt, data_file, tmp_path) -> None:
    full = losses(train(tiny(qwen3_ckpt, data_file, tmp_path / "full")))
    cfg = tiny(qwen3_ckpt, data_file, tmp_path / "resumed")
    # Stop at step 6: the last checkpoint is step 4, so steps 5-6 are redone, as after a kill.
    train(replace(cfg, stop_after=6))
    assert not (tmp_path / "resumed" / "config.json").exists()
    assert (tmp_path / "resumed" / ".work" / "checkpoint.pt").exists()
    resumed = losses(train(cfg))
    assert len(resumed) == len(full) == 12
    assert resumed == pytest.approx(full, abs=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bfloat16_precision_trains_the_same_drafter_in_float32_weights(qwen3_ckpt, data_file, tmp_path) -> None:
    """--precision bfloat16 (autocast of the drafter's forward) follows the float32 run closely, keeps the
    weights in float32, learns, resumes into a float32 run, and is refused when unknown."""
    steps = 30
    fp32 = losses(train(tiny(qwen3_ckpt, data_file, tmp_path / "fp32", steps=steps, eval_every=15)))
    cfg = tiny(qwen3_ckpt, data_file, tmp_path / "bf16", steps=steps, eval_every=15, precision="bfloat16")
    train(replace(cfg, stop_after=6))
    ckpt = torch.load(tmp_path / "bf16" / ".work" / "checkpoint.pt", weights_only=False)
    assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
    bf16 = losses(train(replace(cfg, precision="float32", steps=8)))  # a resumed run may change it
    assert len(bf16) == 8
    bf16 = losses(train(tiny(qwen3_ckpt, data_file, tmp_path / "bf16b", steps=steps, eval_every=15,
                             precision="bfloat16")))
    assert bf16 != fp32  # the products did run in bfloat16
    assert bf16[0] == pytest.approx(fp32[0], rel=0.02)
    assert sum(bf16[-5:]) / 5 < sum(bf16[:5]) / 5 - 0.1, bf16
    assert sum(bf16[-5:]) / 5 == pytest.approx(sum(fp32[-5:]) / 5, rel=0.1)
    with pytest.raises(ValueError, match="--precision must be one of float32, bfloat16, got 'fp8'"):
        train(tiny(qwen3_ckpt, data_file, tmp_path / "bad", precision="fp8"))


def test_two_process_ddp_matches_one_process(qwen3_ckpt, data_file, tmp_path) -> None:
    steps = 5
    one = losses(train(tiny(qwen3_ckpt, data_file, tmp_path / "one", steps=steps, eval_every=100)))
    out2 = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "dspark.train.train_drafter", "--target", str(qwen3_ckpt.path), "--data", str(data_file),
           "--out", str(out2), "--block-size", "4", "--num-layers", "1", "--markov-rank", "16",
           "--anchors-per-seq", "4", "--steps", str(steps), "--batch-size", "4", "--lr", "3e-3",
           "--warmup-steps", "3", "--eval-every", "100", "--ckpt-every", "4", "--threads", "1",
           "--val-percent", "20"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = losses(out2)
    assert json.loads((out2 / "training_log.json").read_text())["world_size"] == 2
    assert two == pytest.approx(one, abs=2e-4)


def test_bad_inputs_give_clear_errors(qwen3_ckpt, data_file, tmp_path, capsys) -> None:
    common = ["--target", str(qwen3_ckpt.path), "--out", str(tmp_path / "o"), "--steps", "1", "--threads", "1"]

    def err(argv: list[str]) -> str:
        assert main(argv) == 2
        return capsys.readouterr().err

    assert "data file" in err(common + ["--data", str(tmp_path / "nope.jsonl")])
    assert "nope.jsonl" in err(common + ["--data", str(tmp_path / "nope.jsonl")])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "0 usable sequence" in err(common + ["--data", str(empty)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt_ids": [1, 2], "output_ids": "abc"}\n')
    assert "bad.jsonl:1: key 'output_ids'" in err(common + ["--data", str(bad)])
    assert "--block-size must be >= 1" in err(common + ["--data", str(data_file), "--block-size", "0"])
    assert "target_layer_ids" in err(common + ["--data", str(data_file), "--target-layer-ids", "0,9"])
    for flag in ("--block-context", "--context-next-token"):
        assert "apply to the dspark and dflash drafters" in err(common + ["--data", str(data_file), "--drafter",
                                                                         "eagle3", flag])

    nomask = tmp_path / "nomask"
    shutil.copytree(qwen3_ckpt.path, nomask)
    tc = json.loads((nomask / "tokenizer_config.json").read_text())
    tc.pop("mask_token")
    (nomask / "tokenizer_config.json").write_text(json.dumps(tc))
    msg = err(["--target", str(nomask), "--data", str(data_file), "--out", str(tmp_path / "o2"), "--steps", "1"])
    assert "mask token" in msg


def test_resume_with_changed_settings_is_refused(qwen3_ckpt, data_file, tmp_path) -> None:
    from dspark.errors import CheckpointError

    cfg = tiny(qwen3_ckpt, data_file, tmp_path / "run", steps=8)
    train(cfg)
    other = tmp_path / "other.jsonl"
    shutil.copy(data_file, other)
    for change, flag in (({"lr": 1e-2}, "--lr"), ({"num_layers": 2}, "--num-layers"), ({"data": str(other)}, "--data")):
        with pytest.raises(CheckpointError, match=rf"other settings: {flag} .*delete .*\.work to start fresh"):
            train(replace(cfg, **change))
    with pytest.raises(CheckpointError, match="already trained 8 steps, more than --steps 4"):
        train(replace(cfg, steps=4))
    # A checkpoint from before a setting existed resumes when the setting keeps its default.
    state = torch.load(tmp_path / "run" / ".work" / "checkpoint.pt", weights_only=False)
    del state["config"]["block_context"]
    torch.save(state, tmp_path / "run" / ".work" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="--block-context True"):
        train(replace(cfg, steps=9, block_context=True))
    # Raising --steps on purpose continues the finished run.
    more = losses(train(replace(cfg, steps=12)))
    assert len(more) == 12 and more[:8] == losses_of(tmp_path / "run", 8)


def losses_of(out: Path, n: int) -> list[float]:
    return json.loads((out / "training_log.json").read_text())["train_losses"][:n]


def test_damaged_checkpoint_falls_back_or_says_what_to_delete(qwen3_ckpt, data_file, tmp_path, capsys) -> None:
    from dspark.errors import CheckpointError

    cfg = tiny(qwen3_ckpt, data_file, tmp_path / "run")
    train(replace(cfg, stop_after=9))  # checkpoints at steps 4 and 8
    work = tmp_path / "run" / ".work"
    ckpt, prev = work / "checkpoint.pt", work / "checkpoint.prev.pt"
    assert prev.exists()
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # truncated
    out = train(cfg)
    err = capsys.readouterr().err
    assert "is damaged" in err and "resuming from" in err and str(prev) in err
    assert len(losses(out)) == 12
    ckpt.write_bytes(b"garbage")
    prev.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=rf"is damaged .* delete {work}"):
        train(replace(cfg, steps=16))


def _ctrl_c() -> None:
    raise KeyboardInterrupt


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)  # delivered to the handler the run installed


@pytest.mark.parametrize("stop, status, message", [
    (_ctrl_c, 130, "interrupted at step 6 of 12"),
    # `kill PID`: a run started in the background ignores Ctrl-C. No periodic checkpoint is due at
    # step 6 (--ckpt-every 4 gives one at 4), so the resumed run's exactness needs the one saved here.
    (_sigterm, 143, "terminated (signal 15) at step 6 of 12"),
], ids=["ctrl-c", "sigterm"])
def test_interrupt_checkpoints_and_resumes_exactly(stop, status, message, qwen3_ckpt, data_file, tmp_path,
                                                   monkeypatch, capsys) -> None:
    """Ctrl-C or SIGTERM mid-run: one line, status 130 / 143, the SIGTERM handler only the run's while
    it runs, and a checkpoint the next run resumes from exactly."""
    import torch

    from dspark.train import train_drafter as td

    full = losses(train(tiny(qwen3_ckpt, data_file, tmp_path / "full")))
    real = td.batch_indices

    def stop_at_step_6(seed, step, n, bs):
        if step == 6:
            stop()
        return real(seed, step, n, bs)

    monkeypatch.setattr(td, "batch_indices", stop_at_step_6)
    out = tmp_path / "run"
    argv = ["--target", str(qwen3_ckpt.path), "--data", str(data_file), "--out", str(out), "--block-size", "4",
            "--num-layers", "1", "--markov-rank", "16", "--anchors-per-seq", "4", "--steps", "12",
            "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "3", "--eval-every", "6", "--ckpt-every", "4",
            "--threads", "1", "--val-percent", "20"]
    before = signal.getsignal(signal.SIGTERM)
    assert main(argv) == status
    assert signal.getsignal(signal.SIGTERM) is before
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"dspark train-drafter: {message}; checkpoint saved"), err[-1]
    assert "Traceback" not in "\n".join(err)
    assert torch.load(out / ".work" / "checkpoint.pt", weights_only=False)["log"]["step"] == 6
    monkeypatch.setattr(td, "batch_indices", real)
    assert main(argv) == 0
    assert losses(out) == pytest.approx(full, abs=1e-6)


def test_reuse_freed_memory_takes_effect_on_glibc() -> None:
    """The trainers' malloc setting (big freed blocks kept for reuse) applies where glibc is the C
    library (training runs after it are covered by the tests above, which run in the same process)."""
    import platform

    from dspark.train.common import reuse_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc-only setting")
    assert reuse_freed_memory() is True


def test_freed_memory_is_returned_inside_the_block_and_kept_after() -> None:
    """`freed_memory_returned` (around the log-normalisers, whose temporaries change size every
    sequence): inside it a freed 64 MB block goes back to the OS; after it, freed blocks are kept again
    (`reuse_freed_memory`)."""
    import platform

    import torch

    from dspark.train.common import freed_memory_returned, reuse_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc-only setting")

    def anon_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024

    def grown_after_free() -> float:
        before = anon_mb()
        t = torch.ones(16 * 2**20)  # 64 MB, every page touched
        del t
        return anon_mb() - before

    assert reuse_freed_memory() is True
    with freed_memory_returned():
        assert grown_after_free() < 16
    assert grown_after_free() > 48  # kept (for reuse) again after the block


def test_split_keeps_every_response_to_a_prompt_on_one_side(data_file, tmp_path) -> None:
    """Held-out prompts stay held out when more responses to the same prompts are appended (a second
    sample, another temperature); a file with one response per prompt splits as before."""
    import numpy as np

    from dspark.train.train_drafter import _VAL_SPLIT_SEED, load_data

    one = load_data(data_file, 300, 64, 20.0)
    rows = [json.loads(x) for x in data_file.read_text().splitlines() if x.strip()]
    # The old rule, by sequence index, for a file whose prompts are all distinct.
    order = np.random.default_rng(_VAL_SPLIT_SEED).permutation(len(rows))
    old_val = sorted(order[:round(len(rows) * 0.2)].tolist())
    assert [s.ids for s in one.val] == [rows[i]["prompt_ids"] + rows[i]["output_ids"] for i in old_val]
    doubled = tmp_path / "doubled.jsonl"
    second = [{**r, "output_ids": r["output_ids"][::-1]} for r in rows]
    doubled.write_text("".join(json.dumps(r) + "\n" for r in rows + second))
    two = load_data(doubled, 300, 64, 20.0)
    val_prompts = {tuple(s.ids[:s.output_start]) for s in two.val}
    train_prompts = {tuple(s.ids[:s.output_start]) for s in two.train}
    assert not val_prompts & train_prompts
    assert val_prompts == {tuple(s.ids[:s.output_start]) for s in one.val}
    assert len(two.val) == 2 * len(one.val) and len(two.train) == 2 * len(one.train)
    assert [s.ids for s in two.val[:len(one.val)]] == [s.ids for s in one.val]  # the old ones first


def test_init_from_starts_at_the_given_drafter(qwen3_ckpt, data_file, tmp_path) -> None:
    """--init-from: the first step starts from the saved drafter's weights (its first loss is the loss
    the saved drafter reaches, far below a fresh start's), a resume keeps the run's own weights, and a
    drafter of another shape is refused with the keys that differ."""
    from dspark.errors import CheckpointError

    first = tmp_path / "first"
    train(tiny(qwen3_ckpt, data_file, first, steps=24))
    fresh_losses = losses(first)
    second = tmp_path / "second"
    train(tiny(qwen3_ckpt, data_file, second, steps=8, init_from=str(first)))
    log = json.loads((second / "training_log.json").read_text())
    assert log["init_from"] == str(first)
    assert log["train_losses"][0] < fresh_losses[0] - 0.5 * (fresh_losses[0] - min(fresh_losses))
    assert "Started from the drafter" in (second / "README.md").read_text()
    # Resume: raising --steps continues from the run's checkpoint, not from the starting drafter.
    train(tiny(qwen3_ckpt, data_file, second, steps=10, init_from=str(first)))
    assert losses(second)[:8] == log["train_losses"] and len(losses(second)) == 10
    # Another block size is the same weights (a gamma = 4 drafter starts a block-6 run from where it is) ...
    third = tmp_path / "third"
    train(tiny(qwen3_ckpt, data_file, third, steps=2, block_size=6, init_from=str(first)))
    assert losses(third)[0] < fresh_losses[0] - 0.5 * (fresh_losses[0] - min(fresh_losses))
    # ... another shape is refused, naming what differs
    with pytest.raises(CheckpointError, match="markov_rank"):
        train(tiny(qwen3_ckpt, data_file, tmp_path / "fourth", markov_rank=8, init_from=str(first)))


def test_normaliser_keys_tell_two_datagen_files_apart() -> None:
    """Two datagen files merged into one data file have the same batch file names and sequence ids in
    their own .hidden folders; the cached log-normalisers must not mix them up."""
    from dspark.train.train_drafter import Sequence, TargetNormalisers

    a = Sequence(ids=[1, 2, 3, 4], output_start=2, hidden=("runs/x/a.jsonl.hidden/batch_000000.safetensors", "seq_0"))
    b = Sequence(ids=[1, 2, 3, 4], output_start=2, hidden=("runs/x/b.jsonl.hidden/batch_000000.safetensors", "seq_0"))
    assert TargetNormalisers._store_key(a) != TargetNormalisers._store_key(b)
    assert TargetNormalisers._store_key(a) == TargetNormalisers._store_key(
        Sequence(ids=[1, 2, 3, 4], output_start=2, hidden=("elsewhere/a.jsonl.hidden/batch_000000.safetensors", "seq_0")))
