"""Sequential Temperature Scaling and `dspark calibrate`: STS lowers held-out ECE on miscalibrated
data, respects the masking after a rejection, leaves calibrated data alone; the command records
rounds on the demo pair, writes calib.json, the reliability PNG and the drafter's calibration.json
(which loading applies), and bad input gets one line naming it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dspark.cli import main
from dspark.schedule import (calibrated_survival, expected_calibration_error, joint_outcomes,
                             sequential_temperature_scaling)
from helpers import write_sets

REPO = Path(__file__).resolve().parent.parent
DEMO_TARGET = REPO / "models" / "dspark-demo-target"
DEMO_DRAFTER = REPO / "models" / "dspark-demo-drafter"


def synthetic(n: int, gamma: int, sharpen: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rounds whose true conditional acceptance is p_k; the reported logits are sharpened by
    `sharpen` (> 1: over-confident). Outcomes after the first rejection are NaN (not verified)."""
    g = torch.Generator().manual_seed(seed)
    p = 0.35 + 0.6 * torch.rand(n, gamma, generator=g, dtype=torch.float64)
    z = torch.logit(p) * sharpen
    acc = (torch.rand(n, gamma, generator=g, dtype=torch.float64) < p).double()
    prior = torch.cat([torch.ones(n, 1, dtype=torch.float64), torch.cumprod(acc, 1)[:, :-1]], 1)
    return z, torch.where(prior.bool(), acc, torch.full_like(acc, float("nan")))


def mean_ece(z, acc, temps) -> float:
    valid, y = joint_outcomes(z, acc)
    surv = calibrated_survival(z, temps)
    return sum(float(expected_calibration_error(surv[valid[:, k], k], y[valid[:, k], k]))
               for k in range(z.shape[1])) / z.shape[1]


def test_sts_lowers_held_out_ece_of_overconfident_scores():
    z, acc = synthetic(6000, 5, sharpen=3.0, seed=0)
    temps = sequential_temperature_scaling(z[:3000], acc[:3000])
    assert temps.shape == (5,) and bool((temps > 1.5).all())  # over-confident: temperatures above 1
    before, after = mean_ece(z[3000:], acc[3000:], None), mean_ece(z[3000:], acc[3000:], temps)
    assert before > 0.08 and after < 0.03 and after < before / 4, (before, after)


def test_sts_leaves_calibrated_scores_nearly_alone():
    z, acc = synthetic(8000, 4, sharpen=1.0, seed=1)
    temps = sequential_temperature_scaling(z, acc)
    assert all(0.7 < t < 1.4 for t in temps.tolist()), temps


def test_sts_respects_the_mask():
    z, acc = synthetic(3000, 4, sharpen=2.0, seed=2)
    temps = sequential_temperature_scaling(z, acc)
    # What a row holds after its first rejection is ignored (marked 1, 0 or -1 instead of NaN) ...
    after_reject = torch.isnan(acc)
    for fill in (1.0, 0.0, -1.0):
        assert torch.equal(sequential_temperature_scaling(z, torch.where(after_reject, fill, acc)), temps)
    # ... and positions not drafted (NaN logits, e.g. ℓ < γ near max_tokens) drop out from there on.
    z_cut = z.clone()
    z_cut[:1500, 2:] = float("nan")
    t_cut = sequential_temperature_scaling(z_cut, acc)
    assert torch.equal(t_cut[:2], temps[:2])  # earlier positions still use every row
    valid, _ = joint_outcomes(z_cut, acc)
    assert not valid[:1500, 2:].any() and valid[:, :2].all()


def test_sts_checks_shapes():
    from dspark.schedule import ScheduleError

    with pytest.raises(ScheduleError, match=r"both be \[N, gamma\]"):
        sequential_temperature_scaling(torch.zeros(3, 4), torch.zeros(3, 5))


# ---- dspark calibrate ---------------------------------------------------------------------------------

@pytest.fixture()
def drafter_copy(tmp_path) -> Path:
    d = tmp_path / "drafter"
    d.mkdir()
    shutil.copy(DEMO_DRAFTER / "config.json", d / "config.json")
    (d / "model.safetensors").symlink_to(DEMO_DRAFTER / "model.safetensors")
    return d


