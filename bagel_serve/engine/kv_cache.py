"""Paged KV cache: one pool of fixed-size blocks per model, and contexts that are block tables over it.

`KVPool` holds, for every decoder layer, the K and V rows of all contexts in blocks of `block_size`
rows. It grows by slabs on demand (a slab is one tensor of whole blocks per K and V, all layers
together) up to `max_blocks`, so its memory follows use; blocks are reference counted and go back to
a sorted free list when their count drops to zero. Allocation prefers consecutive block ids (it
extends the caller's last block when it can, else takes the lowest run of free blocks), so a context
usually occupies consecutive rows of one slab and attention reads it as a plain slice.

A `Context` is one prompt's cache as attention sees it: a block table, a length (rows written) and the
next RoPE position. Forking shares every block (a reference each, no copy); appending after a fork
copies only the shared, partly filled last block (copy-on-write). This is how the CFG contexts share
their common prefix with the full context, as DESIGN.md asks. Rows are kept after k-norm and RoPE, as
the reference caches them.

Optionally (`enable_prefix_caching`) the pool keeps a `PrefixCache`: full blocks of committed text rows
registered under a hash chain of their token ids, which a new context adopts with `match_prefix`.

Contexts release their blocks explicitly (`release()`) or when they are garbage collected.

Admission ledger: when the pool is bounded (`max_blocks`), schedulers reserve an upper bound of each
request's blocks with `try_admit` before it starts and give it back with `unadmit` when its contexts
are gone, so a request admitted never runs out of blocks mid-flight. Engines that share a pool (the
two stages of the in-process topology) share its ledger.

Sharing between processes: a pool made with `shared=True` keeps its CPU slabs in shared memory (CUDA
slabs are always shareable through CUDA IPC), so another process can read its contexts in place:
`borrowed(...)` builds, from the owner's slab tensors, a read-only pool with the owner's block numbering,
and `Context.adopt` a context over given blocks of it. The owner keeps those blocks until the borrower
says it is done.
"""

from __future__ import annotations

import bisect
import hashlib
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch


class PoolExhausted(RuntimeError):
    """The pool cannot hand out the blocks asked for without exceeding `max_blocks` (or device memory)."""


# ---------------------------------------------------------------------------------------------- plans
@dataclass
class _Run:
    """Logical rows that are consecutive rows [start, stop) of one slab: read as a view."""

    slab: int
    start: int
    stop: int


@dataclass
class _Segments:
    """Logical rows made of a few stretches of consecutive slab rows (slab, start, stop), in order;
    `ends[i]` is the logical row where stretch i ends. Read with one concatenation."""

    parts: list[tuple[int, int, int]]
    ends: list[int]


@dataclass
class _Gather:
    """Logical rows scattered in many stretches: in each group the rows `idx` of one slab land at
    output positions `pos` (None when all rows come from that one slab, in order)."""

    groups: list[tuple[int, torch.Tensor, torch.Tensor | None]]
    n: int


_Plan = _Run | _Segments | _Gather
_MAX_SEGMENTS = 8  # more stretches than this are read with an index gather


