"""`dspark eval`: accepted length τ and conditional acceptance per drafter and prompt set (paper
Table 1, Figures 2 and 4).

Usage:

    dspark eval --drafters dspark,dflash,eagle3 --data-dir ../shared/benchmarks \\
        --sets humaneval,mbpp,gsm8k,math500,mt-bench --num-prompts 20 --temperature 0 \\
        --max-tokens 256 --out runs/eval.json [--gamma 16] [--gammas 4,8,12,16] [--thresholds 0,0.2,0.4,0.6,0.8]
    python -m dspark.eval.acceptance ...           # the same, without the `dspark` entry point

A drafter is a bare name (`dspark`, `dflash`, `eagle3`, `draft-model`, `dspark-5l`, `dflash-5l`: the
bundled checkpoint of that kind trained for the target; `ngram`: prompt lookup, no checkpoint), a
drafter directory, or `LABEL=DIR` to name a directory in the tables.

For each (drafter, set, γ) cell the first N prompts of the set (first turn; chat-templated when the
target has a template, cut from the left when too long) are decoded in batches of --batch-size,
and the per-request counters are pooled over the set:

    τ = Σ (accepted_drafts + rounds) / Σ rounds           (tokens per round, bonus included)
    conditional acceptance at k = Σ accepted_at_k / Σ tried_at_k      (P(k | 1..k−1 accepted))

Pooling (rather than averaging per-request τ) weights every verification round equally, as the
paper's tables do. Per-domain τ is the macro average over the sets given for that domain.

Every finished cell is written to --out at once (atomically), so an interrupted run picks up where it
stopped: rerunning with the same arguments skips cells already there. Next to the JSON go a Markdown
table (`.md`, also printed), `<out>.acceptance.png` (Figure 2), with --gammas
`<out>.tau_vs_gamma.png` (Figure 4), and with --thresholds `<out>.threshold_sweep.png` (Figure 5):
each drafter with a confidence head decodes every set again under the verification policy
`threshold:P` for each P (verify draft j while its calibrated survival Π_{i≤j} c_i stays above P;
P = 0 verifies every draft), and the sweep reports draft tokens verified and accepted per step and
the acceptance rate (accepted / verified), pooled over each domain's sets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from dspark.entry import module_main
from dspark.errors import DSparkError
from dspark.eval.prompts import DOMAIN_ORDER, PreparedPrompts, domain_of, load_prompt_set, prepare_prompts

if TYPE_CHECKING:
    from dspark.drafters import Drafter
    from dspark.engine import Engine, RequestOutput
    from dspark.models import TargetModel
    from dspark.sampling import SamplingParams

# A drafter for the Python API: a name or directory, a ready Drafter, or a factory called as
# factory(target, max_seqs, max_len) (tests build untrained drafters this way, without checkpoints).
DrafterFactory = Callable[["TargetModel", int, int], "Drafter"]
DrafterSpec = Union[str, os.PathLike, "Drafter", DrafterFactory]

_REPO_ROOT = Path(__file__).resolve().parent.parent.parent
VANILLA = "vanilla"


class EvalError(DSparkError, ValueError):
    """Bad evaluation arguments or an unusable results file; the message names the culprit."""


# ---------------------------------------------------------------------------------------------------
# Drafters and the engine loop (shared with `dspark bench`)


def resolve_drafter_arg(arg: str) -> tuple[str, str | Path]:
    """Command-line drafter -> (label, spec). A bare name (`dspark`, `dflash`, ..., `ngram`) stays a name:
    `build_drafter` picks the bundled checkpoint of that kind trained for the loaded target, as
    `dspark generate` and `LLM(drafter=...)` do (`dspark.bundled.resolve_drafter`); names come first,
    so a directory that happens to share one never shadows it."""
    from dspark.bundled import NO_DRAFTER, is_bundled_name, is_weightless_name, known_drafter_names

    arg = arg.strip()
    if "=" in arg:
        label, _, src = arg.partition("=")
        if not label or not src:
            raise EvalError(f"drafter {arg!r}: expected LABEL=DIR")
        return label, Path(src)
    if is_bundled_name(arg) or is_weightless_name(arg):
        return arg, arg
    if Path(arg).is_dir():
        return Path(arg).name, Path(arg)
    known = known_drafter_names()
    hint = "; `dspark bench` times plain decoding as `vanilla`" if arg.lower() in NO_DRAFTER else ""
    raise EvalError(f"drafter {arg!r} is neither a directory nor a known name ({', '.join(known)}){hint}")


def resolve_drafter_args(args: Sequence[str]) -> dict[str, str | Path]:
    """`resolve_drafter_arg` for each of --drafters, by label; two drafters under one label (a directory
    named like a bare name, or two directories with one name) are an error naming the LABEL=DIR form,
    since the second would silently replace the first."""
    specs: dict[str, str | Path] = {}
    for a in args:
        label, spec = resolve_drafter_arg(a)
        if label in specs:
            raise EvalError(f"--drafters: {a!r} and {str(specs[label])!r} both get the label {label!r}; name one "
                            f"with LABEL=DIR (e.g. {label}-new={spec})")
        specs[label] = spec
    return specs


def build_drafter(spec: DrafterSpec, target: "TargetModel", max_seqs: int, max_len: int) -> "Drafter":
    if hasattr(spec, "propose") and not isinstance(spec, type):
        return spec  # a ready Drafter object
    if callable(spec):
        return spec(target, max_seqs, max_len)
    from dspark.bundled import resolve_drafter
    from dspark.drafters import load_drafter

    source = resolve_drafter(spec, target) if isinstance(spec, str) else spec
    if source is None:
        raise EvalError(f"drafter {spec!r} means plain decoding; it has no acceptance to measure")
    drafter = load_drafter(source, target, max_seqs=max_seqs, max_len=max_len)
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        drafter.source_path = Path(source)  # what `dspark eval` keys stored results by
    return drafter


def _digest(obj: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def files_identity(path: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime_ns) of the files in a model or drafter directory (or of one file)."""
    from dspark.models.gguf import file_identity

    path = Path(path)
    files = [path] if path.is_file() else sorted(f for f in path.iterdir() if f.is_file())
    return [tuple(file_identity(f).values()) for f in files]


