"""`dspark calibrate`: Sequential Temperature Scaling of a drafter's confidence head (paper §3.2.1,
Figure 6), fitted on held-out prompts and stored with the drafter.

Usage:

    dspark calibrate --model models/dspark-demo-target --drafter dspark --data-dir ../shared/benchmarks \\
        --sets humaneval,gsm8k,mt-bench --num-prompts 40 --max-tokens 128 --out runs/calib.json
    python -m dspark.eval.calibrate ...            # the same, without the `dspark` entry point

Speculative rounds run with every draft verified (policy `static`), on prompts the drafter was not
trained on (the benchmark sets; never its training data). Each round records, per request, the
confidence head's raw logits z_1..z_ℓ and how many drafts the target accepted. The prompts are split
(every other prompt by default, --holdout): Sequential Temperature Scaling fits one temperature per
draft position on the first part (`dspark.schedule.sequential_temperature_scaling`), and the
metrics are measured on the held-out part, before (T = 1) and after:

  * ECE of the survival a_k = Π_{i≤k} σ(z_i / T_i) against "drafts 1..k all accepted" (15 bins),
  * ROC-AUC of a_k (discrimination; temperature scaling barely changes it), Brier score.

Writes --out (`temperatures`, `ece_before`, `ece_after`, `roc_auc`, `brier_before`, `brier_after`,
lists by position, their means, and the reliability bins), the reliability diagrams
`<out>.reliability.png`, and `calibration.json` in the drafter's directory (unless --no-store):
loading the drafter then applies c_k = σ(z_k / T_k), which the `threshold:P` and `confidence`
policies read. Calibration depends on the sampling temperature it was measured at (stored too).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dspark.entry import module_main
from dspark.eval.acceptance import EvalError, build_drafter, resolve_drafter_arg, run_engine
from dspark.eval.prompts import load_prompt_set, prepare_prompts

RELIABILITY_BINS = 10  # the diagram's bins (ECE itself uses dspark.schedule.ECE_BINS)


@dataclass
class CalibrateConfig:
    drafter: str
    data_dir: Path
    sets: list[str]
    out: Path
    num_prompts: int = 40
    max_tokens: int = 128
    temperature: float = 0.0
    holdout: float = 0.5
    model: str | None = None
    batch_size: int = 8
    seed: int = 0
    store: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        self.data_dir, self.out = Path(self.data_dir), Path(self.out)
        for name, v in (("--num-prompts", self.num_prompts), ("--max-tokens", self.max_tokens),
                        ("--batch-size", self.batch_size)):
            if v < 1:
                raise EvalError(f"{name} must be >= 1, got {v}")
        if not 0.0 < self.holdout < 1.0:
            raise EvalError(f"--holdout must be in (0, 1), got {self.holdout}")
        if self.temperature < 0:
            raise EvalError(f"--temperature must be >= 0, got {self.temperature}")
        if not self.sets:
            raise EvalError("--sets is empty")


@dataclass
class Recorded:
    """Rounds of one split: raw confidence logits and outcomes, [rounds, γ] (NaN past what was drafted)."""

    logits: list[list[float]] = field(default_factory=list)
    accepted: list[list[float]] = field(default_factory=list)

    def add(self, z: list[float], num_verified: int, num_accepted: int, gamma: int) -> None:
        nan = float("nan")
        row = [nan] * gamma
        row[:len(z)] = z
        outcome = [1.0] * num_accepted + ([0.0] if num_accepted < num_verified else [])
        self.logits.append(row)
        self.accepted.append(outcome + [nan] * (gamma - len(outcome)))


def is_held_out(i: int, fraction: float) -> bool:
    """Prompt i is held out when it crosses a multiple of 1/fraction: an evenly spread `fraction`."""
    return math.floor((i + 1) * fraction) > math.floor(i * fraction)


def roc_auc(score: Any, y: Any) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None with one class only."""
    import numpy as np

    score, y = np.asarray(score, dtype=np.float64), np.asarray(y) == 1
    n1, n0 = int(y.sum()), int((~y).sum())
    if not n1 or not n0:
        return None
    _, inv, counts = np.unique(score, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = ((ends - counts + 1 + ends) / 2.0)[inv]
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def calibration_metrics(logits, accepted, temperatures) -> dict[str, list]:
    """Per position: samples, ECE, ROC-AUC, Brier of the survival under `temperatures` (None: raw),
    and reliability bins (mean predicted, observed, count)."""
    import torch

    from dspark.schedule import calibrated_survival, expected_calibration_error, joint_outcomes

    z = torch.as_tensor(logits, dtype=torch.float64)
    valid, y = joint_outcomes(z, accepted)
    surv = calibrated_survival(z, temperatures)
    out: dict[str, list] = {"samples": [], "ece": [], "roc_auc": [], "brier": [], "reliability": []}
    for k in range(z.shape[1]):
        m = valid[:, k]
        p, o = surv[m, k], y[m, k]
        out["samples"].append(int(m.sum()))
        if not int(m.sum()):
            for key in ("ece", "roc_auc", "brier"):
                out[key].append(None)
            out["reliability"].append({"predicted": [], "observed": [], "count": []})
            continue
        out["ece"].append(float(expected_calibration_error(p, o)))
        out["roc_auc"].append(roc_auc(p.numpy(), o.numpy()))
        out["brier"].append(float(((p - o) ** 2).mean()))
        idx = (p * RELIABILITY_BINS).long().clamp(0, RELIABILITY_BINS - 1)
        bins: dict[str, list] = {"predicted": [], "observed": [], "count": []}
        for b in range(RELIABILITY_BINS):
            sel = idx == b
            bins["count"].append(int(sel.sum()))
            bins["predicted"].append(float(p[sel].mean()) if sel.any() else None)
            bins["observed"].append(float(o[sel].mean()) if sel.any() else None)
        out["reliability"].append(bins)
    return out


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def record_rounds(engine, prompts: list[list[int]], held_out: list[bool], params, gamma: int,
                  progress: bool) -> tuple[Recorded, Recorded]:
    """Decode every prompt with every draft verified; (fit rounds, held-out rounds)."""
    from tqdm import tqdm

    seen: list[tuple[Any, list[float], int, int]] = []  # (request id, z_1..z_ℓ, ℓ, accepted) per round

    def observe(rec) -> None:
        if rec.confidence_logits is not None:
            seen.extend((rid, z[:v], v, a) for rid, z, v, a in zip(rec.request_ids, rec.confidence_logits,
                                                                  rec.num_verified, rec.num_accepted) if v)

    engine.round_observers.append(observe)
    try:
        with tqdm(total=len(prompts), desc="calibration rounds", unit="prompt", disable=not progress) as bar:
            outs = run_engine(engine, prompts, params, bar)
    finally:
        engine.round_observers.remove(observe)
    split = {o.request_id: h for o, h in zip(outs, held_out)}
    fit, test = Recorded(), Recorded()
    for rid, z, v, a in seen:
        (test if split[rid] else fit).add(z, v, a, gamma)
    return fit, test


def calibrate(cfg: CalibrateConfig, *, target=None, drafter=None, progress: bool = True,
              plots: bool = True) -> dict[str, Any]:
    """Record, fit, measure and write (see the module docstring); returns what --out holds.
    `target` / `drafter`: ready objects instead of cfg.model / cfg.drafter (tests)."""
    import torch

    from dspark.engine import Engine
    from dspark.sampling import SamplingParams
    from dspark.schedule import sequential_temperature_scaling
    from dspark.train.checkpoint import atomic_write_text, check_writable

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    texts = {s: load_prompt_set(cfg.data_dir, s, cfg.num_prompts) for s in cfg.sets}
    check_writable(cfg.out, "--out")
    if target is None:
        from dspark.bundled import default_model_path
        from dspark.models import load_target
        target = load_target(Path(cfg.model) if cfg.model else default_model_path())
    prepared = {s: prepare_prompts(t, target.tokenizer, target.context_length, cfg.max_tokens)
                for s, t in texts.items()}
    prompts = [ids for p in prepared.values() for ids in p.token_ids]
    max_len = min(target.context_length, max(len(p) for p in prompts) + cfg.max_tokens)
    if drafter is None:
        _, spec = resolve_drafter_arg(cfg.drafter)
        drafter = build_drafter(spec, target, cfg.batch_size, max_len)
    if not getattr(drafter, "has_confidence", False):
        raise EvalError(f"--drafter {cfg.drafter}: the {drafter.name} drafter has no confidence head to calibrate")
    store_dir = getattr(drafter, "source_path", None)
    if cfg.store and store_dir is None:
        raise EvalError(f"--drafter {cfg.drafter} is not a drafter directory to store calibration.json in; "
                        "pass --no-store to only write --out")
    if cfg.store:
        check_writable(Path(store_dir) / "calibration.json", "--drafter")
    drafter.set_confidence_temperatures(None)  # record the head's raw logits, not an older calibration
    gamma = drafter.block_size
    held_out = [is_held_out(i, cfg.holdout) for i in range(len(prompts))]
    if all(held_out) or not any(held_out):
        raise EvalError(f"--holdout {cfg.holdout} leaves no prompt to {'fit on' if all(held_out) else 'hold out'} "
                        f"({len(prompts)} prompts); raise --num-prompts")
    engine = Engine(target, max_num_seqs=cfg.batch_size, max_model_len=max_len, drafter=drafter, policy="static")
    params = [SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=cfg.seed + i)
              for i in range(len(prompts))]
    fit, test = record_rounds(engine, prompts, held_out, params, gamma, progress)
    if not fit.logits or not test.logits:
        raise EvalError("no speculative rounds were recorded on the fit or the held-out prompts; raise "
                        "--num-prompts or --max-tokens")
    temps = sequential_temperature_scaling(torch.tensor(fit.logits), torch.tensor(fit.accepted)).tolist()
    before = calibration_metrics(test.logits, test.accepted, None)
    after = calibration_metrics(test.logits, test.accepted, temps)
    fit_after = calibration_metrics(fit.logits, fit.accepted, temps)
    result: dict[str, Any] = {
        "temperatures": temps,
        "ece_before": before["ece"], "ece_after": after["ece"],
        "mean_ece_before": _mean(before["ece"]), "mean_ece_after": _mean(after["ece"]),
        "roc_auc": after["roc_auc"], "roc_auc_before": before["roc_auc"],
        "mean_roc_auc": _mean(after["roc_auc"]),
        "brier_before": before["brier"], "brier_after": after["brier"],
        "mean_brier_before": _mean(before["brier"]), "mean_brier_after": _mean(after["brier"]),
        "samples_by_position": after["samples"],
        "fit": {"rounds": len(fit.logits), "ece_after": fit_after["ece"], "samples_by_position": fit_after["samples"]},
        "held_out_rounds": len(test.logits),
        "reliability": {"before": before["reliability"], "after": after["reliability"]},
        "config": {"drafter": cfg.drafter, "model": str(target.path) if target.path else cfg.model,
                   "sets": cfg.sets, "num_prompts": cfg.num_prompts, "max_tokens": cfg.max_tokens,
                   "temperature": cfg.temperature, "holdout": cfg.holdout, "seed": cfg.seed,
                   "gamma": gamma, "threads": torch.get_num_threads()},
    }
    # What is stored: the fitted temperatures where they calibrate the held-out rounds better than the raw
    # head, else none (T = 1): on a small or noisy fit the ECE objective can pick a temperature that
    # flattens a position's confidences (seen: T_1 = 20 on SmolLM2's seventh drafter, held-out mean ECE
    # 1.56% -> 2.05%), which would hide from the scheduler what the head knows.
    kept = stored_temperatures(temps, result["mean_ece_before"], result["mean_ece_after"])
    result["stored_temperatures"] = kept
    drafter.set_confidence_temperatures(kept)
    atomic_write_text(cfg.out, json.dumps(result, indent=1) + "\n")
    paths = {"json": cfg.out}
    if plots:
        from dspark.eval.plots import plot_reliability
        paths["png"] = plot_reliability(result, cfg.out.with_suffix(".reliability.png"))
    if cfg.store:
        stored = {"temperatures": kept, "method": "sequential temperature scaling" if kept == temps else
                  "none: sequential temperature scaling raised the held-out ECE (fitted: " +
                  ", ".join(f"{t:.3g}" for t in temps) + ")",
                  "mean_ece_before": result["mean_ece_before"], "mean_ece_after": result["mean_ece_after"],
                  "sampling_temperature": cfg.temperature, "sets": cfg.sets, "num_prompts": cfg.num_prompts}
        paths["calibration"] = Path(store_dir) / "calibration.json"
        atomic_write_text(paths["calibration"], json.dumps(stored, indent=1) + "\n")
    result["paths"] = {k: str(v) for k, v in paths.items()}
    return result


