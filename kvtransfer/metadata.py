"""What the connector's scheduler half tells its worker half each step, and the stats it returns.

`PdserveConnectorMetadata` is the only channel between the halves (vLLM builds it in the
scheduler process and binds it in each worker before the forward). `PdserveConnectorStats`
carries the worker half's transfer records back: dicts of `cluster.wire.TransferStat`
fields, which the engine host turns back into `TransferStat`s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvtransfer.specs import LoadSpec, SaveSpec

__all__ = ["LoadSpec", "PdserveConnectorMetadata", "PdserveConnectorStats", "SaveSpec"]

MAX_AGGREGATED_RECORDS = 1000  # per aggregate (vLLM's own stats windows hold 1,000 requests)



@dataclass
class PdserveConnectorMetadata(KVConnectorMetadata):
    saves: list[SaveSpec] = field(default_factory=list)
    loads: list[LoadSpec] = field(default_factory=list)
    discards: list[str] = field(default_factory=list)  # segment paths to give back unpublished


@dataclass
class PdserveConnectorStats(KVConnectorStats):
    """Transfer records since the last collection: dicts of TransferStat fields."""

    def reset(self) -> None:
        self.data = {"transfers": []}

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        records = self.data.setdefault("transfers", [])
        records.extend(other.data.get("transfers", []))
        # vLLM's logging stat logger (always on while stats are) aggregates every step's
        # records here until `AsyncLLM.do_log_stats()` resets it, which only vLLM's API
        # server calls: in a pdserve worker the list grew by one record per transfer for
        # ever (~0.7 MiB/min per worker in the 20-minute soak). pdserve's own stats come
        # from each step's records, not from this aggregate; it keeps the newest only.
        del records[:-MAX_AGGREGATED_RECORDS]
        return self

    def reduce(self) -> dict[str, int | float]:
        records = self.data.get("transfers", [])
        return {
            "num_transfers": len(records),
            "num_bytes": sum(r["num_bytes"] for r in records),
            "num_failed": sum(r["outcome"] != "ok" for r in records),
        }

    def is_empty(self) -> bool:
        return not self.data.get("transfers")
