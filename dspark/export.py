"""Export a DSpark drafter to the checkpoint layout a serving engine loads.

Usage:

    dspark export --drafter runs/drafter --format vllm --out runs/drafter-vllm
    dspark export --drafter runs/drafter --format sglang --out runs/drafter-sglang
    dspark export --drafter runs/drafter --format deepspec --out runs/drafter-deepspec
    dspark export --drafter runs/drafter --format gguf --target SmolLM2.gguf --out drafter.gguf

Formats (each written atomically; what every engine checks is tested in tests/test_export.py):

  deepspec  the layout DeepSpec's `Qwen3DSparkModel` saves: `config.json` (a Qwen3 config plus
            block_size, target_layer_ids, num_target_layers, mask_token_id, markov_rank,
            markov_head_type, enable_confidence_head, confidence_head_with_markov, num_anchors) and
            `model.safetensors` with `layers.N.*`, `fc`, `hidden_norm`, `norm`,
            `markov_head.markov_w1/markov_w2`, `confidence_head.proj`. The target's embedding and LM
            head are left out (every engine below takes them from the target).
  vllm      the same files, loaded by vLLM's `Qwen3DSparkModel` (`--speculative-config
            '{"method": "dspark", "model": OUT}'`); target_layer_ids stay 0-based layer outputs (vLLM
            adds 1 for its hidden-state index). A reduced draft vocabulary also writes
            `draft_vocab_size`, `lm_head.weight` [Vd, H] and `d2t` [Vd] (draft id -> target id offset).
  sglang    the same files, loaded by SGLang's `Qwen3DSparkModel` (`--speculative-algorithm DSPARK`);
            SGLang's DSpark head is full-vocabulary, so a reduced draft vocabulary is refused.
            Our reduced-vocabulary drafters store `d2t` only (their LM head rows are the target's):
            their vllm and gguf exports need `--target` and carry those rows.
  gguf      one GGUF file for llama.cpp's DSpark draft (`--spec-type draft-dspark`): architecture
            `dflash`, `dflash.block_size`, `dflash.target_layers` (layer *inputs*: our ids + 1),
            `dflash.sample_from_anchor`, `dflash.has_confidence_head`, the target's vocabulary with
            `tokenizer.ggml.mask_token_id`, tensors in llama.cpp's names (`fc`, `enc.output_norm`,
            `output_norm`, `blk.N.attn_q` ..., `markov_w1`, `markov_w2`, `conf_proj`; a reduced draft
            vocabulary adds `output.weight` [Vd, H] and `d2t`, which llama.cpp's DFlash/DSpark loader
            reads as absolute target ids, int64). `--target` is the target's GGUF file (llama.cpp runs the target from it; the
            vocabulary is copied from it).

DFlash drafters (markov_rank 0) export to `deepspec` only: the engines' DSpark loaders need a Markov
head, and their DFlash loaders use the other block layout (slot k predicts anchor+k, ours anchor+k+1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dspark.errors import CheckpointError, DSparkError

FORMATS = ("deepspec", "vllm", "sglang", "gguf")
DSPARK_ARCHITECTURE = "Qwen3DSparkModel"
GGUF_ARCH = "dflash"  # llama.cpp's DFlash/DSpark draft architecture (src/models/dflash.cpp)

# Our tensor names (DeepSpec's) -> llama.cpp's, per draft layer and for the whole drafter.
GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GGUF_TOP_NAMES = {
    "fc.weight": "fc.weight",
    "hidden_norm.weight": "enc.output_norm.weight",
    "norm.weight": "output_norm.weight",
    "markov_head.markov_w1.weight": "markov_w1.weight",
    "markov_head.markov_w2.weight": "markov_w2.weight",
    "confidence_head.proj.weight": "conf_proj.weight",
    "confidence_head.proj.bias": "conf_proj.bias",
    "lm_head.weight": "output.weight",
    "d2t": "d2t",
}


@dataclass
class DrafterFiles:
    """A drafter directory as read from disk: its `config.json` and every tensor of its weights."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])

    @property
    def draft_vocab_size(self) -> int:
        return int(self.config.get("draft_vocab_size") or self.vocab_size)

    @property
    def reduced_vocab(self) -> bool:
        return self.draft_vocab_size < self.vocab_size


def expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a DSpark drafter with this `config.json` holds, with its shape (the layout DeepSpec's
    `Qwen3DSparkModel` saves, without the target's embedding / LM head; a reduced draft vocabulary adds
    `lm_head.weight` and `d2t`)."""
    H, V = int(cfg["hidden_size"]), int(cfg["vocab_size"])
    Vd = int(cfg.get("draft_vocab_size") or V)
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    D = int(cfg.get("head_dim") or H // heads)
    inter, r = int(cfg["intermediate_size"]), int(cfg.get("markov_rank") or 0)
    bias = bool(cfg.get("attention_bias", False))
    shapes: dict[str, tuple[int, ...]] = {
        "fc.weight": (H, len(cfg["target_layer_ids"]) * H), "hidden_norm.weight": (H,), "norm.weight": (H,)}
    for i in range(int(cfg["num_hidden_layers"])):
        p = f"layers.{i}."
        for name, shape in (("self_attn.q_proj", (heads * D, H)), ("self_attn.k_proj", (kv * D, H)),
                            ("self_attn.v_proj", (kv * D, H)), ("self_attn.o_proj", (H, heads * D))):
            shapes[p + name + ".weight"] = shape
            if bias:
                shapes[p + name + ".bias"] = (shape[0],)
        shapes[p + "self_attn.q_norm.weight"] = (D,)
        shapes[p + "self_attn.k_norm.weight"] = (D,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, H)
        shapes[p + "mlp.up_proj.weight"] = (inter, H)
        shapes[p + "mlp.down_proj.weight"] = (H, inter)
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
    if r > 0:
        shapes["markov_head.markov_w1.weight"] = (V, r)
        shapes["markov_head.markov_w2.weight"] = (Vd, r)
        head = str(cfg.get("markov_head_type", "vanilla"))
        if head in ("gated", "gated_markov"):
            shapes["markov_head.gate_proj.weight"] = (r, H + r)
            shapes["markov_head.gate_proj.bias"] = (r,)
        elif head == "rnn":
            shapes["markov_head.joint_proj.weight"] = (3 * r, 2 * r + H)
            shapes["markov_head.joint_proj.bias"] = (3 * r,)
        elif head == "joint":
            shapes["markov_head.up.weight"] = (8 * r, H + r)
            shapes["markov_head.down.weight"] = (H, 8 * r)
    if cfg.get("block_context"):
        shapes["block_context_proj.weight"] = (H, H)
    if cfg.get("context_next_token"):
        shapes["next_token_proj.weight"] = (H, H)
    if cfg.get("enable_confidence_head"):
        width = H + (r if cfg.get("confidence_head_with_markov") else 0)
        shapes["confidence_head.proj.weight"] = (1, width)
        shapes["confidence_head.proj.bias"] = (1,)
    if Vd < V:
        shapes["lm_head.weight"] = (Vd, H)
        shapes["d2t"] = (Vd,)
    return shapes


def read_drafter(path: str | Path) -> DrafterFiles:
    """Read and check a DSpark drafter directory (ours or DeepSpec's); errors name the file and key."""
    from safetensors import safe_open

    from dspark.drafters.dspark_drafter import ARCHITECTURE, DSparkConfig, SHARED_KEYS

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"--drafter {path}: no config.json there (a drafter directory has config.json "
                              "and model.safetensors)")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    arch = (raw.get("architectures") or [None])[0]
    if arch != ARCHITECTURE:
        raise CheckpointError(f"{cfg_file}: architectures[0]={arch!r}; only DSpark/DFlash drafters "
                              f"({ARCHITECTURE}) can be exported")
    DSparkConfig.from_json_dict(raw, str(cfg_file))  # validates every field DeepSpec's layout has
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"--drafter {path}: no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():
                if key not in SHARED_KEYS or key == "lm_head.weight":
                    tensors[key] = h.get_tensor(key)
    drafter = DrafterFiles(path=path, config=raw, tensors=tensors)
    want = expected_shapes(raw)
    if not drafter.reduced_vocab:
        tensors.pop("lm_head.weight", None)  # the target's own head: engines take it from the target
    for key, shape in want.items():
        if key not in tensors:
            if key == "lm_head.weight":  # our reduced-vocabulary drafters keep only d2t; see with_lm_head_rows
                continue
            if key == "confidence_head.proj.bias":  # some exporters drop it; zero is its initial value
                tensors[key] = torch.zeros(shape)
                continue
            raise CheckpointError(f"{path}: missing tensor {key!r} (config.json says it exists)")
        if tuple(tensors[key].shape) != shape:
            raise CheckpointError(f"{path}: tensor {key!r} has shape {list(tensors[key].shape)}, "
                                  f"config.json implies {list(shape)}")
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise CheckpointError(f"{path}: unknown tensor(s) {', '.join(extra[:5])}")
    return drafter


