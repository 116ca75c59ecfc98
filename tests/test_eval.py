"""`dspark eval`: τ and conditional acceptance pooled correctly, domain tables, resumability, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dspark.errors import DSparkError

from dspark.eval import acceptance
from dspark.eval.acceptance import EvalConfig, EvalError, evaluate, pool_metrics
from dspark.eval.prompts import PromptSetError, load_prompt_set, prepare_prompts
from helpers import CODE, MATH, eval_dspark, write_sets


def make_cfg(tmp_path: Path, **kw) -> EvalConfig:
    base = dict(drafters=["ngram", "dspark"], data_dir=write_sets(tmp_path / "data"), sets=["humaneval", "gsm8k"],
                out=tmp_path / "out" / "eval.json", num_prompts=3, max_tokens=12, batch_size=2, gammas=[2, 4, 8])
    base.update(kw)
    return EvalConfig(**base)


def drafters():
    return {"ngram": "ngram", "dspark": eval_dspark}


def test_eval_end_to_end_and_resume(tmp_path, target, monkeypatch, capsys):
    cfg = make_cfg(tmp_path)
    rep = evaluate(cfg, drafters(), target=target, progress=False)
    data = json.loads(cfg.out.read_text())
    assert set(data) >= {"config", "results", "domains", "gamma_sweep", "cells", "notes", "truncated_prompts"}
    # ngram's block is 16, untrained dspark's 6: γ=8 is skipped for dspark with a note.
    assert data["config"]["main_gamma"] == {"ngram": 16, "dspark": 6}
    assert any("γ=8 skipped" in n and n.startswith("dspark") for n in data["notes"])
    assert data["truncated_prompts"] == {"humaneval": 0, "gsm8k": 1}
    assert any("gsm8k: 1 of 3 prompts cut" in n for n in data["notes"])
    for label, gamma in (("ngram", 16), ("dspark", 6)):
        for s in ("humaneval", "gsm8k"):
            r = data["results"][label][s]
            assert r["accepted_length"] >= 1.0
            assert len(r["conditional_acceptance"]) == gamma
            assert all(0.0 <= x <= 1.0 for x in r["conditional_acceptance"])
            assert 0 < r["num_tokens"] <= 3 * 12  # eos may stop a request early
        dom = data["domains"][label]
        assert dom["code"] == pytest.approx(data["results"][label]["humaneval"]["accepted_length"])
        assert dom["math"] == pytest.approx(data["results"][label]["gsm8k"]["accepted_length"])
        assert dom["mean"] == pytest.approx((dom["code"] + dom["math"]) / 2)
    assert set(data["gamma_sweep"]["ngram"]["humaneval"]) == {"2", "4", "8"}
    assert set(data["gamma_sweep"]["dspark"]["gsm8k"]) == {"2", "4"}
    # ngram, 16/2/4/8 x 2 sets = 8 cells; dspark 6/2/4 x 2 = 6.
    assert len(rep.computed) == 14 and not rep.skipped
    md = cfg.out.with_suffix(".md").read_text()
    assert "| drafter | γ | humaneval | code avg | gsm8k | math avg | mean |" in md
    assert md.count("\n| ngram |") == 1 and "| dspark | 6 |" in md
    for p in (cfg.out.with_suffix(".acceptance.png"), cfg.out.with_suffix(".tau_vs_gamma.png")):
        assert p.read_bytes()[:4] == b"\x89PNG"

    # Resume: nothing is decoded again, and the tables are unchanged.
    calls = []
    monkeypatch.setattr(acceptance, "run_cell", lambda *a, **k: calls.append(a) or pytest.fail("recomputed"))
    rep2 = evaluate(cfg, drafters(), target=target, progress=False)
    assert calls == [] and rep2.computed == [] and len(rep2.skipped) == 14
    assert json.loads(cfg.out.read_text())["results"] == data["results"]

    # A changed argument (max_tokens) is a new cell, not a stale hit.
    monkeypatch.undo()
    cfg3 = make_cfg(tmp_path, max_tokens=5, gammas=[], drafters=["ngram"])
    rep3 = evaluate(cfg3, {"ngram": "ngram"}, target=target, progress=False, plots=False)
    assert len(rep3.computed) == 2 and not rep3.skipped
    assert len(json.loads(cfg.out.read_text())["cells"]) == 16


def test_tau_matches_hand_computation(tmp_path, target):
    """τ and conditional acceptance from the code equal sums over the engine's per-request metrics."""
    from dspark.engine import Engine
    from dspark.sampling import SamplingParams

    prompts = prepare_prompts(CODE + MATH, target.tokenizer, target.context_length, 16)
    eng = Engine(target, max_num_seqs=3, drafter=acceptance.build_drafter("ngram", target, 3, 256))
    outs = acceptance.run_engine(eng, prompts.token_ids, [SamplingParams(temperature=0, max_tokens=16,
                                                                         num_speculative_tokens=5)] * 6)
    stats = pool_metrics(outs, 5)
    rounds = sum(o.metrics.rounds for o in outs)
    emitted = sum(o.metrics.accepted_drafts + o.metrics.rounds for o in outs)
    assert stats.accepted_length == pytest.approx(emitted / rounds)
    assert stats.accepted_drafts > 0  # the repetitive prompts make prompt lookup hit
    for k in range(5):
        tried = sum(o.metrics.tried_by_position[k] for o in outs if len(o.metrics.tried_by_position) > k)
        acc = sum(o.metrics.accepted_by_position[k] for o in outs if len(o.metrics.accepted_by_position) > k)
        assert stats.conditional_acceptance[k] == pytest.approx(acc / tried if tried else 0.0)
    # The per-set number in a results file is this same pooled τ.
    cfg = make_cfg(tmp_path, drafters=["ngram"], gammas=[], gamma=5, max_tokens=16, sets=["humaneval"],
                   batch_size=3)
    data = evaluate(cfg, {"ngram": "ngram"}, target=target, progress=False, plots=False).data
    sub = pool_metrics(outs[:3], 5)  # humaneval = the first three prompts, same seeds, greedy
    assert data["results"]["ngram"]["humaneval"]["accepted_length"] == pytest.approx(sub.accepted_length)


