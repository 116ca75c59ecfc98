"""Parity of the target runtime with transformers on tiny random checkpoints (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_VOCAB, TinyCheckpoint, build_checkpoint
from dspark.models import ForwardResult, TargetModel, load_target

ATOL = 1e-4


def hf_run(ckpt: TinyCheckpoint, ids: list[int]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Reference logits [len, vocab] and hidden_states of transformers on one full sequence."""
    with torch.no_grad():
        out = ckpt.hf_model(torch.tensor([ids]), output_hidden_states=True)
    return out.logits[0].float(), tuple(h[0] for h in out.hidden_states)


def rand_ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY_VOCAB, (n,), generator=g).tolist()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module", params=["qwen3", "llama", "qwen2", "qwen3_bf16", "llama_bf16"])
def pair(request: pytest.FixtureRequest) -> tuple[TinyCheckpoint, TargetModel]:
    ckpt = request.getfixturevalue(f"{request.param}_ckpt")
    target = load_target(ckpt.path)
    # Random float32 weights keep F.linear; bf16 checkpoints run every test on the packed fp16-weight GEMM.
    assert target.cpu_gemm == ("fp16-weights" if request.param.endswith("bf16") else "fp32")
    return ckpt, target


def test_prefill_matches_transformers(pair: tuple[TinyCheckpoint, TargetModel]) -> None:
    ckpt, target = pair
    ids = rand_ids(37, seed=0)
    ref, _ = hf_run(ckpt, ids)
    cache = target.new_cache(max_seqs=2, max_len=64)
    slot = cache.allocate()
    out = target.forward(cache, [slot], [ids])
    assert isinstance(out, ForwardResult) and out.num_new == [37]
    assert out.logits.shape == (1, 37, TINY_VOCAB) and out.logits.dtype == torch.float32
    assert ref.abs().max() > 1.0  # the check is not vacuous: logits are far from zero
    assert max_diff(out.logits[0], ref) < ATOL
    assert cache.length(slot) == 37


def test_last_only_logits(pair: tuple[TinyCheckpoint, TargetModel]) -> None:
    ckpt, target = pair
    a, b = rand_ids(9, seed=1), rand_ids(4, seed=2)
    cache = target.new_cache(max_seqs=2, max_len=32)
    s0, s1 = cache.allocate(), cache.allocate()
    out = target.forward(cache, [s0, s1], [a, b], all_logits=False)
    assert out.logits.shape == (2, 1, TINY_VOCAB)
    assert max_diff(out.logits[0, 0], hf_run(ckpt, a)[0][-1]) < ATOL
    assert max_diff(out.logits[1, 0], hf_run(ckpt, b)[0][-1]) < ATOL


def test_step_by_step_decoding(pair: tuple[TinyCheckpoint, TargetModel]) -> None:
    ckpt, target = pair
    ids = rand_ids(20, seed=3)
    ref, _ = hf_run(ckpt, ids)
    cache = target.new_cache(max_seqs=1, max_len=32)
    slot = cache.allocate()
    target.forward(cache, [slot], [ids[:5]])
    for t in range(5, 20):
        out = target.forward(cache, [slot], torch.tensor([[ids[t]]]))  # tensor fast path
        assert max_diff(out.logits[0, 0], ref[t]) < ATOL, f"step {t}"
    assert cache.length(slot) == 20


def test_rollback_then_refeed_equals_fresh_run(pair: tuple[TinyCheckpoint, TargetModel]) -> None:
    ckpt, target = pair
    prefix, draft_a, draft_b = rand_ids(12, seed=4), rand_ids(6, seed=5), rand_ids(4, seed=6)
    cache = target.new_cache(max_seqs=1, max_len=32)
    slot = cache.allocate()
    target.forward(cache, [slot], [prefix])
    target.forward(cache, [slot], [draft_a])
    cache.truncate(slot, 12 + 2)  # keep two draft tokens, reject the rest
    out = target.forward(cache, [slot], [draft_b])
    ref, _ = hf_run(ckpt, prefix + draft_a[:2] + draft_b)
    assert max_diff(out.logits[0], ref[14:]) < ATOL
    assert cache.length(slot) == 18