# ---------------------------------------------------------------------------------------------------
# Hugging Face layouts (DeepSpec, vLLM, SGLang)


def engine_config(drafter: DrafterFiles, fmt: str) -> dict[str, Any]:
    """`config.json` for `fmt`; refuses what the engine cannot load, naming the reason."""
    raw = dict(drafter.config)
    rank = int(raw.get("markov_rank") or 0)
    where = f"--format {fmt}"
    if fmt != "deepspec" and rank <= 0:
        raise DSparkError(f"{where}: {drafter.path} is a DFlash drafter (markov_rank 0); the engines' DSpark "
                          "loaders need a Markov head and their DFlash loaders read block slot k as anchor+k "
                          "(ours: anchor+k+1), so only --format deepspec applies")
    for key, what in (("block_context", "the last context position's features added to every block input"),
                      ("context_next_token", "each context position's features read the token after it")):
        if fmt != "deepspec" and raw.get(key):
            raise DSparkError(f"{where}: {drafter.path} has {key} (this project's extension: {what}), which the "
                              "engines' DSpark loaders do not compute, so they would draft from another model; only "
                              "--format deepspec keeps it")
    if fmt != "deepspec" and raw.get("markov_head_type") == "joint":
        raise DSparkError(f"{where}: {drafter.path} has the joint Markov head (this project's extension), which no "
                          "engine's DSpark loader has; only --format deepspec keeps it")
    if fmt == "vllm" and raw.get("markov_head_type", "vanilla") != "vanilla":
        raise DSparkError(f"{where}: vLLM's Qwen3DSparkModel has only the vanilla Markov head, this drafter's "
                          f"is {raw['markov_head_type']!r}; use --format sglang")
    if fmt == "sglang" and drafter.reduced_vocab:
        raise DSparkError(f"{where}: the drafter has a reduced draft vocabulary (draft_vocab_size="
                          f"{drafter.draft_vocab_size} < {drafter.vocab_size}), which SGLang does not support; "
                          "use --format vllm or gguf")
    if fmt in ("sglang", "vllm", "gguf") and min(raw["target_layer_ids"]) < 0:
        raise DSparkError(f"{where}: target_layer_ids {raw['target_layer_ids']} taps the embedding (-1), which "
                          "the engines' loaders reject (SGLang: ids must lie in [0, num_target_layers))")
    raw["architectures"] = [DSPARK_ARCHITECTURE]
    raw["model_type"] = "qwen3"  # the draft layers are Qwen3 layers (q/k norms), whatever the target
    raw.setdefault("layer_types", ["full_attention"] * int(raw["num_hidden_layers"]))
    raw["tie_word_embeddings"] = False
    if drafter.reduced_vocab:
        raw["draft_vocab_size"] = drafter.draft_vocab_size
    return raw