def test_errors_name_the_culprit(tmp_path, target):
    with pytest.raises(PromptSetError, match="nope"):
        evaluate(make_cfg(tmp_path, sets=["humaneval", "nope"]), drafters(), target=target, progress=False)
    missing = tmp_path / "no-such-dir"
    with pytest.raises(PromptSetError, match="no-such-dir"):
        load_prompt_set(missing, "humaneval")
    with pytest.raises(EvalError, match="zzz"):
        acceptance.resolve_drafter_arg("zzz")
    with pytest.raises(EvalError, match="num-prompts"):
        make_cfg(tmp_path, num_prompts=0)
    # A directory named like a bare name would silently replace it under one label: an error naming LABEL=DIR.
    (tmp_path / "dspark").mkdir()
    with pytest.raises(EvalError, match=r"both get the label 'dspark'.*LABEL=DIR"):
        acceptance.resolve_drafter_args(["dspark", str(tmp_path / "dspark")])
    assert list(acceptance.resolve_drafter_args(["dspark", f"new={tmp_path / 'dspark'}"])) == ["dspark", "new"]
    # The command line turns these into one line on stderr and exit status 2.
    rc = acceptance.main(["--drafters", "ngram", "--data-dir", str(missing), "--sets", "humaneval",
                          "--out", str(tmp_path / "x.json")])
    assert rc == 2


def test_bundled_name_for_another_target_names_drafter_and_target(target):
    # The bundled dflash checkpoint was trained for the demo target, not for this tiny one.
    label, spec = acceptance.resolve_drafter_arg("dflash")
    assert (label, spec) == ("dflash", "dflash")
    with pytest.raises(DSparkError, match=r"drafter 'dflash': no bundled dflash drafter for"):
        acceptance.build_drafter(spec, target, 1, 64)


def test_cli_main_runs(tmp_path, qwen3_ckpt, capsys):
    data_dir = write_sets(tmp_path / "data")
    out = tmp_path / "cli.json"
    argv = ["--drafters", "ngram", "--data-dir", str(data_dir), "--sets", "humaneval", "--num-prompts", "2",
            "--max-tokens", "6", "--gamma", "3", "--out", str(out), "--model", str(qwen3_ckpt.path),
            "--threads", "1", "--no-progress"]
    assert acceptance.main(argv) == 0
    text = capsys.readouterr().out
    assert "| ngram | 3 |" in text and "1 cells computed" in text
    assert json.loads(out.read_text())["config"]["threads"] == 1


