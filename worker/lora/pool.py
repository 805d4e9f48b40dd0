"""The adapter pool of one tensor-parallel rank: adapter rows at their true rank, read by the LoRA ops.

S-LoRA's unified paging, for LoRA weights: instead of a slot index into stacks sized for the largest
rank on every module, each adapter holds exactly the rank rows of the modules it targets, in pages of one
flat tensor, and a per-row table says where they are (layout and row ids: `worker/lora/pages.py`).

- `storage`: [num_pages * page_elems] in the LoRA dtype, NaN wherever no adapter's row is (unused pages,
  freed rows, page tails), so an op that reads a row it should not produces NaN and fails a test.
- `view(w)`: [num_rows(w), w], the contiguous view of the whole storage as rows of width w. An op
  reads A rows from view(h_in_local) and B rows from view(h_out_local): row j starts at element j * w
  (kernels must form that offset in 64 bits: it can pass 2^31 in a large pool, row ids do not).
- Per adapter (`AdapterRows`), for each (layer, module) it targets: `a_rows` [r] and `b_rows` [r] row
  ids with view(h_in_local)[a_rows[j]] = a[j] (a: [r, h_in_local]) and view(h_out_local)[b_rows[j]] =
  b_t[j] (b_t: [r, h_out_local], B transposed with the scale folded in, as in the stacks).
- Per step (`StepTables`), for the G adapters its rows use: `a_rows` / `b_rows` [K, G, R_max] int32 and
  `lora_ranks` [K, G] int32 over the K (layer, module) keys of the model; entry [k, g, j] for j >= r is
  PAD_ROW, never read (the rank bounds every read). A rank of 0 means adapter g does not target key k.

Tensor parallel: each rank has its own pool, with the widths of its shards (the sharding rule is the
stacks', `worker/lora/stacks.py`), and the same calls in the same order on every rank give the same
rows and the same PoolFullError, because the allocator is deterministic.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from worker.lora.pages import RowAllocator

Key = tuple[int, str]  # (layer, module), e.g. (3, "q_proj")
PAD_ROW = -(2**31)  # table entries past a rank: no valid row id is negative, so a gather using one fails


@dataclass(frozen=True)
class ModuleFactors:
    """One (layer, module)'s LoRA factors on this rank, as the ops want them (`LoraStack.prepare`)."""

    a: torch.Tensor  # [r, h_in_local]
    b_t: torch.Tensor  # [r, h_out_local]: B transposed, with the LoRA scale folded in


@dataclass(frozen=True)
class ModuleRows:
    """Where one (layer, module)'s rows are: `a_rows` index view(a_width), `b_rows` view(b_width)."""

    a_rows: torch.Tensor  # [r] int64 on the pool's device (a view into AdapterRows.row_ids)
    b_rows: torch.Tensor  # [r] int64 on the pool's device
    a_width: int  # h_in_local
    b_width: int  # h_out_local
    a_start: int  # a_rows is host_row_ids[a_start : a_start + r]
    b_start: int

    @property
    def lora_rank(self) -> int:
        return self.a_rows.shape[0]


