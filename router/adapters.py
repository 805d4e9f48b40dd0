"""Adapter registry: which LoRA adapter sits in which worker slot, and what /info says about each.

At startup every configured adapter is loaded into slot 1..N (list order) on every rank; slot 0 means the
base model. Requests name adapters by id; null, "" and the base model's id select the base model, and an
unknown id is an error (TGI silently serves the base model instead).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from router.client import ShardedClient, WorkerError
from router.config import AdapterSource

log = logging.getLogger(__name__)


class AdapterLoadError(RuntimeError):
    """An adapter could not be loaded at startup; the message names it."""


class UnknownAdapterError(KeyError):
    def __init__(self, adapter_id: str):
        super().__init__(adapter_id)
        self.adapter_id = adapter_id


@dataclass(frozen=True)
class AdapterInfo:
    id: str
    source: str
    slot: int
    lora_rank: int
    alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "source": self.source,
            "rank": self.lora_rank,  # /info's documented key (router/responses.py)
            "alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "target_modules": list(self.target_modules),
        }


class AdapterRegistry:
    def __init__(self, base_model_id: str, adapters: Sequence[AdapterInfo] = ()):
        self.base_model_id = base_model_id
        self._by_id = {a.id: a for a in adapters}

    @classmethod
    async def load(
        cls, client: ShardedClient, base_model_id: str, sources: Sequence[AdapterSource], num_slots: int
    ) -> AdapterRegistry:
        ids = [s.id for s in sources]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise AdapterLoadError(f"adapter ids must be unique; repeated: {', '.join(duplicates)}")
        if base_model_id in ids or "" in ids:
            raise AdapterLoadError(
                f"an adapter cannot be named {base_model_id!r} or '' (they mean the base model)"
            )
        if len(sources) > num_slots:
            raise AdapterLoadError(
                f"{len(sources)} adapters configured but the workers have {num_slots} adapter slots"
            )
        infos = []
        for slot, source in enumerate(sources, start=1):
            log.info("Loading adapter weights into model: %s", source.id)
            try:
                reply = await client.load_adapter(slot, source.id, source.path)
            except WorkerError as e:
                raise AdapterLoadError(f"failed to load adapter {source.id!r} from {source.path}: {e}") from e
            infos.append(
                AdapterInfo(
                    id=source.id,
                    source=source.source,
                    slot=slot,
                    lora_rank=reply.lora_rank,
                    alpha=round(reply.alpha, 6),  # a float32 on the wire
                    use_rslora=reply.use_rslora,
                    target_modules=tuple(reply.target_modules),
                )
            )
            log.info("Loaded adapter %s into slot %d in %.2f s", source.id, slot, reply.load_ns / 1e9)
        return cls(base_model_id, infos)

    def find(self, adapter_id: str | None) -> AdapterInfo | None:
        """The adapter `adapter_id` names; None for the base model. Raises UnknownAdapterError.

        Requests reach this through `router.lifecycle.resolve_adapter`, once each."""
        if adapter_id is None or adapter_id == "" or adapter_id == self.base_model_id:
            return None
        try:
            return self._by_id[adapter_id]
        except KeyError:
            raise UnknownAdapterError(adapter_id) from None

    def infos(self) -> list[AdapterInfo]:
        return sorted(self._by_id.values(), key=lambda a: a.slot)
