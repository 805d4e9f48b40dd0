"""Issue 6's performance ratios P1-P6, computed from one run's figures, with their targets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ratio:
    id: str
    measure: str
    target: float
    higher_is_better: bool
    value: float | None
    detail: str

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def as_dict(self) -> dict:
        op = ">=" if self.higher_is_better else "<="
        return {
            "measure": self.measure,
            "value": self.value,
            "target": f"{op} {self.target:g}",
            "met": self.met,
            "detail": self.detail,
        }


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def compute(f: dict) -> dict[str, Ratio]:
    """f: the suite's figures (see suite.py for where each comes from)."""
    base, mixed = f["base_saturated"], f["mixed8_saturated"]
    p3_n, p3_8 = f["many_registered"], f["small8_zipf"]
    machine, model = f["machine"], f["model"]
    ideal_step = model["weight_bytes"] / machine["copy_bytes_per_s"]
    ceiling = machine["gemm_flops_per_s"] / (2 * model["parameters"])
    p5_load, lone = f["mixed8_half_load"], f["mixed8_lone"]
    return {
        r.id: r
        for r in [
            Ratio(
                "P1", "8 distinct adapters ÷ base-only, output tok/s at the same concurrency", 0.95, True,
                _div(mixed["output_tokens_per_s"], base["output_tokens_per_s"]),
                f"{mixed['output_tokens_per_s']:.1f} / {base['output_tokens_per_s']:.1f} tok/s",
            ),
            Ratio(
                "P2", "our server (8 adapters) ÷ transformers+peft mixed-batch generate, output tok/s", 5.0,
                True, _div(mixed["output_tokens_per_s"], f["hf_peft"]["output_tokens_per_s"]),
                f"{mixed['output_tokens_per_s']:.1f} / {f['hf_peft']['output_tokens_per_s']:.1f} tok/s "
                f"(static batches of {f['hf_peft']['batch_size']})",
            ),
            Ratio(
                "P3", f"{p3_n['registered']} adapters registered ÷ 8 registered (zipf), output tok/s", 0.9,
                True, _div(p3_n["output_tokens_per_s"], p3_8["output_tokens_per_s"]),
                f"{p3_n['output_tokens_per_s']:.1f} / {p3_8['output_tokens_per_s']:.1f} tok/s; "
                f"{p3_n['registered']} registered: {p3_n['why']}",
            ),
            Ratio(
                "P4", "batch-1 decode step (lone request ITL p50) ÷ weight bytes / copy bandwidth", 1.5,
                False,
                _div(f["base_lone"]["itl_p50_s"], ideal_step),
                f"{_ms(f['base_lone']['itl_p50_s'])} / {_ms(ideal_step)}",
            ),
            Ratio(
                "P5", "TTFT p50 at half the saturating request rate ÷ TTFT p50 of a lone request", 2.0, False,
                _div(p5_load["ttft_p50_s"], lone["ttft_p50_s"]),
                f"{_ms(p5_load['ttft_p50_s'])} at {p5_load['rate']:.2f} req/s / {_ms(lone['ttft_p50_s'])}",
            ),
            Ratio(
                "P6", "saturated output tok/s (8 adapters) ÷ GEMM FLOP/s / (2 × parameters)", 0.5, True,
                _div(mixed["output_tokens_per_s"], ceiling),
                f"{mixed['output_tokens_per_s']:.1f} / {ceiling:.0f} tok/s",
            ),
        ]
    }  # fmt: skip


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f} ms"


def table(ratios: dict[str, Ratio]) -> str:
    """Plain-text table: id, value, target, met, detail."""
    lines = [f"{'id':<3} {'value':>7} {'target':>7} {'met':<4} measure / detail"]
    for r in ratios.values():
        d = r.as_dict()
        value = "n/a" if r.value is None else f"{r.value:.3f}"
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        lines.append(f"{r.id:<3} {value:>7} {d['target']:>7} {met:<4} {r.measure}")
        lines.append(f"{'':<24}{r.detail}")
    return "\n".join(lines)
