"""NativeCpuFused (`csrc/fused_cpu.cpp`) against the `reference.py` ops it fuses (HF's ops and roundings).

Every op in float32, bfloat16 and float16; widths odd and not multiples of 16 (40, 37, 200) and
SmolLM2's (576 hidden, 1536 intermediate, 9 + 3 heads of 64); 1, 3, 64 and 257 rows (257 rows spread over
threads); inputs as the model passes them (rotary on a view of the qkv output, norms on row-strided
views). float32 matches to ~1e-6; in 16-bit dtypes the residual add and the rotation are bit-equal and
the rest nearly so (a rare element one rounding away: torch's float32 sum order, its exp to an ulp).
Skipped where the extension cannot be built; a haswell (AVX2 only) build runs a subset where this CPU can
run it, so an AVX-512 machine checks the code an AVX2-only one runs. Last, a tiny model's prompt logprobs
with the fused ops equal those with torch's.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from worker.kernels import cpu_fused, cpu_native, select_fused_ops
from worker.kernels.cpu_fused import NativeCpuFused
from worker.kernels.reference import (
    add_rms_norm_ref,
    rms_norm_ref,
    rotary_cos_sin_ref,
    rotary_ref,
    silu_mul_ref,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROWS = [1, 3, 64, 257]
EPS = 1e-5
# (rtol, atol) an element may differ by, and the share of elements allowed to differ at all.
TOL = {torch.float32: (2e-6, 1e-6), torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (2e-3, 1e-6)}
MISMATCH = {torch.float32: 1.0, torch.bfloat16: 2e-3, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def fused():
    ops = cpu_fused.load_native_fused()
    if ops is None:
        pytest.skip("the native CPU fused ops cannot be built here (see the log)")
    return ops


VARIANTS = {"haswell": ("avx2", "fma", "f16c")}  # AVX2 without AVX-512: AMD EPYC before Zen 4


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request):
    """The extension built with -march=<variant> (cached like the native build)."""
    flags = cpu_native.cpu_flags().split()
    if not all(f in flags for f in VARIANTS[request.param]) or cpu_fused.load_native_fused() is None:
        pytest.skip(f"this CPU cannot run a {request.param} build, or there is no compiler")
    return NativeCpuFused(cpu_native.build(request.param, source=cpu_fused.SOURCE))


def gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def check(out: torch.Tensor, ref: torch.Tensor, exact: bool = False) -> None:
    """out equals ref within the dtype's tolerance, bit-equal in all but a share MISMATCH of elements
    (all of them where `exact`)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    differ = (out != ref) & ~(out.isnan() & ref.isnan())
    allowed = 0 if exact else math.floor(MISMATCH[out.dtype] * out.numel())
    assert int(differ.sum()) <= allowed, f"{int(differ.sum())} of {out.numel()} elements differ"
    rtol, atol = TOL[out.dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol, equal_nan=True)


def strided_rows(rows: int, h: int, dtype, g, scale=1.0) -> torch.Tensor:
    """[rows, h] as a view with a row stride past h (columns 3 .. 3 + h of wider rows)."""
    return (torch.randn(rows, h + 5, generator=g) * scale).to(dtype)[:, 3 : 3 + h]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("h", [40, 37, 576])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(fused, dtype, h, rows):
    g = gen("rms", dtype, h, rows)
    x = (torch.randn(rows, h, generator=g) * 3).to(dtype)
    weight = (1 + 0.3 * torch.randn(h, generator=g)).to(dtype)
    check(fused.rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS))
    xs = strided_rows(rows, h, dtype, g)
    check(fused.rms_norm(xs, weight, EPS), rms_norm_ref(xs, weight, EPS))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("h", [40, 200, 576])
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_in_place(fused, dtype, h, rows):
    g = gen("add", dtype, h, rows)
    x = torch.randn(rows, h, generator=g).to(dtype)
    residual = (torch.randn(rows, h, generator=g) * 4).to(dtype)
    weight = (1 + 0.3 * torch.randn(h, generator=g)).to(dtype)
    ref_normed, ref_sum = add_rms_norm_ref(x, residual, weight, EPS)
    normed, stream = fused.add_rms_norm(x, residual, weight, EPS)
    assert normed is x and stream is residual, "in place: x becomes the norm, residual the sum"
    check(stream, ref_sum, exact=True)
    check(normed, ref_normed)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_strided(fused, dtype):
    """Row-strided views are written in place; the rest of their storage is untouched."""
    g = gen("add strided", dtype)
    base_x = torch.randn(64, 205, generator=g).to(dtype)
    base_r = torch.randn(64, 205, generator=g).to(dtype)
    x, residual = base_x[:, 3:203], base_r[:, 3:203]
    weight = torch.randn(200, generator=g).to(dtype)
    before_x, before_r = base_x.clone(), base_r.clone()
    ref_normed, ref_sum = add_rms_norm_ref(x, residual, weight, EPS)
    fused.add_rms_norm(x, residual, weight, EPS)
    check(residual, ref_sum, exact=True)
    check(x, ref_normed)
    for base, before in ((base_x, before_x), (base_r, before_r)):
        assert torch.equal(base[:, :3], before[:, :3]) and torch.equal(base[:, 203:], before[:, 203:])
    # An inner stride other than 1 goes through copies, written back.
    xt = torch.randn(200, 8, generator=g).to(dtype).T
    rt = torch.randn(200, 8, generator=g).to(dtype).T
    ref_normed, ref_sum = add_rms_norm_ref(xt, rt, weight, EPS)
    fused.add_rms_norm(xt, rt, weight, EPS)
    check(rt, ref_sum, exact=True)
    check(xt, ref_normed)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("inter", [40, 37, 1536])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(fused, dtype, inter, rows):
    g = gen("silu", dtype, inter, rows)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 3).to(dtype)
    check(fused.silu_mul(gate_up), silu_mul_ref(gate_up))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_extremes(fused, dtype):
    """Gates far out (exp overflowing and underflowing), zeros, infinities and NaN, in the vector lanes
    and the scalar tail."""
    g = gen("silu extremes", dtype)
    values = [0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, 87.0, -87.0, 89.0, -89.0, 100.0, -100.0, 1e4, -1e4]
    if dtype != torch.float16:
        values += [-1e30, 1e30, float("inf"), float("-inf"), float("nan")]
    gate = torch.tensor(values * 3)
    gate_up = torch.cat([gate, torch.randn(gate.numel(), generator=g)]).to(dtype)[None]
    check(fused.silu_mul(gate_up), silu_mul_ref(gate_up))


