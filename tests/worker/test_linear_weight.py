"""LinearWeight (worker/layers/linear_weight.py) against F.linear, its plain reference."""

import pytest
import torch
import torch.nn.functional as F

from worker.layers.linear_weight import LinearWeight


@pytest.mark.parametrize("rows", [0, 1, 3, 7, 33, 133])
@pytest.mark.parametrize("shape", [(960, 576), (49, 150), (576, 1536), (3, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_f_linear(rows, shape, dtype, bias):
    gen = torch.Generator().manual_seed(rows * 7 + shape[0])
    w = torch.randn(*shape, generator=gen).to(dtype)
    x = torch.randn(rows, shape[1], generator=gen).to(dtype)
    b = torch.randn(shape[0], generator=gen).to(dtype) if bias else None
    expected = F.linear(x, w, b)
    got = LinearWeight(w)(x, b)
    assert got.dtype == dtype and got.shape == (rows, shape[0])
    # Same oneDNN kernel and blocking as F.linear: bitwise equal, not merely close.
    assert torch.equal(got, expected)


def test_packs_bfloat16_on_cpu_only():
    w = torch.randn(8, 4)
    assert LinearWeight(w.bfloat16()).packed == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert not LinearWeight(w).packed
    assert not LinearWeight(w.half()).packed


def test_non_contiguous_input_and_weight():
    w = torch.randn(16, 24).bfloat16()
    x = torch.randn(24, 5).bfloat16().T  # [5, 24], not contiguous
    assert torch.equal(LinearWeight(w.T.contiguous().T)(x), F.linear(x, w))
