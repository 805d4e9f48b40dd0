"""The adapter pool of one tensor-parallel rank: adapter rows at their true rank, read by the LoRA ops.

S-LoRA's unified paging, for LoRA weights: instead of a slot index into stacks sized for the largest
rank on every module, each adapter holds exactly the rank rows of the modules it targets, in pages of one
flat tensor, and a per-row table says where they are (layout and row ids: `worker/lora/pages.py`).

- `storage`: [num_pages * page_elems] in the LoRA dtype, NaN wherever no adapter's row is in a page ever
  handed out (holes, freed rows, page tails), so an op that reads a row it should not produces NaN and
  fails a test. Pages never handed out are filled when they first are (see `AdapterPool`).
- `view(w)`: [num_rows(w), w], the contiguous view of the whole storage as rows of width w. An op
  reads A rows from view(h_in_local) and B rows from view(h_out_local): row j starts at element j * w
  (kernels must form that offset in 64 bits: it can pass 2^31 in a large pool, row ids do not).
- Per adapter (`AdapterRows`), for each (layer, module) it targets: `a_rows` [r] and `b_rows` [r] row
  ids with view(h_in_local)[a_rows[j]] = a[j] (a: [r, h_in_local]) and view(h_out_local)[b_rows[j]] =
  b_t[j] (b_t: [r, h_out_local], B transposed with the LoRA scale folded in).
- Per step (`StepTables`), for the G adapters its rows use: `a_rows` / `b_rows` [K, G, R_max] int32 and
  `lora_ranks` [K, G] int32 over the K (layer, module) keys of the model; entry [k, g, j] for j >= r is
  PAD_ROW, never read (the rank bounds every read). A rank of 0 means adapter g does not target key k.

Tensor parallel: each rank has its own pool, with the widths of its shards (the sharding rule:
`worker/lora/sites.py`), and the same calls in the same order on every rank give the same
rows and the same PoolFullError, because the allocator is deterministic.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from worker.lora.packed import FactorPlace, ModuleFactors, PackedFactors
from worker.lora.pages import RowAllocator

Key = tuple[int, str]  # (layer, module), e.g. (3, "q_proj")
PAD_ROW = -(2**31)  # table entries past a rank: no valid row id is negative, so a gather using one fails


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
    """One rank's adapter pool: storage, its class views and a RowAllocator.

    A page is NaN-filled when it is first handed out (`fill_all`: every page at once), not at startup:
    on the CPU an untouched page costs no memory, so a large ADAPTER_MEMORY costs only what adapters
    use. A page never handed out holds no row, so no row id an op is given can reach it; tests that
    also want a stray read of such a page to show NaN use `fill_all`."""

    def __init__(
        self,
        num_pages: int,
        page_elems: int,
        widths: Iterable[int],
        dtype: torch.dtype,
        device: torch.device,
        fill_all: bool = False,
    ):
        if not dtype.is_floating_point:
            raise ValueError(f"the pool dtype must be floating point (unused rows are NaN), got {dtype}")
        self.allocator = RowAllocator(num_pages, page_elems, widths)
        self.dtype, self.device = dtype, torch.device(device)
        # [num_pages * page_elems]
        self.storage = torch.empty((num_pages * page_elems,), dtype=dtype, device=self.device)
        self._filled = bytearray(num_pages)  # 1 where the page was NaN-filled
        if fill_all:
            self.storage.fill_(float("nan"))
            self._filled = bytearray(b"\x01" * num_pages)
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

    def filled_pages(self) -> list[int]:
        """The pages ever handed out (NaN wherever no row is placed)."""
        return [p for p, filled in enumerate(self._filled) if filled]

    def filled_storage(self) -> torch.Tensor:
        """[filled pages, page_elems]: a copy of those pages (what a check for stray rows reads)."""
        pages = torch.tensor(self.filled_pages(), dtype=torch.int64, device=self.device)
        return self.storage.view(-1, self.allocator.page_elems).index_select(0, pages)

    def place(self, factors: Mapping[Key, ModuleFactors] | PackedFactors) -> AdapterRows:
        """Allocate rows for every (layer, module) of `factors` (all or nothing: PoolFullError and
        nothing changed when they do not fit), then write A's rows and B^T's rows into them: one
        scatter per row width. ValueError for a factor of a width the pool has no class for."""
        packed = factors if isinstance(factors, PackedFactors) else PackedFactors.pack(factors)
        demand = packed.demand()
        for w in demand:
            self.view(w)
        given = self.allocator.allocate(demand)  # width -> row ids, in the order of its block's rows
        spans, offset = {}, 0
        for w in sorted(given):  # row_ids holds each class's rows together, in the order given
            spans[w] = (offset, offset + len(given[w]))
            offset += len(given[w])
        host = torch.tensor([r for w in sorted(given) for r in given[w]], dtype=torch.int64)  # [total rows]
        self._fill_new_pages(given)
        row_ids = host.to(self.device)  # [total rows], the same tensor on a CPU pool
        for w, (s, e) in spans.items():
            # The copy rounds to the pool dtype once; non_blocking: pinned host blocks copy asynchronously.
            block = packed.blocks[w].to(self.device, self.dtype, non_blocking=True)
            self._views[w].index_copy_(0, row_ids[s:e], block)
        modules = {}
        for p in packed.places:
            a, b = spans[p.a_width][0] + p.a_offset, spans[p.b_width][0] + p.b_offset
            a_rows, b_rows = row_ids[a : a + p.rank], row_ids[b : b + p.rank]
            modules[p.key] = ModuleRows(a_rows, b_rows, p.a_width, p.b_width, a, b)
        rows = AdapterRows(next(self._handles), modules, row_ids, host, spans)
        self._live[rows.handle] = rows
        return rows

    def _fill_new_pages(self, given: Mapping[int, list[int]]) -> None:
        """NaN-fill the pages of `given` rows that were never handed out before."""
        page_elems = self.allocator.page_elems
        for w, ids in given.items():
            # A row lies wholly inside one page: the page of its first element.
            for p in torch.unique(torch.tensor(ids) * w // page_elems).tolist():
                if not self._filled[p]:
                    self.storage[p * page_elems : (p + 1) * page_elems].fill_(float("nan"))
                    self._filled[p] = 1

    def read(self, rows: AdapterRows, pin: bool = False) -> PackedFactors:
        """The factors `rows` hold, copied to the host (page-locked with `pin`): what `place` was given,
        in the pool dtype; one gather per row width."""
        blocks = {}
        for w, (s, e) in rows.width_spans.items():
            blocks[w] = self._views[w].index_select(0, rows.row_ids[s:e]).cpu()  # [rows of width w, w]
        places = []
        for key in sorted(rows.modules):
            m = rows.modules[key]
            a_off = m.a_start - rows.width_spans[m.a_width][0]
            b_off = m.b_start - rows.width_spans[m.b_width][0]
            places.append(FactorPlace(key, m.lora_rank, m.a_width, a_off, m.b_width, b_off))
        packed = PackedFactors(blocks, tuple(places))
        return packed.pinned() if pin else packed

    def release(self, rows: AdapterRows) -> list[int]:
        """NaN-fill the adapter's rows, then free them; returns the pages that became free. Raises
        ValueError for rows already released or placed in another pool (nothing is touched)."""
        if self._live.get(rows.handle) is not rows:
            raise ValueError(f"adapter rows {rows.handle} are not placed in this pool (released twice?)")
        for w, (s, e) in rows.width_spans.items():
            self._views[w].index_fill_(0, rows.row_ids[s:e], float("nan"))
        del self._live[rows.handle]
        return self.allocator.free(rows.rows_by_width())