def test_calibrate_writes_results_and_the_drafter_applies_them(tmp_path, drafter_copy, capsys):
    data = write_sets(tmp_path / "data")
    out = tmp_path / "calib.json"
    argv = ["calibrate", "--model", str(DEMO_TARGET), "--drafter", str(drafter_copy), "--data-dir", str(data),
            "--sets", "humaneval,gsm8k", "--num-prompts", "3", "--max-tokens", "24", "--out", str(out),
            "--no-progress", "--batch-size", "6"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mean ECE" in printed and str(out) in printed
    res = json.loads(out.read_text())
    gamma = 7
    for key in ("temperatures", "ece_before", "ece_after", "roc_auc", "brier_before", "brier_after"):
        assert len(res[key]) == gamma, key
    assert all(t > 0 for t in res["temperatures"])
    assert res["held_out_rounds"] > 0 and res["fit"]["rounds"] > 0
    assert 0 <= res["mean_ece_before"] <= 1 and 0 <= res["mean_ece_after"] <= 1
    assert out.with_suffix(".reliability.png").read_bytes()[:4] == b"\x89PNG"
    stored = json.loads((drafter_copy / "calibration.json").read_text())
    kept = res["stored_temperatures"]  # the fit, unless it raised the held-out ECE (then T = 1)
    assert kept == (res["temperatures"] if res["mean_ece_after"] <= res["mean_ece_before"] else [1.0] * gamma)
    assert stored["temperatures"] == kept

    from dspark.drafters import load_drafter
    from dspark.models import load_target

    target = load_target(DEMO_TARGET)
    d = load_drafter(drafter_copy, target, max_seqs=1, max_len=64)
    assert d.confidence_temperatures.tolist() == pytest.approx(kept, rel=1e-6)
    (drafter_copy / "calibration.json").rename(tmp_path / "kept.json")
    assert load_drafter(drafter_copy, target, max_seqs=1, max_len=64).confidence_temperatures is None  # raw head
    (tmp_path / "kept.json").rename(drafter_copy / "calibration.json")
    bundled = json.loads((DEMO_DRAFTER / "calibration.json").read_text())["temperatures"]  # committed, applied
    assert load_drafter(DEMO_DRAFTER, target, 1, 64).confidence_temperatures.tolist() == pytest.approx(bundled)
    # The stored temperatures are what the proposal's confidences use: c_k = σ(z_k / T_k).
    from dspark.sampling import SamplingParams, SamplingTensors

    ids = target.tokenizer.encode("def add(a, b):")
    cache = target.new_cache(1, 64)
    res_t = target.forward(cache, [cache.allocate()], [ids], hidden_layer_ids=d.target_layer_ids)
    d.add_sequence(0, ids, res_t.hidden[0])
    greedy = SamplingTensors.from_params([SamplingParams(temperature=0)])
    prop = d.propose([0], [ids[-1]], [gamma], greedy, [None])
    want = torch.sigmoid(prop.confidence_logits.float() / torch.tensor(kept, dtype=torch.float32))
    assert torch.allclose(prop.confidence, want, atol=1e-6)


def test_a_fit_that_raises_the_held_out_ece_is_not_stored():
    """STS is fitted on half the prompts; the drafter keeps its raw head (T = 1) when the fit calibrates the
    other half worse than no fit at all, and the fit otherwise."""
    from dspark.eval.calibrate import stored_temperatures

    fit = [20.0, 0.65, 1.6]
    assert stored_temperatures(fit, 0.0156, 0.0205) == [1.0, 1.0, 1.0]
    assert stored_temperatures(fit, 0.0253, 0.0216) == fit
    assert stored_temperatures(fit, 0.02, 0.02) == fit
    assert stored_temperatures(fit, None, None) == fit


@pytest.mark.parametrize("extra, match", [
    (["--drafter", "ngram"], "the ngram drafter has no confidence head to calibrate"),
    (["--holdout", "1.5"], r"--holdout must be in \(0, 1\), got 1.5"),
    (["--sets", "nosuchset"], "nosuchset"),
    (["--num-prompts", "0"], "--num-prompts must be >= 1"),
])
def test_calibrate_bad_input_is_one_line(tmp_path, drafter_copy, capsys, extra, match):
    import re

    data = write_sets(tmp_path / "data")
    argv = ["calibrate", "--model", str(DEMO_TARGET), "--drafter", str(drafter_copy), "--data-dir", str(data),
            "--sets", "humaneval", "--num-prompts", "2", "--max-tokens", "8", "--out", str(tmp_path / "c.json"),
            "--no-progress", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dspark calibrate: error:") and re.search(match, err), err
    assert not (drafter_copy / "calibration.json").exists()


def test_bad_calibration_file_is_named(tmp_path, drafter_copy):
    from dspark.drafters import load_drafter
    from dspark.errors import CheckpointError
    from dspark.models import load_target

    target = load_target(DEMO_TARGET)
    for body, match in (('{"temperatures": [1, 2]}', "has 2 values; the drafter's block_size is 7"),
                        ('{"temps": []}', "missing key 'temperatures'"),
                        ('{"temperatures": [1, 1, 1, 1, 1, 1, -1]}', "positive finite"), ("{", "not valid JSON")):
        (drafter_copy / "calibration.json").write_text(body)
        with pytest.raises(CheckpointError, match=f"calibration.json.*{match}"):
            load_drafter(drafter_copy, target, max_seqs=1, max_len=64)