def test_batch_of_ragged_sequences_equals_each_alone(pair: tuple[TinyCheckpoint, TargetModel]) -> None:
    ckpt, target = pair
    prompts = [rand_ids(n, seed=10 + n) for n in (7, 15, 3)]
    drafts = [rand_ids(n, seed=20 + n) for n in (4, 1, 3)]
    cache = target.new_cache(max_seqs=5, max_len=32)
    slots = [cache.allocate() for _ in range(5)][1:4]  # slots 1..3: a contiguous range
    pre = target.forward(cache, slots, prompts)  # ragged prefill, all from empty
    # Verify ragged drafts on a non-contiguous slot order (gathered, explicitly masked path).
    order = [2, 0, 1]
    out = target.forward(cache, [slots[i] for i in order], [drafts[i] for i in order], hidden_layer_ids=[0])
    assert out.num_new == [3, 4, 1]
    assert out.logits.shape == (3, 4, TINY_VOCAB)
    for row, i in enumerate(order):
        full = prompts[i] + drafts[i]
        ref, hs = hf_run(ckpt, full)
        p, d = len(prompts[i]), len(drafts[i])
        assert max_diff(pre.logits[i, :p], ref[:p]) < ATOL
        assert max_diff(out.logits[row, :d], ref[p:]) < ATOL
        assert max_diff(out.hidden[row, :d, 0], hs[1][p:]) < ATOL
        assert cache.length(slots[i]) == p + d
    # A decode step with one token each but different lengths (masked, contiguous range).
    nxt = [[5], [6], [7]]
    step = target.forward(cache, slots, nxt)
    for i in range(3):
        ref, _ = hf_run(ckpt, prompts[i] + drafts[i] + nxt[i])
        assert max_diff(step.logits[i, 0], ref[-1]) < ATOL


def test_hidden_state_taps(pair: tuple[TinyCheckpoint, TargetModel]) -> None:
    """Tap -1 = embeddings = hidden_states[0]; tap i = decoder layer i = hidden_states[i + 1], except the
    last layer, where transformers 5.x stores the *normed* output: final_norm(our tap) matches it."""
    ckpt, target = pair
    n_layers = target.num_layers
    last = n_layers - 1
    ids = rand_ids(10, seed=7)
    _, hs = hf_run(ckpt, ids)
    assert len(hs) == n_layers + 1
    cache = target.new_cache(max_seqs=1, max_len=16)
    slot = cache.allocate()
    tap_ids = [-1, 0, 1, last]
    out = target.forward(cache, [slot], [ids[:6]], hidden_layer_ids=tap_ids)
    out2 = target.forward(cache, [slot], [ids[6:]], hidden_layer_ids=tap_ids)  # taps after a cached prefix
    hidden = torch.cat([out.hidden, out2.hidden], dim=1)[0]  # [10, taps, hidden]
    assert hidden.shape == (10, 4, 64)
    for n, i in enumerate(tap_ids):
        if i != last:  # (qwen2 fixture has 2 layers, so there layer 1 is the last)
            assert max_diff(hidden[:, n], hs[i + 1]) < ATOL, f"tap {i}"
    # Raw last-layer output (before final norm), captured with a hook on transformers' last layer.
    captured: list[torch.Tensor] = []
    handle = ckpt.hf_model.model.layers[last].register_forward_hook(
        lambda mod, args, output: captured.append(output[0] if isinstance(output, tuple) else output)
    )
    try:
        hf_run(ckpt, ids)
    finally:
        handle.remove()
    assert max_diff(hidden[:, 3], captured[0][0]) < ATOL
    assert max_diff(target.final_norm(hidden[:, 3]), hs[n_layers]) < ATOL
    assert max_diff(hidden[:, 3], hs[n_layers]) > 1e-2  # the two conventions really differ
    with pytest.raises(ValueError, match="hidden layer id"):
        target.forward(cache, [slot], [[1]], hidden_layer_ids=[n_layers])


def test_embed_and_lm_head_compose(pair: tuple[TinyCheckpoint, TargetModel]) -> None:
    ckpt, target = pair
    ids = rand_ids(5, seed=8)
    ref, hs = hf_run(ckpt, ids)
    assert max_diff(target.embed(torch.tensor(ids)), hs[0]) < ATOL
    logits = target.lm_head(hs[-1]).float()  # hs[-1] is already final-normed in transformers 5.x
    assert max_diff(logits, ref) < ATOL


def test_tied_embeddings_share_storage(llama_ckpt: TinyCheckpoint) -> None:
    target = load_target(llama_ckpt.path)
    assert target.config.tie_word_embeddings
    assert target.transformer.lm_head_weight.data_ptr() == target.transformer.embed_weight.data_ptr()
    assert target.config.rope_scaling is not None  # llama3 scaling parsed (parity tested above)


def test_sharded_checkpoint_matches(tmp_path) -> None:
    ckpt = build_checkpoint(tmp_path / "sharded", "qwen3", seed=3, max_shard_size="40KB")
    assert (ckpt.path / "model.safetensors.index.json").is_file()
    assert len(list(ckpt.path.glob("*.safetensors"))) > 2
    target = load_target(ckpt.path)
    ids = rand_ids(11, seed=9)
    cache = target.new_cache(1, 16)
    out = target.forward(cache, [cache.allocate()], [ids])
    assert max_diff(out.logits[0], hf_run(ckpt, ids)[0]) < ATOL


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16, "auto"])
def test_low_precision_loads_and_runs(qwen3_ckpt: TinyCheckpoint, dtype) -> None:
    target = load_target(qwen3_ckpt.path, dtype=dtype)
    expected = {"bfloat16": torch.bfloat16, torch.float16: torch.float16, "auto": torch.float32}[dtype]
    assert target.dtype == expected and target.transformer.layers[0].attn.qkv_weight.dtype == expected
    ids = rand_ids(16, seed=11)
    cache = target.new_cache(1, 32)
    assert cache.k.dtype == expected
    slot = cache.allocate()
    out = target.forward(cache, [slot], [ids[:10]])
    step = target.forward(cache, [slot], [ids[10:]])
    logits = torch.cat([out.logits, step.logits], dim=1)[0]
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    ref, _ = hf_run(qwen3_ckpt, ids)
    tol = 1e-4 if expected == torch.float32 else 0.1 * ref.abs().max().item()
    assert max_diff(logits, ref) < tol
    # Low precision mostly keeps the argmax (random logits have some near-ties).
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_bf16_checkpoint_auto_dtype(tmp_path) -> None:
    ckpt = build_checkpoint(tmp_path / "bf16", "qwen3", seed=4, num_layers=2, dtype=torch.bfloat16)
    assert load_target(ckpt.path, dtype="auto").dtype == torch.bfloat16
    assert load_target(ckpt.path).dtype == torch.float32  # CPU default


