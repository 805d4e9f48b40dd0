"""The AdapterResolver tests' fixtures (tests/router/resolver/harness.py), for every module here."""

from tests.router.resolver.harness import hub, make, no_network, no_outside_access, tree  # noqa: F401
