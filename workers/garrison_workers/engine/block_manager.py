"""Paged KV cache bookkeeping: fixed-size blocks, per-sequence block tables, ref counts, prefix cache.

Only ids and counts live here; the model runner owns the cache tensors. A full block is published
under a hash of (salt, previous block's hash, its tokens); a later sequence with the same salt and
the same leading tokens reuses it instead of recomputing. Freed blocks keep their hash until they are
handed out again, so a finished request's prefix stays reusable while memory allows (LRU order).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from garrison_workers.engine.sequence import Sequence


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None
    token_ids: tuple[int, ...] = ()


def block_hash(salt: bytes, parent: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    # A cryptographic hash: tenants must not be able to forge a collision with another's blocks.
    digest = hashlib.sha256(salt)
    digest.update(parent or b"\0" * 32)
    digest.update(b"".join(t.to_bytes(4, "little") for t in token_ids))
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU first
        self._by_hash: dict[bytes, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def reuse_cached_prefix(self, seq: Sequence) -> None:
        """On first admission, take the longest run of the prompt's full blocks already in the cache.

        At least the last prompt token is always recomputed, since its logits are needed.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        parent: bytes | None = None
        limit = (seq.num_tokens - 1) // self.block_size
        for index in range(limit):
            tokens = tuple(seq.token_ids[index * self.block_size:(index + 1) * self.block_size])
            digest = block_hash(seq.salt, parent, tokens)
            block_id = self._by_hash.get(digest)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            parent = digest
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = seq.num_cached_prompt_tokens = len(seq.block_table) * self.block_size

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold `num_tokens` tokens; False (and no change) if blocks run out."""
        extra = self.blocks_needed(num_tokens) - len(seq.block_table)
        if extra > len(self._free):
            return False
        for _ in range(extra):
            block_id = next(iter(self._free))
            self._take(block_id)
            self._forget_hash(block_id)
            seq.block_table.append(block_id)
        return True

    def publish_full_blocks(self, seq: Sequence) -> None:
        """Hash every block whose tokens are all computed, so later sequences can reuse it."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        parent = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash if seq.num_hashed_blocks else None
        for index in range(seq.num_hashed_blocks, full):
            block = self.blocks[seq.block_table[index]]
            block.token_ids = tuple(seq.token_ids[index * self.block_size:(index + 1) * self.block_size])
            block.hash = block_hash(seq.salt, parent, block.token_ids)
            self._by_hash.setdefault(block.hash, block.block_id)
            parent = block.hash
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def free(self, seq: Sequence) -> None:
        # Released in reverse so a sequence's tail blocks are reused before its (more shareable) head.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self._free[block_id]
        block.ref_count += 1

    def _forget_hash(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.hash is not None and self._by_hash.get(block.hash) == block_id:
            del self._by_hash[block.hash]
        block.hash, block.token_ids = None, ()
