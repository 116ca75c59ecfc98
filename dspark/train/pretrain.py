"""Pretrain a small Qwen3-architecture code model from scratch: the recipe behind the bundled demo target.

Usage (the demo target, see models/dspark-demo-target/README.md for the exact command used):

    dspark pretrain --out models/dspark-demo-target                 # corpus: the stdlib source
    dspark pretrain --corpus DIR --out OUT --steps 200 --hidden-size 64 --num-layers 2
    torchrun --nproc-per-node 2 -m dspark.train.pretrain --out OUT   # data parallel (gloo on CPU)
    dspark pretrain --tokenizer models/dspark-demo-target --out OUT --hidden-size 128 --num-layers 2
        # a draft model for the `draft-model` drafter: reuses the target's tokenizer and vocabulary

Steps: discover files and split train/validation by file (a hash of the path), train a byte-level
BPE tokenizer (or, with --tokenizer DIR, copy DIR's tokenizer and take the vocabulary size from DIR's
config.json, else from the tokenizer), tokenise both splits into one stream each, then train with
AdamW (warm-up, cosine decay), random windows drawn deterministically from (seed, step) so a resumed
or data-parallel run sees exactly the batches an uninterrupted single-process run sees. Checkpoints
go to ``OUT/.work/checkpoint.pt`` atomically; starting the same command again resumes. At the end the
model is written as a Hugging Face directory that transformers' Auto classes load as they are,
with a model card (README.md) recording the command, data, steps, tokens, time and losses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dspark.entry import module_main
from dspark.train.checkpoint import atomic_write_text
from dspark.train.common import (OPTIMISER_OPTIONS, RUN_OPTIONS, RunConfig, adamw, add_config_options,
                                 add_output_options, card_header, command_line, data_parallel, dist_info, due,
                                 lr_at, optimizer_step, progress_bar, resume, save_checkpoint, stop_requested,
                                 terminate_as_interrupt, training_interrupted)
from dspark.train.corpus import CorpusError, discover, read_text, tokenize_files
from dspark.train.tokenizer_train import EOS_TOKEN, PAD_TOKEN, save_tokenizer, train_tokenizer


@dataclass(kw_only=True)
class PretrainConfig(RunConfig):
    corpus: str | None = None            # None: the running Python's standard library
    extensions: tuple[str, ...] = (".py",)
    val_percent: float = 3.0             # of the files
    vocab_size: int = 8192               # of the trained tokenizer; with `tokenizer`, read from there
    tokenizer: str | None = None         # reuse this directory's tokenizer instead of training one
    hidden_size: int = 320
    intermediate_size: int = 864
    num_layers: int = 8
    num_heads: int = 5
    num_kv_heads: int = 1
    head_dim: int = 64
    max_position_embeddings: int = 2048
    seq_len: int = 512
    eval_tokens: int = 65536
    steps: int = 1200
    lr: float = 1.5e-3
    warmup_steps: int = 100
    weight_decay: float = 0.1
    save_dtype: str = "bfloat16"

    def validate(self) -> None:
        super().validate()
        self.require_positive("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                              "num_kv_heads", "head_dim", "seq_len")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"--num-heads ({self.num_heads}) must be a multiple of --num-kv-heads "
                             f"({self.num_kv_heads})")
        if self.seq_len >= self.max_position_embeddings:
            raise ValueError(f"--seq-len ({self.seq_len}) must be below --max-position-embeddings "
                             f"({self.max_position_embeddings})")


def batch_offsets(seed: int, step: int, n_tokens: int, seq_len: int, batch_size: int) -> np.ndarray:
    """Window starts for one global batch; a pure function of (seed, step) so resume is exact."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, n_tokens - seq_len - 1, size=batch_size)


def windows(stream: np.ndarray, offsets: np.ndarray, seq_len: int) -> torch.Tensor:
    idx = offsets[:, None] + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(stream[idx].astype(np.int64))  # [batch, seq_len + 1]


def eos_pad_ids(meta: dict) -> tuple[int | list[int], int]:
    """The model's eos and pad ids. Data prepared before --tokenizer existed records only the
    trained tokenizer's special-token ids."""
    special = meta["special_tokens"]
    return meta.get("eos_token_id", special.get(EOS_TOKEN)), meta.get("pad_token_id", special.get(PAD_TOKEN))


