"""One load run's figures: throughput, TTFT and inter-token latency percentiles, early stops."""

from __future__ import annotations

from tests.bench.loadgen import Run


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100), at least 1
    return ordered[int(rank) - 1]


def summarize(run: Run) -> dict:
    ok = [r for r in run.records if r.ok]
    tokens = sum(len(r.token_times) for r in ok)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    out = {
        "requests": len(run.records),
        "failed": len(run.records) - len(ok),
        "wall_s": run.wall_s,
        "output_tokens": tokens,
        "requested_tokens": sum(r.request.max_new_tokens for r in run.records),
        # Requests that ended on EOS before max_new_tokens (the API cannot ignore EOS).
        "early_stops": sum(r.finish_reason != "length" for r in ok),
        "output_tokens_per_s": tokens / run.wall_s if run.wall_s > 0 else 0.0,
        "requests_per_s": len(ok) / run.wall_s if run.wall_s > 0 else 0.0,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p99_s": percentile(gaps, 99),
    }
    errors = [r.error for r in run.records if not r.ok]
    if errors:
        out["first_error"] = errors[0] or "no final event"
    return out
