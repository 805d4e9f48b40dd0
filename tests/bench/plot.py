"""The suite's PNG: throughput vs. number of adapters, and latency vs. load."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write files only
import matplotlib.pyplot as plt  # noqa: E402 - after the backend choice


def plot(results: dict, path: Path) -> Path:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    scaling = results["adapter_scaling"]
    left.plot(
        [s["registered"] for s in scaling],
        [s["output_tokens_per_s"] for s in scaling],
        "o-",
        label="ours, small adapters (r8 q,v), zipf",
    )
    mixed = results["runs"]["mixed8_saturated"]
    left.plot([8], [mixed["output_tokens_per_s"]], "s", label="ours, 8 mixed adapters (r8/16/32, all)")
    left.axhline(results["runs"]["base_saturated"]["output_tokens_per_s"], ls="--", c="k", label="ours, base")
    hf = results["runs"]["hf_peft"]
    left.plot([8], [hf["output_tokens_per_s"]], "^", c="r", label="transformers+peft, 8 mixed adapters")
    left.set_xscale("log")
    counts = sorted({s["registered"] for s in scaling} | {8})
    left.set_xticks(counts, [str(c) for c in counts])
    left.minorticks_off()
    left.set_xlabel("adapters registered")
    left.set_ylabel("output tokens/s")
    left.set_title("Throughput vs. number of adapters")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)

    sweep = results["concurrency_sweep"]
    load = [s["requests_per_s"] for s in sweep]
    for key, label, style in [
        ("ttft_p50_s", "TTFT p50", "o-"),
        ("ttft_p99_s", "TTFT p99", "o--"),
        ("itl_p50_s", "inter-token p50", "s-"),
        ("itl_p99_s", "inter-token p99", "s--"),
    ]:
        right.plot(load, [_ms(s[key]) for s in sweep], style, label=label)
        for x, s in zip(load, sweep, strict=True):
            if key == "ttft_p50_s":
                right.annotate(f"c={s['concurrency']}", (x, _ms(s[key])), fontsize=7)
    half = results["runs"]["mixed8_half_load"]
    right.plot([half["requests_per_s"]], [_ms(half["ttft_p50_s"])], "*", ms=12, label="TTFT p50, Poisson")
    right.set_yscale("log")
    right.set_xlabel("requests/s served (8 mixed adapters)")
    right.set_ylabel("ms")
    right.set_title("Latency vs. load")
    right.legend(fontsize=8)

    fig.suptitle(results["title"], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ms(seconds: float | None) -> float:
    return float("nan") if seconds is None else seconds * 1e3
