"""The batch-invariant row attention kernel: it matches SDPA to float32 rounding, and a token's outputs
are the same bits whatever it is computed with (a verification call of k tokens or k decode steps,
alone or batched with other sequences of other lengths, padded or not)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_checkpoint

from dspark.models import load_target, row_attention

pytestmark = pytest.mark.skipif(not row_attention.available(),
                                reason=f"row attention kernel unavailable: {row_attention.unavailable_reason()}")


def _kernel(q, k, v, rows, scale, lib=None):
    out = torch.full_like(q, float("nan"))
    lib = lib or row_attention._library()
    fn = lib.dspark_row_attention_f16 if k.dtype == torch.float16 else lib.dspark_row_attention
    row_attention._call(fn, q, k, v, rows, out, scale)
    return out


def _half_cache(g, *shape):
    """Random float16 keys or values, with float16's subnormals, signed zeros and its largest values."""
    x = torch.randn(*shape, generator=g)
    flat = x.view(-1)
    flat[::97] = 3e-6 * torch.sign(flat[::97])  # subnormal in float16 (below 6.1e-5)
    flat[5::101] = -0.0
    flat[7::211] = 6.0e4 * torch.sign(flat[7::211]) / 1e4  # large but with a finite softmax
    return x.half()


@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 4, 128), (2, 1, 24)])
def test_float16_cache_gives_the_float32_kernels_bits_on_its_values(H, Hkv, D):
    """A float16 KV cache (the default for 4-bit GGUFs): each half widened exactly, then the float32
    kernel's sums, so the bits equal the float32 kernel's on the widened cache."""
    g = torch.Generator().manual_seed(D)
    k, v = _half_cache(g, 3, Hkv, 300, D), _half_cache(g, 3, Hkv, 300, D)
    lengths = [1, 3, 8, 9, 64, 65, 299, 300]
    slots = [i % 3 for i in range(len(lengths))]
    q = torch.randn(len(lengths), H, D, generator=g) * 2
    rows = row_attention.RowPlan.from_lists(list(range(len(lengths))), slots, lengths)
    half = _kernel(q, k, v, rows, D ** -0.5)
    assert torch.equal(half, _kernel(q, k.float(), v.float(), rows, D ** -0.5))
    assert torch.isfinite(half).all()


def test_float16_cache_without_f16c_gives_the_same_bits(tmp_path):
    """The kernel built without -march=native (no F16C: each half widened in C, subnormals included):
    its float16 path gives its float32 path's bits on the widened cache (no FMA there either, so its
    bits are not the native build's)."""
    from dspark.models.ckernel import CKernel

    plain = CKernel(row_attention.SOURCE, (row_attention.FLAG_SETS[-1],), row_attention._setup, env="DSPARK_TEST_UNUSED").compile(tmp_path)
    g = torch.Generator().manual_seed(11)
    k, v = _half_cache(g, 2, 3, 130, 64), _half_cache(g, 2, 3, 130, 64)
    q = torch.randn(4, 9, 64, generator=g)
    rows = row_attention.RowPlan.from_lists([0, 1, 2, 3], [0, 1, 1, 0], [1, 17, 130, 64])
    half = _kernel(q, k, v, rows, 0.125, lib=plain)
    assert torch.equal(half, _kernel(q, k.float(), v.float(), rows, 0.125, lib=plain))
    torch.testing.assert_close(half, _kernel(q, k, v, rows, 0.125), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H,Hkv,D", [(9, 3, 64), (4, 4, 128), (8, 2, 32), (2, 1, 24)])
def test_kernel_matches_sdpa(H, Hkv, D):
    g = torch.Generator().manual_seed(H * D)
    cache_k = torch.randn(3, Hkv, 400, D, generator=g)
    cache_v = torch.randn(3, Hkv, 400, D, generator=g)
    lengths = [1, 2, 7, 8, 9, 63, 64, 65, 300, 400]
    slots = [i % 3 for i in range(len(lengths))]
    q = torch.randn(len(lengths), H, D, generator=g) * 3  # peaked softmaxes too
    rows = row_attention.RowPlan.from_lists(list(range(len(lengths))), slots, lengths)
    got = _kernel(q, cache_k, cache_v, rows, D ** -0.5)
    for r, (slot, n) in enumerate(zip(slots, lengths)):
        ref = F.scaled_dot_product_attention(q[r:r + 1, :, None], cache_k[slot:slot + 1, :, :n],
                                             cache_v[slot:slot + 1, :, :n], enable_gqa=H != Hkv)[0, :, 0]
        torch.testing.assert_close(got[r], ref, atol=2e-6, rtol=1e-5)


def test_kernel_result_does_not_depend_on_the_other_rows():
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 3, 128, 64, generator=g), torch.randn(2, 3, 128, 64, generator=g)
    q = torch.randn(6, 9, 64, generator=g)
    rows = row_attention.RowPlan.from_lists(list(range(6)), [0, 1, 0, 1, 0, 1], [5, 128, 17, 33, 100, 1])
    together = _kernel(q, k, v, rows, 0.125)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # several rows are split between torch's threads: the same bits
        assert torch.equal(_kernel(q, k, v, rows, 0.125), together)
    finally:
        torch.set_num_threads(threads)
    for r in range(6):
        alone = row_attention.RowPlan.from_lists([0], [rows.row_slot[r].item()], [rows.row_len[r].item()])
        assert torch.equal(_kernel(q[r:r + 1], k, v, alone, 0.125)[0], together[r])


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    # A bf16 checkpoint, as real ones are: its projections run on the fp16-weight GEMM, whose calls
    # RowPlan pads so that each row gets the same bits at any row count (test_row_plan; the int4 GEMM
    # likewise, test_int4). (fp32 weights go to MKL's sgemm, whose rows depend on the row count.)
    ck = build_checkpoint(tmp_path_factory.mktemp("bf16"), "qwen3", seed=3, dtype=torch.bfloat16)
    out = {mode: load_target(ck.path, attention=mode) for mode in ("auto", "sdpa")}
    assert out["auto"].cpu_gemm == "fp16-weights"
    out["f16-cache"] = load_target(ck.path, kv_cache_dtype="float16")
    assert out["auto"].kv_cache_dtype == torch.float32 and out["f16-cache"].kv_cache_dtype == torch.float16
    assert out["f16-cache"].attention == "rows"
    return out


