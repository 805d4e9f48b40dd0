"""API_KEYS, TENANT_WEIGHTS, ADAPTER_WEIGHTS and ADAPTER_QUEUE_SHARE: parsed, checked, and composed into the
RouterConfig, whose limits then hold the fairness policy."""

from __future__ import annotations

import re

import pytest

from launch.composition import compose
from launch.settings import SettingsError, load_settings
from router.limits import Limits


def test_pairs_are_parsed_and_composed(tmp_path):
    s = load_settings(
        [
            "--api-key",
            "kd",
            "--api-keys",
            "alice=sk-a, bob=sk=b",
            "--tenant-weights",
            "alice=2",
            "--adapter-weights",
            "org/x=0.5",
            "--adapter-queue-share",
            "0.25",
        ]
    )
    _, router = compose(s, tmp_path, [], ["/s/0"], "cpu")
    assert router.api_keys == {"alice": "sk-a", "bob": "sk=b"}  # a key may hold `=`
    assert router.tenant_keys() == {"alice": "sk-a", "bob": "sk=b", "default": "kd"}
    assert (router.tenant_weights, router.adapter_weights) == ({"alice": 2.0}, {"org/x": 0.5})
    limits = Limits.resolve(router, num_blocks=100, block_size=16, max_position=1024)
    assert limits.max_queued_per_adapter == 32  # a quarter of MAX_CONCURRENT_REQUESTS 128
    assert limits.fairness.by_tenant and limits.fairness.base_adapter == router.model_id
    # One key alone is not several tenants: fairness stays per adapter.
    _, single = compose(load_settings(["--api-key", "k"]), tmp_path, [], ["/s/0"], "cpu")
    assert not Limits.resolve(single, num_blocks=100, block_size=16, max_position=1024).fairness.by_tenant
    assert (
        Limits.resolve(single, num_blocks=100, block_size=16, max_position=1024).max_queued_per_adapter
        is None
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--api-keys", "alice"], "API_KEYS (--api-keys): entry 1 is not `name=value`"),
        (["--api-keys", "a=1,a=2"], "'a' is named twice"),
        (["--api-keys", "a="], "a tenant's key is empty"),
        (["--adapter-weights", "x=0"], "the weight of 'x' must be a number > 0"),
        (["--tenant-weights", "x=heavy"], "the weight of 'x' must be a number > 0"),
        (["--api-key", "k", "--api-keys", "default=z"], "API_KEYS names tenant 'default'"),
        (["--adapter-queue-share", "1.5"], "ADAPTER_QUEUE_SHARE"),
    ],
)
def test_bad_values_name_the_setting(argv, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        load_settings(argv)


def test_a_bad_key_list_is_not_echoed():
    with pytest.raises(SettingsError) as caught:
        load_settings(["--api-keys", "alice=secret-one,bob"])
    assert "secret-one" not in str(caught.value)
