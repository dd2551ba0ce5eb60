"""Value types of the search: a parallel configuration and a disaggregated plan.

Placements (DistServe's two algorithms, by DistServe's names, generalised to instance counts):

- `high_node_affinity` (DistServe's Algorithm 1, for nodes linked fast enough that where a
  KV transfer goes does not matter): every instance lives inside one node; prefill and
  decode instances are packed onto nodes independently (first-fit decreasing). A KV
  transfer between instances on the same node uses NVLink, otherwise the source node's NIC.
  The router picks any decode instance.
- `low_node_affinity` (DistServe's Algorithm 2, for limited cross-node bandwidth): the
  cluster is cut into units of `pp` nodes (prefill and decode share the pipeline degree);
  on every node of a unit sit `k_p` prefill and `k_d` decode stage segments, so stage i of
  a prefill hands its layers to stage i of a decode over NVLink. The router pairs a
  prefill only with decode instances of its own unit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Placement = Literal["high_node_affinity", "low_node_affinity"]


@dataclass(frozen=True, order=True)
class ParallelConfig:
    tp: int  # tensor-parallel degree
    pp: int  # pipeline-parallel degree

    @property
    def num_gpus(self) -> int:
        return self.tp * self.pp

    @property
    def label(self) -> str:
        return f"TP{self.tp}" + (f"xPP{self.pp}" if self.pp > 1 else "")


@dataclass(frozen=True, order=True)
class Plan:
    placement: Placement
    prefill: ParallelConfig
    num_prefill: int
    decode: ParallelConfig
    num_decode: int
    num_units: int = 1  # low node affinity: units of `pp` nodes; high node affinity: always 1

    @property
    def num_gpus(self) -> int:
        return self.num_prefill * self.prefill.num_gpus + self.num_decode * self.decode.num_gpus

    @property
    def label(self) -> str:
        return (f"{self.num_prefill}x prefill {self.prefill.label} + "
                f"{self.num_decode}x decode {self.decode.label} ({self.placement.replace('_', ' ')})")

    @property
    def pool_key(self) -> tuple:
        """Identity of the configuration ignoring instance counts."""
        return (self.placement, self.prefill, self.decode)