def build_model(cfg: PretrainConfig, meta: dict):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    eos, pad = eos_pad_ids(meta)

    mcfg = Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=True, rope_theta=10000.0, rms_norm_eps=1e-6,
        bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
    )
    mcfg._attn_implementation = "sdpa"
    torch.manual_seed(cfg.seed)
    return Qwen3ForCausalLM(mcfg)


@torch.no_grad()
def evaluate(model, stream: np.ndarray, cfg: PretrainConfig) -> float:
    """Mean next-token loss over fixed, non-overlapping validation windows."""
    model.eval()
    n_win = max(1, min(cfg.eval_tokens // cfg.seq_len, (len(stream) - 1) // cfg.seq_len))
    offsets = np.arange(n_win) * cfg.seq_len
    total, count = 0.0, 0
    for i in range(0, n_win, cfg.batch_size):
        x = windows(stream, offsets[i:i + cfg.batch_size], cfg.seq_len)
        out = model(input_ids=x[:, :-1], labels=x[:, :-1].clone())
        # transformers shifts labels itself; count the predicted positions.
        n = x.shape[0] * (cfg.seq_len - 1)
        total += out.loss.item() * n
        count += n
    model.train()
    return total / count


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def reuse_tokenizer(src: str | Path, out_dir: Path):
    """Copy `src`'s tokenizer files into `out_dir`, so the model trained here shares them (a draft
    model must: its token ids are compared with the target's). Returns (tokenizer backend,
    special-token ids by name, {"vocab_size", "eos_token_id", "pad_token_id"}).

    The vocabulary size is `src`'s config.json `vocab_size` when there is one (a target's embedding
    is often padded past the tokenizer), and never less than the tokenizer's own size."""
    from dspark.tokenizer import Tokenizer, read_json

    src = Path(src)
    tok = Tokenizer.from_dir(src)  # CheckpointError naming the file when something is missing
    eos_ids = tok.eos_token_ids
    if not eos_ids:
        raise CorpusError(f"tokenizer in {src} has no end-of-text token (tokenizer_config.json 'eos_token' or "
                          "generation_config.json 'eos_token_id'); it separates files in the token stream")
    model_cfg = read_json(src / "config.json", required=False) or {}
    vocab = max(tok.vocab_size, int(model_cfg.get("vocab_size") or 0))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out_dir / name)
    special = {name: tid for name, tid in ((tok.eos_token, eos_ids[0]), (tok.pad_token, tok.pad_token_id),
                                           (tok.mask_token, tok.mask_token_id)) if name is not None}
    ids = {"vocab_size": vocab, "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else list(eos_ids),
           "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]}
    return tok.backend, special, ids


def prepare_data(cfg: PretrainConfig, work: Path, rank: int, world: int):
    """Tokenizer and token streams, built once (rank 0) and cached in the work directory."""
    tok_dir = work / "tokenizer"
    meta_path = work / "data.json"
    if rank == 0 and not meta_path.exists():
        split = discover(cfg.corpus, cfg.extensions, cfg.val_percent)
        if cfg.tokenizer is not None:
            tok, special, token_ids = reuse_tokenizer(cfg.tokenizer, tok_dir)
        else:
            tok = train_tokenizer(split.train, cfg.vocab_size)
            special = save_tokenizer(tok, tok_dir, cfg.max_position_embeddings)
            token_ids = {"vocab_size": cfg.vocab_size, "eos_token_id": special[EOS_TOKEN],
                         "pad_token_id": special[PAD_TOKEN]}
        eos = token_ids["eos_token_id"]
        eos = eos[0] if isinstance(eos, list) else eos
        train = tokenize_files(tok, split.train, eos)
        val = tokenize_files(tok, split.val, eos)
        if len(train) < cfg.seq_len + 2 or len(val) < cfg.seq_len + 2:
            raise CorpusError(f"corpus {str(split.root)!r} is too small: {len(train)} train and {len(val)} "
                              f"validation tokens, need more than --seq-len ({cfg.seq_len}) + 1 in each")
        np.save(work / "train.npy", train)
        np.save(work / "val.npy", val)
        meta = {"corpus": str(split.root), "train_files": len(split.train), "val_files": len(split.val),
                "train_tokens": int(len(train)), "val_tokens": int(len(val)), "special_tokens": special,
                "tokenizer_source": str(cfg.tokenizer) if cfg.tokenizer is not None else None, **token_ids,
                "val_file_list": [p.relative_to(split.root).as_posix() for p in split.val]}
        atomic_write_text(meta_path, json.dumps(meta, indent=2))
    if world > 1:
        torch.distributed.barrier()
    meta = json.loads(meta_path.read_text())
    train = np.load(work / "train.npy")
    val = np.load(work / "val.npy")
    return meta, train, val


def _sample_continuations(model, tok_dir: Path, meta: dict, n: int = 4, max_new: int = 48) -> list[dict]:
    """Greedy continuations of function headers taken from held-out files, for the model card."""
    from dspark.tokenizer import Tokenizer

    # DSpark's own tokenizer reads any tokenizer --tokenizer may have copied in (transformers'
    # AutoTokenizer rejects some valid tokenizer_config.json spellings).
    tok = Tokenizer.from_dir(tok_dir)
    _, pad = eos_pad_ids(meta)
    samples = []
    for rel in meta["val_file_list"]:
        text = read_text(Path(meta["corpus"]) / rel)
        for line_no, line in enumerate(text.splitlines()):
            if line.lstrip().startswith("def ") and line.rstrip().endswith(":"):
                # No trailing newline: byte-level BPE merges a newline with the next line's indent, so
                # a prompt ending in a bare newline would ask for an unindented line.
                prompt = "\n".join(text.splitlines()[max(0, line_no - 6):line_no + 1])
                ids = torch.tensor([tok.encode(prompt)])
                with torch.no_grad():
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                         do_sample=False, pad_token_id=pad)
                samples.append({"file": rel, "prompt": prompt,
                                "continuation": tok.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)})
                break
        if len(samples) >= n:
            break
    return samples