def target_identity(target: "TargetModel") -> dict[str, Any]:
    src = target.source if target.source is not None else target.path
    ident = {"files": files_identity(src) if src is not None and Path(src).exists() else str(src),
             "dtype": str(target.dtype), "cpu_gemm": target.cpu_gemm,
             "attention": getattr(target, "attention", "sdpa")}
    # The fused C layer parts compute the same model in another float rounding (named only when on,
    # so the identities of other targets, and the caches keyed by them, stay as they were).
    fused = getattr(getattr(target, "transformer", None), "num_fused_layers", 0)
    if fused:
        ident["fused_layers"] = fused
    kv = getattr(target, "kv_cache_dtype", target.dtype)
    if kv != target.dtype:  # named only when it differs, as above
        ident["kv_cache_dtype"] = str(kv)
    return ident


def drafter_identity(spec: Any, drafter: Any) -> Any:
    """The files a drafter was loaded from, or (weightless drafters, objects, factories) what it is."""
    source = getattr(drafter, "source_path", None)
    if source is not None and Path(source).exists():
        return {"files": files_identity(Path(source))}
    return {"kind": type(drafter).__name__, "name": getattr(drafter, "name", None),
            "block_size": getattr(drafter, "block_size", None), "spec": spec if isinstance(spec, str) else None}


def run_engine(engine: "Engine", prompts: Sequence[Sequence[int]], params: Sequence["SamplingParams"],
               bar: Any = None) -> list["RequestOutput"]:
    """Decode every prompt on `engine` (batched up to its max_num_seqs); outputs in prompt order."""
    return engine.run([list(p) for p in prompts], params, on_finished=bar.update if bar is not None else None)