def test_tau_ratios_pick_drafters_by_kind():
    domains = {"mine": {"code": 3.0, "mean": 2.0}, "base": {"code": 2.0, "mean": 1.6}, "e3": {"code": 1.5, "mean": None}}
    r = acceptance.tau_ratios(domains, {"mine": "dspark", "base": "dflash", "e3": "eagle3"})
    assert r["dspark/dflash"] == pytest.approx({"code": 1.5, "mean": 1.25})
    assert r["dspark/eagle3"] == {"code": 2.0, "mean": None}
    assert acceptance.tau_ratios(domains, {"base": "dflash"}) == {}


def test_training_curves_plot(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    for name, taus in (("a", [1.5, 2.0, 2.4]), ("b", [2.0, 2.8, 3.1])):
        d = tmp_path / name
        d.mkdir()
        evals = [{"step": 100 * (i + 1), "val_tau": t, "val_loss": 3.0 - t} for i, t in enumerate(taus)]
        (d / "training_log.json").write_text(json.dumps({"evals": evals}))
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "plot_training_curves.py"
    out = tmp_path / "curves.png"
    r = subprocess.run([sys.executable, str(script), "--out", str(out), f"A={tmp_path / 'a'}", f"B={tmp_path / 'b'}"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
    r = subprocess.run([sys.executable, str(script), "--out", str(out), f"C={tmp_path / 'missing'}"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "missing/training_log.json" in r.stderr


def test_resume_is_keyed_by_what_the_label_points_to(tmp_path, target):
    """Rerunning with `dspark=OTHER_DIR` recomputes: stored cells are tied to the drafter's files."""
    from helpers import untrained_dspark

    dirs = []
    for seed in (0, 1):
        d = untrained_dspark(target, 2, seed=seed, block_size=6)
        dirs.append(d.model.save_pretrained(tmp_path / f"d{seed}"))
    cfg = make_cfg(tmp_path, drafters=[f"dspark={dirs[0]}"], gammas=[], sets=["humaneval"])
    first = evaluate(cfg, target=target, progress=False, plots=False)
    assert len(first.computed) == 1
    again = evaluate(cfg, target=target, progress=False, plots=False)
    assert again.computed == [] and len(again.skipped) == 1
    other = evaluate(make_cfg(tmp_path, drafters=[f"dspark={dirs[1]}"], gammas=[], sets=["humaneval"]),
                     target=target, progress=False, plots=False)
    assert len(other.computed) == 1 and not other.skipped
    assert any("recomputed" in n for n in other.notes)


def test_threshold_sweep(tmp_path, target):
    """Figure 5: threshold:P cells for drafters with a confidence head; a higher P verifies fewer drafts
    per step and never lowers the acceptance rate much; P = 0 verifies every draft."""
    cfg = make_cfg(tmp_path, gammas=[], thresholds=[0.0, 0.3, 0.6], max_tokens=16)
    rep = evaluate(cfg, drafters(), target=target, progress=False)
    data = json.loads(cfg.out.read_text())
    assert any("ngram: no confidence head, so no threshold sweep" in n for n in data["notes"])
    sweep = data["threshold_sweep"]
    assert set(sweep) == {"dspark"} and set(sweep["dspark"]["humaneval"]) == {"0", "0.3", "0.6"}
    for s in ("humaneval", "gsm8k"):
        cells = sweep["dspark"][s]
        v = [cells[p]["verified_per_step"] for p in ("0", "0.3", "0.6")]
        assert v[0] >= v[1] >= v[2] and v[0] > v[2]
        static = data["results"]["dspark"][s]
        assert cells["0"]["verified_drafts"] == static["verified_drafts"]  # P = 0: every draft, as static
    assert len(rep.computed) == 2 * 2 + 3 * 2  # static cells of both drafters + dspark's sweep
    assert "Threshold sweep (policy threshold:P)" in rep.markdown and "| dspark | 0.3 |" in rep.markdown
    assert cfg.out.with_suffix(".threshold_sweep.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(EvalError, match=r"--thresholds must all be in \[0, 1\), got \[1.5\]"):
        make_cfg(tmp_path, thresholds=[1.5])
