"""The real default model (SmolLM2-135M: 9 heads, 3 KV heads, tied embeddings) vs peft, and under TP=3."""

from __future__ import annotations

import pytest

from tests.adapter_factory import save_random_adapter
from tests.worker.engine_scenario import build_runner, run_scenario, scenario_prompts
from tests.worker.peft_reference import assert_matches_reference, load_peft_model
from tests.worker.test_tensor_parallel import assert_same, run_tp

pytestmark = pytest.mark.slow

MIX = [None, "r8_all", "r16_qv", "r8_all", "r16_qv", None]
LENGTHS = [6, 11, 3, 8, 5, 9]


@pytest.fixture(scope="module")
def smollm2_adapters(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2-adapters")
    return {
        "r8_all": save_random_adapter(smollm2_dir, root / "a", r=8, alpha=16, seed=1, std=0.03),
        "r16_qv": save_random_adapter(
            smollm2_dir, root / "b", r=16, alpha=8, target_modules=("q_proj", "v_proj"), seed=2, std=0.03
        ),
    }


@pytest.fixture(scope="module")
def single_rank_records(smollm2_dir, smollm2_adapters):
    runner, slots = build_runner(smollm2_dir, smollm2_adapters)
    prompts = scenario_prompts(runner.hf_config.vocab_size, MIX, LENGTHS)
    return prompts, run_scenario(runner, slots, prompts)


def test_smollm2_equals_peft(smollm2_dir, smollm2_adapters, single_rank_records):
    _, records = single_rank_records
    assert_matches_reference(records, load_peft_model(smollm2_dir, smollm2_adapters), atol=1e-4)


def test_smollm2_tp3_equals_tp1(smollm2_dir, smollm2_adapters, single_rank_records):
    prompts, records = single_rank_records
    assert_same(run_tp(3, smollm2_dir, smollm2_adapters, prompts), records)