def _prefill(target, cache, slot, ids):
    with torch.inference_mode():
        target.forward(cache, [slot], [ids], all_logits=False)


def test_model_uses_rows_by_default(targets):
    assert targets["auto"].attention == "rows" and targets["sdpa"].attention == "sdpa"


@pytest.mark.parametrize("name", ["auto", "f16-cache"])
def test_verified_tokens_equal_decoded_tokens_bit_for_bit(targets, name):
    """What makes greedy speculation reproduce plain decoding exactly: k tokens scored in one call get the
    logits they get when decoded one at a time (with a float32 or a float16 KV cache)."""
    t = targets[name]
    prompt, new = list(range(3, 40)), [50, 61, 7, 9, 101, 33, 2, 80]
    cache = t.new_cache(1, 128)
    slot = cache.allocate()
    _prefill(t, cache, slot, prompt)
    with torch.inference_mode():
        verified = t.forward(cache, [slot], [new], hidden_layer_ids=[0]).logits[0]
        cache.truncate(slot, len(prompt))
        decoded = torch.cat([t.forward(cache, [slot], [[x]]).logits[0] for x in new])
    assert torch.equal(verified, decoded)
    # And the reference it stands in for: SDPA, to float32 rounding.
    ref = targets["sdpa"]
    cache = ref.new_cache(1, 128)
    slot = cache.allocate()
    _prefill(ref, cache, slot, prompt)
    with torch.inference_mode():
        reference = ref.forward(cache, [slot], [new]).logits[0]
    if name == "auto":
        torch.testing.assert_close(reference, verified, atol=1e-4, rtol=1e-4)
    else:  # keys and values rounded to float16: close to the float32 model, not equal
        torch.testing.assert_close(reference, verified, atol=2e-2, rtol=1e-2)
        assert not torch.equal(reference, verified)


@pytest.mark.parametrize("name", ["auto", "f16-cache"])
def test_a_sequence_gets_the_same_bits_alone_and_batched(targets, name, monkeypatch):
    """Ragged verification (different lengths, different numbers of new tokens, padding) beside other
    sequences gives each sequence exactly what it gets alone; so does a long chunk (SDPA path, here
    over 64 tokens: the tiny model's 256 positions hold no chunk over the real limit)."""
    monkeypatch.setattr(row_attention, "ROW_LIMIT", 64)
    t = targets[name]
    prompts = [list(range(5, 25)), list(range(30, 110)), list(range(7, 12))]
    news = [[4, 5, 6], [9], list(range(60, 60 + row_attention.ROW_LIMIT + 6))]  # the last one: SDPA path
    alone = []
    for p, n in zip(prompts, news):
        cache = t.new_cache(1, 256)
        slot = cache.allocate()
        _prefill(t, cache, slot, p)
        with torch.inference_mode():
            alone.append(t.forward(cache, [slot], [n]).logits[0])
    cache = t.new_cache(4, 256)
    slots = [cache.allocate() for _ in range(4)]
    slots = slots[1:]  # not slots 0..2: the batch reads through a slot index, not a slice
    for s, p in zip(slots, prompts):
        _prefill(t, cache, s, p)
    with torch.inference_mode():
        together = t.forward(cache, slots, news).logits
    for i, n in enumerate(news):
        assert torch.equal(together[i, :len(n)], alone[i]), i


