"""The DSpark drafter: DeepSpec-layout loading, caches, batching, train/serve agreement, sampling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from dspark.drafters import (DRAFTERS, DSparkConfig, DSparkDrafter, DSparkModel, Drafter,
                             default_target_layer_ids, load_drafter)
from dspark.drafters.dspark_drafter import BlockDraft
from dspark.errors import CheckpointError
from dspark.sampling import SamplingParams, SamplingTensors, logits_to_probs, make_generator

G = 4  # block size used throughout


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(target, seed: int = 0, **overrides) -> DSparkModel:
    """A random drafter with weights large enough that every component visibly matters."""
    kw = dict(block_size=G, markov_rank=8, num_hidden_layers=2)
    kw.update(overrides)
    cfg = DSparkConfig.for_target(target.config, target.tokenizer.mask_token_id, **kw)
    model = DSparkModel.from_target(cfg, target, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    model.requires_grad_(False)
    return model


def taps(model: DSparkModel, n: int, seed: int = 0) -> torch.Tensor:
    """Random target features [n, L, H] (the drafter only consumes them)."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return torch.randn(n, len(c.target_layer_ids), c.hidden_size, generator=g)


def sampling(*params: SamplingParams) -> SamplingTensors:
    return SamplingTensors.from_params(list(params))


GREEDY = SamplingParams(temperature=0.0)


def draft(d: DSparkDrafter, slots, anchors, params, seeds=None, gamma=G) -> BlockDraft:
    gens = [make_generator(s) for s in (seeds or [None] * len(slots))]
    return d.draft_block(list(slots), list(anchors), gamma, sampling(*params), gens)


