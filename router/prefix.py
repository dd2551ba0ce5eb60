"""Which instance probably holds a prompt's prefix in its KV cache: the router's estimate.

vLLM's prefix cache keys full KV blocks by a hash chained over the block's tokens and every
block before it, so two prompts share cached blocks exactly as far as they share full
blocks from the start. The router hashes prompts the same way (its own hash; only equality
matters) and remembers, per instance, the block chains it recently sent there, as an LRU
bounded by that instance's KV-cache size in blocks. An instance evicts by its own LRU under
memory pressure, so the index can over-estimate a hit; a wrong guess costs a recompute on
that instance, never a wrong answer.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence


def block_hashes(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """One hash per full block of `token_ids`, each chained over every block before it."""
    hashes = []
    parent = 0
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash((parent, tuple(token_ids[start:start + block_size])))
        hashes.append(parent)
    return tuple(hashes)


class PrefixIndex:
    """The block chains recently routed to one instance (LRU, bounded in blocks)."""

    def __init__(self, capacity_blocks: int):
        self.capacity_blocks = max(0, capacity_blocks)
        self._blocks: collections.OrderedDict[int, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def num_matched_blocks(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of the chain this instance is believed to hold."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        if self.capacity_blocks == 0:
            return
        for h in hashes:
            self._blocks[h] = None
            self._blocks.move_to_end(h)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)

    def resize(self, capacity_blocks: int) -> None:
        self.capacity_blocks = max(0, capacity_blocks)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)