@dataclass(frozen=True)
class AdapterRows:
    """One adapter's rows in a pool, from `AdapterPool.place`; `AdapterPool.release` gives them back."""

    handle: int  # unique in its pool while placed
    modules: dict[Key, ModuleRows]
    row_ids: torch.Tensor  # [total rows] int64 on the pool's device, grouped by width
    host_row_ids: torch.Tensor  # [total rows] int64 on the CPU (the same tensor on a CPU pool)
    width_spans: dict[int, tuple[int, int]]  # width -> [start, end) of its rows in row_ids
    _tables: dict = field(default_factory=dict, compare=False, repr=False)  # keys -> host table cache

    @property
    def lora_rank(self) -> int:
        """The largest rank over the adapter's modules."""
        return max(m.lora_rank for m in self.modules.values())

    @property
    def num_elements(self) -> int:
        """A and B elements the adapter holds on this rank (its true size)."""
        return sum(m.lora_rank * (m.a_width + m.b_width) for m in self.modules.values())

    def rows_by_width(self) -> dict[int, list[int]]:
        """width -> the adapter's row ids of that class (what the allocator handed out)."""
        return {w: self.host_row_ids[s:e].tolist() for w, (s, e) in self.width_spans.items()}

    def host_table(self, keys: tuple[Key, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [2, K, lora_rank] int32 with A then B row ids, PAD_ROW past each rank; ranks [K] int32)
        on the CPU, built once per `keys` and cached: a step copies it instead of walking modules."""
        if keys not in self._tables:
            pad = self.host_row_ids.shape[0]  # index of the PAD_ROW appended below
            index = torch.full((2, len(keys), self.lora_rank), pad, dtype=torch.int64)  # [2, K, R]
            ranks = torch.zeros(len(keys), dtype=torch.int32)  # [K]
            for k, key in enumerate(keys):
                m = self.modules.get(key)
                if m is not None:
                    index[0, k, : m.lora_rank] = torch.arange(m.a_start, m.a_start + m.lora_rank)
                    index[1, k, : m.lora_rank] = torch.arange(m.b_start, m.b_start + m.lora_rank)
                    ranks[k] = m.lora_rank
            padded = torch.cat([self.host_row_ids, torch.tensor([PAD_ROW])])  # [total rows + 1]
            self._tables[keys] = (padded[index].to(torch.int32), ranks)
        return self._tables[keys]


@dataclass(frozen=True)
class StepTables:
    """The row tables of one step for its G active adapters (g = the row's index into `adapters`)."""

    keys: tuple[Key, ...]
    index: dict[Key, int]  # key -> k
    a_rows: torch.Tensor  # [K, G, R_max] int32 on the device: A row ids, PAD_ROW past each rank
    b_rows: torch.Tensor  # [K, G, R_max] int32 on the device
    lora_ranks: torch.Tensor  # [K, G] int32 on the device; 0 = adapter g does not target key k
    host_lora_ranks: torch.Tensor  # [K, G] int32 on the CPU, to skip keys without a device sync

    @classmethod
    def build(cls, adapters: Sequence[AdapterRows], keys: Sequence[Key], device: torch.device) -> StepTables:
        """Tables of `adapters` over `keys` (every (layer, module) the model applies LoRA to, in its
        order): G copies of each adapter's cached host table and one transfer each."""
        keys = tuple(keys)
        tables = [ad.host_table(keys) for ad in adapters]
        r_max = max((t.shape[2] for t, _ in tables), default=0)
        rows = torch.full((2, len(keys), len(adapters), r_max), PAD_ROW, dtype=torch.int32)  # [2, K, G, R]
        ranks = torch.zeros(len(keys), len(adapters), dtype=torch.int32)  # [K, G]
        for g, (t, r) in enumerate(tables):
            rows[:, :, g, : t.shape[2]] = t
            ranks[:, g] = r
        on_device = rows.to(device)
        return cls(
            keys=keys,
            index={key: k for k, key in enumerate(keys)},
            a_rows=on_device[0],
            b_rows=on_device[1],
            lora_ranks=ranks.to(device),
            host_lora_ranks=ranks,
        )

    def for_key(self, key: Key) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(a_rows [G, R_max], b_rows [G, R_max], lora_ranks [G]) of one (layer, module): the
        `lora_pool_ref` arguments, as contiguous views."""
        k = self.index[key]
        return self.a_rows[k], self.b_rows[k], self.lora_ranks[k]


class AdapterPool:
    """One rank's adapter pool: NaN-filled storage, its class views and a RowAllocator."""

    def __init__(
        self, num_pages: int, page_elems: int, widths: Iterable[int], dtype: torch.dtype, device: torch.device
    ):
        if not dtype.is_floating_point:
            raise ValueError(f"the pool dtype must be floating point (unused rows are NaN), got {dtype}")
        self.allocator = RowAllocator(num_pages, page_elems, widths)
        self.dtype, self.device = dtype, torch.device(device)
        # [num_pages * page_elems]; NaN until a row is placed (reading an unused row must show).
        self.storage = torch.full((num_pages * page_elems,), float("nan"), dtype=dtype, device=self.device)
        self._views = {}
        for w in self.allocator.widths:
            n = self.allocator.num_rows(w)
            self._views[w] = self.storage[: n * w].view(n, w)  # [num_rows(w), w], no copy
        self._live: dict[int, AdapterRows] = {}
        self._handles = itertools.count(1)

    @property
    def widths(self) -> tuple[int, ...]:
        return self.allocator.widths

    def view(self, width: int) -> torch.Tensor:
        """[num_rows(width), width]: the storage as rows of class `width` (row ids index it)."""
        if width not in self._views:
            raise ValueError(f"no row class of width {width}; the pool has {self.widths}")
        return self._views[width]

    @property
    def bytes_used(self) -> int:
        """Bytes of the pages that hold rows (what adapters cost, holes and tails included)."""
        return self.allocator.used_pages * self.allocator.page_elems * self.storage.element_size()

    @property
    def bytes_total(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def place(self, factors: Mapping[Key, ModuleFactors]) -> AdapterRows:
        """Allocate rows for every (layer, module) of `factors` (all or nothing: PoolFullError and
        nothing changed when they do not fit), then write A's rows and B^T's rows into them."""
        keys = sorted(factors)  # a fixed order, so every rank assigns the same rows to the same key
        given = self.allocator.allocate(self._demand(factors, keys))
        spans, offset = {}, 0
        for w in sorted(given):  # row_ids holds each class's rows together, in the order given
            spans[w] = (offset, offset + len(given[w]))
            offset += len(given[w])
        host = torch.tensor([r for w in sorted(given) for r in given[w]], dtype=torch.int64)  # [total rows]
        row_ids = host.to(self.device)  # [total rows], the same tensor on a CPU pool
        cursor = {w: s for w, (s, _) in spans.items()}
        modules = {}
        for key in keys:
            f, r = factors[key], factors[key].a.shape[0]
            a_w, b_w = f.a.shape[1], f.b_t.shape[1]
            a, cursor[a_w] = cursor[a_w], cursor[a_w] + r
            b, cursor[b_w] = cursor[b_w], cursor[b_w] + r
            modules[key] = ModuleRows(row_ids[a : a + r], row_ids[b : b + r], a_w, b_w, a, b)
            # One scatter per factor, straight from the caller's tensor (no staging copy); the copy
            # rounds to the pool dtype once, as a copy into the stacks does.
            self._views[a_w].index_copy_(0, modules[key].a_rows, f.a.to(self.device, self.dtype))
            self._views[b_w].index_copy_(0, modules[key].b_rows, f.b_t.to(self.device, self.dtype))
        rows = AdapterRows(next(self._handles), modules, row_ids, host, spans)
        self._live[rows.handle] = rows
        return rows

    def _demand(self, factors: Mapping[Key, ModuleFactors], keys: list[Key]) -> dict[int, int]:
        """width -> rows `factors` need, after checking their shapes and widths."""
        demand: dict[int, int] = {}
        for key in keys:
            a, b_t = factors[key].a, factors[key].b_t
            if a.dim() != 2 or b_t.dim() != 2 or a.shape[0] != b_t.shape[0] or a.shape[0] == 0:
                raise ValueError(
                    f"{key}: need a [r, h_in] and b_t [r, h_out] with r >= 1: {a.shape}, {b_t.shape}"
                )
            for w in (a.shape[1], b_t.shape[1]):
                self.view(w)
                demand[w] = demand.get(w, 0) + a.shape[0]
        return demand

    def read(self, rows: AdapterRows, pin: bool = False) -> dict[Key, ModuleFactors]:
        """The factors `rows` hold, copied to the host (page-locked with `pin`): what `place` was given,
        in the pool dtype."""
        out = {}
        for key, m in rows.modules.items():
            a = self._views[m.a_width].index_select(0, m.a_rows).cpu()  # [r, h_in_local]
            b_t = self._views[m.b_width].index_select(0, m.b_rows).cpu()  # [r, h_out_local]
            if pin:
                a, b_t = a.pin_memory(), b_t.pin_memory()
            out[key] = ModuleFactors(a, b_t)
        return out

    def release(self, rows: AdapterRows) -> list[int]:
        """NaN-fill the adapter's rows, then free them; returns the pages that became free. Raises
        ValueError for rows already released or placed in another pool (nothing is touched)."""
        if self._live.get(rows.handle) is not rows:
            raise ValueError(f"adapter rows {rows.handle} are not placed in this pool (released twice?)")
        for w, (s, e) in rows.width_spans.items():
            self._views[w].index_fill_(0, rows.row_ids[s:e], float("nan"))
        del self._live[rows.handle]
        return self.allocator.free(rows.rows_by_width())
