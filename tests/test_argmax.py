"""The C row argmax (`dspark.models.argmax`) gives exactly torch.argmax's indices."""

import pytest
import torch

from dspark.models import argmax


def torch_rows(x: torch.Tensor) -> list[int]:
    return x.argmax(-1).reshape(-1).tolist()


@pytest.fixture(scope="module")
def kernel():
    if not argmax.KERNEL.available():
        pytest.fail(f"the argmax kernel should build here: {argmax.KERNEL.unavailable_reason()}")
    return argmax


@pytest.mark.parametrize("shape", [(1, 49152), (2, 1, 49152), (8, 3, 1000), (5, 17), (3, 1), (4, 16), (2, 31)])
def test_matches_torch_on_random_rows(kernel, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g)
    assert kernel.argmax_rows(x) == torch_rows(x)


def test_edge_values(kernel):
    rows = argmax._self_test_rows()
    assert kernel.argmax_rows(rows) == torch_rows(rows)
    x = torch.zeros(3, 100)
    x[0, 64] = x[0, 99] = 1.0  # a tie across the vector body and the tail
    x[1, :] = float("nan")  # every value NaN
    x[2, 99] = float("nan")  # a NaN only in the tail, the maximum earlier
    x[2, 3] = 7.0
    assert kernel.argmax_rows(x) == torch_rows(x) == [64, 0, 99]


def test_many_ties_and_quantised_logits(kernel):
    # Logits of a 4-bit model take few distinct values: ties are common; the first index must win.
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-3, 4, (64, 257), generator=g).float()
    assert kernel.argmax_rows(x) == torch_rows(x)


def test_strided_and_other_inputs_fall_back_or_match(kernel):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 40, generator=g)
    view = base[::2, 3:37]  # rows evenly strided, not contiguous
    assert kernel.argmax_rows(view) == torch_rows(view)
    assert kernel.argmax_rows(base.t()) == torch_rows(base.t())  # last dim strided: torch
    assert kernel.argmax_rows(base.double()) == torch_rows(base.double())  # float64: torch
    assert kernel.argmax_rows(base[:0]) == []  # no rows


def test_off_switch(monkeypatch):
    monkeypatch.setenv("DSPARK_ARGMAX_KERNEL", "0")
    assert argmax.KERNEL.library() is None
    x = torch.randn(2, 50)
    assert argmax.argmax_rows(x) == torch_rows(x)