# ---------------------------------------------------------------------------------------------------
# An independent reference of the architecture, written from the paper and DeepSpec's parameter names
# with Hugging Face conventions (rotate_half, repeated KV heads, explicit softmax).


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def reference_block(w: dict, cfg: dict, hidden: torch.Tensor, anchor: int, embed, lm_head):
    """Base logits [G, V] and h [G, H] for an anchor at position p = len(hidden)."""
    eps, Hq, Hkv, D = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    p, Gs = hidden.shape[0], cfg["block_size"]
    ctx = _rms(hidden.reshape(p, -1) @ w["fc.weight"].T, w["hidden_norm.weight"], eps)  # [p, H]
    ids = torch.tensor([anchor] + [cfg["mask_token_id"]] * (Gs - 1))
    x = embed[ids]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, D, 2).float() / D))
    pos = torch.arange(p + Gs).float()
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], dim=-1)
    cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # [p+G, 1, D]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"layers.{i}."
        hn = _rms(x, w[pre + "input_layernorm.weight"], eps)
        q = _rms((hn @ w[pre + "self_attn.q_proj.weight"].T).view(Gs, Hq, D), w[pre + "self_attn.q_norm.weight"], eps)
        kin = torch.cat([ctx, hn])  # context features and block tokens share k_proj / v_proj
        k = _rms((kin @ w[pre + "self_attn.k_proj.weight"].T).view(-1, Hkv, D), w[pre + "self_attn.k_norm.weight"], eps)
        v = (kin @ w[pre + "self_attn.v_proj.weight"].T).view(-1, Hkv, D)
        q = q * cos[p:] + _rotate_half(q) * sin[p:]
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
        att = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)  # every block query sees everything
        o = torch.einsum("hqk,khd->qhd", att.softmax(-1), v).reshape(Gs, Hq * D)
        x = x + o @ w[pre + "self_attn.o_proj.weight"].T
        hn = _rms(x, w[pre + "post_attention_layernorm.weight"], eps)
        gate, up = hn @ w[pre + "mlp.gate_proj.weight"].T, hn @ w[pre + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ w[pre + "mlp.down_proj.weight"].T
    h = _rms(x, w["norm.weight"], eps)
    return h @ lm_head.T, h


def write_deepspec_dir(path: Path, target, seed: int = 3) -> tuple[dict, dict]:
    """A drafter directory built by hand from DeepSpec's field and parameter names (embedding and LM
    head included, no `drafter_type`, rope in the transformers-5 `rope_parameters` form)."""
    tc = target.config
    r, H, V, D = 8, tc.hidden_size, tc.vocab_size, tc.head_dim
    layer_ids = [0, 1]
    cfg = {
        "architectures": ["Qwen3DSparkModel"], "model_type": "qwen3", "block_size": G,
        "target_layer_ids": layer_ids, "num_target_layers": tc.num_layers, "num_anchors": 512,
        "mask_token_id": target.tokenizer.mask_token_id, "markov_rank": r, "markov_head_type": "vanilla",
        "enable_confidence_head": True, "confidence_head_with_markov": True, "num_hidden_layers": 1,
        "hidden_size": H, "intermediate_size": 80, "num_attention_heads": tc.num_heads,
        "num_key_value_heads": tc.num_kv_heads, "head_dim": D, "rms_norm_eps": 1e-6, "vocab_size": V,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "max_position_embeddings": 256,
        "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
        "layer_types": ["full_attention"], "torch_dtype": "float32",
    }
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return scale * torch.randn(*shape, generator=g)

    Hq, Hkv = tc.num_heads, tc.num_kv_heads
    w = {
        "fc.weight": rnd(H, len(layer_ids) * H), "hidden_norm.weight": 1 + rnd(H), "norm.weight": 1 + rnd(H),
        "layers.0.input_layernorm.weight": 1 + rnd(H), "layers.0.post_attention_layernorm.weight": 1 + rnd(H),
        "layers.0.self_attn.q_proj.weight": rnd(Hq * D, H), "layers.0.self_attn.k_proj.weight": rnd(Hkv * D, H),
        "layers.0.self_attn.v_proj.weight": rnd(Hkv * D, H), "layers.0.self_attn.o_proj.weight": rnd(H, Hq * D),
        "layers.0.self_attn.q_norm.weight": 1 + rnd(D), "layers.0.self_attn.k_norm.weight": 1 + rnd(D),
        "layers.0.mlp.gate_proj.weight": rnd(80, H), "layers.0.mlp.up_proj.weight": rnd(80, H),
        "layers.0.mlp.down_proj.weight": rnd(H, 80),
        "markov_head.markov_w1.weight": rnd(V, r, scale=1.0), "markov_head.markov_w2.weight": rnd(V, r, scale=1.0),
        "confidence_head.proj.weight": rnd(1, H + r), "confidence_head.proj.bias": rnd(1),
        "embed_tokens.weight": target.transformer.embed_weight.detach().clone(),
        "lm_head.weight": target.transformer.lm_head_weight.detach().clone(),
    }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(cfg, rope_theta=10000.0)
    return cfg, w


# ---------------------------------------------------------------------------------------------------


def test_default_target_layer_ids() -> None:
    assert default_target_layer_ids(8) == [1, 3, 5]
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    for n in range(1, 40):
        ids = default_target_layer_ids(n)
        assert ids and all(-1 <= i < n - 1 or n == 1 for i in ids) and ids == sorted(set(ids))


def test_registry_and_protocol(target) -> None:
    assert DRAFTERS["dspark"] is DSparkDrafter and "dflash" in DRAFTERS
    d = DSparkDrafter(make_model(target), max_seqs=2, max_len=64)
    assert isinstance(d, Drafter)
    assert d.name == "dspark" and d.block_size == G


def test_deepspec_layout_loads_and_matches_reference(target, tmp_path) -> None:
    cfg, w = write_deepspec_dir(tmp_path / "ds", target)
    d = load_drafter(tmp_path / "ds", target, max_seqs=2, max_len=64)
    assert d.name == "dspark" and d.block_size == G and d.target_layer_ids == [0, 1]
    hidden = torch.randn(9, 2, target.config.hidden_size, generator=torch.Generator().manual_seed(5))
    d.add_sequence(0, list(range(10, 19)), hidden)
    anchor = 42
    out = draft(d, [0], [anchor], [GREEDY])
    embed, head = w["embed_tokens.weight"], w["lm_head.weight"]
    base, h = reference_block(w, cfg, hidden, anchor, embed, head)
    assert torch.allclose(out.base_logits[0], base, atol=1e-4), (out.base_logits[0] - base).abs().max()
    # Sequential head and confidence head, left to right from the anchor.
    prev = anchor
    for k in range(G):
        e = w["markov_head.markov_w1.weight"][prev]
        logits = base[k] + e @ w["markov_head.markov_w2.weight"].T
        c = torch.sigmoid(torch.cat([h[k], e]) @ w["confidence_head.proj.weight"][0] + w["confidence_head.proj.bias"])
        assert int(out.token_ids[0, k]) == int(logits.argmax())
        assert torch.allclose(out.logits[0, k], logits, atol=1e-4)
        assert float(out.confidence[0, k]) == pytest.approx(float(c), abs=1e-5)
        prev = int(out.token_ids[0, k])
    proposal = d.propose([0], [anchor], 3, sampling(GREEDY), [None])
    assert proposal.token_ids.shape == (1, 3) and proposal.probs is None
    assert torch.equal(proposal.token_ids[0], out.token_ids[0, :3])
    assert ((proposal.confidence > 0) & (proposal.confidence < 1)).all()


def test_deepspec_layout_errors_name_file_and_key(target, tmp_path) -> None:
    cfg, w = write_deepspec_dir(tmp_path / "ok", target)

    def variant(name, cfg_change=None, drop=None, tensors=None):
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps({**cfg, **(cfg_change or {})}))
        ws = {k: v for k, v in w.items() if k != drop}
        ws.update(tensors or {})
        save_file(ws, str(path / "model.safetensors"))
        return path

    with pytest.raises(CheckpointError, match="layers.0.mlp.up_proj.weight"):
        load_drafter(variant("missing", drop="layers.0.mlp.up_proj.weight"), target, 1, 32)
    with pytest.raises(CheckpointError, match="architectures"):
        load_drafter(variant("arch", {"architectures": ["Nope"]}), target, 1, 32)
    with pytest.raises(CheckpointError, match="block_size"):
        load_drafter(variant("bs", {"block_size": 0}), target, 1, 32)
    with pytest.raises(CheckpointError, match="target_layer_ids"):
        load_drafter(variant("layers", {"target_layer_ids": [0, 7]}), target, 1, 32)
    with pytest.raises(CheckpointError, match="num_target_layers"):
        load_drafter(variant("ntl", {"num_target_layers": 5}), target, 1, 32)
    with pytest.raises(CheckpointError, match="embed_tokens.weight"):
        load_drafter(variant("emb", tensors={"embed_tokens.weight": torch.zeros(3, 3)}), target, 1, 32)
    with pytest.raises(CheckpointError, match="fc.weight.*shape"):
        load_drafter(variant("fc", tensors={"fc.weight": torch.zeros(3, 3)}), target, 1, 32)
    with pytest.raises(CheckpointError, match="config.json"):
        load_drafter(tmp_path, target, 1, 32)  # a directory without config.json
    with pytest.raises(CheckpointError, match="registered"):
        load_drafter("no-such-drafter", target, 1, 32)


