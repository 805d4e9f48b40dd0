"""The transformers + peft baseline: the same requests as static batches of mixed-adapter `generate`.

What a user without a multi-LoRA server would run (feasibility §5): a `PeftModel` with every adapter
loaded, in the dtype our server runs (its /info `model_dtype`: the two then do the same arithmetic),
`generate(..., adapter_names=[...])` over batches of `batch_size` requests in arrival order, greedy. A
static batch runs until its longest request is done, so each batch is forced to exactly its largest
max_new_tokens (min_new_tokens = max_new_tokens: no early EOS) and each request is credited with its own
max_new_tokens: the output tokens are the ones asked for, as in our server's runs.

It runs in a child process (`run_baseline`) so its peak RSS is its own:

    python -m tests.bench.hf_baseline SPEC.json OUT.json
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from tests.bench.rss_monitor import RssMonitor
from tests.bench.workload import Request

DTYPES = ("float32", "bfloat16", "float16")


def run_baseline(
    model_dir: Path,
    adapters: dict[str, Path],
    requests: list[Request],
    batch_size: int,
    work_dir: Path,
    dtype: str,
) -> dict:
    """Run the baseline in a child process, in `dtype` (one of DTYPES); its figures plus `peak_rss_bytes`
    of the child."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    spec = {
        "model_dir": str(model_dir),
        "adapters": {k: str(v) for k, v in adapters.items()},
        "requests": [asdict(r) for r in requests],
        "batch_size": batch_size,
        "dtype": dtype,
    }
    spec_path, out_path = work_dir / "hf_baseline_spec.json", work_dir / "hf_baseline_out.json"
    spec_path.write_text(json.dumps(spec))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tests.bench.hf_baseline", str(spec_path), str(out_path)])
    with RssMonitor(proc.pid) as rss:
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"hf_baseline exited with {code}")
    out = json.loads(out_path.read_text())
    out["peak_rss_bytes"] = max(rss.peak_bytes, out.pop("maxrss_bytes"))
    out["total_s"] = time.perf_counter() - start  # with the model and adapter loads
    return out


def _load(model_dir: Path, adapters: dict[str, str], dtype: str):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the launcher serves (DEVICE=auto)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device)
    model.generation_config.pad_token_id = tok.pad_token_id
    names = list(adapters)
    if names:
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
    return tok, model.eval()


def _generate(tok, model, batch: list[Request], with_adapters: bool) -> None:
    import torch

    enc = tok([r.text for r in batch], return_tensors="pt", padding=True).to(model.device)
    n = max(r.max_new_tokens for r in batch)
    kwargs = {"adapter_names": [r.adapter or "__base__" for r in batch]} if with_adapters else {}
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)


def main(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    requests = [Request(**r) for r in spec["requests"]]
    size = spec["batch_size"]
    tok, model = _load(Path(spec["model_dir"]), spec["adapters"], spec["dtype"])
    with_adapters = bool(spec["adapters"])
    warm = [Request(0, requests[0].text, 2, requests[0].adapter)]
    _generate(tok, model, warm, with_adapters)  # not timed
    start = time.perf_counter()
    for i in range(0, len(requests), size):
        _generate(tok, model, requests[i : i + size], with_adapters)
    wall = time.perf_counter() - start
    tokens = sum(r.max_new_tokens for r in requests)
    out = {
        "requests": len(requests),
        "batch_size": size,
        "dtype": spec["dtype"],
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall,
        "requests_per_s": len(requests) / wall,
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:3])