def write_hf(drafter: DrafterFiles, fmt: str, out: Path) -> Path:
    """Write `out/config.json` + `out/model.safetensors` for a Hugging Face-layout engine, atomically (a
    temporary directory renamed into place; an existing export is replaced only when done)."""
    from safetensors.torch import save_file

    cfg = engine_config(drafter, fmt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists() and not (out / "config.json").is_file():
        raise DSparkError(f"--out {out}: exists and is not a drafter export; choose another path")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {k: v.contiguous() for k, v in drafter.tensors.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        for f in tmp.iterdir():  # files users keep get the permissions of any other tool's (umask)
            os.chmod(f, 0o666 & ~_umask())
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            out.replace(old)
        tmp.replace(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    from dspark.train.checkpoint import current_umask

    return current_umask()


# ---------------------------------------------------------------------------------------------------
# llama.cpp (GGUF)


def gguf_tensor_name(name: str) -> str:
    """Our tensor name -> llama.cpp's (`layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`)."""
    if name in GGUF_TOP_NAMES:
        return GGUF_TOP_NAMES[name]
    if name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        if rest in GGUF_LAYER_NAMES:
            return f"blk.{idx}.{GGUF_LAYER_NAMES[rest]}"
    raise DSparkError(f"--format gguf: llama.cpp's DSpark draft has no tensor for {name!r}")


def _target_vocab(target: Path) -> tuple[list[Any], int]:
    """The `tokenizer.*` fields of the target's GGUF file (llama.cpp's draft needs the same vocabulary),
    and its vocabulary size."""
    import gguf

    if target.suffix != ".gguf" or not target.is_file():
        raise DSparkError(f"--target {target}: --format gguf needs the target's .gguf file (llama.cpp runs the "
                          "target from it and the drafter carries its vocabulary)")
    try:
        reader = gguf.GGUFReader(str(target))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"--target {target}: not a readable GGUF file ({e})") from None
    fields = [f for name, f in reader.fields.items() if name.startswith("tokenizer.")
              and name != "tokenizer.ggml.mask_token_id"]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise DSparkError(f"--target {target}: has no tokenizer.ggml.tokens")
    return fields, len(tokens.data)


def _copy_field(w: Any, field: Any) -> None:
    """Copy one GGUF metadata field (scalar, string or array) from a reader to a writer."""
    import gguf

    t = field.types
    if t[0] == gguf.GGUFValueType.ARRAY:
        w.add_key_value(field.name, field.contents(), gguf.GGUFValueType.ARRAY, sub_type=t[-1])
    else:
        w.add_key_value(field.name, field.contents(), t[0])


def write_gguf(drafter: DrafterFiles, target: Path, out: Path) -> Path:
    """Write the drafter as llama.cpp's DSpark draft GGUF (float32 tensors), atomically."""
    import gguf

    from dspark.train.checkpoint import _atomic

    cfg = engine_config(drafter, "gguf")
    if not cfg.get("enable_confidence_head") or not cfg.get("confidence_head_with_markov"):
        # src/models/dflash.cpp load_arch_tensors: conf_proj is {n_embd + markov_rank, 1} or absent.
        if cfg.get("enable_confidence_head"):
            raise DSparkError("--format gguf: llama.cpp's confidence head reads [h; W1[x_prev]] "
                              "(confidence_head_with_markov); this drafter's reads h only")
    fields, n_vocab = _target_vocab(Path(target))
    if n_vocab != drafter.vocab_size:
        raise DSparkError(f"--target {target}: vocabulary of {n_vocab} tokens, the drafter's has "
                          f"{drafter.vocab_size}: it was made for another target")
    a = GGUF_ARCH
    H = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    D = int(cfg.get("head_dim") or H // heads)
    has_conf = "confidence_head.proj.weight" in drafter.tensors

    def write(tmp: str) -> None:
        w = gguf.GGUFWriter(tmp, a)
        w.add_name(f"{drafter.path.name} (DSpark drafter)")
        w.add_uint32(f"{a}.block_count", int(cfg["num_hidden_layers"]))
        w.add_uint32(f"{a}.context_length", int(cfg.get("max_position_embeddings", 40960)))
        w.add_uint32(f"{a}.embedding_length", H)
        w.add_uint32(f"{a}.feed_forward_length", int(cfg["intermediate_size"]))
        w.add_uint32(f"{a}.attention.head_count", heads)
        w.add_uint32(f"{a}.attention.head_count_kv", int(cfg.get("num_key_value_heads") or heads))
        w.add_uint32(f"{a}.attention.key_length", D)
        w.add_uint32(f"{a}.attention.value_length", D)
        w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", float(cfg.get("rms_norm_eps", 1e-6)))
        w.add_float32(f"{a}.rope.freq_base", float(cfg.get("rope_theta", 1e6)))
        w.add_uint32(f"{a}.rope.dimension_count", D)
        w.add_uint32(f"{a}.vocab_size", drafter.vocab_size)
        w.add_uint32(f"{a}.block_size", int(cfg["block_size"]))
        # llama.cpp extracts the *input* of each listed target layer; ours are layer outputs.
        w.add_array(f"{a}.target_layers", [int(i) + 1 for i in cfg["target_layer_ids"]])
        w.add_bool(f"{a}.sample_from_anchor", True)  # block slot k predicts anchor + k + 1 (DeepSpec)
        w.add_bool(f"{a}.has_confidence_head", has_conf)
        w.add_bool(f"{a}.attention.causal", False)
        for f in fields:
            _copy_field(w, f)
        w.add_mask_token_id(int(cfg["mask_token_id"]))
        for name, t in drafter.tensors.items():
            if name == "d2t":
                # llama.cpp's DFlash/DSpark reads d2t as the target id of each draft id (absolute, not
                # vLLM's offsets; measured: with offsets it accepted 0 of 1,294 drafts, with absolute
                # ids as many as we do) and src/models/dflash.cpp asserts GGML_TYPE_I64.
                arr = (torch.arange(t.shape[0]) + t.long()).numpy().astype(np.int64)
            else:
                arr = t.detach().to(torch.float32).numpy()
            w.add_tensor(gguf_tensor_name(name), arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    _atomic(Path(out), write)
    return Path(out)


# ---------------------------------------------------------------------------------------------------
# Command line


def export(drafter_dir: str | Path, fmt: str, out: str | Path, target: str | Path | None = None) -> Path:
    """Export `drafter_dir` to `fmt` at `out`; returns `out`."""
    if fmt not in FORMATS:
        raise DSparkError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    from dspark.models import load_target

    drafter = read_drafter(drafter_dir)
    t = None  # the target, loaded at most once
    if drafter.reduced_vocab and "lm_head.weight" not in drafter.tensors and fmt != "sglang":
        if target is None:
            raise DSparkError(f"--drafter {drafter.path}: a reduced draft vocabulary (draft_vocab_size="
                              f"{drafter.draft_vocab_size}) whose LM head rows are the target's; pass --target (the "
                              "target model) so the export carries lm_head.weight [draft_vocab_size, hidden]")
        t = load_target(str(target), dtype="float32")  # exact rows, cast to the drafter's dtype below
        with_lm_head_rows(drafter, t, target)
    if fmt == "gguf":
        if target is None:
            raise DSparkError("--format gguf needs --target, the target's .gguf file")
        return write_gguf(drafter, Path(target), Path(out))
    if target is not None:
        from dspark.drafters.dspark_drafter import DSparkConfig

        t = t if t is not None else load_target(str(target))
        DSparkConfig.from_json_dict(drafter.config, str(drafter.path / "config.json")).check_target(
            t.config, str(drafter.path / "config.json"))
    return write_hf(drafter, fmt, Path(out))


def with_lm_head_rows(drafter: DrafterFiles, t: Any, target: str | Path) -> None:
    """Add `lm_head.weight` [Vd, H]: the LM head rows of the draft vocabulary of `t`, the loaded target
    (`target` its path, for messages; draft id d is target id d + d2t[d]), in the dtype of the
    drafter's other weights."""
    head = t.transformer.lm_head_weight
    if head.shape[0] != drafter.vocab_size or head.shape[1] != int(drafter.config["hidden_size"]):
        raise DSparkError(f"--target {target}: LM head {list(head.shape)}, the drafter expects "
                          f"[{drafter.vocab_size}, {drafter.config['hidden_size']}]: it was made for another target")
    ids = torch.arange(drafter.draft_vocab_size) + drafter.tensors["d2t"].long()
    if int(ids.min()) < 0 or int(ids.max()) >= drafter.vocab_size:
        raise CheckpointError(f"{drafter.path}: d2t maps draft ids outside the vocabulary [0, {drafter.vocab_size})")
    dtype = drafter.tensors["fc.weight"].dtype
    drafter.tensors["lm_head.weight"] = head[ids].to(dtype).contiguous()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--drafter", required=True, metavar="DIR", help="the DSpark drafter directory to export")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="deepspec / vllm / sglang: a Hugging Face directory for that loader; gguf: one file "
                        "for llama.cpp's draft-dspark")
    p.add_argument("--out", required=True, metavar="PATH", help="directory (deepspec, vllm, sglang) or .gguf file")
    p.add_argument("--target", default=None, metavar="MODEL",
                   help="the target: its .gguf file (required for gguf: its vocabulary goes into the drafter); "
                        "for the other formats a check that the drafter fits it, and the source of the LM head "
                        "rows a reduced-vocabulary drafter exports with (default: none)")


def run(args: argparse.Namespace) -> int:
    out = export(args.drafter, args.format, args.out, args.target)
    print(f"wrote {out} ({args.format})")
    return 0


def main(argv: list[str] | None = None) -> int:
    from dspark.entry import module_main

    return module_main(argv, prog="dspark export", description=__doc__, add_arguments=add_arguments, run=run,
                       label="dspark export: error")


if __name__ == "__main__":
    raise SystemExit(main())