def test_save_load_roundtrip_gives_identical_proposals(target, tmp_path) -> None:
    for head in ("markov", "gated_markov", "rnn", "joint", "ctx"):
        model = (make_model(target, block_context=True, context_next_token=True) if head == "ctx"
                 else make_model(target, markov_head_type=head))
        a = DSparkDrafter(model, 2, 64)
        out = a.save_pretrained(tmp_path / head)
        raw = json.loads((out / "config.json").read_text())
        assert raw["architectures"] == ["Qwen3DSparkModel"] and raw["drafter_type"] == "dspark"
        assert raw["markov_head_type"] == {"markov": "vanilla", "gated_markov": "gated", "rnn": "rnn", "joint": "joint",
                                      "ctx": "vanilla"}[head]
        assert raw.get("block_context", False) == raw.get("context_next_token", False) == (head == "ctx")
        b = load_drafter(out, target, 2, 64)
        assert b.config == model.config
        for d in (a, b):
            d.add_sequence(3, list(range(7)), taps(model, 7))
        params = [GREEDY, SamplingParams(temperature=0.9, top_k=40, seed=1)]
        pa = draft(a, [3, 3][:1], [11], params[1:], seeds=[1])
        pb = draft(b, [3], [11], params[1:], seeds=[1])
        assert torch.equal(pa.token_ids, pb.token_ids)
        assert torch.equal(pa.probs, pb.probs)
        assert torch.equal(pa.confidence, pb.confidence)


