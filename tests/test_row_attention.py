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


def _kernel(q, k, v, rows, scale):
    out = torch.full_like(q, float("nan"))
    row_attention._call(row_attention._library().dspark_row_attention, q, k, v, rows, out, scale)
    return out


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
    return out


def _prefill(target, cache, slot, ids):
    with torch.inference_mode():
        target.forward(cache, [slot], [ids], all_logits=False)


def test_model_uses_rows_by_default(targets):
    assert targets["auto"].attention == "rows" and targets["sdpa"].attention == "sdpa"


def test_verified_tokens_equal_decoded_tokens_bit_for_bit(targets):
    """What makes greedy speculation reproduce plain decoding exactly: k tokens scored in one call get the
    logits they get when decoded one at a time."""
    t = targets["auto"]
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
        torch.testing.assert_close(ref.forward(cache, [slot], [new]).logits[0], verified, atol=1e-4, rtol=1e-4)


def test_a_sequence_gets_the_same_bits_alone_and_batched(targets):
    """Ragged verification (different lengths, different numbers of new tokens, padding) beside other
    sequences gives each sequence exactly what it gets alone; so does a long chunk (SDPA path)."""
    t = targets["auto"]
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