def test_context_length_and_cache_limits(qwen3_ckpt: TinyCheckpoint) -> None:
    target = load_target(qwen3_ckpt.path)
    assert target.max_position_embeddings == target.context_length == 256
    assert target.new_cache(1).max_len == 256
    with pytest.raises(ValueError, match="max_position_embeddings=256"):
        target.new_cache(1, max_len=257)


def test_rms_norm_fast_path_matches_reference() -> None:
    from dspark.models.transformer import rms_norm

    x, w = torch.randn(3, 5, 4, 32), torch.randn(4, 32)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    assert max_diff(rms_norm(x, w, 1e-6), ref) < 1e-5
    xb = x.bfloat16()  # low precision takes the transformers-exact path
    ref_b = w.bfloat16() * (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(rms_norm(xb, w.bfloat16(), 1e-6), ref_b)


def test_complex_rope_on_interleaved_rows_matches_rotate_half() -> None:
    """RoPE as transformers writes it (half-split rotate_half on HF rows) equals our complex multiply on
    interleaved rows, up to the same row permutation."""
    from dspark.models.transformer import interleave_rope_rows

    H, D, P = 3, 8, 5
    x = torch.randn(P, H, D)  # HF row order
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.arange(P).float()[:, None] * inv_freq[None, :]  # [P, D/2]
    cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]
    rotate_half = torch.cat([-x[..., D // 2 :], x[..., : D // 2]], dim=-1)
    ref = x * cos + rotate_half * sin  # [P, H, D]
    xi = interleave_rope_rows(x.permute(1, 2, 0).reshape(H * D, P), H, D).reshape(H, D, P).permute(2, 0, 1)
    got = torch.view_as_real(torch.view_as_complex(xi.contiguous().reshape(P, H, D // 2, 2)) * torch.polar(
        torch.ones_like(freqs), freqs)[:, None]).reshape(P, H, D)
    ref_i = interleave_rope_rows(ref.permute(1, 2, 0).reshape(H * D, P), H, D).reshape(H, D, P).permute(2, 0, 1)
    assert max_diff(got, ref_i) < 1e-5


def test_outputs_usable_by_a_trainer(qwen3_ckpt: TinyCheckpoint) -> None:
    """Drafters train through the frozen embedding / final norm / LM head and on forward's taps."""
    target = load_target(qwen3_ckpt.path)
    cache = target.new_cache(1, 16)
    out = target.forward(cache, [cache.allocate()], [[1, 2, 3]], hidden_layer_ids=[0])
    fc = torch.nn.Linear(64, 64)
    h = fc(out.hidden[:, :, 0])  # would fail on inference-mode tensors
    loss = target.lm_head(target.final_norm(h + target.embed(torch.tensor([[1, 2, 3]])))).logsumexp(-1).sum()
    loss.backward()
    assert fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0
    assert not target.transformer.lm_head_weight.requires_grad


def test_packed_fp16_weight_gemm_is_opt_out_and_exact(qwen3_bf16_ckpt: TinyCheckpoint) -> None:
    from dspark.models.transformer import fp16_exact

    packed, plain = load_target(qwen3_bf16_ckpt.path), load_target(qwen3_bf16_ckpt.path, cpu_gemm="off")
    assert packed.cpu_gemm == "fp16-weights" and plain.cpu_gemm == "fp32"
    ids = rand_ids(21, seed=9)
    outs = []
    for t in (packed, plain):
        cache = t.new_cache(max_seqs=1, max_len=32)
        outs.append(t.forward(cache, [cache.allocate()], [ids]).logits)
    assert max_diff(outs[0], outs[1]) < 1e-4  # same weights, same fp32 accumulation, other order
    w = torch.tensor([1.0, 0.1, 2.0 ** -20])
    assert fp16_exact(w.bfloat16().float()) and not fp16_exact(torch.tensor([0.1])) and \
        not fp16_exact(torch.tensor([1e6]))
    with pytest.raises(ValueError, match="cpu_gemm must be one of auto, fp16, int4, int4-a8, off"):
        load_target(qwen3_bf16_ckpt.path, cpu_gemm="fast")