@pytest.mark.parametrize("block_context, next_token", [(False, False), (True, False), (False, True)])
def test_incremental_context_equals_full_recompute(target, block_context, next_token) -> None:
    model = make_model(target, block_context=block_context, context_next_token=next_token)
    n0, chunks = 6, [3, 1, 4]
    total = n0 + sum(chunks)
    hidden = taps(model, total)
    ids = list(range(20, 20 + total))
    inc = DSparkDrafter(model, 2, 64)
    inc.add_sequence(1, ids[:n0], hidden[:n0])
    pos = n0
    for c in chunks:
        draft(inc, [1], [ids[pos]], [GREEDY])  # writes block scratch past the context; must not leak
        inc.commit(1, ids[pos:pos + c], hidden[pos:pos + c])
        pos += c
    full = DSparkDrafter(model, 2, 64)
    full.add_sequence(0, ids, hidden)
    assert inc.context_length(1) == full.context_length(0) == total
    p = SamplingParams(temperature=0.7, seed=3)
    a = draft(inc, [1], [5], [p], seeds=[3])
    b = draft(full, [0], [5], [p], seeds=[3])
    assert torch.equal(a.token_ids, b.token_ids)
    assert torch.allclose(a.probs, b.probs, atol=1e-6)
    assert torch.allclose(a.confidence, b.confidence, atol=1e-6)
    # Sanity: the context matters (a drafter that missed the last commit drafts differently).
    short = DSparkDrafter(model, 1, 64)
    short.add_sequence(0, ids[:-4], hidden[:-4])
    c = draft(short, [0], [5], [p], seeds=[3])
    assert not torch.allclose(c.base_logits, b.base_logits, atol=1e-3)


@pytest.mark.parametrize("head, block_context, next_token", [
    ("markov", False, False), ("gated_markov", False, False), ("rnn", False, False), ("joint", False, False),
    ("markov", True, False), ("markov", False, True), ("markov", True, True)])
def test_training_forward_equals_inference(target, head, block_context, next_token) -> None:
    model = make_model(target, markov_head_type=head, block_context=block_context, context_next_token=next_token)
    T0 = 14
    hidden = taps(model, T0 + G)
    ids = torch.randint(4, 250, (T0,), generator=torch.Generator().manual_seed(2)).tolist()
    # (anchor 0, no context at all, exists only in training; with both options its block input is not zero there)
    anchors = [1 if block_context and next_token else 0, 5, 9, 13]
    infer = {}
    for t in anchors:
        d = DSparkDrafter(model, 1, 64)
        d.add_sequence(0, ids[:max(t, 1)], hidden[:max(t, 1)])
        if t == 0:  # no context at all: drop the one we had to add
            d.cache.truncate(d._slots[0], 0)
            d._pending.clear()
            if block_context:
                d._last_taps.zero_()
        infer[t] = draft(d, [0], [ids[t]], [GREEDY])
    # Continue the sequence with the last block's own drafts so teacher forcing replays them.
    seq = ids + infer[13].token_ids[0].tolist()
    out = model.forward_train(hidden[None, :len(seq)], torch.tensor([seq]), torch.tensor([anchors]))
    for a, t in enumerate(anchors):
        assert torch.allclose(out.base_logits[0, a], infer[t].base_logits[0], atol=1e-4), t
        assert torch.equal(out.labels[0, a], torch.tensor(seq[t + 1:t + 1 + G]))
    assert torch.allclose(out.logits[0, 3], infer[13].logits[0], atol=1e-4)
    assert torch.allclose(torch.sigmoid(out.confidence_logits[0, 3]), infer[13].confidence[0], atol=1e-5)
    assert out.label_mask.all()


