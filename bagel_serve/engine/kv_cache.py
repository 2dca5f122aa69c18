"""The KV cache: one preallocated tensor for every layer, and contexts that are block tables over it.

`KVCache.tensor` is [layers, 2, num_blocks * block_size, kv heads, head dim] (layer l's keys are
`tensor[l, 0]`, its values `tensor[l, 1]`), allocated once at start. A cache slot is
`block * block_size + offset`; the forward's `slot_mapping` says where each committed row goes and the
attention kernels read contexts through their block tables. Which blocks are whose is the
`BlockManager`'s bookkeeping.

A `Context` is one prompt's cache as attention sees it: a block table, a length (rows written) and the next
RoPE position. Forking shares every block (a reference each, no copy); appending after a fork first copies
the shared, partly filled last block (copy-on-write). This is how the CFG contexts share their common
prefix with the full context. Rows are kept after k-norm and RoPE, as the reference caches them.

Sharing between processes: the tensor is one CUDA allocation (or, with `shared=True`, CPU shared memory), so
another process can map it and read contexts in place: `KVCache.borrowed` wraps a mapped tensor read-only,
with the owner's block numbering, and `Context.adopt` builds a context over given blocks of it.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch

from bagel_serve.engine.block_manager import BlockManager, PoolExhausted

__all__ = ["BLOCK_SIZE", "KVCache", "Context", "PoolExhausted", "slot_of"]

BLOCK_SIZE = 16
"""Rows per block (vLLM's default): small enough that forks copy little, large enough for the kernels."""


def slot_of(block_table: Sequence[int], row: int, block_size: int) -> int:
    """The cache slot of one row of a context whose blocks are `block_table`, in plain integers (the runner
    places every decode token with it; `KVCache.slots` is the same rule over a range of rows, as a tensor)."""
    return block_table[row // block_size] * block_size + row % block_size


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, *, block_size: int = BLOCK_SIZE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 enable_prefix_caching: bool = False, shared: bool = False) -> None:
        for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"KVCache: {name} must be a positive integer, got {v!r}")
        self.manager = BlockManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching)
        shape = (num_layers, 2, num_blocks * block_size, num_kv_heads, head_dim)
        try:
            # A normal tensor even when made inside inference mode: it is written in place by every forward.
            with torch.inference_mode(False), torch.no_grad():
                self.tensor = torch.empty(shape, dtype=dtype, device=device)
                if shared and self.tensor.device.type == "cpu":
                    self.tensor.share_memory_()
                self.tensor[:, :, : block_size].zero_()  # the null block (table padding): never read, but finite
        except torch.OutOfMemoryError as e:
            raise PoolExhausted(f"cannot allocate a KV cache of {num_blocks} blocks "
                                f"({num_blocks * self.bytes_per_block_of(shape, dtype, block_size) / 2**30:.2f} GiB) "
                                f"on {device}") from e

    @staticmethod
    def bytes_per_block_of(shape: tuple[int, ...], dtype: torch.dtype, block_size: int) -> int:
        layers, _, _, heads, dim = shape
        return 2 * layers * block_size * heads * dim * torch.empty((), dtype=dtype).element_size()

    @classmethod
    def borrowed(cls, tensor: torch.Tensor, block_size: int) -> "KVCache":
        """A read-only cache over another process's cache tensor (mapped here), with its block numbering:
        contexts adopted on it read the owner's rows in place; nothing here allocates or frees a block."""
        if tensor.dim() != 5 or tensor.shape[1] != 2 or tensor.shape[2] % block_size:
            raise ValueError(f"KVCache.borrowed: a cache tensor is [layers, 2, slots, kv heads, head dim] with "
                             f"slots a multiple of block_size {block_size}; got {tuple(tensor.shape)}")
        cache = cls.__new__(cls)
        cache.manager = BlockManager(tensor.shape[2] // block_size, block_size, read_only=True)
        cache.tensor = tensor
        return cache

    # ------------------------------------------------------------------ geometry
    @property
    def num_layers(self) -> int:
        return self.tensor.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.tensor.shape[3]

    @property
    def head_dim(self) -> int:
        return self.tensor.shape[4]

    @property
    def dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def block_size(self) -> int:
        return self.manager.block_size

    @property
    def num_blocks(self) -> int:
        return self.manager.num_blocks

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_block_of(tuple(self.tensor.shape), self.dtype, self.block_size)

    @property
    def read_only(self) -> bool:
        return self.manager.read_only

    def keys(self, layer: int) -> torch.Tensor:
        return self.tensor[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.tensor[layer, 1]

    def slots(self, blocks: Sequence[int], a: int, b: int) -> torch.Tensor:
        """Cache slots (CPU int64) of rows [a, b) of a context whose block table is `blocks`."""
        rows = torch.arange(a, b)
        bs = self.block_size
        return torch.tensor(blocks, dtype=torch.int64)[rows // bs] * bs + rows % bs

    def copy_rows(self, src_block: int, dst_block: int, rows: int) -> None:
        """Copy the first `rows` rows of one block into another, in every layer (copy-on-write)."""
        if rows > 0:
            bs = self.block_size
            with torch.inference_mode(False), torch.no_grad():
                self.tensor[:, :, dst_block * bs : dst_block * bs + rows] = \
                    self.tensor[:, :, src_block * bs : src_block * bs + rows]

    def usage(self) -> dict:
        u = self.manager.usage()
        bpb = self.bytes_per_block
        return {**u, "bytes_per_block": bpb, "used_bytes": u["used_blocks"] * bpb, "total_bytes": u["total_blocks"] * bpb}

    def __repr__(self) -> str:
        u = self.manager.usage()
        return (f"KVCache(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype}, device={self.device}, block_size={self.block_size}, "
                f"blocks used {u['used_blocks']}/{u['total_blocks']})")


def _release_later(manager_ref: "weakref.ref[BlockManager]", blocks: list[int]) -> None:
    """Finalizer of a garbage-collected Context: hand its blocks back at the manager's next operation."""
    manager = manager_ref()
    if manager is not None and blocks:
        manager.release_later(list(blocks))
    blocks.clear()


class Context:
    """One prompt's cache as attention sees it: rows [0, length) and the next RoPE position.

    The rows live in the blocks of `block_table` (block i holds rows [i*block_size, (i+1)*block_size)).
    Appending goes in two steps: `reserve(n)` (before the forward: copy-on-write and allocation, which is
    where a full cache shows) and `commit(n, rope_advance)` once the forward has written the rows.
    """

    def __init__(self, cache: KVCache) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"Context(cache) takes a KVCache, got {type(cache).__name__}")
        self.cache = cache
        self.length = 0
        self.rope = 0
        self._reserved = 0
        self._released = False
        self._blocks: list[int] = []  # mutated in place only: the finalizer holds this very list
        self._hashes: list[bytes] = []  # prefix-cache keys of the leading full blocks, once known
        self._finalizer = weakref.finalize(self, _release_later, weakref.ref(cache.manager), self._blocks)
        self._finalizer.atexit = False

    @property
    def manager(self) -> BlockManager:
        return self.cache.manager

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def block_table(self) -> tuple[int, ...]:
        return tuple(self._blocks)

    def __repr__(self) -> str:
        return (f"Context(length={self.length}, rope={self.rope}, blocks={len(self._blocks)}"
                f"{', released' if self._released else ''})")

    def _check_alive(self) -> None:
        if self._released:
            raise RuntimeError("this context was released")

    # ------------------------------------------------------------------ lifetime
    @classmethod
    def adopt(cls, cache: KVCache, blocks: Sequence[int], length: int, rope: int) -> "Context":
        """A context over existing blocks of `cache` (taking a reference to each), e.g. of a borrowed cache."""
        bs = cache.block_size
        if not 0 <= length <= len(blocks) * bs or len(blocks) != -(-length // bs):
            raise ValueError(f"Context.adopt: {len(blocks)} blocks of {bs} rows cannot hold exactly {length} rows")
        if any(not 0 < b < cache.num_blocks for b in blocks):
            raise ValueError(f"Context.adopt: block ids must be in [1, {cache.num_blocks}), got {list(blocks)}")
        ctx = cls(cache)
        cache.manager.incref(blocks)
        ctx._blocks.extend(blocks)
        ctx.length, ctx.rope = length, rope
        return ctx

    def fork(self) -> "Context":
        """A context with the same rows and RoPE position, sharing our blocks (no copy)."""
        self._check_alive()
        other = Context(self.cache)
        bs = self.cache.block_size
        shared = self._blocks[: -(-self.length // bs)]
        self.manager.incref(shared)
        other._blocks.extend(shared)
        other._hashes.extend(self._hashes[: self.length // bs])
        other.length, other.rope = self.length, self.rope
        return other

    def release(self) -> None:
        """Give our blocks back now. Idempotent; the context is unusable afterwards."""
        if self._released:
            return
        self._released = True
        self._finalizer.detach()
        blocks = list(self._blocks)
        self._blocks.clear()
        self._hashes.clear()
        self.length = self._reserved = 0
        if blocks:
            self.manager.decref(blocks)

    # ------------------------------------------------------------------ appending
    def reserve(self, n: int) -> None:
        """Make room to append n rows: copy-on-write a shared partly filled block, then allocate the blocks
        still needed. Raises PoolExhausted when the cache is full (our table is then unchanged)."""
        self._check_alive()
        if n < 0:
            raise ValueError(f"cannot reserve {n} rows")
        bs, manager = self.cache.block_size, self.manager
        need = -(-(self.length + n) // bs)
        with manager.lock:
            first = self.length // bs  # the block the next row goes into
            cow = [i for i in range(first, min(len(self._blocks), need)) if manager.refcount(self._blocks[i]) > 1]
            fresh = manager.allocate(len(cow) + max(0, need - len(self._blocks)))
            for i, new in zip(cow, fresh):
                old = self._blocks[i]
                self.cache.copy_rows(old, new, max(0, min(bs, self.length - i * bs)))
                manager.decref([old])
                self._blocks[i] = new
            self._blocks.extend(fresh[len(cow):])
        self._reserved = n

    def slots(self, a: int, b: int) -> torch.Tensor:
        """Cache slots (CPU int64) of our rows [a, b); rows past `length` must have been reserved."""
        self._check_alive()
        if -(-b // self.cache.block_size) > len(self._blocks):
            raise RuntimeError(f"rows up to {b} have no blocks ({len(self._blocks)} blocks; reserve first)")
        return self.cache.slots(self._blocks, a, b)

    def commit(self, n: int, rope_advance: int) -> None:
        """Accept the n rows the forward that just ran wrote after our last one (reserved before)."""
        if n > self._reserved:
            raise RuntimeError(f"commit({n}) of more rows than reserved ({self._reserved})")
        self.length += n
        self._reserved = 0
        self.rope += rope_advance

    def rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows [0, length) of one layer (a gather from the cache)."""
        self._check_alive()
        slots = self.slots(0, self.length).to(self.cache.device)
        return self.cache.keys(layer).index_select(0, slots), self.cache.values(layer).index_select(0, slots)

    # ------------------------------------------------------------------ prefix caching
    def match_prefix(self, token_ids: Sequence[int]) -> int:
        """Adopt the cached full blocks that start `token_ids` (text from RoPE position 0); returns how many
        tokens they cover, which the caller then need not prefill. The context must be empty."""
        self._check_alive()
        cache = self.manager.prefix_cache
        if cache is None:
            return 0
        if self.length or self._blocks:
            raise RuntimeError("match_prefix needs an empty context")
        bs = self.cache.block_size
        keys: list[bytes] = []
        blocks: list[int] = []
        with self.manager.lock:
            parent = None
            for i in range(len(token_ids) // bs):
                key = cache.block_key(parent, token_ids[i * bs : (i + 1) * bs])
                b = cache.lookup(key)
                if b is None:
                    break
                keys.append(key)
                blocks.append(b)
                parent = key
            self.manager.incref(blocks)
            cache.touch(reversed(keys))  # the root becomes the most recent: deeper blocks go first
        self._blocks.extend(blocks)
        self._hashes.extend(keys)
        self.length = self.rope = len(blocks) * bs
        return self.length

    def register_prefix(self, token_ids: Sequence[int]) -> int:
        """Register our full blocks with the prefix cache; `token_ids` is this context's whole token history
        (text only, from RoPE position 0, at most `length` tokens). Returns the tokens now covered."""
        self._check_alive()
        cache = self.manager.prefix_cache
        if cache is None:
            return 0
        if len(token_ids) > self.length:
            raise ValueError(f"register_prefix: {len(token_ids)} token ids but only {self.length} rows committed")
        bs = self.cache.block_size
        full = len(token_ids) // bs
        with self.manager.lock:
            parent = self._hashes[-1] if self._hashes else None
            for i in range(len(self._hashes), full):
                key = cache.block_key(parent, token_ids[i * bs : (i + 1) * bs])
                cache.insert(key, self._blocks[i])
                self._hashes.append(key)
                parent = key
            cache.touch(reversed(self._hashes[:full]))
        return full * bs

