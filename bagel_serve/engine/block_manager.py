"""Bookkeeping of the KV cache's blocks: which are free, who holds them, what prefixes they cache.

Pure bookkeeping — no tensors. Block ids are addresses: block b holds cache slots
[b * block_size, (b + 1) * block_size). Block 0 is never handed out: it is the null block that the zero
padding of block tables (and the decode kernel's masked lanes) point at, so padding never names a block a
context holds. Nothing is stored there or read from it: the padded rows of a CUDA-graph batch store nowhere
(slot -1) and attend to nothing (length 0), and keys past a sequence's length are masked.

Blocks are reference counted: a fork of a context (the CFG contexts share their prefix with the full one)
takes a reference instead of a copy, and a block is free again when its count drops to zero. Contexts
collected by the garbage collector hand their blocks back at the next operation (a finalizer may run in
the middle of one, so it only queues them).

Admission ledger: a scheduler reserves an upper bound of a request's blocks (`try_admit`) before it
starts and gives it back (`unadmit`) when its contexts are gone, so an admitted request never runs out of
blocks mid-flight. Engines on one cache share its ledger.

Prefix cache (`enable_prefix_caching`): full blocks of committed text rows registered under a hash chain of
their token ids; a new context adopts them instead of prefilling them again. Blocks only the cache holds are
evicted, least recently used first, when an allocation would otherwise fail.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict, deque
from typing import Iterable, Sequence

NULL_BLOCK = 0


class PoolExhausted(RuntimeError):
    """The cache cannot hand out the blocks asked for."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = False,
                 read_only: bool = False) -> None:
        for name, v in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BlockManager: {name} must be a positive integer, got {v!r}")
        if num_blocks < 2 and not read_only:
            raise ValueError(f"BlockManager: a cache needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.read_only = read_only
        """Every block belongs to another process's cache (a borrowed one): nothing is ever allocated or freed."""
        self._ref = [1] * num_blocks if read_only else [1] + [0] * (num_blocks - 1)
        self._free: deque[int] = deque() if read_only else deque(range(1, num_blocks))
        self._deferred: list[list[int]] = []
        self.lock = threading.RLock()
        """Held by whoever changes several blocks at once (a context appending, matching a prefix)."""
        self.admitted = 0
        """Blocks reserved by admitted requests (see try_admit)."""
        self.prefix_cache: PrefixCache | None = PrefixCache(self) if enable_prefix_caching else None

    # ------------------------------------------------------------------ introspection
    @property
    def capacity(self) -> int:
        """Blocks that can be handed out (all but the reserved one)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        with self.lock:
            self._drain()
            return len(self._free)

    @property
    def num_used(self) -> int:
        return self.capacity - self.num_free

    def refcount(self, block: int) -> int:
        with self.lock:
            self._drain()
            return self._ref[block]

    def can_allocate(self, n: int) -> bool:
        with self.lock:
            self._drain()
            return n <= len(self._free) + self._evictable()

    # ------------------------------------------------------------------ admission ledger
    def try_admit(self, n: int) -> bool:
        """Reserve n blocks for a request about to start; False when that would exceed the capacity
        beside the reservations already made."""
        with self.lock:
            if self.admitted + n > self.capacity:
                return False
            self.admitted += n
            return True

    def unadmit(self, n: int) -> None:
        with self.lock:
            if n > self.admitted:
                raise RuntimeError(f"unadmit({n}) with only {self.admitted} blocks reserved")
            self.admitted -= n

    # ------------------------------------------------------------------ blocks
    def allocate(self, n: int) -> list[int]:
        """Hand out n blocks with reference count 1 (evicting cached prefixes only if the free ones do not
        suffice); PoolExhausted when they cannot be had."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n == 0:
            return []
        if self.read_only:
            raise RuntimeError("this KV cache is borrowed from another process and read-only: its contexts can "
                               "be attended to, never extended")
        with self.lock:
            self._drain()
            short = n - len(self._free)
            if short > 0:
                if self._evictable() < short:
                    raise PoolExhausted(
                        f"KV cache exhausted: {n} blocks wanted, {len(self._free)} free of {self.capacity} "
                        f"(block_size {self.block_size})")
                self.prefix_cache.evict(short)
            out = [self._free.popleft() for _ in range(n)]
            for b in out:
                self._ref[b] = 1
            return out

    def incref(self, blocks: Iterable[int]) -> None:
        with self.lock:
            self._drain()
            for b in blocks:
                if self._ref[b] <= 0:
                    raise RuntimeError(f"incref of free block {b}")
                self._ref[b] += 1

    def decref(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block; a block whose count reaches 0 is free again."""
        with self.lock:
            self._drain()
            self._decref(blocks)

    def release_later(self, blocks: list[int]) -> None:
        """For finalizers: queue blocks to be decref'd at the next operation."""
        self._deferred.append(blocks)

    def _decref(self, blocks: Iterable[int]) -> None:
        if self.read_only:
            return
        for b in blocks:
            r = self._ref[b]
            if r <= 0 or b == NULL_BLOCK:
                raise RuntimeError(f"decref of free block {b} (double free)")
            self._ref[b] = r - 1
            if r == 1:
                self._free.append(b)

    def _drain(self) -> None:
        while self._deferred:
            self._decref(self._deferred.pop())

    def _evictable(self) -> int:
        return self.prefix_cache.evictable() if self.prefix_cache is not None else 0

    def usage(self) -> dict:
        with self.lock:
            self._drain()
            return {"block_size": self.block_size, "total_blocks": self.capacity, "free_blocks": len(self._free),
                    "used_blocks": self.capacity - len(self._free), "admitted_blocks": self.admitted,
                    "cached_blocks": len(self.prefix_cache) if self.prefix_cache is not None else 0}


class PrefixCache:
    """Full blocks of committed text rows, keyed by a hash chain over their token ids.

    The key of block i is sha256(key of block i-1, token ids of block i), so a key names the whole prefix up
    to and including its block. The cache holds one reference to every registered block; least recently used
    entries that nobody else holds are evicted when an allocation would otherwise fail."""

    def __init__(self, manager: BlockManager) -> None:
        self._manager = manager
        self._entries: OrderedDict[bytes, int] = OrderedDict()  # LRU first
        self._by_block: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def block_key(parent: bytes | None, token_ids: Sequence[int]) -> bytes:
        h = hashlib.sha256(parent or b"root")
        h.update(b"|".join(str(int(t)).encode() for t in token_ids))
        return h.digest()

    def lookup(self, key: bytes) -> int | None:
        return self._entries.get(key)

    def touch(self, keys: Iterable[bytes]) -> None:
        """Mark keys as just used, in order (the last one becomes the most recent)."""
        for key in keys:
            if key in self._entries:
                self._entries.move_to_end(key)

    def insert(self, key: bytes, block: int) -> bool:
        """Register `block` under `key` (taking a reference); False when the key or block is already in."""
        if key in self._entries or block in self._by_block:
            return False
        self._manager.incref([block])
        self._entries[key] = block
        self._by_block[block] = key
        return True

    def _idle(self) -> list[bytes]:
        """Keys whose block only the cache holds, least recently used first."""
        refs = self._manager._ref
        return [key for key, b in self._entries.items() if refs[b] == 1]

    def evictable(self) -> int:
        return len(self._idle())

    def evict(self, n: int) -> int:
        """Free up to n blocks held only by the cache, least recently used first; returns how many."""
        blocks = []
        for key in self._idle()[:n]:
            b = self._entries.pop(key)
            del self._by_block[b]
            blocks.append(b)
        self._manager._decref(blocks)
        return len(blocks)

    def clear(self) -> None:
        """Drop every entry (blocks still used by contexts stay with them)."""
        with self._manager.lock:
            blocks = list(self._entries.values())
            self._entries.clear()
            self._by_block.clear()
            self._manager._decref(blocks)