def test_training_forward_masks_past_the_end(target) -> None:
    model = make_model(target)
    T = 10
    out = model.forward_train(taps(model, T)[None], torch.arange(10, 10 + T)[None], torch.tensor([[2, 7, 8, 0]]),
                              anchor_mask=torch.tensor([[True, True, True, False]]),
                              loss_mask=torch.tensor([[False] * 3 + [True] * 7]))
    assert out.label_mask[0].tolist() == [
        [True, True, True, True],  # predicts 3..6
        [True, True, False, False],  # 8, 9, then past the end
        [True, False, False, False],
        [False, False, False, False],  # padding anchor
    ]


@pytest.mark.parametrize("block_context, next_token", [(False, False), (True, False), (False, True)])
def test_batched_propose_equals_each_alone(target, block_context, next_token) -> None:
    model = make_model(target, block_context=block_context, context_next_token=next_token)
    lengths = [5, 11, 8]
    params = [GREEDY, SamplingParams(temperature=0.8, top_k=50, seed=7), SamplingParams(temperature=1.0, top_p=0.9, seed=8)]
    hid = [taps(model, n, seed=i) for i, n in enumerate(lengths)]
    batched = DSparkDrafter(model, 4, 64)
    for slot, (n, h) in enumerate(zip(lengths, hid)):
        batched.add_sequence(slot + 1, list(range(n)), h)
    both = draft(batched, [3, 1, 2], [30, 10, 20], [params[2], params[0], params[1]], seeds=[8, None, 7])
    order = {3: 0, 1: 1, 2: 2}
    for slot, anchor, p, s in ((1, 10, params[0], None), (2, 20, params[1], 7), (3, 30, params[2], 8)):
        alone = DSparkDrafter(model, 1, 64)
        alone.add_sequence(0, list(range(lengths[slot - 1])), hid[slot - 1])
        one = draft(alone, [0], [anchor], [p], seeds=[s])
        row = order[slot]
        assert torch.equal(both.token_ids[row], one.token_ids[0])
        assert torch.allclose(both.logits[row], one.logits[0], atol=1e-4)
        assert torch.allclose(both.confidence[row], one.confidence[0], atol=1e-5)


def test_markov_bias_conditions_on_the_sampled_prefix(target) -> None:
    """With a sequential head, p_2 depends on the token drawn at position 1; without one (DFlash,
    markov_rank 0) every position's distribution is the parallel backbone's alone."""
    for rank in (8, 0):
        model = make_model(target, markov_rank=rank, confidence_head_with_markov=rank > 0)
        d = DSparkDrafter(model, 1, 64)
        d.add_sequence(0, list(range(6)), taps(model, 6))
        runs = [draft(d, [0], [9], [SamplingParams(temperature=2.0, seed=s)], seeds=[s]) for s in range(12)]
        x1 = [int(r.token_ids[0, 0]) for r in runs]
        assert len(set(x1)) > 1
        i, j = next((i, j) for i in range(12) for j in range(12) if x1[i] != x1[j])
        same = torch.allclose(runs[i].probs[0, 1], runs[j].probs[0, 1])
        if rank:
            assert not same
            head = model.markov_head
            prev = torch.cat([torch.tensor([9]), runs[i].token_ids[0, :-1]])
            assert torch.allclose(runs[i].logits[0], runs[i].base_logits[0] + head.block(prev, torch.zeros(G, 1)), atol=1e-5)
        else:
            assert same
            assert model.markov_head is None
            assert torch.equal(runs[i].logits, runs[i].base_logits)


def test_dflash_drafter(target, tmp_path) -> None:
    model = make_model(target, markov_rank=0, enable_confidence_head=False, drafter_type="dflash")
    DSparkDrafter(model, 1, 32).save_pretrained(tmp_path / "df")
    d = load_drafter(tmp_path / "df", target, 1, 32)
    assert d.name == "dflash" and d.config.markov_rank == 0
    d.add_sequence(0, [1, 2, 3], taps(model, 3))
    prop = d.propose([0], [4], G, sampling(GREEDY), [None])
    assert prop.confidence is None and prop.token_ids.shape == (1, G)