def qkv_view(rows: int, heads: int, kv_heads: int, d: int, dtype, g) -> torch.Tensor:
    """q and k of a qkv output [rows, (H + 2 H_kv) * D], as the model rotates them: a strided view."""
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    return qkv.view(rows, heads + 2 * kv_heads, d)[:, : heads + kv_heads]


def inv_freq_of(d: int, theta: float = 10000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("heads, kv_heads, d", [(9, 3, 64), (2, 1, 40), (1, 1, 128), (3, 2, 6)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary(fused, dtype, heads, kv_heads, d, rows):
    g = gen("rotary", dtype, heads, d, rows)
    x = qkv_view(rows, heads, kv_heads, d, dtype, g)
    positions = torch.randint(0, 4096, (rows,), generator=g)
    cos, sin = rotary_cos_sin_ref(positions, inv_freq_of(d), 1.0, dtype)
    out = fused.rotary(x, cos, sin)
    assert out.is_contiguous()
    check(out, rotary_ref(x, cos, sin), exact=True)
    check(fused.rotary(x, cos[:, 0], sin[:, 0]), rotary_ref(x, cos, sin), exact=True)  # [T, D] tables


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("d, scaling", [(64, 1.0), (40, 0.7), (128, 1.3)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_cos_sin(fused, dtype, d, scaling, rows):
    g = gen("cos sin", dtype, d, rows)
    positions = torch.randint(0, 32768, (rows,), generator=g)
    positions[0] = 0
    inv_freq = inv_freq_of(d, 500000.0 if d == 128 else 10000.0)
    cos, sin = fused.rotary_cos_sin(positions, inv_freq, scaling, dtype)
    ref_cos, ref_sin = rotary_cos_sin_ref(positions, inv_freq, scaling, dtype)
    check(cos, ref_cos)
    check(sin, ref_sin)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads(fused, threads):
    """Calls large enough to be spread over threads give the single-threaded result."""
    old = torch.get_num_threads()
    g = gen("threads")
    x = torch.randn(1024, 576, generator=g).bfloat16()
    gate_up = torch.randn(512, 3072, generator=g).bfloat16()
    weight = torch.randn(576, generator=g).bfloat16()
    try:
        torch.set_num_threads(threads)
        check(fused.rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS))
        check(fused.silu_mul(gate_up), silu_mul_ref(gate_up))
    finally:
        torch.set_num_threads(old)


def test_rejects_bad_arguments(fused):
    x = torch.randn(4, 40)
    with pytest.raises(ValueError, match="weight"):
        fused.rms_norm(x, torch.randn(39), EPS)
    with pytest.raises(ValueError, match="weight"):
        fused.rms_norm(x, torch.randn(40).bfloat16(), EPS)
    with pytest.raises(ValueError, match="residual"):
        fused.add_rms_norm(x, torch.randn(3, 40), torch.randn(40), EPS)
    with pytest.raises(ValueError, match="x"):
        fused.rms_norm(torch.randn(4, 40).double(), torch.randn(40).double(), EPS)
    with pytest.raises(ValueError, match="gate_up"):
        fused.silu_mul(torch.randn(4, 41))
    q = torch.randn(4, 3, 64)
    with pytest.raises(ValueError, match="cos"):
        fused.rotary(q, torch.randn(4, 1, 32), torch.randn(4, 1, 64))
    with pytest.raises(ValueError, match="sin"):
        fused.rotary(q, torch.randn(4, 1, 64), torch.randn(4, 1, 64).bfloat16())
    with pytest.raises(ValueError, match="positions"):
        fused.rotary_cos_sin(torch.arange(4, dtype=torch.int32), torch.randn(32), 1.0, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_builds_match_ref(variant, dtype):
    g = gen("variant", dtype)
    for rows, h in ((1, 576), (3, 37), (64, 200)):
        x = torch.randn(rows, h, generator=g).to(dtype)
        residual = torch.randn(rows, h, generator=g).to(dtype)
        weight = torch.randn(h, generator=g).to(dtype)
        check(variant.rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS))
        ref_normed, ref_sum = add_rms_norm_ref(x, residual, weight, EPS)
        variant.add_rms_norm(x, residual, weight, EPS)
        check(residual, ref_sum, exact=True)
        check(x, ref_normed)
        gate_up = (torch.randn(rows, 2 * h, generator=g) * 3).to(dtype)
        check(variant.silu_mul(gate_up), silu_mul_ref(gate_up))
        q = qkv_view(rows, 9, 3, 64, dtype, g)
        cos, sin = rotary_cos_sin_ref(torch.arange(rows) * 37, inv_freq_of(64), 1.0, dtype)
        check(variant.rotary(q, cos, sin), rotary_ref(q, cos, sin), exact=True)
        fused_cos, fused_sin = variant.rotary_cos_sin(torch.arange(rows) * 37, inv_freq_of(64), 1.0, dtype)
        check(fused_cos, cos)
        check(fused_sin, sin)


def test_selection():
    """select_fused_ops: the native ops on the CPU where they build, None when told so or on a GPU."""
    assert select_fused_ops(torch.device("cpu"), native_cpu=False) is None
    assert select_fused_ops(torch.device("meta")) is None
    ops = select_fused_ops(torch.device("cpu"))
    assert ops is None or isinstance(ops, NativeCpuFused)


def test_failed_build_falls_back_and_logs_once(monkeypatch, caplog, tmp_path):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(cpu_native, "build", no_compiler)
    cpu_fused.load_native_fused.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert cpu_fused.load_native_fused(tmp_path) is None
            assert cpu_fused.load_native_fused(tmp_path) is None
        assert sum("fused ops unavailable" in r.message for r in caplog.records) == 1
    finally:
        cpu_fused.load_native_fused.cache_clear()


def test_own_build_key():
    """Its own extension: a key of its own source, apart from the LoRA kernel's."""
    key = cpu_native.build_key("native", cpu_fused.SOURCE)
    assert key != cpu_native.build_key("native") and key != cpu_native.build_key("haswell", cpu_fused.SOURCE)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_with_fused_ops_matches_torch_ops(fused, tiny_model_dir, monkeypatch, dtype):
    """A tiny model's prompt logprobs and first tokens, fused ops against torch's (the same model)."""
    from worker import runner as runner_module
    from worker.config import WorkerConfig
    from worker.runner import ModelRunner, PrefillRequest
    from worker.sampler import SamplingParams

    config = WorkerConfig(model_dir=tiny_model_dir, dtype=dtype, block_size=4, num_blocks=64)
    prompt = [(7 * i + 3) % 250 for i in range(23)]
    results = {}
    for name in ("fused", "torch"):
        if name == "torch":
            monkeypatch.setattr(runner_module, "select_fused_ops", lambda *args: None)
        runner = ModelRunner(config)
        assert (runner.fused_ops is not None) == (name == "fused")
        request = PrefillRequest(
            1, prompt, list(range(8)), SamplingParams(top_n_tokens=5), prompt_logprobs=True
        )
        outputs = [runner.prefill([request])[0]]
        outputs += [runner.decode([1])[0] for _ in range(4)]
        results[name] = outputs
    fused_out, torch_out = results["fused"], results["torch"]
    assert [o.token_id for o in fused_out] == [o.token_id for o in torch_out]
    tol = 1e-5 if dtype == "float32" else 5e-2
    torch.testing.assert_close(
        torch.tensor(fused_out[0].prompt_logprobs),
        torch.tensor(torch_out[0].prompt_logprobs),
        rtol=0,
        atol=tol,
    )
    for a, b in zip(fused_out, torch_out, strict=True):
        torch.testing.assert_close(
            torch.tensor(a.top_logprobs), torch.tensor(b.top_logprobs), rtol=0, atol=tol
        )