def export(model, cfg: PretrainConfig, work: Path, meta: dict, log: dict) -> Path:
    """Write the Hugging Face directory next to, then over, the output path (never half-written)."""
    out = Path(cfg.out)
    tmp = out.with_name(out.name + ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = getattr(torch, cfg.save_dtype)
    model.config.dtype = dtype
    model.to(dtype).save_pretrained(str(tmp), safe_serialization=True)
    model.to(torch.float32)
    for name in TOKENIZER_FILES:
        if (work / "tokenizer" / name).is_file():
            shutil.copy(work / "tokenizer" / name, tmp / name)
    eos, pad = eos_pad_ids(meta)
    gen = {"eos_token_id": eos, "pad_token_id": pad}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    samples = _sample_continuations(model, tmp, meta)
    (tmp / "README.md").write_text(model_card(cfg, meta, log, samples, meta["special_tokens"]))
    (tmp / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    # Keep the work directory (checkpoint, streams) where it is: move every exported file in.
    out.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()
    return out


def model_card(cfg: PretrainConfig, meta: dict, log: dict, samples: list[dict], special: dict) -> str:
    evals = log["evals"]
    last = evals[-1] if evals else {"step": 0, "val_loss": float("nan")}
    n_params = log["num_params"]
    lines = card_header(cfg, [
        "A small Qwen3-architecture causal language model for Python code, trained from scratch by",
        "DSpark's pretraining recipe (`dspark pretrain`). It is the demo target of DSpark: large enough",
        "that speculative decoding has something to win on a CPU, small enough to train on 2 cores.",
        "It continues Python source; it is not a chat assistant and knows nothing beyond the corpus.",
    ]) + [
        f"- Data: {', '.join(cfg.extensions)} files under `{meta['corpus']}`"
        + (" (the Python standard library)" if cfg.corpus is None else "")
        + " with tests, IDLE, lib2to3, ensurepip and vendored code left out; split by file with a",
        f"  hash of the relative path: {meta['train_files']} train files ({meta['train_tokens']:,} tokens), "
        f"{meta['val_files']} validation files ({meta['val_tokens']:,} tokens).",
        (f"- Tokenizer: reused from `{meta['tokenizer_source']}`, model vocabulary {cfg.vocab_size}, special tokens "
         if meta.get("tokenizer_source") else f"- Tokenizer: byte-level BPE, vocabulary {cfg.vocab_size}, special tokens ")
        + ", ".join(f"`{k}`={v}" for k, v in special.items()) + ".",
        f"- Model: {n_params / 1e6:.1f}M parameters, hidden {cfg.hidden_size}, {cfg.num_layers} layers, "
        f"{cfg.num_heads} heads ({cfg.num_kv_heads} KV), head dim {cfg.head_dim}, MLP {cfg.intermediate_size}, "
        "tied embeddings; saved in " + cfg.save_dtype + ".",
        f"- Training: {log['step']} steps of {cfg.batch_size} x {cfg.seq_len} tokens "
        f"({log['tokens_seen']:,} tokens seen), AdamW lr {cfg.lr} (warm-up {cfg.warmup_steps}, cosine to "
        f"{cfg.min_lr_ratio}x), weight decay {cfg.weight_decay}, seed {cfg.seed}, "
        f"{log['world_size']} process(es), {log['threads']} thread(s) each.",
        f"- Wall time: {log['wall_seconds'] / 60:.1f} minutes of training (sum over resumed runs).",
        f"- Validation loss at step {last['step']}: {last['val_loss']:.4f} nats/token, "
        f"perplexity {math.exp(last['val_loss']):.2f}.",
        "",
        "## Validation curve",
        "",
        "| step | train loss | validation loss | perplexity |",
        "| --- | --- | --- | --- |",
    ]
    for e in evals:
        lines.append(f"| {e['step']} | {e['train_loss']:.4f} | {e['val_loss']:.4f} | {math.exp(e['val_loss']):.2f} |")
    lines += ["", "## Greedy continuations of held-out function headers", ""]
    for s in samples:
        lines += [f"Prompt, the lines ending at a function header of `{s['file']}`:", "", "```python", s["prompt"],
                  "```", "", "Greedy continuation (48 tokens):", "", "```python", s["continuation"], "```", ""]
    return "\n".join(lines) + "\n"


def train(cfg: PretrainConfig) -> Path:
    cfg.validate()
    from dspark.train.checkpoint import check_writable
    check_writable(cfg.out, "--out", is_dir=True)
    rank, world = dist_info()
    if world > 1:
        torch.distributed.init_process_group("gloo")
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size ({cfg.batch_size}) must be divisible by the number of processes ({world})")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    out = Path(cfg.out)
    work = out / ".work"
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
    if world > 1:
        torch.distributed.barrier()
    meta, train_stream, val_stream = prepare_data(cfg, work, rank, world)
    cfg = replace(cfg, vocab_size=int(meta.get("vocab_size", cfg.vocab_size)))
    model = build_model(cfg, meta)
    opt = adamw(model.parameters(), cfg.lr, cfg.weight_decay)
    ckpt_path = work / "checkpoint.pt"
    log = {"evals": [], "step": 0, "tokens_seen": 0, "wall_seconds": 0.0, "world_size": world,
           "threads": torch.get_num_threads(), "num_params": sum(p.numel() for p in model.parameters())}
    log = resume(ckpt_path, model, opt, log, rank, world, cfg)
    ddp_model = data_parallel(model, world)
    model.train()
    bar = progress_bar(cfg.steps, log["step"], "pretrain", rank)
    t_start = time.time()
    wall_before = log["wall_seconds"]
    tokens_per_step = cfg.batch_size * cfg.seq_len
    recent = []
    consistent = True
    try:
        with terminate_as_interrupt():
            while log["step"] < cfg.steps:
                step = log["step"]
                offs = batch_offsets(cfg.seed, step, len(train_stream), cfg.seq_len, cfg.batch_size)
                x = windows(train_stream, offs[rank::world], cfg.seq_len)
                logits = ddp_model(input_ids=x[:, :-1]).logits  # [batch / world, seq_len, vocab]
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
                consistent = False  # from the update until the step counter moves, state is mid-step
                optimizer_step(opt, loss, model, cfg, step)
                loss_v = loss.detach()
                if world > 1:
                    torch.distributed.all_reduce(loss_v)
                    loss_v /= world
                recent.append(loss_v.item())
                recent = recent[-20:]
                log["step"] = step + 1
                log["tokens_seen"] += tokens_per_step
                log["wall_seconds"] = wall_before + time.time() - t_start
                log.setdefault("train_losses", []).append(round(loss_v.item(), 5))
                consistent = True
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(recent):.3f}", lr=f"{lr_at(step, cfg):.1e}",
                                tok_s=f"{tokens_per_step * bar.format_dict['rate'] if bar.format_dict.get('rate') else 0:.0f}")
                done = log["step"] == cfg.steps
                if rank == 0 and due(log["step"], cfg.eval_every, done):
                    v = evaluate(model, val_stream, cfg)
                    log["evals"].append({"step": log["step"], "train_loss": float(np.mean(recent)), "val_loss": v})
                    bar.write(f"step {log['step']}: train loss {np.mean(recent):.4f}, val loss {v:.4f}, ppl {math.exp(v):.2f}")
                if rank == 0 and due(log["step"], cfg.ckpt_every, done):
                    save_checkpoint(ckpt_path, model, opt, log, cfg)
                if stop_requested(cfg, log["step"], done):
                    bar.close()
                    if world > 1:
                        torch.distributed.destroy_process_group()
                    return out
    except KeyboardInterrupt as e:
        bar.close()
        # Ctrl-C or SIGTERM: save between updates only (weights, optimiser and step counter agree), so
        # the resumed run is the uninterrupted one; the message says how to resume.
        can_save = rank == 0 and consistent and log["step"] > 0
        raise training_interrupted(e, log["step"], cfg.steps, ckpt_path,
                                   (lambda: save_checkpoint(ckpt_path, model, opt, log, cfg)) if can_save else None
                                   ) from None
    bar.close()
    if rank == 0:
        export(model, cfg, work, meta, log)
        print(f"wrote {out} (val loss {log['evals'][-1]['val_loss']:.4f})", file=sys.stderr)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = PretrainConfig(out="")
    p.add_argument("--out", required=True, help="output Hugging Face model directory (its .work/ holds checkpoints)")
    p.add_argument("--corpus", default=None, help="directory of text/code files (default: this Python's standard library)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="reuse DIR's tokenizer (e.g. the target model's, to train a draft model for it) instead "
                        "of training one; the vocabulary size then comes from DIR (--vocab-size is ignored) (default: train a tokenizer)")
    p.add_argument("--extensions", default=",".join(d.extensions), help="comma-separated file endings to read (default: .py)")
    add_config_options(p, d, [
        ("val_percent", "percent of files held out for validation"), ("vocab_size", "BPE vocabulary size"),
        ("hidden_size", "model width"), ("intermediate_size", "MLP width"), ("num_layers", "decoder layers"),
        ("num_heads", "attention heads"), ("num_kv_heads", "key/value heads"), ("head_dim", "head dimension"),
        ("max_position_embeddings", "context length"), ("seq_len", "training sequence length"),
        ("batch_size", "global batch in sequences"), ("steps", "optimiser steps"), *OPTIMISER_OPTIONS,
        ("eval_every", "validate every N steps"), ("eval_tokens", "validation tokens per evaluation"),
        *RUN_OPTIONS,
    ])
    add_output_options(p, d, "weights")


def config_from_args(args: argparse.Namespace, argv: list[str] | None = None) -> PretrainConfig:
    kw = {k: v for k, v in vars(args).items() if k in PretrainConfig.__dataclass_fields__}
    kw["extensions"] = tuple(e if e.startswith(".") else "." + e for e in args.extensions.split(",") if e)
    kw["command"] = command_line("dspark.train.pretrain", "pretrain", argv)
    return PretrainConfig(**kw)


def main(argv: list[str] | None = None) -> int:
    return module_main(argv, prog="dspark pretrain", description=__doc__, add_arguments=add_arguments,
                       run=lambda args: train(config_from_args(args, argv)) and 0,
                       errors=(CorpusError, ValueError))


if __name__ == "__main__":
    sys.exit(main())