def test_greedy_and_sampled_probs_are_exact(target) -> None:
    model = make_model(target)
    d = DSparkDrafter(model, 3, 64)
    for s in range(3):
        d.add_sequence(s, list(range(5 + s)), taps(model, 5 + s, seed=s))
    # All greedy: no probs; tokens are the argmax of the logits they were drafted from.
    g = draft(d, [0, 1, 2], [7, 8, 9], [GREEDY] * 3)
    assert g.probs is None
    assert torch.equal(g.token_ids, g.logits.argmax(-1))
    prop = d.propose([0, 1, 2], [7, 8, 9], G, sampling(GREEDY, GREEDY, GREEDY), [None] * 3)
    assert prop.probs is None and torch.equal(prop.token_ids, g.token_ids)
    # Mixed: the greedy row gets a one-hot on its token, the sampled rows the exact distribution.
    params = [GREEDY, SamplingParams(temperature=0.8, top_k=20, seed=1), SamplingParams(temperature=1.3, top_p=0.8, seed=2)]
    m = draft(d, [0, 1, 2], [7, 8, 9], params, seeds=[None, 1, 2])
    st = sampling(*params)
    assert torch.equal(m.token_ids[0], g.token_ids[0])
    assert torch.allclose(m.probs, logits_to_probs(m.logits, st.temperature, st.top_k, st.top_p))
    assert torch.allclose(m.probs.sum(-1), torch.ones(3, G), atol=1e-5)
    picked = m.probs.gather(-1, m.token_ids[..., None]).squeeze(-1)
    assert (picked > 0).all()
    assert torch.equal(m.probs[0].argmax(-1), m.token_ids[0]) and (m.probs[0].max(-1).values == 1).all()
    assert ((m.probs[1] > 0).sum(-1) <= 20).all()
    # Same seeds, same drafts (per-request generators, independent of the rest of the batch).
    again = draft(d, [1], [8], params[1:2], seeds=[1])
    assert torch.equal(again.token_ids[0], m.token_ids[1])


def test_propose_checks_arguments(target) -> None:
    d = DSparkDrafter(make_model(target), 1, 32)
    d.add_sequence(0, [1, 2], taps(d.model, 2))
    with pytest.raises(ValueError, match="gamma"):
        d.propose([0], [1], G + 1, sampling(GREEDY), [None])
    with pytest.raises(ValueError, match="target_hidden"):
        d.commit(0, [1, 2], taps(d.model, 3))
    with pytest.raises(Exception, match="not tracked"):
        d.propose([5], [1], 2, sampling(GREEDY), [None])
    d.free(0)
    d.add_sequence(0, [1], taps(d.model, 1))  # the slot is reusable after free


# ---------------------------------------------------------------------------------------------------
# The greedy Markov kernel (markov_greedy.c) and the int8 packing of inference projections


@pytest.mark.parametrize("reduced", [False, True], ids=["full-vocab", "draft-vocab"])
@pytest.mark.parametrize("with_stop", [False, True])
def test_greedy_kernel_drafts_what_the_torch_loop_drafts(target, monkeypatch, reduced, with_stop) -> None:
    """The one-call greedy loop gives the torch loop's tokens, logits and confidences, and stops where
    it stops (the scheduler's `stop` sees the same confidences, position by position)."""
    from dspark.drafters import markov_kernel

    if not markov_kernel.available():
        pytest.skip(f"no greedy Markov kernel here: {markov_kernel.KERNEL.unavailable_reason()}")
    overrides = {"draft_vocab_size": 64} if reduced else {}
    out = {}
    seen = {}
    for kernel in (True, False):
        d = DSparkDrafter(make_model(target, seed=4, markov_rank=16, **overrides), max_seqs=3, max_len=64)
        if reduced:
            d.model.set_draft_vocab(torch.arange(3, 3 + 4 * 64, 4))
        for s, n in enumerate((9, 5, 12)):
            d.add_sequence(s, list(range(10 + s, 10 + s + n)), taps(d.model, n, seed=s))
        calls: list[torch.Tensor] = []

        def stop(conf: torch.Tensor) -> int | None:  # settles at the second position: verify 3
            calls.append(conf.clone())
            return 3 if conf.shape[1] >= 2 else None
        monkeypatch.setattr(markov_kernel, "available", lambda: kernel)
        with torch.inference_mode():
            assert d._greedy_kernel_fits(sampling(GREEDY, GREEDY, GREEDY), torch.zeros(1)) == kernel
        out[kernel] = d.draft_block([0, 1, 2], [42, 7, 99], G, sampling(GREEDY, GREEDY, GREEDY), [None] * 3,
                                    stop=stop if with_stop else None)
        seen[kernel] = calls
    a, b = out[True], out[False]
    assert a.token_ids.shape == b.token_ids.shape == (3, 3 if with_stop else G)
    assert torch.equal(a.token_ids, b.token_ids)
    # with a stop the kernel computes the LM head only for the positions it reaches (2, then 1 more)
    assert a.base_logits.shape[1] == (3 if with_stop else G)
    assert torch.allclose(a.logits, b.logits, atol=1e-4)
    assert torch.allclose(a.base_logits, b.base_logits[:, :a.base_logits.shape[1]], atol=1e-5)
    assert torch.allclose(a.confidence, b.confidence, atol=1e-5)
    assert len(seen[True]) == len(seen[False]) == (2 if with_stop else 0)
    for x, y in zip(seen[True], seen[False]):
        assert torch.allclose(x, y, atol=1e-5)


