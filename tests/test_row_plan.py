"""Row invariance of the CPU GEMMs: a row's result must not depend on how many rows share the call
(greedy speculative decoding verifies k tokens in one call and must reproduce decoding them one by one)."""

from __future__ import annotations

import pytest
import torch

from dspark.models.transformer import PROBE_ROWS, PackedLinear, RowPlan, fp16_gemm_available


def _row_count_dependent_kernel(w: torch.Tensor, bad: set[int]):
    # x @ w.T on integer-valued inputs (exact in any summation order, so row-invariant by itself), with a
    # last-bit change in every row when the call has a row count in `bad` (as fbgemm's fp16 kernels do on
    # some CPUs for 1, 2, 7, 14, ... rows).
    def fn(x: torch.Tensor) -> torch.Tensor:
        y = x @ w.round().t()
        return torch.nextafter(y, torch.full_like(y, float("inf"))) if x.numel() // x.shape[-1] in bad else y
    return fn


@pytest.mark.parametrize("bad", [set(), {1, 2, 7, 14}, {1, 2} | set(range(31, PROBE_ROWS + 1, 6)),
                                 set(range(1, PROBE_ROWS))])
def test_row_plan_gives_every_row_the_same_bits(bad):
    w = torch.randint(-8, 8, (8, 32)).float()
    plan = RowPlan.probe(f"fake-{sorted(bad)}", 32, lambda pw: _row_count_dependent_kernel(pw, bad))
    assert plan.good == [m for m in range(1, PROBE_ROWS + 1) if m not in bad]
    fn = _row_count_dependent_kernel(w, bad)
    x = torch.randint(-8, 8, (250, 32)).float()
    alone = torch.cat([plan(fn, x[i:i + 1]) for i in range(250)])
    for m in [1, 2, 3, 7, 8, 14, 31, 33, PROBE_ROWS, PROBE_ROWS + 1, 250]:
        got = plan(fn, x[:m])
        assert got.shape == (m, 8)
        assert torch.equal(got, alone[:m]), m
    if not bad:  # nothing to fix: the plan calls the kernel as it is
        assert plan.all_good
    # leading dimensions are kept
    assert torch.equal(plan(fn, x[:6].view(2, 3, 32)).view(6, 8), alone[:6])


def test_row_plan_without_a_probe_is_wrong_where_the_kernel_is():
    # the fake kernel really does change rows: without the plan a 7-row call differs from rows alone
    w, x = torch.randint(-8, 8, (8, 32)).float(), torch.randint(-8, 8, (7, 32)).float()
    fn = _row_count_dependent_kernel(w, {1, 2, 7})
    assert not torch.equal(fn(x)[:1], fn(torch.cat([x[:1], torch.zeros(2, 32)]))[:1])


@pytest.mark.skipif(not fp16_gemm_available(), reason="no fbgemm fp16-weight GEMM in this torch build")
def test_packed_fp16_gemm_rows_equal_rows_alone():
    torch.manual_seed(0)
    lin = PackedLinear(torch.randn(96, 576) * 0.05, torch.randn(96))
    x = torch.randn(160, 576)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(160)])
    for m in list(range(1, 40)) + [61, 62, 97, 160]:
        assert torch.equal(lin(x[:m]), alone[:m]), m
    assert torch.allclose(alone, x @ lin_weight(lin).t() + lin_bias(lin), atol=1e-3)


def lin_weight(lin: PackedLinear) -> torch.Tensor:
    w, _ = torch.ops.quantized.linear_unpack_fp16(lin.packed)
    return w.float()


def lin_bias(lin: PackedLinear) -> torch.Tensor:
    _, b = torch.ops.quantized.linear_unpack_fp16(lin.packed)
    return b.float()
