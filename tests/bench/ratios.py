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
    # The best value this machine allows if a step were its linear layers alone (machine.linear_pass_s):
    # what the GEMM kernels and memory here leave for everything else. None where no such floor applies.
    bound: float | None = None
    bound_detail: str = ""

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
            "machine_bound": self.bound,
            "bound_detail": self.bound_detail,
        }


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _bracketed(f: dict, name: str) -> tuple[float | None, str]:
    """Output tok/s of run `name`, or the mean of it and `name`_after where the suite ran it twice."""
    first, after = f[name]["output_tokens_per_s"], f.get(f"{name}_after", {}).get("output_tokens_per_s")
    if after is None:
        return first, f"{first:.1f}"
    mean = (first + after) / 2
    return mean, f"{mean:.1f} (mean of {first:.1f} before and {after:.1f} after)"


def compute(f: dict) -> dict[str, Ratio]:
    """f: the suite's figures (see suite.py for where each comes from)."""
    mixed, p3_n = f["mixed8_saturated"], f["many_registered"]
    # P1's and P3's references are runs of other servers, made before and again after the runs they are
    # compared with (where `_after` is missing, once): the mean of the two cancels drift that is steady
    # over the suite.
    base_tps, base_text = _bracketed(f, "base_saturated")
    small_tps, small_text = _bracketed(f, "small8_zipf")
    machine, model = f["machine"], f["model"]
    ideal_step = model["weight_bytes"] / machine["copy_bytes_per_s"]
    ceiling = machine["gemm_flops_per_s"] / (2 * model["parameters"])
    p5_load, lone = f["mixed8_half_load"], f["mixed8_lone"]
    passes = machine.get("linear_pass_s", {})  # rows (as text) -> seconds for one pass of the linears
    one_row = passes.get("1")
    best_tps, linears = _linears_only(mixed, passes)
    return {
        r.id: r
        for r in [
            Ratio(
                "P1", "8 distinct adapters ÷ base-only, output tok/s at the same concurrency", 0.95, True,
                _div(mixed["output_tokens_per_s"], base_tps),
                f"{mixed['output_tokens_per_s']:.1f} / {base_text} tok/s",
            ),
            Ratio(
                "P2", "our server (8 adapters) ÷ transformers+peft mixed-batch generate, output tok/s", 5.0,
                True, _div(mixed["output_tokens_per_s"], f["hf_peft"]["output_tokens_per_s"]),
                f"{mixed['output_tokens_per_s']:.1f} / {f['hf_peft']['output_tokens_per_s']:.1f} tok/s "
                f"(static batches of {f['hf_peft']['batch_size']})",
                _div(best_tps, f["hf_peft"]["output_tokens_per_s"]),
                linears,
            ),
            Ratio(
                "P3", f"{p3_n['registered']} adapters registered ÷ 8 registered (zipf), output tok/s", 0.9,
                True, _div(p3_n["output_tokens_per_s"], small_tps),
                f"{p3_n['output_tokens_per_s']:.1f} / {small_text} tok/s; "
                f"{p3_n['registered']} registered: {p3_n['why']}",
            ),
            Ratio(
                "P4", "batch-1 decode step (lone request ITL p50) ÷ weight bytes / copy bandwidth", 1.5,
                False,
                _div(f["base_lone"]["itl_p50_s"], ideal_step),
                f"{_ms(f['base_lone']['itl_p50_s'])} / {_ms(ideal_step)}",
                _div(one_row, ideal_step),
                f"linears alone at 1 row: {_ms(one_row)}" if one_row is not None else "",
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
                _div(best_tps, ceiling),
                linears,
            ),
        ]
    }  # fmt: skip


# Rows of the pass that prices prompt tokens: a prefill's rows run at least this efficiently.
PROMPT_ROWS = 256


def _linears_only(run: dict, passes: dict) -> tuple[float | None, str]:
    """The output tok/s a saturated run could reach at best if its steps were their linear layers alone:
    each output token a row of a pass at the run's concurrency, each prompt token a row of a pass at
    PROMPT_ROWS rows. (None, "") without the figures."""
    rows, prompt, output = run.get("concurrency"), run.get("prompt_tokens"), run.get("output_tokens")
    if str(rows) not in passes or str(PROMPT_ROWS) not in passes or prompt is None or not output:
        return None, ""
    decode_tps, prompt_tps = rows / passes[str(rows)], PROMPT_ROWS / passes[str(PROMPT_ROWS)]
    best = output / (output / decode_tps + prompt / prompt_tps)
    return best, (
        f"linears alone: {output} output tokens at {decode_tps:.0f} tok/s ({rows} rows) and {prompt} prompt "
        f"tokens at {prompt_tps:.0f} tok/s ({PROMPT_ROWS} rows) = {best:.0f} output tok/s"
    )


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.1f} ms"


def table(ratios: dict[str, dict]) -> str:
    """The ratios as the suite prints them: per ratio its value against the target, then its detail and
    machine bound. `ratios`: id -> Ratio.as_dict() (the form bench.json holds)."""
    lines = []
    for rid, r in ratios.items():
        value = "n/a" if r["value"] is None else f"{r['value']:.3f}"
        met = {True: "met", False: "NOT met", None: "-"}[r["met"]]
        lines.append(f"{rid}  {value:>7}  target {r['target']:<7} {met:<8} {r['measure']}")
        lines.append(f"{'':<5}{r['detail']}")
        if r["machine_bound"] is not None:
            lines.append(f"{'':<5}machine bound {r['machine_bound']:.3f}: {r['bound_detail']}")
    return "\n".join(lines)
