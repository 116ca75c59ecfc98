"""The pretraining recipe: tokenizer, loss falls, kill-and-resume, data parallelism, HF loadability,
and clear errors on bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dspark.train.corpus import CorpusError, discover
from dspark.train.tokenizer_train import MASK_TOKEN, SPECIAL_TOKENS, train_tokenizer

REPO = Path(__file__).resolve().parent.parent

_SNIPPETS = [
    "def add(a, b):\n    \"\"\"Return the sum.\"\"\"\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\n\ndef main(argv):\n    for arg in argv:\n        print(arg)\n    return 0\n",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
]


def make_corpus(root: Path, n_files: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = "\n".join(_SNIPPETS[(i + j) % len(_SNIPPETS)].replace("add", f"add{i}{j}") for j in range(12))
        (root / f"mod_{i}.py").write_text(body)
    # Test and vendored directories must be left out of the corpus.
    (root / "test").mkdir(exist_ok=True)
    (root / "test" / "ignored.py").write_text("x = 1\n")
    return root


TINY = ["--vocab-size", "320", "--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "2",
        "--num-heads", "2", "--num-kv-heads", "1", "--head-dim", "16", "--seq-len", "32",
        "--batch-size", "4", "--warmup-steps", "3", "--lr", "5e-3", "--eval-every", "10", "--eval-tokens", "512",
        "--threads", "1"]


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "dspark.cli", *args], capture_output=True, text=True, env=env, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("run") / "model"
    r = run_cli(["pretrain", "--corpus", str(corpus), "--out", str(out), "--steps", "30", "--ckpt-every", "10", *TINY])
    assert r.returncode == 0, r.stderr
    return out


def test_split_is_deterministic_and_skips_tests(corpus):
    a, b = discover(corpus), discover(corpus)
    assert a.train == b.train and a.val == b.val
    names = {p.name for p in a.train + a.val}
    assert "ignored.py" not in names and len(names) == 8
    assert not set(a.train) & set(a.val)


def test_tokenizer_has_special_tokens(corpus):
    tok = train_tokenizer(discover(corpus).train, vocab_size=320)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert None not in ids and len(set(ids)) == len(ids)
    text = "def fib(n):\n    return n  # é\n"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.encode(MASK_TOKEN).ids == [tok.token_to_id(MASK_TOKEN)]


def test_loss_falls_and_output_loads_in_transformers(trained):
    log = json.loads((trained / "training_log.json").read_text())
    losses = log["train_losses"]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert log["evals"][-1]["val_loss"] < log["evals"][0]["val_loss"]
    card = (trained / "README.md").read_text()
    assert "--steps 30" in card and "Validation loss" in card

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(str(trained))
    tok = AutoTokenizer.from_pretrained(str(trained))
    assert model.config.model_type == "qwen3"
    assert tok.mask_token == MASK_TOKEN and tok.eos_token == "<|endoftext|>"
    ids = tok("def fib(n):", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8 or tok.eos_token_id in out[0].tolist()

    # Our runtime loads the same directory and decodes the same greedy tokens.
    from dspark import LLM, SamplingParams
    ours = LLM(model=trained).generate("def fib(n):", SamplingParams(temperature=0, max_tokens=8))[0]
    assert ours.token_ids == out[0, ids.shape[1]:ids.shape[1] + len(ours.token_ids)].tolist()


def test_killed_run_resumes_exactly(tmp_path, corpus, trained):
    out = tmp_path / "model"
    args = ["pretrain", "--corpus", str(corpus), "--out", str(out), "--steps", "30", "--ckpt-every", "1", *TINY]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "dspark.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / ".work" / "checkpoint.pt"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["log"]["step"] >= 5:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # a real kill, mid-run
    proc.wait()
    step_at_kill = torch.load(ckpt, weights_only=False)["log"]["step"]
    assert 5 <= step_at_kill < 30, "the run should have been killed part-way"
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {ckpt} at step" in r.stderr
    resumed = json.loads((out / "training_log.json").read_text())["train_losses"]
    uninterrupted = json.loads((trained / "training_log.json").read_text())["train_losses"]
    # Batches are a function of (seed, step), so the resumed run retraces the uninterrupted one.
    assert resumed == pytest.approx(uninterrupted, abs=1e-4)


def test_two_process_torchrun_matches_one_process(tmp_path, corpus, trained):
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", "29533", "-m", "dspark.train.pretrain", "--corpus", str(corpus),
                        "--out", str(out), "--steps", "10", "--ckpt-every", "10", *TINY],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ddp = json.loads((out / "training_log.json").read_text())
    single = json.loads((trained / "training_log.json").read_text())
    assert ddp["world_size"] == 2
    # Same global batch, gradients averaged: the first steps agree with one process (the lr schedule
    # differs after warm-up because --steps differs, so compare the warm-up steps only).
    assert ddp["train_losses"][:3] == pytest.approx(single["train_losses"][:3], abs=2e-4)


def test_bad_input(tmp_path, corpus):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run_cli(["pretrain", "--corpus", str(empty), "--out", str(tmp_path / "o1"), *TINY])
    assert r.returncode == 2 and "holds no files ending in .py" in r.stderr and "Traceback" not in r.stderr

    r = run_cli(["pretrain", "--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "o2"), *TINY])
    assert r.returncode == 2 and "does not exist" in r.stderr

    bad = make_corpus(tmp_path / "bad")
    (bad / "latin1.py").write_bytes(b"x = '\xe9\xff'\n")
    with pytest.raises(CorpusError, match=r"latin1\.py.*not valid UTF-8"):
        train_tokenizer(discover(bad).train + discover(bad).val, vocab_size=320)

    with pytest.raises(CorpusError, match="vocab_size 100 is too small.*at least 261"):
        train_tokenizer(discover(corpus).train, vocab_size=100)

    r = run_cli(["pretrain", "--corpus", str(corpus), "--out", str(tmp_path / "o3"), *TINY, "--num-heads", "3", "--num-kv-heads", "2"])
    assert r.returncode == 2 and "--num-heads (3) must be a multiple of --num-kv-heads" in r.stderr


def test_resume_with_changed_settings_is_refused(tmp_path, corpus, trained):
    """Issue 14 item 3 for pretrain: a finished run started again with another --lr or model shape
    stops with one line naming the setting (no traceback); raising --steps on purpose continues."""
    import shutil

    out = tmp_path / "model"
    shutil.copytree(trained, out)
    base = ["pretrain", "--corpus", str(corpus), "--out", str(out), "--ckpt-every", "10", *TINY]
    for flag, value in (("--lr", "1e-2"), ("--hidden-size", "48")):
        args = [*base, "--steps", "30"]
        args[args.index(flag) + 1] = value
        r = run_cli(args)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert f"other settings: {flag} " in r.stderr and "to start fresh" in r.stderr
    r = run_cli([*base, "--steps", "32"])
    assert r.returncode == 0, r.stderr
    log = json.loads((out / "training_log.json").read_text())
    assert log["step"] == 32
    assert log["train_losses"][:30] == json.loads((trained / "training_log.json").read_text())["train_losses"]


def test_sigterm_checkpoints_and_resumes_exactly(tmp_path, corpus, trained, monkeypatch, capsys):
    """`kill PID` (SIGTERM) mid-run, with no periodic checkpoint due: the run saves one between updates,
    says so in one line, exits 143, and the rerun retraces the uninterrupted run."""
    from dspark.train import pretrain as pt

    real = pt.batch_offsets

    def terminate_at_step_6(seed, step, *rest):
        if step == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered to the handler the run installed
        return real(seed, step, *rest)

    monkeypatch.setattr(pt, "batch_offsets", terminate_at_step_6)
    out = tmp_path / "model"
    argv = ["--corpus", str(corpus), "--out", str(out), "--steps", "30", "--ckpt-every", "100", *TINY]
    before = signal.getsignal(signal.SIGTERM)
    assert pt.main(argv) == 143
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the run's only while it runs
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dspark pretrain: terminated (signal 15) at step 6 of 30; checkpoint saved"), err[-1]
    assert "Traceback" not in "\n".join(err)
    assert torch.load(out / ".work" / "checkpoint.pt", weights_only=False)["log"]["step"] == 6
    monkeypatch.setattr(pt, "batch_offsets", real)
    assert pt.main(argv) == 0
    resumed = json.loads((out / "training_log.json").read_text())["train_losses"]
    uninterrupted = json.loads((trained / "training_log.json").read_text())["train_losses"]
    assert resumed == pytest.approx(uninterrupted, abs=1e-4)
