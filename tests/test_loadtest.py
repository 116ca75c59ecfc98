"""`dspark loadtest`: every (policy, concurrency) row with its metrics, greedy outputs equal to plain
decoding's under every policy, the HTTP mode, the plots, and bad input named in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dspark.cli import main
from helpers import write_sets

REPO = Path(__file__).resolve().parent.parent
DEMO_TARGET = REPO / "models" / "dspark-demo-target"

KEYS = ("throughput_tokens_per_s", "per_user_tokens_per_s", "mean_verified_tokens_per_request", "ttft_p50_ms",
        "ttft_p99_ms")


def _argv(tmp_path, *extra):
    return ["loadtest", "--model", str(DEMO_TARGET), "--drafter", "dspark", "--data-dir",
            str(write_sets(tmp_path / "data")), "--set", "humaneval", "--requests-per-client", "2",
            "--max-tokens", "12", "--no-progress", "--out", str(tmp_path / "load.json"), *extra]


def test_loadtest_rows_for_every_policy_and_level(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    assert main(_argv(tmp_path, "--concurrency", "1,3", "--policies", "plain,fixed:1,threshold:0.5,confidence")) == 0
    printed = capsys.readouterr().out
    assert "| confidence | 3 |" in printed and "load.frontier.png" in printed
    data = json.loads((tmp_path / "load.json").read_text())
    rows = {(r["policy"], r["concurrency"]): r for r in data["results"]}
    assert set(rows) == {(p, c) for p in ("plain", "fixed:1", "threshold:0.5", "confidence") for c in (1, 3)}
    for key, r in rows.items():
        assert all(r[k] > 0 for k in KEYS), key
        assert r["requests"] == 2 * key[1] and r["completion_tokens"] == 12 * r["requests"]
        assert r["ttft_p99_ms"] >= r["ttft_p50_ms"]
        if key[0] != "plain":
            assert r["mismatches_vs_plain"] == 0, key  # lossless: the same greedy text as plain decoding
    assert rows[("plain", 1)]["mean_verified_tokens_per_request"] == 1.0
    assert 1.0 < rows[("fixed:1", 3)]["mean_verified_tokens_per_request"] <= 2.0
    assert rows[("confidence", 1)]["accepted_length"] >= 1.0
    assert set(data["checks"]) >= {"confidence_never_below_plain", "per_user_confidence_over_fixed1_at_1_client"}
    for suffix in (".frontier.png", ".budget.png"):
        assert (tmp_path / "load.json").with_suffix(suffix).read_bytes()[:4] == b"\x89PNG"


def test_loadtest_through_http(tmp_path, monkeypatch):
    pytest.importorskip("uvicorn")
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    assert main(_argv(tmp_path, "--concurrency", "2", "--policies", "plain,fixed:3", "--http")) == 0
    data = json.loads((tmp_path / "load.json").read_text())
    assert data["config"]["mode"] == "http"
    plain, fixed = data["results"]
    assert plain["statuses"] == {"200": 4} and fixed["statuses"] == {"200": 4}
    assert fixed["mismatches_vs_plain"] == 0 and 2.0 < fixed["mean_verified_tokens_per_request"] <= 4.0
    assert plain["mean_verified_tokens_per_request"] == 1.0


def test_loadtest_repeats_interleave_and_report_the_median_pass(tmp_path, monkeypatch):
    from dspark.server import loadtest as lt

    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    order = []
    real = lt.run_level

    def recording(engine, prompts, c, cfg, on_done, label):
        order.append((str(engine.policy), c))
        return real(engine, prompts, c, cfg, on_done, label)

    monkeypatch.setattr(lt, "run_level", recording)
    assert main(_argv(tmp_path, "--concurrency", "1,2", "--policies", "plain,fixed:2", "--repeats", "3")) == 0
    # Every pass runs each level under every policy back to back, then the next pass; every other
    # pass in the reverse order of policies (ABBA).
    one_pass = [("plain", 1), ("fixed:2", 1), ("plain", 2), ("fixed:2", 2)]
    reverse = [("fixed:2", 1), ("plain", 1), ("fixed:2", 2), ("plain", 2)]
    assert order == one_pass + reverse + one_pass
    data = json.loads((tmp_path / "load.json").read_text())
    assert data["config"]["repeats"] == 3 and len(data["results"]) == 4
    for r in data["results"]:
        passes = r["throughput_all_passes"]
        assert len(passes) == 3 and r["throughput_tokens_per_s"] == sorted(passes)[1]
        if r["policy"] != "plain":
            assert r["mismatches_vs_plain"] == 0


@pytest.mark.parametrize("extra, match", [
    (["--concurrency", "0,2"], r"--concurrency needs levels >= 1, got \[0, 2\]"),
    (["--policies", "plain,fast"], "unknown verification policy 'fast'"),
    (["--policies", "fixed:9"], r"policy fixed:9 verifies more drafts than γ = 7"),
    (["--requests-per-client", "0"], "--requests-per-client must be >= 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--set", "nosuchset"], "nosuchset"),
])
def test_loadtest_bad_input_is_one_line(tmp_path, capsys, extra, match):
    import re

    assert main(_argv(tmp_path, "--concurrency", "1", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dspark loadtest: error:") and re.search(match, err), err


@pytest.mark.parametrize("http", [False, True])
def test_loadtest_steps_the_engine_on_the_thread_that_loaded_the_model(tmp_path, monkeypatch, http):
    """The engine steps on the calling thread (ServingEngine.run_here), the clients (and the HTTP
    server) beside it: a second thread starting OpenMP teams makes libgomp put its workers to sleep
    between parallel sections, which halved SmolLM2's decode speed in the serving loop."""
    import threading

    from dspark.engine import Engine

    if http:
        pytest.importorskip("uvicorn")
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    stepped_on = set()
    real = Engine.step

    def step(self):
        stepped_on.add(threading.current_thread().name)
        return real(self)

    monkeypatch.setattr(Engine, "step", step)
    argv = _argv(tmp_path, "--concurrency", "2", "--policies", "plain,fixed:2") + (["--http"] if http else [])
    assert main(argv) == 0
    assert stepped_on == {threading.current_thread().name}
    data = json.loads((tmp_path / "load.json").read_text())
    assert all(r["statuses"] == {"200": 4} for r in data["results"])


