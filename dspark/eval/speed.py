"""`dspark bench`: wall-clock tokens/s at batch 1, greedy, against plain decoding and transformers.

Usage:

    dspark bench --drafters dspark,dflash,eagle3,ngram --data-dir ../shared/benchmarks --set humaneval \\
        --num-prompts 4 --max-tokens 128 --gamma 8 --threads 2 --repeats 3 --out runs/bench.json
    dspark bench --drafters ngram --no-transformers            # built-in Python prompts, ours only
    python -m dspark.eval.speed ...                            # the same, without the entry point

Methods, all on the same prompt token ids and the same number of new tokens:
  vanilla                      our plain decoding (the reference every other method must reproduce)
  <drafter>                    our speculative decoding with each --drafters entry (names as `dspark eval`)
  hf                           transformers `generate()`, greedy
  hf-prompt-lookup             transformers with prompt_lookup_num_tokens=γ
  hf-assisted                  transformers with assistant_model= the --draft-model directory
                               (default models/dspark-demo-draft-model; skipped with a note if absent)

Each repeat runs every method once over all prompts (one prompt at a time), methods interleaved so
slow drifts of a shared machine hit all of them alike; the best of --repeats is kept. Ours decode
with ignore_eos and transformers with min_new_tokens, so both produce exactly --max-tokens tokens.
Every method's tokens are compared with `vanilla`'s: a difference in one of OUR methods is a bug
(lossless decoding is greedy-exact) and makes the command exit with status 1; a difference in a
transformers method is only reported (its kernels round differently, and min_new_tokens masks eos).
Writes the JSON to --out and a bar chart next to it (`.png`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dspark.config import VerifyPolicy, parse_policies
from dspark.entry import module_main
from dspark.eval.acceptance import VANILLA, DrafterSpec, EvalError, build_drafter, resolve_drafter_args, run_engine
from dspark.eval.prompts import BUILTIN_PROMPTS, load_prompt_set, prepare_prompts

if TYPE_CHECKING:
    from dspark.models import TargetModel

HF_PLAIN, HF_PLD, HF_ASSISTED = "hf", "hf-prompt-lookup", "hf-assisted"
HF_PLD_DEFAULT_GAMMA = 10  # transformers' documented typical value, used when --gamma is not given


@dataclass
class BenchConfig:
    drafters: list[str]
    out: Path
    data_dir: Path | None = None
    set: str = "humaneval"
    num_prompts: int = 4
    max_tokens: int = 128
    gamma: int | None = None          # None: each drafter's block size
    threads: int | None = None
    repeats: int = 3
    model: str | None = None
    draft_model: str | None = None    # None: the bundled draft-model baseline, when present
    transformers: bool = True
    # Verification policies each drafter runs with (method LABEL, or LABEL+POLICY for others than static).
    policies: list[str] = field(default_factory=lambda: ["static"])
    reprofile: bool = False  # measure the step-cost table again (policy confidence)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.data_dir = Path(self.data_dir) if self.data_dir is not None else None
        for name, v in (("--num-prompts", self.num_prompts), ("--max-tokens", self.max_tokens),
                        ("--repeats", self.repeats)):
            if v < 1:
                raise EvalError(f"{name} must be >= 1, got {v}")
        if self.gamma is not None and self.gamma < 1:
            raise EvalError(f"--gamma must be >= 1, got {self.gamma}")
        if self.threads is not None and self.threads < 1:
            raise EvalError(f"--threads must be >= 1, got {self.threads}")
        self.policies = [str(p) for p in parse_policies(",".join(map(str, self.policies)))]


@dataclass
class MethodRun:
    """One pass of a method over every prompt."""

    token_ids: list[list[int]]  # new tokens per prompt
    seconds: float              # wall clock, summed over prompts
    rounds: int = 0             # verification rounds (our speculative methods)
    accepted_drafts: int = 0


class BenchMethod(Protocol):
    name: str
    ours: bool          # our engine (must be greedy-exact) or a transformers baseline
    gamma: int | None

    def run(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> MethodRun: ...


@dataclass
class EngineMethod:
    """Our engine at batch 1: plain decoding (`drafter=None`) or speculative."""

    name: str
    engine: Any
    gamma: int | None = None
    ours: bool = True

    def run(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> MethodRun:
        from dspark.sampling import SamplingParams

        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, num_speculative_tokens=self.gamma)
        out = MethodRun([], 0.0)
        for ids in prompts:  # one prompt at a time: batch 1, each timed end to end (prefill included)
            t0 = time.perf_counter()
            o = run_engine(self.engine, [ids], [sp])[0]
            out.seconds += time.perf_counter() - t0
            out.token_ids.append(list(o.token_ids))
            if self.gamma:
                out.rounds += o.metrics.rounds
                out.accepted_drafts += o.metrics.accepted_drafts
        return out


@dataclass
class HFMethod:
    """transformers `generate()` with extra keyword arguments (prompt lookup, assistant model)."""

    name: str
    model: Any
    kwargs: dict[str, Any] = field(default_factory=dict)
    gamma: int | None = None
    pad_token_id: int = 0
    ours: bool = False

    def run(self, prompts: Sequence[Sequence[int]], max_tokens: int) -> MethodRun:
        import torch

        out = MethodRun([], 0.0)
        for ids in prompts:
            x = torch.tensor([list(ids)])
            t0 = time.perf_counter()
            with torch.inference_mode():
                y = self.model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                        max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                        pad_token_id=self.pad_token_id, **self.kwargs)
            out.seconds += time.perf_counter() - t0
            out.token_ids.append(y[0, x.shape[1]:].tolist())
        return out


@dataclass
class MethodResult:
    method: str
    ours: bool
    gamma: int | None
    num_tokens: int
    seconds: float                 # best repeat
    tokens_per_s: float
    all_seconds: list[float]
    same_tokens: bool              # identical to `vanilla` on every prompt
    accepted_length: float | None  # τ (our speculative methods)
    speedup_vs_vanilla: float | None = None
    speedup_vs_hf: float | None = None


@dataclass
class BenchReport:
    data: dict[str, Any]
    table: str
    results: list[MethodResult]
    notes: list[str]
    paths: dict[str, Path]

    @property
    def ok(self) -> bool:
        return all(r.same_tokens for r in self.results if r.ours)


def _load_hf(path: str | Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model


def _prompts(cfg: BenchConfig, target: "TargetModel", notes: list[str]) -> list[list[int]]:
    ctx = target.context_length
    if cfg.data_dir is not None:
        texts = load_prompt_set(cfg.data_dir, cfg.set, cfg.num_prompts)
        prep = prepare_prompts(texts, target.tokenizer, ctx, cfg.max_tokens)
    else:
        if cfg.num_prompts > len(BUILTIN_PROMPTS):
            notes.append(f"only {len(BUILTIN_PROMPTS)} built-in prompts (asked for {cfg.num_prompts})")
        texts = list(BUILTIN_PROMPTS[:cfg.num_prompts])
        prep = prepare_prompts(texts, target.tokenizer, ctx, cfg.max_tokens, chat=False)  # code openings
    if prep.truncated:
        notes.append(f"{prep.truncated} prompts cut from the left to fit the {ctx}-token context")
    return prep.token_ids


def benchmark(cfg: BenchConfig, drafters: Mapping[str, DrafterSpec] | None = None, *,
              target: "TargetModel | None" = None, progress: bool = True) -> BenchReport:
    """Time every method; `drafters` (label -> name, directory, Drafter or factory) overrides cfg.drafters."""
    import torch
    from tqdm import tqdm

    from dspark.bundled import default_model_path
    from dspark.engine import Engine
    from dspark.models import load_target
    from dspark.train.checkpoint import atomic_write_text

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    if cfg.data_dir is not None:
        load_prompt_set(cfg.data_dir, cfg.set, 1)  # fail on a bad set before loading any model
    from dspark.train.checkpoint import check_writable
    check_writable(cfg.out, "--out")
    specs: dict[str, DrafterSpec] = dict(drafters) if drafters is not None else \
        resolve_drafter_args([a for a in cfg.drafters if a != VANILLA])
    model_path = Path(cfg.model) if cfg.model else (target.path if target is not None and target.path
                                                    else default_model_path())
    if target is None:
        target = load_target(model_path)
    notes: list[str] = []
    prompts = _prompts(cfg, target, notes)
    max_len = min(target.context_length, max(len(p) for p in prompts) + cfg.max_tokens)

    methods: list[BenchMethod] = [EngineMethod(VANILLA, Engine(target, max_num_seqs=1, max_model_len=max_len))]
    for label, spec in specs.items():
        d = build_drafter(spec, target, 1, max_len)
        g = cfg.gamma or d.block_size
        if g > d.block_size:
            notes.append(f"{label}: --gamma {g} exceeds its block_size {d.block_size}; using {d.block_size}")
            g = d.block_size
        for i, text in enumerate(cfg.policies):
            policy = VerifyPolicy.parse(text)
            if not policy.speculative:
                notes.append(f"{label}+{policy}: skipped, that is `vanilla`")
                continue
            if policy.needs_confidence and not d.has_confidence:
                notes.append(f"{label}: no confidence head, so no {policy} run")
                continue
            if policy.kind == "fixed" and policy.value > g:
                notes.append(f"{label}+{policy}: skipped, γ is {g}")
                continue
            if i:  # its own caches: engines never share a drafter
                d = build_drafter(spec, target, 1, max_len)
            name = label if policy.kind == "static" else f"{label}+{policy}"
            methods.append(EngineMethod(name, Engine(target, max_num_seqs=1, max_model_len=max_len, drafter=d,
                                                     policy=policy, reprofile=cfg.reprofile), g))
    hf = None
    if cfg.transformers:
        try:
            import transformers  # noqa: F401
        except ModuleNotFoundError:
            notes.append("transformers rows skipped: transformers is not installed "
                         "(pip install -e \".[bench]\" adds it)")
        else:
            # The directory the target was read from (a GGUF's converted cache): the same weights.
            hf = _load_hf(target.path if target.path is not None else model_path)
    if hf is not None:
        eos = target.eos_token_ids
        pad = eos[0] if eos else 0
        methods.append(HFMethod(HF_PLAIN, hf, pad_token_id=pad))
        g = cfg.gamma or HF_PLD_DEFAULT_GAMMA
        methods.append(HFMethod(HF_PLD, hf, {"prompt_lookup_num_tokens": g}, g, pad))
        from dspark.bundled import bundled_drafter_for
        draft_dir = Path(cfg.draft_model) if cfg.draft_model else bundled_drafter_for("draft-model", target)
        if draft_dir is None or not (draft_dir / "config.json").is_file():
            notes.append(f"{HF_ASSISTED} skipped: no draft-model directory for this target "
                         f"{'at ' + str(draft_dir) + ' ' if draft_dir else ''}(pass --draft-model DIR)")
        else:
            try:
                assistant = _load_hf(draft_dir)
            except Exception as e:  # a drafter layout transformers cannot load is a skip, not a failure
                notes.append(f"{HF_ASSISTED} skipped: transformers cannot load {draft_dir} ({type(e).__name__}: {e})")
            else:
                g = cfg.gamma or assistant.generation_config.num_assistant_tokens or 5
                assistant.generation_config.num_assistant_tokens = g
                assistant.generation_config.num_assistant_tokens_schedule = "constant"  # a fixed γ, like ours
                methods.append(HFMethod(HF_ASSISTED, hf, {"assistant_model": assistant}, g, pad))

    # Warm-up: first calls pay for allocation and lazy initialisation, which is not decoding speed.
    for m in methods:
        m.run(prompts[:1], min(cfg.max_tokens, 4))
    runs: dict[str, list[MethodRun]] = {m.name: [] for m in methods}
    with tqdm(total=cfg.repeats * len(methods), desc="bench", unit="run", disable=not progress) as bar:
        for _ in range(cfg.repeats):
            for m in methods:
                runs[m.name].append(m.run(prompts, cfg.max_tokens))
                bar.update(1)

    reference = runs[VANILLA][0].token_ids
    results: list[MethodResult] = []
    for m in methods:
        rs = runs[m.name]
        best = min(rs, key=lambda r: r.seconds)
        n = sum(len(t) for t in best.token_ids)
        rounds = sum(r.rounds for r in rs)
        tau = (sum(r.accepted_drafts for r in rs) + rounds) / rounds if rounds else None
        results.append(MethodResult(m.name, m.ours, m.gamma, n, best.seconds,
                                    n / best.seconds if best.seconds > 0 else 0.0, [r.seconds for r in rs],
                                    all(r.token_ids == reference for r in rs), tau))
    base = {r.method: r.tokens_per_s for r in results}
    for r in results:
        r.speedup_vs_vanilla = r.tokens_per_s / base[VANILLA] if base[VANILLA] else None
        r.speedup_vs_hf = r.tokens_per_s / base[HF_PLAIN] if base.get(HF_PLAIN) else None
        if not r.same_tokens:
            notes.append(f"{r.method}: tokens differ from vanilla" +
                         (" (a lossless-decoding bug)" if r.ours else " (transformers baseline; reported only)"))

    paths = {"json": cfg.out, "png": cfg.out.with_suffix(".png")}
    threads = torch.get_num_threads()
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    config.update(model=str(model_path), threads=threads, drafters=list(specs), num_prompts_used=len(prompts),
                  prompt_source=f"{cfg.data_dir}/{cfg.set}.jsonl" if cfg.data_dir else "built-in Python openings",
                  batch_size=1, greedy=True)
    data = {"config": config, "methods": [asdict(r) for r in results], "notes": notes,
            "all_ours_same_tokens": all(r.same_tokens for r in results if r.ours)}
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg.out, json.dumps(data, indent=1) + "\n")
    from dspark.eval.plots import plot_bench
    plot_bench([asdict(r) for r in results], paths["png"],
               title=f"batch 1, greedy, {len(prompts)} prompts x {cfg.max_tokens} tokens, {threads} threads")
    return BenchReport(data, format_table(results, threads, len(prompts), cfg.max_tokens), results, notes, paths)


def format_table(results: Sequence[MethodResult], threads: int, num_prompts: int, max_tokens: int) -> str:
    def f(x: float | None, spec: str) -> str:
        return "–" if x is None else format(x, spec)

    lines = [f"batch 1, greedy, {num_prompts} prompts x {max_tokens} new tokens, threads: {threads}", "",
             "| method | γ | tokens/s | τ | vs vanilla | vs hf | same tokens |",
             "|---|---:|---:|---:|---:|---:|:---:|"]
    for r in results:
        lines.append(f"| {r.method} | {r.gamma or '–'} | {r.tokens_per_s:.1f} | {f(r.accepted_length, '.2f')} | "
                     f"{f(r.speedup_vs_vanilla, '.2f')}x | {f(r.speedup_vs_hf, '.2f')}x | "
                     f"{'yes' if r.same_tokens else 'NO'} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafters", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=["ngram"],
                   help="comma-separated drafters: names (dspark, dflash, eagle3, draft-model = bundled "
                        "checkpoints; ngram), directories, or LABEL=DIR (default: ngram); vanilla always runs")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="directory of benchmark prompt sets (default: built-in Python openings)")
    p.add_argument("--set", default="humaneval", help="prompt set in --data-dir (default: humaneval)")
    p.add_argument("--num-prompts", type=int, default=4, help="first N prompts (default: 4)")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per prompt (default: 128)")
    p.add_argument("--gamma", type=int, default=None,
                   help=f"γ for every speculative method (default: each drafter's block size; "
                        f"{HF_PLD_DEFAULT_GAMMA} for transformers prompt lookup)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, stated in the output (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per method; the best is kept (default: 3)")
    p.add_argument("--out", type=Path, default=Path("runs/bench.json"), help="results JSON; the PNG goes next to it (default: runs/bench.json)")
    from dspark.bundled import MODEL_HELP

    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--draft-model", default=None,
                   help="small LM directory for transformers assisted generation "
                        "(default: models/dspark-demo-draft-model when present)")
    p.add_argument("--policies", default="static",
                   help="comma-separated verification policies each drafter runs with (static, fixed:K, "
                        "threshold:P, confidence; method LABEL+POLICY; γ is then the most verified) (default: static)")
    p.add_argument("--scheduler", dest="policies", type=lambda s: f"static,{s}" if s != "static" else s,
                   help=argparse.SUPPRESS)  # the old flag: --scheduler confidence = --policies static,confidence
    p.add_argument("--reprofile", action="store_true",
                   help="measure the target's step-cost table again instead of reading the cached one")
    p.add_argument("--no-transformers", dest="transformers", action="store_false",
                   help="skip the Hugging Face transformers baselines")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(drafters=args.drafters, out=args.out, data_dir=args.data_dir, set=args.set,
                       num_prompts=args.num_prompts, max_tokens=args.max_tokens, gamma=args.gamma,
                       threads=args.threads, repeats=args.repeats, model=args.model, draft_model=args.draft_model,
                       transformers=args.transformers, policies=args.policies.split(","), reprofile=args.reprofile)


def run(args: argparse.Namespace) -> int:
    """`dspark bench`: exit status 0, or 1 when one of our methods did not reproduce plain decoding."""
    rep = benchmark(config_from_args(args), progress=not getattr(args, "no_progress", False))
    print(rep.table, end="")
    for n in rep.notes:
        print(f"note: {n}")
    print(f"wrote {rep.paths['json']}, {rep.paths['png']}")
    if not rep.ok:
        bad = ", ".join(r.method for r in rep.results if r.ours and not r.same_tokens)
        print(f"dspark bench: error: {bad} produced different tokens than plain decoding", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return module_main(argv, prog="python -m dspark.eval.speed", description=__doc__, add_arguments=add_arguments,
                       run=run, label="dspark bench: error")


if __name__ == "__main__":
    sys.exit(main())