@pytest.mark.parametrize("name", ["auto", "f16-cache"])
def test_a_prompt_gets_the_same_bits_however_it_is_chunked(targets, name):
    """Chunks up to ROW_LIMIT tokens (the engine's default step budget) run on the row kernel: a prompt
    prefilled whole, in two chunks or token by token gives the same logits, bit for bit (how a busy
    server splits a prompt must not change the reply)."""
    assert row_attention.ROW_LIMIT >= 512  # the engine's default max_num_batched_tokens
    t = targets[name]
    prompt = [3 + (7 * i) % 200 for i in range(130)]

    def last_logits(splits: list[int]) -> torch.Tensor:
        cache = t.new_cache(1, 160)
        slot, pos = cache.allocate(), 0
        with torch.inference_mode():
            for n in splits:
                out = t.forward(cache, [slot], [prompt[pos:pos + n]]).logits[0, -1]
                pos += n
        return out

    whole = last_logits([130])
    for splits in ([65, 65], [100, 30], [1] * 130):
        assert torch.equal(last_logits(splits), whole), splits


def test_the_engine_never_prefills_a_chunk_over_the_row_limit(targets, monkeypatch):
    """However large the step budget, prompt chunks stay on the row kernel (<= ROW_LIMIT tokens), so
    the reply is what a small budget's chunks give, token for token."""
    from dspark.engine import Engine
    from dspark.sampling import SamplingParams

    t = targets["f16-cache"]
    sizes: list[int] = []
    forward = t.forward

    def recording(cache, slots, tokens, *args, **kwargs):
        sizes.extend(len(x) for x in tokens)
        return forward(cache, slots, tokens, *args, **kwargs)

    monkeypatch.setattr(t, "forward", recording)
    prompts = [[3 + (7 * i + j) % 200 for i in range(90)] for j in range(3)]
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)] * 3
    small = [o.token_ids for o in Engine(t, max_num_seqs=3, max_num_batched_tokens=24).run(prompts, params)]
    monkeypatch.setattr(row_attention, "ROW_LIMIT", 20)
    sizes.clear()
    big = [o.token_ids for o in Engine(t, max_num_seqs=3, max_num_batched_tokens=256).run(prompts, params)]
    assert max(sizes) == 20 and big == small


def test_prefill_in_a_group_equals_prefill_alone(targets):
    t = targets["auto"]
    prompts = [list(range(3, 3 + n)) for n in (90, 70, 12)]
    alone = []
    for p in prompts:
        cache = t.new_cache(1, 128)
        with torch.inference_mode():
            alone.append(t.forward(cache, [cache.allocate()], [p]).logits[0])
    cache = t.new_cache(3, 128)
    slots = [cache.allocate() for _ in prompts]
    with torch.inference_mode():
        together = t.forward(cache, slots, prompts).logits
    for i, p in enumerate(prompts):
        assert torch.equal(together[i, :len(p)], alone[i]), i


def test_disabled_by_environment(monkeypatch, qwen3_ckpt):
    monkeypatch.setenv("DSPARK_ROW_ATTENTION", "0")
    assert not row_attention.available() and row_attention.unavailable_reason() == "DSPARK_ROW_ATTENTION=0"
    assert load_target(qwen3_ckpt.path).attention == "sdpa"


def test_no_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(RuntimeError, match="no-such-cc"):
        row_attention._compile(tmp_path / "kernels")
    assert not list((tmp_path / "kernels").glob("*.so"))  # nothing half-written left behind


def test_shapes_the_kernel_takes():
    assert row_attention.supports(9, 3, 64) and row_attention.supports(4, 4, 128)
    assert not row_attention.supports(9, 3, 12)  # not a multiple of 8: SDPA instead
    assert not row_attention.supports(8, 3, 64)  # query heads not a multiple of kv heads
    assert not row_attention.supports(4, 4, row_attention.MAX_HEAD_DIM + 8)
    q = torch.zeros(1, 2, 12)
    k = torch.zeros(1, 1, 4, 12)
    with pytest.raises(RuntimeError, match="returned -1"):  # the C side agrees
        _kernel(q, k, k, row_attention.RowPlan.from_lists([0], [0], [4]), 1.0)
