"""schemathesis against the served OpenAPI document: generated requests for every operation, valid ones
(positive) and invalid ones (negative), against the router on loopback (fake workers, so that thousands
of generations take seconds). No response may be a 5xx, and each must conform to the document: a
documented status code, content type and body schema, and invalid requests refused with a 4xx.

Not checked: `positive_data_acceptance`, since a request the schema allows can still break a limit the
schema cannot express (prompt tokens + max_new_tokens <= max_total_tokens, a known adapter id), which is
a documented 422.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from router import routes
from tests.router.conftest import (  # noqa: F401 - fixtures
    adapter_root,
    encode,
    sock_dir,
    start_router,
    tiny_tokenizer_dir,
)

pytestmark = pytest.mark.slow

MIN_CASES = 500
# Examples per operation and mode; operations without inputs (most GETs) yield a single case.
EXAMPLES = {GenerationMode.POSITIVE: 60, GenerationMode.NEGATIVE: 40}
KEY = "schema-key"


def fuzz(base_url: str, headers: dict[str, str]) -> Counter:
    """Run every operation's cases; returns the number of cases per (method path, mode, status)."""
    doc = requests.get(base_url + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(doc)
    seen: Counter = Counter()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode, examples in EXAMPLES.items():
            if mode is GenerationMode.NEGATIVE and not has_inputs(operation):
                continue  # nothing to make invalid
            fuzz_operation(operation, mode, examples, base_url, session, headers, seen)
    return seen


def has_inputs(operation) -> bool:
    parts = (operation.body, operation.query, operation.headers, operation.path_parameters, operation.cookies)
    return any(len(part) for part in parts)


def fuzz_operation(operation, mode, examples, base_url, session, headers, seen: Counter) -> None:
    name = f"{operation.method.upper()} {operation.path}"

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
        seen[(name, mode.value, response.status_code)] += 1
        case.validate_response(response, excluded_checks=[positive_data_acceptance], headers=headers)

    run()


@pytest.mark.parametrize("api_key", [None, KEY], ids=["open", "api-key"])
async def test_generated_requests_conform_to_the_document(start_router, api_key):  # noqa: F811
    h = await start_router(world_size=1, api_key=api_key, max_concurrent_requests=1024)
    base_url = str(h.http.make_url("")).rstrip("/")
    headers = {"Authorization": f"Bearer {KEY}"} if api_key else {}
    seen = await asyncio.to_thread(fuzz, base_url, headers)
    total = sum(seen.values())
    operations = {op for op, _, _ in seen}
    statuses = Counter(status for (_, _, status), n in seen.items() for _ in range(n))
    print(
        f"\nschemathesis ({'API_KEY' if api_key else 'open'}): {total} cases over {len(operations)} "
        f"operations, statuses {dict(sorted(statuses.items()))}"
    )
    assert total >= MIN_CASES
    assert not [s for s in statuses if s >= 500]
    documented = {f"{r.method} {r.path}" for r in routes.ROUTES}
    assert operations == documented
