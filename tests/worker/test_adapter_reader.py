"""The adapter reader process (worker/lora/reader.py), forked first thing in a fresh interpreter the way
`python -m worker` forks it: what it reads equals reading in the worker itself, arrives in shared memory,
refusals come back as the same errors, it runs at idle priority, and when it is gone the worker reads
adapters itself."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys
    from pathlib import Path
    from worker.lora.reader import AdapterReader, ReaderProcess, read_adapter

    process = ReaderProcess.fork()  # before anything starts a thread
    assert process is not None, "the reader was not forked"
    from tests.worker.engine_scenario import build_runner
    from worker.lora.adapter import AdapterError

    model_dir, adapter_dir, bad_dir = map(Path, sys.argv[1:4])
    runner, _ = build_runner(model_dir, {}, num_slots=2)
    spec = runner.read_spec()
    got, want = process.read("r8_all", adapter_dir, spec), read_adapter("r8_all", adapter_dir, spec)
    out = {
        "facts_equal": got.facts == want.facts,
        "places_equal": got.packed.places == want.packed.places,
        "blocks_equal": set(got.packed.blocks) == set(want.packed.blocks)
        and all(got.packed.blocks[w].equal(b) for w, b in want.packed.blocks.items()),
        "shared": all(b.is_shared() for b in got.packed.blocks.values()),
        "idle_priority": os.sched_getscheduler(process._process.pid) == os.SCHED_IDLE,
    }
    try:
        process.read("bad", bad_dir, spec)
    except AdapterError as err:
        out["refused"] = str(err)
    placed = runner.place_adapter(1, 1, got)
    out["placed"] = placed.name
    os.kill(process._process.pid, signal.SIGKILL)
    process._process.join()
    reader = AdapterReader(0, process)
    again = asyncio.run(reader.read("r8_all", adapter_dir, spec))
    out["fallback_equal"] = all(again.packed.blocks[w].equal(b) for w, b in want.packed.blocks.items())
    out["in_process_after_death"] = reader.in_process
    asyncio.run(reader.close())
    print(json.dumps(out))
    """
)


def test_the_reader_process_reads_what_the_worker_would(tiny_model_dir, tiny_adapters, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16}))
    (bad / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(tiny_adapters["r8_all"]), str(bad)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out.pop("refused").startswith("adapter 'bad':")
    assert out == {
        "facts_equal": True,
        "places_equal": True,
        "blocks_equal": True,
        "shared": True,
        "idle_priority": True,
        "placed": "r8_all",
        "fallback_equal": True,
        "in_process_after_death": False,
    }