# ---------------------------------------------------------------------------------------------------
# Metrics


@dataclass
class AcceptanceStats:
    """Counters pooled over the requests of one cell."""

    num_requests: int = 0
    num_tokens: int = 0       # tokens generated (the prefill's first token included)
    rounds: int = 0           # verification rounds
    accepted_drafts: int = 0
    verified_drafts: int = 0  # drafts sent to the target (Σ ℓ)
    accepted_by_position: list[int] = field(default_factory=list)  # [gamma]
    tried_by_position: list[int] = field(default_factory=list)     # [gamma]

    @property
    def accepted_length(self) -> float:
        """τ: tokens emitted per round, bonus included (1.0 when nothing was verified)."""
        return (self.accepted_drafts + self.rounds) / self.rounds if self.rounds else 1.0

    @property
    def conditional_acceptance(self) -> list[float]:
        return [a / t if t else 0.0 for a, t in zip(self.accepted_by_position, self.tried_by_position)]


def pool_metrics(outputs: Sequence["RequestOutput"], gamma: int) -> AcceptanceStats:
    s = AcceptanceStats(accepted_by_position=[0] * gamma, tried_by_position=[0] * gamma)
    for o in outputs:
        m = o.metrics
        s.num_requests += 1
        s.num_tokens += m.num_tokens
        s.rounds += m.rounds
        s.accepted_drafts += m.accepted_drafts
        s.verified_drafts += m.verified_drafts
        for k, (a, t) in enumerate(zip(m.accepted_by_position, m.tried_by_position)):
            s.accepted_by_position[k] += a
            s.tried_by_position[k] += t
    return s


# ---------------------------------------------------------------------------------------------------
# Configuration and cells


@dataclass
class EvalConfig:
    drafters: list[str]
    data_dir: Path
    sets: list[str]
    out: Path
    num_prompts: int = 20
    temperature: float = 0.0
    gamma: int | None = None          # None: each drafter's block_size
    max_tokens: int = 256
    gammas: list[int] = field(default_factory=list)  # the τ-vs-γ sweep (Figure 4)
    thresholds: list[float] = field(default_factory=list)  # the threshold:P sweep (Figure 5)
    model: str | None = None
    seed: int = 0
    batch_size: int = 8
    threads: int | None = None

    def __post_init__(self) -> None:
        self.data_dir, self.out = Path(self.data_dir), Path(self.out)
        for name, v in (("--num-prompts", self.num_prompts), ("--max-tokens", self.max_tokens),
                        ("--batch-size", self.batch_size)):
            if v < 1:
                raise EvalError(f"{name} must be >= 1, got {v}")
        if self.gamma is not None and self.gamma < 1:
            raise EvalError(f"--gamma must be >= 1, got {self.gamma}")
        if any(g < 1 for g in self.gammas):
            raise EvalError(f"--gammas must all be >= 1, got {self.gammas}")
        if any(not 0 <= p < 1 for p in self.thresholds):
            raise EvalError(f"--thresholds must all be in [0, 1), got {self.thresholds}")
        if self.temperature < 0:
            raise EvalError(f"--temperature must be >= 0, got {self.temperature}")
        if not self.sets:
            raise EvalError("--sets is empty")
        if len(set(self.drafters)) != len(self.drafters):
            raise EvalError(f"--drafters lists a drafter twice: {self.drafters}")


@dataclass(frozen=True)
class CellKey:
    drafter: str
    set: str
    gamma: int
    temperature: float
    num_prompts: int
    max_tokens: int
    seed: int
    policy: str = "static"

    @property
    def id(self) -> str:
        return (f"{self.drafter}|{self.set}|gamma={self.gamma}|T={self.temperature:g}|n={self.num_prompts}"
                f"|max_tokens={self.max_tokens}|seed={self.seed}" + (f"|policy={self.policy}"
                                                                    if self.policy != "static" else ""))