def test_block_attention_on_the_row_kernel_matches_sdpa(target) -> None:
    """At inference the block's attention runs on the row kernel (each block row against its own
    sequence's context and whole block, read in place from the cache); it drafts what SDPA with the
    block mask drafts, for sequences of different context lengths in one call."""
    from dspark.models import row_attention

    if not row_attention.available():
        pytest.skip(f"no row attention kernel here: {row_attention.unavailable_reason()}")
    out = {}
    for use in (True, False):
        d = DSparkDrafter(make_model(target, seed=5), max_seqs=3, max_len=64)
        d.use_row_attention = use
        for s, n in enumerate((9, 2, 17)):
            d.add_sequence(s, list(range(10 + s, 10 + s + n)), taps(d.model, n, seed=s))
        calls = []
        orig = row_attention.attention
        try:
            row_attention.attention = lambda *a, **k: calls.append(1) or orig(*a, **k)  # type: ignore[assignment]
            out[use] = d.draft_block([0, 1, 2], [42, 7, 99], G, sampling(GREEDY, GREEDY, GREEDY), [None] * 3)
        finally:
            row_attention.attention = orig  # type: ignore[assignment]
        assert bool(calls) == use  # the kernel ran (once per draft layer) only when asked
    a, b = out[True], out[False]
    assert torch.equal(a.token_ids, b.token_ids)
    assert torch.allclose(a.base_logits, b.base_logits, atol=1e-4), (a.base_logits - b.base_logits).abs().max()
    assert torch.allclose(a.confidence, b.confidence, atol=1e-5)


def _c_drafter(target, seed: int, max_seqs: int, use_c: bool) -> DSparkDrafter:
    """A random float32 drafter with its projections packed for the C draft layers (skips where the
    kernels do not build), set to use them or not."""
    from dspark.models import int4_gemm, row_attention

    if not (int4_gemm.available() and row_attention.available()):
        pytest.skip("no int8 GEMM or row attention kernel here")
    model = make_model(target, seed=seed, intermediate_size=96)
    model.float()
    assert model.pack_fp16_weights() > 0
    d = DSparkDrafter(model, max_seqs=max_seqs, max_len=64)
    d.use_c_layers = use_c
    return d


def test_draft_layers_in_one_c_call_match_the_torch_ops(target) -> None:
    """With the projections on the int8 GEMM, each draft layer runs as one C call (`c_layers`: q|k|v and
    gate|up fused, q/k head norms, half-rotating RoPE, the block rows' keys written at their positions,
    row attention over context and block); it drafts what the same layers in torch ops draft."""
    from dspark.models import int4_gemm

    out, calls = {}, []
    orig = int4_gemm.draft_layer
    for use in (True, False):
        d = _c_drafter(target, 6, 3, use)
        assert d.model.c_layers is not None and len(d.model.c_layers) == 2
        for s, n in enumerate((9, 2, 17)):
            d.add_sequence(s, list(range(10 + s, 10 + s + n)), taps(d.model, n, seed=s))
        calls.clear()
        try:
            int4_gemm.draft_layer = lambda *a, **k: calls.append(1) or orig(*a, **k)  # type: ignore[assignment]
            with torch.inference_mode():
                out[use] = d.draft_block([0, 1, 2], [42, 7, 99], G, sampling(GREEDY, GREEDY, GREEDY), [None] * 3)
        finally:
            int4_gemm.draft_layer = orig  # type: ignore[assignment]
        assert len(calls) == (2 if use else 0)  # once per draft layer, only when asked
    a, b = out[True], out[False]
    assert torch.equal(a.token_ids, b.token_ids)
    assert torch.allclose(a.base_logits, b.base_logits, atol=2e-3), (a.base_logits - b.base_logits).abs().max()
    assert torch.allclose(a.confidence, b.confidence, atol=1e-3)


