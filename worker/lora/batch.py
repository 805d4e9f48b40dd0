"""Per-step LoRA state: the step's adapters' row tables, and each site's view of them.

The step planner builds one `StepLora` per set of adapters a step runs (the tables of its G adapters,
one transfer; reused by the steps after it while the set is the same) and one `LoraBatch` per run of
rows (a join step's prompt rows and decode rows are two, sharing the tables); every LoRA-capable layer
calls `apply` with its site. Each site's `PoolPart`s are made with the tables, before any forward
(`plan_sites`), and shared by both row runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from worker.kernels import LoraOps
from worker.kernels.pool_args import PoolPart, StepRows
from worker.lora.pool import AdapterPool, AdapterRows, StepTables
from worker.lora.sites import LoraSite


@dataclass
class StepLora:
    """The step's adapters (g = index into `adapters`) and their row tables over the model's keys."""

    ops: LoraOps
    pool: AdapterPool
    tables: StepTables
    adapters: tuple[int, ...]  # [G] handles of the adapters' rows
    _a_rows: tuple[torch.Tensor, ...]  # per key k: [G, R_max] views, made in one call
    _b_rows: tuple[torch.Tensor, ...]
    _ranks: tuple[torch.Tensor, ...]  # per key k: [G]
    _host_ranks: list[list[int]]  # [K][G]
    _sites: dict[int, tuple[torch.Tensor, tuple[PoolPart, ...]]] = field(default_factory=dict)

    @classmethod
    def build(cls, ops: LoraOps, pool: AdapterPool, adapters: list[AdapterRows], keys, device) -> StepLora:
        tables = StepTables.build(adapters, keys, device)
        return cls(
            ops=ops,
            pool=pool,
            tables=tables,
            adapters=tuple(a.handle for a in adapters),
            _a_rows=tables.a_rows.unbind(0),
            _b_rows=tables.b_rows.unbind(0),
            _ranks=tables.lora_ranks.unbind(0),
            _host_ranks=tables.host_lora_ranks.tolist(),
        )

    def plan_sites(self, sites: list[LoraSite]) -> None:
        """Make every site's parts now, so that the forward only looks them up."""
        for site in sites:
            self.site(site)

    def site(self, site: LoraSite) -> tuple[torch.Tensor, tuple[PoolPart, ...]]:
        """(a_view, the parts some adapter of the step targets) of `site`; made on first use."""
        cached = self._sites.get(id(site))
        if cached is None:
            parts = []
            for part in site.parts:
                k = self.tables.index[(site.layer, part.module)]
                host = self._host_ranks[k]
                if any(host):
                    parts.append(
                        PoolPart(
                            key=(site.layer, part.module),
                            b_view=self.pool.view(part.width),
                            a_rows=self._a_rows[k],
                            b_rows=self._b_rows[k],
                            lora_ranks=self._ranks[k],
                            host_lora_ranks=tuple(host),
                            out_offset=part.column,
                        )
                    )
            cached = self._sites[id(site)] = (self.pool.view(site.h_in), tuple(parts))
        return cached


@dataclass
class LoraBatch:
    """One run of rows of a step: which of the step's adapters each row uses."""

    step: StepLora
    rows: StepRows

    def apply(self, site: LoraSite | None, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[:, part columns] += x @ A @ B for every part of `site` some row's adapter targets.

        x: [num_tokens, h_in_local]; out: [num_tokens, h_out_local_total], updated in place.
        """
        if site is None:
            return
        a_view, parts = self.step.site(site)
        if parts:
            self.step.ops.lora_site(x, a_view, parts, self.rows, out)


@dataclass
class SplitLoraBatch:
    """Row ranges applied as separate LoraBatches: a join step's prompt rows, then its decode rows."""

    parts: list[tuple[int, int, LoraBatch]]  # (first row, end row, the batch of those rows)

    def apply(self, site: LoraSite | None, x: torch.Tensor, out: torch.Tensor) -> None:
        """As LoraBatch.apply, each part on its rows (views: out is updated in place)."""
        for start, end, part in self.parts:
            part.apply(site, x[start:end], out[start:end])