def stored_temperatures(fitted: list[float], mean_ece_before: float | None,
                        mean_ece_after: float | None) -> list[float]:
    """The temperatures stored with the drafter: the fitted ones when they lower the held-out mean ECE
    (or nothing was measured to say otherwise), else T = 1 at every position (the raw head)."""
    if mean_ece_before is not None and mean_ece_after is not None and mean_ece_after > mean_ece_before:
        return [1.0] * len(fitted)
    return list(fitted)


def _fmt(xs: list, pct: bool = True) -> str:
    return ", ".join("–" if x is None else (f"{100 * x:.1f}%" if pct else f"{x:.3f}") for x in xs)


def summary_lines(result: dict[str, Any]) -> list[str]:
    b, a = result["mean_ece_before"], result["mean_ece_after"]
    return [f"temperatures by position: {', '.join(f'{t:.3g}' for t in result['temperatures'])}",
            f"held-out ECE by position: before {_fmt(result['ece_before'])}; after {_fmt(result['ece_after'])}",
            f"mean ECE {100 * b:.2f}% -> {100 * a:.2f}%; ROC-AUC {_fmt(result['roc_auc'], False)}; mean Brier "
            f"{result['mean_brier_before']:.4f} -> {result['mean_brier_after']:.4f} "
            f"({result['held_out_rounds']} held-out rounds, {result['fit']['rounds']} fitted)"] + \
        (["stored: T = 1 at every position (the fitted temperatures raised the held-out ECE)"]
         if result["stored_temperatures"] != result["temperatures"] else [])


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dspark.bundled import MODEL_HELP
    from dspark.eval.acceptance import _csv

    p.add_argument("--drafter", required=True,
                   help="drafter with a confidence head: a bundled name (dspark, dspark-5l) or a directory")
    p.add_argument("--data-dir", type=Path, required=True, help="directory of benchmark prompt sets (*.jsonl)")
    p.add_argument("--sets", type=_csv, default=["humaneval", "gsm8k", "mt-bench"],
                   help="comma-separated held-out sets (files SET.jsonl in --data-dir) "
                        "(default: humaneval,gsm8k,mt-bench)")
    p.add_argument("--num-prompts", type=int, default=40, help="first N prompts of each set (default: 40)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature the calibration is for; 0 = greedy (default: 0)")
    p.add_argument("--holdout", type=float, default=0.5,
                   help="fraction of the prompts held out to measure the calibration on (default: 0.5)")
    p.add_argument("--out", type=Path, default=Path("runs/calib.json"),
                   help="results JSON; the reliability PNG goes next to it (default: runs/calib.json)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--batch-size", type=int, default=8, help="requests decoded together (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed; prompt i uses seed+i (default: 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-store", dest="store", action="store_false",
                   help="only write --out; leave the drafter directory as it is")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> CalibrateConfig:
    return CalibrateConfig(drafter=args.drafter, data_dir=args.data_dir, sets=args.sets, out=args.out,
                           num_prompts=args.num_prompts, max_tokens=args.max_tokens, temperature=args.temperature,
                           holdout=args.holdout, model=args.model, batch_size=args.batch_size, seed=args.seed,
                           store=args.store, threads=args.threads)


def run(args: argparse.Namespace) -> int:
    """`dspark calibrate`: exit status 0."""
    result = calibrate(config_from_args(args), progress=not args.no_progress)
    for line in summary_lines(result):
        print(line)
    print("wrote " + ", ".join(result["paths"].values()))
    return 0


def main(argv: list[str] | None = None) -> int:
    return module_main(argv, prog="python -m dspark.eval.calibrate", description=__doc__, add_arguments=add_arguments,
                       run=run, label="dspark calibrate: error")


if __name__ == "__main__":
    sys.exit(main())