def test_context_keys_values_in_one_c_call_match_the_torch_ops(target) -> None:
    """With the C draft layers, what a commit appends to the drafter's cache (context features and every
    layer's keys and values, for a prompt and for a ragged batch of kept tokens) is one C call
    (`int4_gemm.draft_context`); it writes what the torch ops write, at the same positions, and leaves
    every other cache entry alone."""
    from dspark.drafters.base import DraftCommit
    from dspark.models import int4_gemm

    caches, calls = {}, []
    orig = int4_gemm.draft_context
    for use in (True, False):
        d = _c_drafter(target, 7, 4, use)
        assert d.model.c_context is not None
        calls.clear()
        try:
            int4_gemm.draft_context = lambda *a, **k: calls.append(a[1].shape[0]) or orig(*a, **k)  # type: ignore
            with torch.inference_mode():
                for s, n in enumerate((9, 2, 17)):
                    d.add_sequence(s, list(range(10 + s, 10 + s + n)), taps(d.model, n, seed=s))
                kept = [[5, 6, 7], [8], [9, 10]]
                hidden = torch.stack([torch.cat([taps(d.model, len(k), seed=10 + i),
                                                 torch.zeros(3 - len(k), *taps(d.model, 1).shape[1:])])
                                      for i, k in enumerate(kept)])
                d.commit_batch(DraftCommit([2, 0, 1], kept, hidden))
        finally:
            int4_gemm.draft_context = orig  # type: ignore[assignment]
        assert calls == ([9, 2, 17, 6] if use else [])  # one call a commit, its rows only
        assert [d.context_length(s) for s in range(3)] == [10, 4, 20]
        caches[use] = (d.cache.k.clone(), d.cache.v.clone())
    (kc, vc), (kt, vt) = caches[True], caches[False]
    assert torch.equal(kc == 0, kt == 0) and torch.equal(vc == 0, vt == 0)  # the same entries written
    assert torch.allclose(kc, kt, atol=1e-4), (kc - kt).abs().max()
    assert torch.allclose(vc, vt, atol=1e-4), (vc - vt).abs().max()
    assert (kc != 0).any()


def test_inference_projections_run_int8_close_to_float(target) -> None:
    """`pack_fp16_weights` puts a drafter's projections on the int8 GEMM (Q8_0 weights, 8-bit
    activations) where it builds: under inference_mode they stay within a percent of the float32
    projections; with gradients enabled (training) they are exactly F.linear."""
    from dspark.models import int4_gemm
    from dspark.models.transformer import Int8Linear

    if not int4_gemm.available():
        pytest.skip(f"no int8 kernel here: {int4_gemm.unavailable_reason()}")
    model = make_model(target, seed=2, markov_rank=16)
    model.float()
    lin = model.layers[0].mlp.gate_proj
    assert lin.in_features % 32 == 0
    x = torch.randn(3, 5, lin.in_features, generator=torch.Generator().manual_seed(1))
    exact = F.linear(x, lin.weight, lin.bias)
    assert model.pack_fp16_weights() > 0
    packed = lin.forward.args[1]
    assert isinstance(packed, Int8Linear) and packed.act8
    with torch.inference_mode():
        fast = lin(x)
    err = (fast - exact).abs().max().item()
    assert 0 < err <= 0.01 * exact.abs().max().item()
    with torch.enable_grad():
        assert torch.equal(lin(x), exact)
