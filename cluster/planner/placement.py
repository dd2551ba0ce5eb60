"""Where a plan's instances sit on the cluster, and the KV-transfer links that follow.

`layout_plan` returns the node of every pipeline stage of every instance, or None when
the plan does not fit the cluster (see `plans` for the two placement algorithms).
`transfer_topology` turns a layout into the simulator's links:

- same node: the prefill instance's NVLink, bandwidth = per-pair bandwidth x GPU pairs
  (min of the two instances' GPU counts: every GPU sends its own shard in parallel);
- different nodes: the source node's NIC, shared FCFS by every transfer leaving that node.
"""

from __future__ import annotations

from dataclasses import dataclass

from .decode_pool import TransferTopology
from .plans import Plan


@dataclass(frozen=True)
class Layout:
    prefill_nodes: tuple[tuple[int, ...], ...]  # [num_prefill] -> node of each stage
    decode_nodes: tuple[tuple[int, ...], ...]  # [num_decode] -> node of each stage
    prefill_units: tuple[int, ...]  # [num_prefill] routing unit (low node affinity), else 0
    decode_units: tuple[int, ...]


def _pack_first_fit_decreasing(plan: Plan, num_nodes: int, gpus_per_node: int) -> Layout | None:
    items = [(plan.prefill.num_gpus, 0, i) for i in range(plan.num_prefill)]
    items += [(plan.decode.num_gpus, 1, i) for i in range(plan.num_decode)]
    if any(size > gpus_per_node for size, _, _ in items):
        return None
    items.sort(key=lambda it: (-it[0], it[1], it[2]))
    free = [gpus_per_node] * num_nodes
    nodes: dict[tuple[int, int], int] = {}
    for size, role, i in items:
        node = next((n for n in range(num_nodes) if free[n] >= size), None)
        if node is None:
            return None
        free[node] -= size
        nodes[(role, i)] = node
    return Layout(
        prefill_nodes=tuple((nodes[(0, i)],) * plan.prefill.pp for i in range(plan.num_prefill)),
        decode_nodes=tuple((nodes[(1, i)],) * plan.decode.pp for i in range(plan.num_decode)),
        prefill_units=(0,) * plan.num_prefill,
        decode_units=(0,) * plan.num_decode,
    )


def _low_node_affinity(plan: Plan, num_nodes: int, gpus_per_node: int) -> Layout | None:
    pp, units = plan.prefill.pp, plan.num_units
    if plan.decode.pp != pp or units < 1 or units * pp > num_nodes:
        return None
    if plan.num_prefill % units or plan.num_decode % units:
        return None
    k_p, k_d = plan.num_prefill // units, plan.num_decode // units
    if k_p < 1 or k_d < 1 or k_p * plan.prefill.tp + k_d * plan.decode.tp > gpus_per_node:
        return None

    def nodes_of(unit: int) -> tuple[int, ...]:
        return tuple(range(unit * pp, unit * pp + pp))

    return Layout(
        prefill_nodes=tuple(nodes_of(i // k_p) for i in range(plan.num_prefill)),
        decode_nodes=tuple(nodes_of(i // k_d) for i in range(plan.num_decode)),
        prefill_units=tuple(i // k_p for i in range(plan.num_prefill)),
        decode_units=tuple(i // k_d for i in range(plan.num_decode)),
    )


def layout_plan(plan: Plan, num_nodes: int, gpus_per_node: int) -> Layout | None:
    if plan.num_prefill < 1 or plan.num_decode < 1:
        return None
    if plan.placement == "low_node_affinity":
        return _low_node_affinity(plan, num_nodes, gpus_per_node)
    return _pack_first_fit_decreasing(plan, num_nodes, gpus_per_node)


def transfer_topology(
    plan: Plan,
    layout: Layout,
    kv_bytes_per_token: float,
    intra_node_bytes_per_s: float,
    inter_node_bytes_per_s: float,
    latency_s: float = 0.0,
) -> TransferTopology:
    num_p, num_d = plan.num_prefill, plan.num_decode
    pairs = min(plan.prefill.num_gpus, plan.decode.num_gpus)
    intra_spt = kv_bytes_per_token / (intra_node_bytes_per_s * pairs)
    inter_spt = kv_bytes_per_token / inter_node_bytes_per_s
    link_ids, spt, cands = [], [], []
    for p in range(num_p):
        row_link, row_spt = [], []
        for d in range(num_d):
            # Stage-aligned on the same nodes (low node affinity), or both on one node (low).
            if set(layout.prefill_nodes[p]) == set(layout.decode_nodes[d]):
                row_link.append(p)  # this prefill instance's NVLink
                row_spt.append(intra_spt)
            else:
                row_link.append(num_p + layout.prefill_nodes[p][0])  # source node's NIC
                row_spt.append(inter_spt)
        link_ids.append(tuple(row_link))
        spt.append(tuple(row_spt))
        unit = layout.prefill_units[p]
        cands.append(tuple(d for d in range(num_d) if layout.decode_units[d] == unit))
    num_nodes = 1 + max(n for nodes in layout.prefill_nodes + layout.decode_nodes for n in nodes)
    return TransferTopology(
        decode_candidates=tuple(cands),
        link_ids=tuple(link_ids),
        seconds_per_token=tuple(spt),
        num_links=num_p + num_nodes,
        latency_s=latency_s,
    )
