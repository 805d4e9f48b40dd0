"""Virtual token counters (VTC): who is owed service next, across tenants and adapters (plain Python).

VTC (Sheng et al., "Fairness in Serving Large Language Models", OSDI '24): each client has a counter of
the service it has received, in weighted tokens, charged as the service happens: `INPUT_TOKEN_COST` per
prompt token when its sequence is admitted, `OUTPUT_TOKEN_COST` per generated token as each is produced,
both divided by the client's weight (default 1; weight 2 gets twice the share). Admission serves the
backlogged client (one with a waiting request) whose counter is lowest. A client that becomes backlogged
after having none waiting is lifted to the lowest counter among the backlogged ones, or, when nobody is
backlogged, to the counter of the last client that stopped being backlogged: idle time banks no credit.
Among clients backlogged over an interval, weighted service then differs by at most the VTC bound: the
cost of one admitted prompt plus the output the running batch can produce before a slot frees,
w_in * L_in + w_out * batch * max_new_tokens (within the paper's 2 * max(w_in * L_in, w_out * M)).
The queue (router/queue.py) charges prompts at admission; the scheduler charges each generated token.

Output costs twice input, as in the paper's evaluation: a generated token takes a whole decode step's
row, while a prompt token shares one forward with the rest of its prompt.

Clients are two levels. Tenants are the names of API_KEYS when two or more keys are configured (else
there is a single tenant, ""); within a tenant, each adapter is a client (the base model is one, named by
the model id). Every token is charged to both the tenant's counter and its (tenant, adapter) counter;
admission picks the lowest tenant, then that tenant's lowest adapter. So tenants share the server
fairly, and each tenant's adapters share its part; with one tenant this is plain per-adapter VTC.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

INPUT_TOKEN_COST = 1.0
OUTPUT_TOKEN_COST = 2.0

Client = tuple[str, str]
"""(tenant, adapter): whose counters a sequence is charged to."""


@dataclass(frozen=True)
class FairnessConfig:
    """The weights of tenants and adapters (absent: 1), and whether requests are fair per tenant."""

    adapter_weights: Mapping[str, float] = field(default_factory=dict)
    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    by_tenant: bool = False
    base_adapter: str = ""
    """The client name of base-model requests (the model id, as in the metrics' labels)."""

    def adapter(self, adapter_id: str | None) -> str:
        """The client name of `adapter_id` (None: the base model)."""
        return self.base_adapter if adapter_id is None else adapter_id

    def client(self, tenant: str | None, adapter_id: str | None) -> Client:
        """The counters a request of `tenant` for `adapter_id` (None: the base model) is charged to."""
        return ((tenant or "") if self.by_tenant else "", self.adapter(adapter_id))


class VirtualTokenCounter:
    """One level of clients' counters: the tenants, or one tenant's adapters."""

    def __init__(self, weights: Mapping[str, float] | None = None):
        self._weights = dict(weights or {})
        self._served: dict[str, float] = {}
        self._last_left = 0.0  # the counter of the last client that stopped being backlogged

    def __getitem__(self, name: str) -> float:
        return self._served.get(name, 0.0)

    def charge(self, name: str, cost: float) -> None:
        self._served[name] = self[name] + cost / self._weights.get(name, 1.0)

    def arrive(self, name: str, backlogged: Collection[str]) -> None:
        """`name` becomes backlogged while `backlogged` (the others) are: lift it so it banks no credit."""
        floor = min((self[other] for other in backlogged), default=self._last_left)
        if self[name] < floor:
            self._served[name] = floor

    def leave(self, name: str) -> None:
        """`name` has nothing waiting any more."""
        self._last_left = self[name]


class FairnessLedger:
    """The tenants' counters and each tenant's adapters' counters, charged and lifted together."""

    def __init__(self, config: FairnessConfig | None = None):
        self.config = config or FairnessConfig()
        self.tenants = VirtualTokenCounter(self.config.tenant_weights)
        self._adapters: dict[str, VirtualTokenCounter] = {}

    def adapters(self, tenant: str) -> VirtualTokenCounter:
        if tenant not in self._adapters:
            self._adapters[tenant] = VirtualTokenCounter(self.config.adapter_weights)
        return self._adapters[tenant]

    def rank(self, client: Client) -> tuple[float, float]:
        """Lower goes first: the tenant's counter, then its adapter's."""
        tenant, adapter = client
        return self.tenants[tenant], self.adapters(tenant)[adapter]

    def charge(self, client: Client, *, prompt: int = 0, output: int = 0) -> None:
        """Service `client` received: `prompt` tokens prefilled, `output` tokens generated."""
        cost = INPUT_TOKEN_COST * prompt + OUTPUT_TOKEN_COST * output
        tenant, adapter = client
        self.tenants.charge(tenant, cost)
        self.adapters(tenant).charge(adapter, cost)

    def arrive(self, client: Client, backlogged: Collection[Client]) -> None:
        """`client` gets its first waiting request while `backlogged` have some."""
        tenant, adapter = client
        if all(t != tenant for t, _ in backlogged):
            self.tenants.arrive(tenant, {t for t, _ in backlogged})
        self.adapters(tenant).arrive(adapter, {a for t, a in backlogged if t == tenant})

    def leave(self, client: Client, backlogged: Collection[Client]) -> None:
        """`client`'s last waiting request left; `backlogged` still have some."""
        tenant, adapter = client
        self.adapters(tenant).leave(adapter)
        if all(t != tenant for t, _ in backlogged):
            self.tenants.leave(tenant)

    def may_overtake(self, client: Client, stalled: Client, slack: float) -> bool:
        """Whether `client` may be admitted ahead of `stalled`, a lower client whose next request does not
        fit yet: only while it is less than `slack` ahead, so that a large request is not starved by a
        stream of small ones that keep fitting (compared at the level where the two differ)."""
        if client[0] != stalled[0]:
            return self.tenants[client[0]] < self.tenants[stalled[0]] + slack
        counters = self.adapters(client[0])
        return counters[client[1]] < counters[stalled[1]] + slack