def test_load_checks_pair_the_policies_pass_by_pass():
    """The cells' medians can rank two policies one way while pass by pass (each pass runs both back to
    back) the other wins every time: the paired checks take each pass's ratio, then the median."""
    from dspark.server.loadtest import load_checks

    def row(policy, passes):
        return {"policy": policy, "concurrency": 4, "per_user_tokens_per_s": 1.0,
                "throughput_tokens_per_s": sorted(passes)[(len(passes) - 1) // 2], "throughput_all_passes": passes}

    rows = [row("plain", [100.0, 130.0, 160.0]), row("fixed:1", [90.0, 120.0, 200.0]),
            row("confidence", [101.0, 129.0, 161.0])]
    checks = load_checks(rows)
    assert checks["confidence_never_below_plain"] is False  # medians: 129 < 130
    assert checks["confidence_over_plain_paired"] == {"4": round(161 / 160, 4)}  # ratios 1.01, 0.992, 1.006
    assert checks["confidence_never_below_plain_paired"] is True
    assert checks["confidence_vs_best_fixed_paired"] == {"4": round(129 / 120, 4)}  # 1.12, 1.075, 0.805
    assert checks["confidence_within_5pct_of_best_fixed_paired"] is True
    single = load_checks([dict(r, throughput_all_passes=None) for r in rows])
    assert "confidence_over_plain_paired" not in single and "confidence_never_below_plain" in single