# ---------------------------------------------------------------------------------------------- pool
class KVPool:
    """Per-layer K and V storage in blocks of `block_size` rows, grown by slabs, reference counted."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        block_size: int = 16,
        max_blocks: int | None = None,
        slab_blocks: int = 256,
        enable_prefix_caching: bool = False,
        shared: bool = False,
    ) -> None:
        for name, v in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("block_size", block_size), ("slab_blocks", slab_blocks)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"KVPool: {name} must be a positive integer, got {v!r}")
        if max_blocks is not None and (isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1):
            raise ValueError(f"KVPool: max_blocks must be a positive integer or None, got {max_blocks!r}")
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.slab_blocks = slab_blocks
        self.shared = shared
        self.read_only = False
        self.admitted = 0
        """Blocks reserved by admitted requests (see try_admit)."""
        # slab i holds blocks [_slab_start[i], _slab_start[i] + _slab_size[i]); K/V are
        # [num_layers, blocks * block_size, num_kv_heads, head_dim].
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self._kl: list[list[torch.Tensor]] = []  # per slab, per layer views of _k / _v
        self._vl: list[list[torch.Tensor]] = []
        self._slab_start: list[int] = []
        self._slab_size: list[int] = []
        self._capacity = 0
        self._ref: list[int] = []  # per block id
        self._free: list[int] = []  # sorted
        self._free_set: set[int] = set()
        # Blocks of contexts collected by the garbage collector, released at the next pool operation
        # (a finalizer may run in the middle of one, so it never touches the free list itself).
        self._deferred: list[list[int]] = []
        self._lock = threading.RLock()
        self.prefix_cache: PrefixCache | None = PrefixCache(self) if enable_prefix_caching else None

    # ------------------------------------------------------------------ introspection
    @property
    def capacity_blocks(self) -> int:
        """Blocks in the slabs allocated so far (used + free)."""
        return self._capacity

    @property
    def num_blocks_free(self) -> int:
        """Free blocks in the slabs allocated so far (growth up to max_blocks not counted)."""
        with self._lock:
            self._drain()
            return len(self._free)

    @property
    def num_blocks_used(self) -> int:
        with self._lock:
            self._drain()
            return self._capacity - len(self._free)

    @property
    def num_slabs(self) -> int:
        return len(self._k)

    def slabs(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(first block id, K, V) of every slab, in block order: what `borrowed` takes."""
        with self._lock:
            return list(zip(self._slab_start, self._k, self._v))

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def refcount(self, block: int) -> int:
        with self._lock:
            self._drain()
            return self._ref[block]

    def can_allocate(self, n: int) -> bool:
        """Whether `allocate(n)` would succeed (growing slabs and evicting cached prefixes as needed)."""
        with self._lock:
            self._drain()
            return n <= len(self._free) + self._growable() + self._evictable()

    def usage(self) -> dict:
        with self._lock:
            self._drain()
            used = self._capacity - len(self._free)
            bpb = self.bytes_per_block
            return {
                "block_size": self.block_size,
                "used_blocks": used,
                "free_blocks": len(self._free),
                "total_blocks": self._capacity,
                "max_blocks": self.max_blocks,
                "cached_blocks": len(self.prefix_cache) if self.prefix_cache is not None else 0,
                "slabs": len(self._k),
                "used_rows": used * self.block_size,
                "total_rows": self._capacity * self.block_size,
                "bytes_per_block": bpb,
                "used_bytes": used * bpb,
                "total_bytes": self._capacity * bpb,
            }

    def __repr__(self) -> str:
        u = self.usage()
        return (f"KVPool(layers={self.num_layers}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype}, device={self.device}, block_size={self.block_size}, "
                f"blocks used {u['used_blocks']}/{u['total_blocks']} (max {self.max_blocks}), slabs {u['slabs']})")

    @classmethod
    def borrowed(cls, slabs: Sequence[tuple[int, torch.Tensor, torch.Tensor]], block_size: int) -> "KVPool":
        """A read-only pool over another pool's slabs, given as (first block id, K slab, V slab) in block
        order, with the owner's block ids: contexts adopted on it read the owner's rows in place. Every
        block counts as held by the owner, so nothing here ever frees or allocates one."""
        if not slabs:
            raise ValueError("KVPool.borrowed needs at least one slab")
        k0 = slabs[0][1]
        layers, _, heads, dim = k0.shape
        pool = cls(layers, heads, dim, k0.dtype, k0.device, block_size)
        pool.read_only = True
        for start, k, v in slabs:
            rows = k.shape[1]
            if start < pool._capacity or rows % block_size or tuple(v.shape) != tuple(k.shape) \
                    or tuple(k.shape[::2]) != (layers, heads) or k.shape[3] != dim:
                raise ValueError(f"KVPool.borrowed: slab at block {start} with K {tuple(k.shape)}, V {tuple(v.shape)} "
                                 f"does not fit after block {pool._capacity} (block_size {block_size})")
            pool._add_slab(start, k, v, refcount=1)
        return pool

    # ------------------------------------------------------------------ admission ledger
    def try_admit(self, n: int) -> bool:
        """Reserve n blocks for a request about to start; False when a bounded pool has no room for
        them beside the reservations already made (an unbounded pool always admits)."""
        with self._lock:
            if self.max_blocks is not None and self.admitted + n > self.max_blocks:
                return False
            self.admitted += n
            return True

    def unadmit(self, n: int) -> None:
        """Give back a reservation made by try_admit."""
        with self._lock:
            if n > self.admitted:
                raise RuntimeError(f"unadmit({n}) with only {self.admitted} blocks reserved")
            self.admitted -= n

    # ------------------------------------------------------------------ allocation
    def allocate(self, n: int, after: int | None = None) -> list[int]:
        """Hand out n blocks, each with reference count 1.

        Preference: the n blocks right after block `after` (so a context's rows stay consecutive), else
        the lowest run of n consecutive free blocks in one slab, else the n lowest free blocks. A new
        slab is allocated only when the free blocks do not suffice; cached prefixes are evicted only
        when the pool may not grow. Raises PoolExhausted when max_blocks would be exceeded.
        """
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n == 0:
            return []
        if self.read_only:
            raise RuntimeError("this KV pool is borrowed from another process and read-only: its contexts "
                               "can be read and attended to, never extended")
        with self._lock:
            self._drain()
            self._ensure_free(n)
            out = self._take_after(after, n) if after is not None else None
            if out is None:
                out = self._take_run(n)
            if out is None:
                out = self._free[:n]
                del self._free[:n]
            self._free_set.difference_update(out)
            for b in out:
                self._ref[b] = 1
            return out

    def incref(self, blocks: Iterable[int]) -> None:
        with self._lock:
            self._drain()
            for b in blocks:
                if self._ref[b] <= 0:
                    raise RuntimeError(f"incref of free block {b}")
                self._ref[b] += 1

    def decref(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block; a block whose count reaches 0 is free again."""
        with self._lock:
            self._drain()
            self._decref(blocks)

    def trim(self) -> int:
        """Give back trailing slabs whose blocks are all free; returns how many blocks were dropped."""
        with self._lock:
            self._drain()
            dropped = 0
            while self._k:
                start, size = self._slab_start[-1], self._slab_size[-1]
                lo = bisect.bisect_left(self._free, start)
                if len(self._free) - lo != size:
                    break
                del self._free[lo:]
                self._free_set.difference_update(range(start, start + size))
                del self._ref[start:]
                self._k.pop()
                self._v.pop()
                self._kl.pop()
                self._vl.pop()
                self._slab_start.pop()
                self._slab_size.pop()
                self._capacity = start
                dropped += size
            return dropped

    def _decref(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            r = self._ref[b]
            if r <= 0:
                raise RuntimeError(f"decref of free block {b} (double free)")
            self._ref[b] = r - 1
            if r == 1:
                bisect.insort(self._free, b)
                self._free_set.add(b)

    def _drain(self) -> None:
        while self._deferred:
            self._decref(self._deferred.pop())

    def _growable(self) -> int:
        if self.max_blocks is None:
            return 1 << 62
        return max(0, self.max_blocks - self._capacity)

    def _evictable(self) -> int:
        return self.prefix_cache.evictable() if self.prefix_cache is not None else 0

    def _ensure_free(self, n: int) -> None:
        deficit = n - len(self._free)
        if deficit <= 0:
            return
        growable = self._growable()
        if deficit > growable:
            short = deficit - growable
            if self._evictable() < short:
                raise PoolExhausted(
                    f"KV pool exhausted: {n} blocks wanted, {len(self._free)} free, max_blocks {self.max_blocks} "
                    f"({self._capacity - len(self._free)} in use, block_size {self.block_size}, "
                    f"{self.bytes_per_block} bytes per block)")
            self.prefix_cache.evict(short)
            deficit = n - len(self._free)
            growable = min(growable, deficit)
        if deficit > 0:
            # One slab big enough for the whole request when allowed, so that it lands in consecutive rows.
            self._grow(min(max(self.slab_blocks, n), growable))

    def _grow(self, blocks: int) -> None:
        rows = blocks * self.block_size
        shape = (self.num_layers, rows, self.num_kv_heads, self.head_dim)
        try:
            # Normal tensors even when the pool grows inside inference mode: they are written in place later.
            with torch.inference_mode(False), torch.no_grad():
                k = torch.empty(shape, dtype=self.dtype, device=self.device)
                v = torch.empty(shape, dtype=self.dtype, device=self.device)
                if self.shared and self.device.type == "cpu":
                    k.share_memory_()
                    v.share_memory_()
        except torch.OutOfMemoryError as e:
            raise PoolExhausted(
                f"KV pool exhausted: device memory ran out growing the pool by {blocks} blocks "
                f"({blocks * self.bytes_per_block} bytes); {self._capacity} blocks allocated") from e
        start = self._capacity
        self._add_slab(start, k, v, refcount=0)
        self._free.extend(range(start, start + blocks))  # all above the existing free ids: stays sorted
        self._free_set.update(range(start, start + blocks))

    def _add_slab(self, start: int, k: torch.Tensor, v: torch.Tensor, refcount: int) -> None:
        """Append a slab of whole blocks whose first block id is `start` (ids between the last slab and it
        stay unused), each block with `refcount` references."""
        blocks = k.shape[1] // self.block_size
        self._k.append(k)
        self._v.append(v)
        self._kl.append(list(k.unbind(0)))
        self._vl.append(list(v.unbind(0)))
        self._slab_start.append(start)
        self._slab_size.append(blocks)
        self._ref.extend([0] * (start - self._capacity) + [refcount] * blocks)
        self._capacity = start + blocks

    def _take_after(self, after: int, n: int) -> list[int] | None:
        if not 0 <= after < self._capacity:
            return None
        s = self._slab_of(after)
        if after + n >= self._slab_start[s] + self._slab_size[s]:
            return None
        want = range(after + 1, after + 1 + n)
        if not all(b in self._free_set for b in want):
            return None
        lo = bisect.bisect_left(self._free, after + 1)
        del self._free[lo : lo + n]
        return list(want)

    def _take_run(self, n: int) -> list[int] | None:
        """The lowest run of n consecutive free blocks inside one slab, taken off the free list."""
        free = self._free
        if n == 1:
            return [free.pop(0)]
        i, total = 0, len(free)
        while i < total:
            s = self._slab_of(free[i])
            slab_end = self._slab_start[s] + self._slab_size[s]
            j = i
            while j + 1 < total and free[j + 1] == free[j] + 1 and free[j + 1] < slab_end:
                j += 1
                if j - i + 1 == n:
                    first = free[i]
                    del free[i : j + 1]
                    return list(range(first, first + n))
            i = j + 1
        return None

    # ------------------------------------------------------------------ rows
    def _slab_of(self, block: int) -> int:
        return bisect.bisect_right(self._slab_start, block) - 1

    def slab_row(self, block: int) -> tuple[int, int]:
        """(slab, first row in that slab) of a block."""
        s = self._slab_of(block)
        return s, (block - self._slab_start[s]) * self.block_size

    def copy_block(self, src: int, dst: int, rows: int) -> None:
        """Copy the first `rows` rows of block src into block dst, in every layer."""
        if rows <= 0:
            return
        (ss, sr), (ds, dr) = self.slab_row(src), self.slab_row(dst)
        with torch.inference_mode(False), torch.no_grad():
            self._k[ds][:, dr : dr + rows] = self._k[ss][:, sr : sr + rows]
            self._v[ds][:, dr : dr + rows] = self._v[ss][:, sr : sr + rows]

    def _plan_range(self, blocks: Sequence[int], a: int, b: int) -> _Plan:
        """How logical rows [a, b) of a block table map onto slab rows: one slice, a few slices, or
        (many stretches) an index gather."""
        bs = self.block_size
        parts: list[list[int]] = []
        for i in range(a // bs, (b - 1) // bs + 1):
            s, row = self.slab_row(blocks[i])
            start, stop = row + max(a - i * bs, 0), row + min(b - i * bs, bs)
            if parts and parts[-1][0] == s and parts[-1][2] == start:
                parts[-1][2] = stop
            elif len(parts) == _MAX_SEGMENTS:
                return self._gather_plan(blocks, a, b)
            else:
                parts.append([s, start, stop])
        if len(parts) == 1:
            return _Run(*parts[0])
        ends, e = [], 0
        for _, start, stop in parts:
            e += stop - start
            ends.append(e)
        return _Segments([tuple(p) for p in parts], ends)

    def _leading_run(self, blocks: Sequence[int]) -> tuple[int, int, int]:
        """(slab, first slab row, number of blocks) of the longest leading stretch of a block table that
        is consecutive blocks of one slab; (0, 0, 0) for an empty table."""
        if not blocks:
            return 0, 0, 0
        first = blocks[0]
        s = self._slab_of(first)
        limit = min(len(blocks), self._slab_start[s] + self._slab_size[s] - first)
        n = 1
        while n < limit and blocks[n] == first + n:
            n += 1
        return s, (first - self._slab_start[s]) * self.block_size, n

    def _slab_rows(self, blocks: Sequence[int], a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slab index, row within that slab) of each logical row [a, b) of a block table, as CPU int64
        tensors."""
        bs = self.block_size
        fb, lb = a // bs, (b - 1) // bs
        bt = torch.tensor(blocks[fb : lb + 1], dtype=torch.int64)
        starts = torch.tensor(self._slab_start, dtype=torch.int64)
        slab = torch.bucketize(bt, starts, right=True) - 1
        off = a - fb * bs
        local = (((bt - starts[slab]) * bs)[:, None] + torch.arange(bs)).flatten()[off : off + (b - a)]
        return slab.repeat_interleave(bs)[off : off + (b - a)], local

    def _gather_plan(self, blocks: Sequence[int], a: int, b: int) -> _Gather:
        """Index gather plan of logical rows [a, b) of a block table (one group per slab it touches)."""
        slab_rows, local = self._slab_rows(blocks, a, b)
        uniq = torch.unique(slab_rows).tolist()
        dev = self.device
        if len(uniq) == 1:
            return _Gather([(uniq[0], local.to(dev), None)], b - a)
        groups = []
        for u in uniq:
            pos = (slab_rows == u).nonzero().squeeze(1)
            groups.append((u, local[pos].to(dev), pos.to(dev)))
        return _Gather(groups, b - a)

    def _read(self, layer: int, plan: _Plan, n: int, extra: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the first n rows a plan maps (it may map more: whole blocks), followed by the
        `extra` rows if given."""
        if isinstance(plan, _Run):
            k = self._kl[plan.slab][layer][plan.start : plan.start + n]
            v = self._vl[plan.slab][layer][plan.start : plan.start + n]
            if extra is None:
                return k, v
            return torch.cat([k, extra[0]]), torch.cat([v, extra[1]])
        if isinstance(plan, _Segments):
            last = bisect.bisect_left(plan.ends, n)
            ks, vs = [], []
            for i in range(last + 1):
                s, start, stop = plan.parts[i]
                if i == last:
                    stop -= plan.ends[i] - n
                ks.append(self._kl[s][layer][start:stop])
                vs.append(self._vl[s][layer][start:stop])
            if extra is not None:
                ks.append(extra[0])
                vs.append(extra[1])
            return torch.cat(ks), torch.cat(vs)
        m = n + (extra[0].shape[0] if extra is not None else 0)
        shape = (max(m, plan.n), self.num_kv_heads, self.head_dim)
        k = torch.empty(shape, dtype=self.dtype, device=self.device)
        v = torch.empty(shape, dtype=self.dtype, device=self.device)
        kg, vg = k[: plan.n], v[: plan.n]
        for s, idx, pos in plan.groups:
            ksrc, vsrc = self._kl[s][layer], self._vl[s][layer]
            if pos is None:
                torch.index_select(ksrc, 0, idx, out=kg)
                torch.index_select(vsrc, 0, idx, out=vg)
            else:
                kg.index_copy_(0, pos, ksrc.index_select(0, idx))
                vg.index_copy_(0, pos, vsrc.index_select(0, idx))
        if extra is not None:
            k[n:m] = extra[0]
            v[n:m] = extra[1]
        return (k, v) if m == shape[0] else (k[:m], v[:m])

    def _write(self, layer: int, plan: _Plan, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        if isinstance(plan, _Run):
            self._kl[plan.slab][layer][plan.start : plan.stop] = k_new
            self._vl[plan.slab][layer][plan.start : plan.stop] = v_new
            return
        if isinstance(plan, _Segments):
            p0 = 0
            for (s, start, stop), p1 in zip(plan.parts, plan.ends):
                self._kl[s][layer][start:stop] = k_new[p0:p1]
                self._vl[s][layer][start:stop] = v_new[p0:p1]
                p0 = p1
            return
        k_new, v_new = k_new.to(self.dtype), v_new.to(self.dtype)
        for s, idx, pos in plan.groups:
            if pos is None:
                kp, vp = k_new, v_new
            else:
                kp, vp = k_new.index_select(0, pos), v_new.index_select(0, pos)
            self._kl[s][layer].index_copy_(0, idx, kp)
            self._vl[s][layer].index_copy_(0, idx, vp)


# ---------------------------------------------------------------------------------------------- prefix cache
class PrefixCache:
    """Full blocks of committed text rows, keyed by a hash chain over their token ids.

    The key of block i is sha256(key of block i-1, token ids of block i), so a key names the whole
    prefix up to and including its block. The cache holds one reference to every registered block;
    least-recently-used entries whose block nobody else holds are evicted when the pool may not grow. In
    a pool with no bound (the CPU's) nothing would ever evict them, so there the cache keeps at most
    `UNBOUNDED_IDLE_BLOCKS` blocks that only it holds.
    """

    UNBOUNDED_IDLE_BLOCKS = 4096

    def __init__(self, pool: KVPool) -> None:
        self._pool = weakref.ref(pool)
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
        self._pool().incref([block])
        self._entries[key] = block
        self._by_block[block] = key
        return True

    def evictable(self) -> int:
        pool = self._pool()
        return sum(1 for b in self._entries.values() if pool._ref[b] == 1)

    def evict(self, n: int) -> int:
        """Free up to n blocks held only by the cache, least recently used first; returns how many."""
        pool = self._pool()
        victims = []
        for key, b in self._entries.items():
            if len(victims) >= n:
                break
            if pool._ref[b] == 1:
                victims.append(key)
        for key in victims:
            b = self._entries.pop(key)
            del self._by_block[b]
            pool._decref([b])
        return len(victims)

    def clear(self) -> None:
        """Drop every entry (blocks still used by contexts stay with them)."""
        pool = self._pool()
        with pool._lock:
            blocks = list(self._entries.values())
            self._entries.clear()
            self._by_block.clear()
            pool._decref(blocks)


# ---------------------------------------------------------------------------------------------- context
def _release_later(pool_ref: "weakref.ref[KVPool]", blocks: list[int]) -> None:
    """Finalizer of a garbage-collected Context: hand its blocks back at the pool's next operation."""
    pool = pool_ref()
    if pool is not None and blocks:
        pool._deferred.append(list(blocks))
    blocks.clear()


class Context:
    """One prompt's cache as seen by attention: K/V rows [0, length) and the next RoPE position.

    The rows live in the blocks of `block_table` (block i holds rows [i*block_size, (i+1)*block_size)).
    """

    _MAX_PLANS = 8

    def __init__(self, pool: KVPool) -> None:
        if not isinstance(pool, KVPool):
            raise TypeError(f"Context(pool) takes a KVPool, got {type(pool).__name__} "
                            "(contexts now live in a paged pool: Context(KVPool(...)))")
        self.pool = pool
        self.length = 0
        self.rope = 0
        self._pending = 0
        self._reserved = 0
        self._released = False
        self._blocks: list[int] = []  # mutated in place only: the finalizer holds this very list
        self._hashes: list[bytes] = []  # prefix-cache keys of the leading full blocks, once known
        self._plans: dict[tuple[int, int], _Plan] = {}
        self._lead: tuple[int, int, int] | None = None  # see _read_plan
        self._table_plan: _Plan | None = None
        self._finalizer = weakref.finalize(self, _release_later, weakref.ref(pool), self._blocks)
        self._finalizer.atexit = False

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        return self.pool.num_layers

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def block_table(self) -> tuple[int, ...]:
        return tuple(self._blocks)

    @property
    def released(self) -> bool:
        return self._released

    def __repr__(self) -> str:
        return (f"Context(length={self.length}, rope={self.rope}, blocks={len(self._blocks)}"
                f"{', released' if self._released else ''})")

    def _check_alive(self) -> None:
        if self._released:
            raise RuntimeError("this context was released")

    def _changed(self) -> None:
        """The block table changed: forget the row plans."""
        self._plans.clear()
        self._lead = None
        self._table_plan = None

    def _read_plan(self, end: int) -> _Plan:
        """How our rows [0, end) are read: a slice when they lie in consecutive rows of one slab (the
        usual case), else the plan of the whole table (built once per block table, reused by every
        layer and every decode step until the table changes)."""
        lead = self._lead
        if lead is None:
            lead = self._lead = self.pool._leading_run(self._blocks)
        if end <= lead[2] * self.pool.block_size:
            return _Run(lead[0], lead[1], lead[1] + end)
        if self._table_plan is None:
            self._table_plan = self.pool._plan_range(self._blocks, 0, len(self._blocks) * self.pool.block_size)
        return self._table_plan

    def _write_plan(self, a: int, b: int) -> _Plan:
        """Where rows [a, b) are written. Cached per range."""
        key = (a, b)
        plan = self._plans.get(key)
        if plan is None:
            plan = self.pool._plan_range(self._blocks, a, b)
            if len(self._plans) >= self._MAX_PLANS:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    # ------------------------------------------------------------------ lifetime
    @classmethod
    def adopt(cls, pool: KVPool, blocks: Sequence[int], length: int, rope: int) -> "Context":
        """A context over existing blocks of `pool` (taking a reference to each), e.g. of a borrowed pool."""
        bs = pool.block_size
        if not 0 <= length <= len(blocks) * bs or len(blocks) != -(-length // bs):
            raise ValueError(f"Context.adopt: {len(blocks)} blocks of {bs} rows cannot hold exactly {length} rows")
        ctx = cls(pool)
        pool.incref(blocks)
        ctx._blocks.extend(blocks)
        ctx.length, ctx.rope = length, rope
        return ctx

    def fork(self) -> "Context":
        """A context with the same rows and RoPE position, sharing our blocks (no copy)."""
        self._check_alive()
        other = Context(self.pool)
        shared = self._blocks[: -(-self.length // self.pool.block_size)]
        self.pool.incref(shared)
        other._blocks.extend(shared)
        other._hashes.extend(self._hashes[: self.length // self.pool.block_size])
        other.length, other.rope = self.length, self.rope
        return other

    def release(self) -> None:
        """Give our blocks back to the pool now. Idempotent; the context is unusable afterwards."""
        if self._released:
            return
        self._released = True
        self._finalizer.detach()
        blocks = list(self._blocks)
        self._blocks.clear()
        self._hashes.clear()
        self._changed()
        self.length = self._pending = self._reserved = 0
        if blocks:
            self.pool.decref(blocks)

    # ------------------------------------------------------------------ attention
    def keys(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V rows [0, length) of one layer (a view when the rows are consecutive in the pool)."""
        self._check_alive()
        if self.length == 0:
            p = self.pool
            empty = torch.empty((0, p.num_kv_heads, p.head_dim), dtype=p.dtype, device=p.device)
            return empty, empty
        return self.pool._read(layer, self._read_plan(self.length), self.length)

    def reserve(self, n: int) -> None:
        """Make room to append n rows in place: copy-on-write a shared partly filled block, then
        allocate the blocks still needed. Raises PoolExhausted when the pool is full."""
        self._check_alive()
        if n < 0:
            raise ValueError(f"cannot reserve {n} rows")
        if n == 0:
            self._reserved = 0
            return
        pool, bs = self.pool, self.pool.block_size
        end = self.length + n
        need = -(-end // bs)
        with pool._lock:
            # Blocks we will write into must be ours alone.
            for i in range(self.length // bs, min(len(self._blocks), need)):
                old = self._blocks[i]
                if pool.refcount(old) > 1:
                    (new,) = pool.allocate(1, after=self._blocks[i - 1] if i else None)
                    pool.copy_block(old, new, max(0, min(bs, self.length - i * bs)))
                    pool.decref([old])
                    self._blocks[i] = new
                    self._changed()
            if need > len(self._blocks):
                self._blocks.extend(pool.allocate(need - len(self._blocks),
                                                  after=self._blocks[-1] if self._blocks else None))
                self._changed()
        self._reserved = n

    def attend_keys(
        self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, commit: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values to attend over: our rows followed by the new ones.

        With commit (after `reserve`) the new rows are written into our blocks and stay once `commit`
        is called. Without it nothing is written: the new rows are appended to a copy of ours.
        """
        self._check_alive()
        n = k_new.shape[0]
        if commit:
            if n > self._reserved:
                raise RuntimeError(f"attend_keys(commit=True) of {n} rows needs reserve({n}) first "
                                   f"(reserved {self._reserved})")
            end = self.length + n
            if n:
                self.pool._write(layer, self._write_plan(self.length, end), k_new, v_new)
            self._pending = n
            if end == 0:
                return k_new, v_new
            return self.pool._read(layer, self._read_plan(end), end)
        if self.length == 0:
            return k_new, v_new
        return self.pool._read(layer, self._read_plan(self.length), self.length, extra=(k_new, v_new))

    def slab_rows(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slab index, row within that slab) of each of our logical rows [0, end), as CPU int64 tensors:
        for kernels that read or write many contexts' rows in the pool at once. Rows past `length` must
        have been reserved."""
        self._check_alive()
        bs = self.pool.block_size
        if -(-end // bs) > len(self._blocks):
            raise RuntimeError(f"slab_rows({end}): only {len(self._blocks) * bs} rows have blocks")
        return self.pool._slab_rows(self._blocks, 0, end)

    def wrote(self, n: int) -> None:
        """Rows [length, length + n) were written into our blocks by such a kernel (after `reserve(n)`);
        `commit` accepts them as it accepts rows written by `attend_keys(commit=True)`."""
        self._check_alive()
        if n > self._reserved:
            raise RuntimeError(f"wrote({n}) needs reserve({n}) first (reserved {self._reserved})")
        self._pending = n

    def commit(self, rope_advance: int) -> None:
        """Accept the rows written by the forward that just ran."""
        self.length += self._pending
        self._pending = 0
        self._reserved = 0
        self.rope += rope_advance

    # ------------------------------------------------------------------ prefix caching
    def match_prefix(self, token_ids: Sequence[int]) -> int:
        """Adopt the cached full blocks that start `token_ids` (text from RoPE position 0); returns how
        many tokens they cover, which the caller then need not prefill. The context must be empty.
        Leave at least one token out (`token_ids[:-1]`) when the caller needs logits of the last one."""
        self._check_alive()
        cache = self.pool.prefix_cache
        if cache is None:
            return 0
        if self.length or self._blocks:
            raise RuntimeError("match_prefix needs an empty context")
        bs = self.pool.block_size
        keys: list[bytes] = []
        blocks: list[int] = []
        with self.pool._lock:
            self.pool._drain()
            parent = None
            for i in range(len(token_ids) // bs):
                key = cache.block_key(parent, token_ids[i * bs : (i + 1) * bs])
                b = cache.lookup(key)
                if b is None:
                    break
                keys.append(key)
                blocks.append(b)
                parent = key
            self.pool.incref(blocks)
            cache.touch(reversed(keys))  # the root becomes the most recent: deeper blocks go first
        self._blocks.extend(blocks)
        self._hashes.extend(keys)
        self._changed()
        self.length = self.rope = len(blocks) * bs
        return self.length

    def register_prefix(self, token_ids: Sequence[int]) -> int:
        """Register our full blocks with the pool's prefix cache; `token_ids` is this context's whole
        token history (text only, from RoPE position 0, at most `length` tokens). Returns the number of
        tokens now covered by cached blocks of this context."""
        self._check_alive()
        cache = self.pool.prefix_cache
        if cache is None:
            return 0
        if len(token_ids) > self.length:
            raise ValueError(f"register_prefix: {len(token_ids)} token ids but only {self.length} rows committed")
        bs = self.pool.block_size
        full = len(token_ids) // bs
        with self.pool._lock:
            self.pool._drain()
            parent = self._hashes[-1] if self._hashes else None
            for i in range(len(self._hashes), full):
                key = cache.block_key(parent, token_ids[i * bs : (i + 1) * bs])
                cache.insert(key, self._blocks[i])
                self._hashes.append(key)
                parent = key
            cache.touch(reversed(self._hashes[:full]))
            if self.pool.max_blocks is None:
                idle = cache.evictable() - cache.UNBOUNDED_IDLE_BLOCKS
                if idle > 0:
                    cache.evict(idle)
        return full * bs