@dataclass
class CellResult:
    key: CellKey
    kind: str                 # the drafter's own name (dspark, dflash, ngram, ...)
    stats: AcceptanceStats
    truncated_prompts: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self.key), "kind": self.kind, "domain": domain_of(self.key.set),
                "accepted_length": self.stats.accepted_length,
                "conditional_acceptance": self.stats.conditional_acceptance,
                **asdict(self.stats), "truncated_prompts": self.truncated_prompts, "seconds": self.seconds}


def run_cell(engine: "Engine", key: CellKey, kind: str, prompts: PreparedPrompts,
             progress: bool = True) -> CellResult:
    """(The engine runs the cell's verification policy, `key.policy`.)"""
    """Decode one set with one drafter at one γ (batched up to the engine's max_num_seqs), pooling
    the metrics."""
    from tqdm import tqdm

    from dspark.sampling import SamplingParams

    params = [SamplingParams(temperature=key.temperature, max_tokens=key.max_tokens, num_speculative_tokens=key.gamma,
                             seed=key.seed + i)  # one seed per prompt: reproducible, yet not all alike
              for i in range(len(prompts.token_ids))]
    t0 = time.perf_counter()
    tag = "" if key.policy == "static" else f"/{key.policy}"
    with tqdm(total=len(params), desc=f"{key.drafter}/{key.set}/γ={key.gamma}{tag}", unit="prompt", leave=False,
              disable=not progress) as bar:
        outs = run_engine(engine, prompts.token_ids, params, bar)
    return CellResult(key, kind, pool_metrics(outs, key.gamma), prompts.truncated, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------
# The report


@dataclass
class EvalReport:
    data: dict[str, Any]          # what is written to the JSON
    markdown: str
    computed: list[str]           # cell ids decoded by this run
    skipped: list[str]            # cell ids found in the results file
    notes: list[str]
    paths: dict[str, Path]


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _sets_by_domain(sets: Sequence[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for d in DOMAIN_ORDER:
        members = [s for s in sets if domain_of(s) == d]
        if members:
            grouped[d] = members
    return grouped


def summarize(cfg: EvalConfig, cells: Mapping[str, dict[str, Any]], main_gamma: Mapping[str, int],
              sweep_gammas: Mapping[str, list[int]], labels: Sequence[str]) -> dict[str, Any]:
    """Tables of this run's configuration, from the cells done so far (missing cells are left out)."""
    def cell(label: str, set_name: str, gamma: int, policy: str = "static") -> dict[str, Any] | None:
        key = CellKey(label, set_name, gamma, cfg.temperature, cfg.num_prompts, cfg.max_tokens, cfg.seed, policy)
        return cells.get(key.id)

    grouped = _sets_by_domain(cfg.sets)
    results: dict[str, dict[str, Any]] = {}
    domains: dict[str, dict[str, float | None]] = {}
    kinds: dict[str, str] = {}
    sweep: dict[str, dict[str, dict[str, float]]] = {}
    for label in labels:
        per_set = {}
        for s in cfg.sets:
            c = cell(label, s, main_gamma[label])
            if c is None:
                continue
            kinds[label] = c["kind"]
            per_set[s] = {k: c[k] for k in ("domain", "gamma", "accepted_length", "conditional_acceptance",
                                             "accepted_by_position", "tried_by_position", "num_tokens",
                                             "rounds", "num_requests", "truncated_prompts", "seconds",
                                             "accepted_drafts")}
            per_set[s]["verified_drafts"] = c.get("verified_drafts")  # absent from results stored before
        results[label] = per_set
        # Macro average per domain only over complete domains, so a partial run never shows a
        # number that silently averages fewer sets than the header claims.
        domains[label] = {d: (_mean([per_set[s]["accepted_length"] for s in members])
                              if all(s in per_set for s in members) else None)
                          for d, members in grouped.items()}
        all_sets = [per_set[s]["accepted_length"] for s in cfg.sets if s in per_set]
        domains[label]["mean"] = _mean(all_sets) if len(all_sets) == len(cfg.sets) else None
        if sweep_gammas.get(label):
            sweep[label] = {}
            for s in cfg.sets:
                row = {str(g): c["accepted_length"] for g in sweep_gammas[label]
                       if (c := cell(label, s, g)) is not None}
                if row:
                    sweep[label][s] = row
    thresholds: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for label in labels:
        for s in cfg.sets:
            for p in cfg.thresholds:
                c = cell(label, s, main_gamma[label], threshold_policy(p))
                if c is None:
                    continue
                v, a, r = c["verified_drafts"], c["accepted_drafts"], c["rounds"]
                thresholds.setdefault(label, {}).setdefault(s, {})[f"{p:g}"] = {
                    "rounds": r, "accepted_drafts": a, "verified_drafts": v, "accepted_length": c["accepted_length"],
                    "verified_per_step": v / r if r else 0.0, "acceptance_rate": a / v if v else None}
    ratios = tau_ratios(domains, kinds)
    return {"results": results, "domains": domains, "drafter_kinds": kinds, "gamma_sweep": sweep,
            "threshold_sweep": thresholds, "ratios": ratios}


def threshold_policy(p: float) -> str:
    return f"threshold:{p:g}"


def tau_ratios(domains: Mapping[str, Mapping[str, float | None]], kinds: Mapping[str, str]) -> dict[str, dict]:
    """τ of the (first) DSpark drafter over DFlash's and EAGLE-3's, per domain and overall."""
    by_kind: dict[str, str] = {}
    for label, kind in kinds.items():
        by_kind.setdefault(kind, label)
    out: dict[str, dict] = {}
    if "dspark" not in by_kind:
        return out
    ours = domains[by_kind["dspark"]]
    for other in ("dflash", "eagle3"):
        if other not in by_kind:
            continue
        theirs = domains[by_kind[other]]
        out[f"dspark/{other}"] = {d: (ours[d] / theirs[d] if ours.get(d) and theirs.get(d) else None)
                                  for d in ours}
    return out


def markdown_table(cfg: EvalConfig, summary: Mapping[str, Any], labels: Sequence[str],
                   main_gamma: Mapping[str, int]) -> str:
    """Paper Table 1 layout: rows drafters; columns sets grouped by domain, then each domain's average."""
    grouped = _sets_by_domain(cfg.sets)
    cols: list[tuple[str, str, str]] = []  # (header, kind, name)
    for d, members in grouped.items():
        cols += [(s, "set", s) for s in members]
        cols.append((f"{d} avg", "domain", d))
    if len(grouped) > 1:
        cols.append(("mean", "domain", "mean"))

    def fmt(x: float | None) -> str:
        return "–" if x is None else f"{x:.2f}"

    lines = [f"Accepted length τ (bonus included), temperature {cfg.temperature:g}, {cfg.num_prompts} prompts "
             f"per set, max {cfg.max_tokens} tokens", "",
             "| drafter | γ | " + " | ".join(c[0] for c in cols) + " |",
             "|---|---:|" + "---:|" * len(cols)]
    for label in labels:
        per_set, dom = summary["results"].get(label, {}), summary["domains"].get(label, {})
        vals = [fmt(per_set[n]["accepted_length"] if n in per_set else None) if k == "set" else fmt(dom.get(n))
                for _, k, n in cols]
        lines.append(f"| {label} | {main_gamma[label]} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def threshold_table(sweep: Mapping[str, Mapping[str, Mapping[str, Mapping[str, Any]]]]) -> str:
    """The threshold:P sweep pooled over every set: drafts verified and accepted per step, acceptance rate, τ."""
    if not sweep:
        return ""
    lines = ["", "Threshold sweep (policy threshold:P), pooled over the sets", "",
             "| drafter | P | verified / step | accepted / step | acceptance rate | τ |", "|---|---:|---:|---:|---:|---:|"]
    for label, per_set in sweep.items():
        for p in sorted({p for cells in per_set.values() for p in cells}, key=float):
            cells = [c[p] for c in per_set.values() if p in c]
            r = sum(c["rounds"] for c in cells)
            v = sum(c["verified_drafts"] for c in cells)
            a = sum(c["accepted_drafts"] for c in cells)
            if r:
                lines.append(f"| {label} | {p} | {v / r:.2f} | {a / r:.2f} | "
                             f"{'–' if not v else f'{100 * a / v:.1f}%'} | {(a + r) / r:.2f} |")
    return "\n".join(lines) + "\n"


def _ratio_lines(ratios: Mapping[str, Mapping[str, float | None]]) -> list[str]:
    lines = []
    for name, per in ratios.items():
        parts = [f"{d} {v:.3f}x" for d, v in per.items() if v is not None]
        if parts:
            lines.append(f"τ ratio {name}: " + ", ".join(parts))
    return lines


def _load_results(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise EvalError(f"--out {path}: exists but is not valid JSON ({e}); move it away or pick another "
                        "--out") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells", {}), dict):
        raise EvalError(f"--out {path}: not a `dspark eval` results file (no 'cells' object)")
    return data


def evaluate(cfg: EvalConfig, drafters: Mapping[str, DrafterSpec] | None = None, *,
             target: "TargetModel | None" = None, progress: bool = True, plots: bool = True) -> EvalReport:
    """Run (or resume) the evaluation and write the JSON, Markdown and plots.

    `drafters`: label -> spec, overriding `cfg.drafters` (whose items are then ignored); lets callers
    pass Drafter objects or factories. `target`: an already loaded target (else `cfg.model`).
    """
    import torch
    from tqdm import tqdm

    from dspark.engine import Engine
    from dspark.train.checkpoint import atomic_write_text

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    # Validate the prompt sets and the output location before any model is loaded: a typo should cost nothing.
    texts = {s: load_prompt_set(cfg.data_dir, s, cfg.num_prompts) for s in cfg.sets}
    from dspark.train.checkpoint import check_writable
    check_writable(cfg.out, "--out")
    specs: dict[str, DrafterSpec] = dict(drafters) if drafters is not None else resolve_drafter_args(cfg.drafters)
    if not specs:
        raise EvalError("--drafters is empty")
    if VANILLA in specs:
        raise EvalError("`vanilla` has no acceptance to measure; use `dspark bench` to time plain decoding")
    labels = list(specs)
    if target is None:
        from dspark.bundled import default_model_path
        from dspark.models import load_target
        target = load_target(Path(cfg.model) if cfg.model else default_model_path())
    ctx = target.context_length
    prepared = {s: prepare_prompts(t, target.tokenizer, ctx, cfg.max_tokens) for s, t in texts.items()}
    notes: list[str] = []
    for s, p in prepared.items():
        if p.truncated:
            notes.append(f"{s}: {p.truncated} of {len(p.token_ids)} prompts cut from the left to leave "
                         f"{cfg.max_tokens} tokens of the {ctx}-token context")
    # Size the cache for the longest prompt of the run, not the model's full context.
    max_len = min(ctx, max(len(ids) for p in prepared.values() for ids in p.token_ids) + cfg.max_tokens)

    data = _load_results(cfg.out)
    cells: dict[str, dict[str, Any]] = dict(data.get("cells", {}))
    loaded = {label: build_drafter(spec, target, cfg.batch_size, max_len) for label, spec in specs.items()}
    main_gamma: dict[str, int] = {}
    sweep_gammas: dict[str, list[int]] = {}
    for label, d in loaded.items():
        g = cfg.gamma or d.block_size
        if g > d.block_size:
            notes.append(f"{label}: --gamma {g} exceeds its block_size {d.block_size}; using {d.block_size}")
            g = d.block_size
        main_gamma[label] = g
        sweep_gammas[label] = [x for x in cfg.gammas if x <= d.block_size]
        skipped_g = [x for x in cfg.gammas if x > d.block_size]
        if skipped_g:
            notes.append(f"{label}: γ={','.join(map(str, skipped_g))} skipped in the sweep (block_size "
                         f"{d.block_size})")

    plan: list[tuple[str, CellKey]] = []
    for label in labels:
        gammas = [main_gamma[label]] + [g for g in sweep_gammas[label] if g != main_gamma[label]]
        for g in gammas:
            for s in cfg.sets:
                plan.append((label, CellKey(label, s, g, cfg.temperature, cfg.num_prompts, cfg.max_tokens,
                                            cfg.seed)))
        if cfg.thresholds and not loaded[label].has_confidence:
            notes.append(f"{label}: no confidence head, so no threshold sweep")
            continue
        for p in cfg.thresholds:
            for s in cfg.sets:
                plan.append((label, CellKey(label, s, main_gamma[label], cfg.temperature, cfg.num_prompts,
                                            cfg.max_tokens, cfg.seed, threshold_policy(p))))
    out_paths = {"json": cfg.out, "markdown": cfg.out.with_suffix(".md"),
                 "acceptance_png": cfg.out.with_suffix(".acceptance.png")}
    if cfg.gammas:
        out_paths["tau_vs_gamma_png"] = cfg.out.with_suffix(".tau_vs_gamma.png")
    if cfg.thresholds:
        out_paths["threshold_sweep_png"] = cfg.out.with_suffix(".threshold_sweep.png")
    config_json = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    config_json.update(drafters=labels, model=str(target.path) if target.path else cfg.model,
                       threads=torch.get_num_threads(), main_gamma=main_gamma, sweep_gammas=sweep_gammas)

    def snapshot() -> dict[str, Any]:
        summary = summarize(cfg, cells, main_gamma, sweep_gammas, labels)
        return {"config": config_json, **summary,
                "truncated_prompts": {s: p.truncated for s, p in prepared.items()}, "notes": notes,
                "cells": cells}

    # What a cell's result depends on beyond its key: the drafter's and the target's files (and the
    # target's numerics), and the prompts themselves. A stored cell is reused only when they match.
    target_id = target_identity(target)
    prompt_ids = {s: _digest(p.token_ids) for s, p in prepared.items()}
    identity = {(label, s): _digest({"drafter": drafter_identity(specs[label], loaded[label]), "target": target_id,
                                     "prompts": prompt_ids[s]}) for label in labels for s in cfg.sets}
    computed, skipped = [], []
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    engines: dict[str, Engine] = {}
    with tqdm(total=len(plan), desc="eval cells", unit="cell", disable=not progress) as bar:
        for label, key in plan:
            ident = identity[(label, key.set)]
            if key.id in cells and cells[key.id].get("identity") == ident:
                skipped.append(key.id)
                bar.update(1)
                continue
            if key.id in cells:
                notes.append(f"{key.id}: recomputed (the drafter, the target or the prompts changed since "
                             "the stored result was made)")
            if (label, key.policy) not in engines:  # one engine (KV cache) alive at a time
                engines = {(label, key.policy): Engine(target, max_num_seqs=cfg.batch_size, max_model_len=max_len,
                                                       drafter=loaded[label], policy=key.policy)}
            res = run_cell(engines[(label, key.policy)], key, loaded[label].name, prepared[key.set], progress)
            cells[key.id] = {**res.to_json(), "identity": ident}
            computed.append(key.id)
            atomic_write_text(cfg.out, json.dumps(snapshot(), indent=1) + "\n")
            bar.update(1)
    final = snapshot()
    atomic_write_text(cfg.out, json.dumps(final, indent=1) + "\n")
    md = markdown_table(cfg, final, labels, main_gamma) + threshold_table(final["threshold_sweep"])
    extra = _ratio_lines(final["ratios"]) + [f"note: {n}" for n in notes]
    md_text = md + ("\n" + "\n".join(f"- {x}" for x in extra) + "\n" if extra else "")
    atomic_write_text(out_paths["markdown"], md_text)
    if plots:
        from dspark.eval import plots as P
        P.plot_conditional_acceptance(final["results"], _sets_by_domain(cfg.sets), out_paths["acceptance_png"])
        if cfg.gammas:
            P.plot_tau_vs_gamma(final["gamma_sweep"], _sets_by_domain(cfg.sets), out_paths["tau_vs_gamma_png"])
        if cfg.thresholds:
            P.plot_threshold_sweep(final["threshold_sweep"], _sets_by_domain(cfg.sets),
                                   out_paths["threshold_sweep_png"])
    else:
        out_paths = {k: v for k, v in out_paths.items() if not k.endswith("_png")}
    return EvalReport(final, md_text, computed, skipped, notes, out_paths)


# ---------------------------------------------------------------------------------------------------
# Command line


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _int_csv(text: str) -> list[int]:
    try:
        return [int(x) for x in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_csv(text: str) -> list[float]:
    try:
        return [float(x) for x in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafters", type=_csv, required=True,
                   help="comma-separated drafters: names (dspark, dflash, eagle3, draft-model = bundled "
                        "checkpoints; ngram), directories, or LABEL=DIR")
    p.add_argument("--data-dir", type=Path, required=True, help="directory of benchmark prompt sets (*.jsonl)")
    p.add_argument("--sets", type=_csv, default=["humaneval", "mbpp", "gsm8k", "math500", "mt-bench"],
                   help="comma-separated set names (files SET.jsonl in --data-dir) "
                        "(default: humaneval,mbpp,gsm8k,math500,mt-bench)")
    p.add_argument("--num-prompts", type=int, default=20, help="first N prompts of each set (default: 20)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default: 0)")
    p.add_argument("--gamma", type=int, default=None, help="γ, draft tokens per round (default: each drafter's block size)")
    p.add_argument("--gammas", type=_int_csv, default=[],
                   help="comma-separated γ values for the τ-vs-γ sweep (Figure 4); values above a "
                        "drafter's block size are skipped with a note (default: no sweep)")
    p.add_argument("--thresholds", type=_float_csv, default=[],
                   help="comma-separated confidence thresholds P for the threshold:P sweep (Figure 5), run at "
                        "each drafter's main γ by drafters with a confidence head (default: no sweep)")
    p.add_argument("--max-tokens", type=int, default=256, help="tokens generated per prompt (default: 256)")
    p.add_argument("--out", type=Path, default=Path("runs/eval.json"),
                   help="results JSON; .md and .png files go next to it (default: runs/eval.json)")
    from dspark.bundled import MODEL_HELP

    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--seed", type=int, default=0, help="sampling seed; prompt i uses seed+i (default: 0)")
    p.add_argument("--batch-size", type=int, default=8, help="requests decoded together (default: 8)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    return EvalConfig(drafters=args.drafters, data_dir=args.data_dir, sets=args.sets, out=args.out,
                      num_prompts=args.num_prompts, temperature=args.temperature, gamma=args.gamma,
                      max_tokens=args.max_tokens, gammas=args.gammas, thresholds=args.thresholds,
                      model=args.model, seed=args.seed,
                      batch_size=args.batch_size, threads=args.threads)


def run(args: argparse.Namespace) -> int:
    """`dspark eval`: returns the exit status (0)."""
    report = evaluate(config_from_args(args), progress=not getattr(args, "no_progress", False))
    print(report.markdown, end="")
    done = f"{len(report.computed)} cells computed, {len(report.skipped)} resumed from {report.paths['json']}"
    print(f"\n{done}; wrote " + ", ".join(str(p) for k, p in report.paths.items() if k != "json"))
    return 0


def main(argv: list[str] | None = None) -> int:
    return module_main(argv, prog="python -m dspark.eval.acceptance", description=__doc__, add_arguments=add_arguments,
                       run=run, label="dspark eval: error")


if __name__ == "__main__":
    sys.exit(main())
