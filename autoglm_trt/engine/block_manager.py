"""Paged KV cache bookkeeping: block ids, reference counts and prefix caching. Pure Python, no torch.

A block is "full" once all `block_size` of its token slots belong to computed (or being-computed)
tokens. Full blocks get a chained hash: H(parent hash, token ids, content hashes of the images that
overlap the block), so two prompts share a block only if everything before it and in it is equal,
images included (placeholder tokens alone are the same for every image). A block whose reference
count drops to 0 keeps its hash and stays findable until it is reused: free blocks without a hash
are handed out first, then cached ones in least-recently-freed order (LRU eviction).
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

from autoglm_trt.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0  # sequences whose block_table holds this block
    hash: bytes | None = None  # set once full and registered in the prefix cache


@dataclass(frozen=True)
class AllocResult:
    ok: bool  # False: not enough free blocks; nothing was changed
    num_new_blocks: int = 0  # fresh blocks appended to the block table
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache (fresh sequences only)
    num_blocks_short: int = 0  # when not ok: how many more free blocks the request needed


_OK = AllocResult(ok=True)  # the decode fast path result (frozen, shared)


def hash_block(parent: bytes | None, token_ids: Iterable[int], extra: tuple[str, ...]) -> bytes:
    """Chained, process-independent hash of one full block (16 bytes of blake2b)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"\x00" * 16)
    ids = list(token_ids)
    h.update(struct.pack(f"<{len(ids)}q", *ids))
    for content_hash in extra:
        h.update(b"\x01" + content_hash.encode())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free_plain: list[int] = list(range(num_blocks - 1, -1, -1))  # stack, no hash
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # ref 0 with hash, LRU first
        self._hash_to_block: dict[bytes, int] = {}
        self.prefix_cache_queries = 0  # tokens looked up in the prefix cache
        self.prefix_cache_hits = 0  # of those, tokens found

    # ---- stats -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free_plain) + len(self._free_cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ------------------------------------------------------------------------
    def _seq_hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """seq.block_hashes, extended to at least `num_full_blocks` (token ids only grow: they stay valid)."""
        bs = self.block_size
        hashes = seq.block_hashes
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            extra = seq.block_hash_extra(i * bs, (i + 1) * bs)
            hashes.append(hash_block(parent, seq.token_ids[i * bs:(i + 1) * bs], extra))
        return hashes

    def _cached_block_ids(self, seq: Sequence) -> list[int]:
        if not self.enable_prefix_caching:
            return []
        # NOTE: at least one token is left to compute so the step produces logits for it.
        max_blocks = (seq.num_tokens - 1) // self.block_size
        found = []
        for h in self._seq_hashes(seq, max_blocks)[:max_blocks]:
            block_id = self._hash_to_block.get(h)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def find_cached_prefix(self, seq: Sequence) -> int:
        """Tokens at the start of `seq` whose KV is in the cache (whole blocks, never all tokens)."""
        return len(self._cached_block_ids(seq)) * self.block_size

    # ---- allocation --------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int, num_cached_tokens: int = 0,
                 lookahead: int = 0) -> AllocResult:
        """Grow seq.block_table to cover num_computed + num_new_tokens tokens, atomically.

        For a sequence with no blocks yet, `num_cached_tokens` (from find_cached_prefix, called just
        before) says how many leading tokens reuse cached blocks; the caller then sets
        seq.num_computed_tokens to it. Blocks that become full are registered in the prefix cache.
        """
        fresh = not seq.block_table
        if not fresh and not num_cached_tokens:  # NOTE: decode fast path: no new block, none fills up
            total = seq.num_computed_tokens + num_new_tokens
            if total + lookahead <= len(seq.block_table) * self.block_size and total % self.block_size:
                return _OK
        cached = self._prefix_blocks(seq, num_cached_tokens)
        computed = num_cached_tokens if fresh else seq.num_computed_tokens
        total = computed + num_new_tokens
        if total > seq.num_tokens:
            raise ValueError(f"{seq.request_id}: cannot allocate {total} tokens, it has {seq.num_tokens}")
        # `lookahead`: room for tokens not known yet (multi-step decode writes them on the GPU)
        num_new_blocks = max(0, self.blocks_needed(total + lookahead) - len(seq.block_table) - len(cached))
        revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)  # those sit in free lists
        short = num_new_blocks + revived - self.num_free_blocks
        if short > 0:
            return AllocResult(ok=False, num_blocks_short=short)
        for block_id in cached:
            self._take(block_id)
        seq.block_table.extend(cached)
        seq.block_table.extend(self._take(self._pop_free()) for _ in range(num_new_blocks))
        if fresh:
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += num_cached_tokens
        self._register_full_blocks(seq, computed, total)
        return AllocResult(ok=True, num_new_blocks=num_new_blocks, num_cached_tokens=num_cached_tokens)

    def _prefix_blocks(self, seq: Sequence, num_cached_tokens: int) -> list[int]:
        """The cached blocks holding seq's first `num_cached_tokens` tokens (checked, not taken)."""
        if not num_cached_tokens:
            return []
        if seq.block_table:
            raise ValueError(f"{seq.request_id}: num_cached_tokens is only for a sequence without blocks")
        cached = self._cached_block_ids(seq)[:num_cached_tokens // self.block_size]
        if len(cached) * self.block_size != num_cached_tokens:
            raise ValueError(f"{seq.request_id}: {num_cached_tokens} cached tokens asked, "
                             f"{len(cached) * self.block_size} found")
        return cached

    def free(self, seq: Sequence) -> None:
        """Drop seq's references; its last blocks are freed first so they are evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is None:
                    self._free_plain.append(block_id)
                else:
                    self._free_cached[block_id] = None
        seq.block_table = []

    def reset_prefix_cache(self) -> None:
        """Forget every free cached block (blocks in use keep their hashes)."""
        for block_id in self._free_cached:
            self._unhash(self.blocks[block_id])
            self._free_plain.append(block_id)
        self._free_cached.clear()

    def _take(self, block_id: int) -> int:
        block = self.blocks[block_id]
        if block.ref_count == 0 and block.hash is not None:
            del self._free_cached[block_id]
        block.ref_count += 1
        return block_id

    def _pop_free(self) -> int:
        if self._free_plain:
            return self._free_plain.pop()
        block_id, _ = self._free_cached.popitem(last=False)  # evict the least recently freed
        self._unhash(self.blocks[block_id])
        return block_id

    def _unhash(self, block: Block) -> None:
        if block.hash is not None and self._hash_to_block.get(block.hash) == block.block_id:
            del self._hash_to_block[block.hash]
        block.hash = None

    def register_computed(self, seq: Sequence, start: int, end: int) -> None:
        """Hash blocks filled by tokens [start, end) computed outside allocate() (multi-step decode)."""
        self._register_full_blocks(seq, start, end)

    def _register_full_blocks(self, seq: Sequence, start: int, end: int) -> None:
        """Hash the blocks that become full as tokens [start, end) are computed."""
        if not self.enable_prefix_caching:
            return
        first, num_full = start // self.block_size, end // self.block_size
        hashes = self._seq_hashes(seq, num_full)
        for i in range(first, num_full):
            block, h = self.blocks[seq.block_table[i]], hashes[i]
            if block.hash is None and h not in self._hash_to_block:
                block.hash = h
                self._hash_to_block[h] = block.block_id
            # NOTE: a twin block computed by another sequence at the same time stays unhashed.

    # ---- checks ------------------------------------------------------------------------------
    def check_invariants(self, seqs: Iterable[Sequence] | None = None) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent. With `seqs` (every sequence that
        holds blocks), also check that reference counts equal block-table occurrences."""
        plain, cached = set(self._free_plain), set(self._free_cached)
        assert len(plain) == len(self._free_plain), "duplicate block in the plain free list"
        assert not plain & cached, "block both plain-free and cached-free"
        for block in self.blocks:
            free = block.block_id in plain or block.block_id in cached
            assert block.ref_count >= 0, f"block {block.block_id} has ref_count {block.ref_count}"
            assert free == (block.ref_count == 0), f"block {block.block_id} free={free} ref={block.ref_count}"
            assert block.block_id not in plain or block.hash is None, f"plain-free block {block.block_id} has a hash"
            assert block.block_id not in cached or block.hash is not None, f"cached block {block.block_id} has no hash"
            if block.hash is not None:
                assert self._hash_to_block.get(block.hash) == block.block_id, f"block {block.block_id} hash unmapped"
        for h, block_id in self._hash_to_block.items():
            assert self.blocks[block_id].hash == h, f"hash maps to block {block_id} with another hash"
        if seqs is not None:
            counts = [0] * self.num_blocks
            for seq in seqs:
                for block_id in seq.block_table:
                    counts[block_id] += 1
            for block in self.blocks:
                assert counts[block.block_id] == block.ref_count, \
                    f"block {block.block_id}: ref_count {block.ref_count}, held {counts[block.block_id]} times"
