"""The KV cache and its contexts: block bookkeeping, sharing, copy-on-write, slots, release, prefix caching,
borrowing. Small random tensors on the CPU, two layers."""

from __future__ import annotations

import gc

import pytest
import torch

from bagel_serve.engine.block_manager import BlockManager, PoolExhausted
from bagel_serve.engine.kv_cache import Context, KVCache, slot_of

LAYERS, HEADS, DIM = 2, 2, 4


def make_cache(blocks: int = 32, **kw) -> KVCache:
    kw.setdefault("block_size", 4)
    return KVCache(LAYERS, HEADS, DIM, blocks, **kw)


class Ref:
    """A context plus the rows it should hold: [layers, 2, rows, heads, dim]."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.kv = torch.empty(LAYERS, 2, 0, HEADS, DIM)

    def fork(self) -> "Ref":
        r = Ref(self.ctx.fork())
        r.kv = self.kv.clone()
        return r

    def append(self, n: int, gen: torch.Generator) -> None:
        """What a forward does: reserve, store the rows at their slots, commit."""
        self.ctx.reserve(n)
        new = torch.randn(LAYERS, 2, n, HEADS, DIM, generator=gen)
        slots = self.ctx.slots(self.ctx.length, self.ctx.length + n)
        self.ctx.cache.tensor[:, :, slots] = new
        self.ctx.commit(n, n)
        self.kv = torch.cat([self.kv, new], dim=2)

    def check(self) -> None:
        assert self.ctx.length == self.kv.shape[2]
        for layer in range(LAYERS):
            k, v = self.ctx.rows(layer)
            assert torch.equal(k, self.kv[layer, 0]) and torch.equal(v, self.kv[layer, 1])


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_block_manager_bookkeeping() -> None:
    m = BlockManager(8, 4)
    assert m.capacity == 7 and m.num_free == 7
    a = m.allocate(3)
    assert 0 not in a and len(set(a)) == 3  # block 0 is the null block: never handed out
    m.incref(a[:1])
    assert [m.refcount(b) for b in a] == [2, 1, 1]
    m.decref(a)
    assert m.num_used == 1 and m.refcount(a[0]) == 1
    m.decref(a[:1])
    assert m.num_used == 0
    with pytest.raises(RuntimeError, match="double free"):
        m.decref(a[:1])
    with pytest.raises(RuntimeError, match="free block"):
        m.incref(a[:1])
    m.allocate(7)
    with pytest.raises(PoolExhausted, match=r"1 blocks wanted, 0 free of 7 \(block_size 4\)"):
        m.allocate(1)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockManager(1, 4)


def test_admission_ledger() -> None:
    m = BlockManager(11, 4)
    assert m.try_admit(6) and m.try_admit(4) and not m.try_admit(1)
    m.unadmit(4)
    assert m.try_admit(4) and m.admitted == 10
    with pytest.raises(RuntimeError, match=r"unadmit\(11\) with only 10 blocks reserved"):
        m.unadmit(11)


def test_preallocated_tensor_layout_and_slots(gen: torch.Generator) -> None:
    cache = make_cache(8)
    assert tuple(cache.tensor.shape) == (LAYERS, 2, 32, HEADS, DIM)
    assert torch.equal(cache.tensor[:, :, :4], torch.zeros(LAYERS, 2, 4, HEADS, DIM))  # the null block
    assert cache.bytes_per_block == 2 * LAYERS * 4 * HEADS * DIM * 4
    r = Ref(Context(cache))
    r.append(6, gen)
    blocks = r.ctx.block_table
    assert len(blocks) == 2
    expect = [blocks[0] * 4 + i for i in range(4)] + [blocks[1] * 4 + i for i in range(2)]
    assert r.ctx.slots(0, 6).tolist() == expect
    assert cache.slots(list(blocks), 3, 5).tolist() == expect[3:5]
    assert [slot_of(blocks, row, 4) for row in range(6)] == expect  # the runner's per-token form
    with pytest.raises(RuntimeError, match="reserve first"):
        r.ctx.slots(0, 9)
    r.check()
    assert (r.ctx.length, r.ctx.rope) == (6, 6)


def test_cache_made_in_inference_mode_is_writable_outside(gen: torch.Generator) -> None:
    with torch.inference_mode():
        cache = make_cache(4)
    r = Ref(Context(cache))
    r.append(3, gen)
    r.check()


def test_fork_shares_blocks_and_copies_only_the_partial_last_block(gen: torch.Generator) -> None:
    cache = make_cache()
    a = Ref(Context(cache))
    a.append(6, gen)  # one full block, one partial (2 of 4 rows)
    b = a.fork()
    assert b.ctx.block_table == a.ctx.block_table and b.ctx.rope == 6
    assert [cache.manager.refcount(x) for x in a.ctx.block_table] == [2, 2]
    b.append(3, gen)  # copy-on-write of the shared partial block, then one more
    assert b.ctx.block_table[0] == a.ctx.block_table[0]
    assert b.ctx.block_table[1] != a.ctx.block_table[1]
    assert cache.manager.refcount(a.ctx.block_table[0]) == 2 and cache.manager.refcount(a.ctx.block_table[1]) == 1
    a.check()
    b.check()
    a.append(1, gen)  # a's own partial block is no longer shared: written in place
    assert len(a.ctx.block_table) == 2
    a.check()
    b.check()


def test_fork_at_a_block_boundary_copies_nothing(gen: torch.Generator) -> None:
    cache = make_cache()
    a = Ref(Context(cache))
    a.append(8, gen)
    b = a.fork()
    used = cache.manager.num_used
    b.append(1, gen)
    assert cache.manager.num_used == used + 1 and b.ctx.block_table[:2] == a.ctx.block_table
    a.check()
    b.check()


def test_a_failed_reserve_leaves_the_context_unchanged(gen: torch.Generator) -> None:
    cache = make_cache(4)  # three usable blocks
    a = Ref(Context(cache))
    a.append(6, gen)
    b = a.fork()
    with pytest.raises(PoolExhausted):
        b.ctx.reserve(8)  # needs a copy of the partial block and two more
    assert b.ctx.block_table == a.ctx.block_table and cache.manager.num_used == 2
    b.append(2, gen)  # one copy-on-write block fits
    a.check()
    b.check()


def test_commit_needs_reserve(gen: torch.Generator) -> None:
    ctx = Context(make_cache())
    with pytest.raises(RuntimeError, match="reserved"):
        ctx.commit(1, 1)
    ctx.reserve(2)
    ctx.commit(2, 1)
    assert (ctx.length, ctx.rope) == (2, 1)  # an image block advances RoPE by one for all its rows


def test_release_returns_blocks_and_is_idempotent(gen: torch.Generator) -> None:
    cache = make_cache()
    r = Ref(Context(cache))
    r.append(9, gen)
    f = r.fork()
    r.ctx.release()
    r.ctx.release()
    assert cache.manager.num_used == 3  # the fork holds them
    with pytest.raises(RuntimeError, match="released"):
        r.ctx.fork()
    with pytest.raises(RuntimeError, match="released"):
        r.ctx.reserve(1)
    f.check()
    f.ctx.release()
    assert cache.manager.num_used == 0
    del r, f
    gc.collect()
    assert cache.manager.num_used == 0  # no double free from the finalizer


def test_garbage_collected_contexts_release(gen: torch.Generator) -> None:
    cache = make_cache()
    r = Ref(Context(cache))
    r.append(9, gen)
    f = r.fork()
    f.append(1, gen)
    assert cache.manager.num_used == 4
    del r
    gc.collect()
    assert cache.manager.num_used == 3
    del f
    gc.collect()
    assert cache.manager.num_used == 0 and cache.manager.num_free == cache.manager.capacity
    c = Context(cache)  # a context in a reference cycle, collected by the cyclic collector
    c.reserve(5)
    c.cycle = c  # type: ignore[attr-defined]
    del c
    gc.collect()
    assert cache.manager.num_used == 0
    cache2 = make_cache()  # the cache going away together with its contexts is harmless
    c2 = Context(cache2)
    c2.reserve(3)
    del cache2, c2
    gc.collect()


def test_borrowed_cache_reads_in_place_and_never_allocates(gen: torch.Generator) -> None:
    cache = make_cache()
    a = Ref(Context(cache))
    a.append(7, gen)
    other = KVCache.borrowed(cache.tensor, 4)
    assert other.tensor.data_ptr() == cache.tensor.data_ptr() and other.read_only
    lent = Context.adopt(other, a.ctx.block_table, a.ctx.length, a.ctx.rope)
    b = Ref(lent)
    b.kv = a.kv
    b.check()
    with pytest.raises(RuntimeError, match="read-only"):
        lent.reserve(1)
    lent.release()
    a.check()
    with pytest.raises(ValueError, match="cannot hold exactly"):
        Context.adopt(other, a.ctx.block_table, 9, 0)
    with pytest.raises(ValueError, match="block ids"):
        Context.adopt(other, [0, 1], 7, 0)
    with pytest.raises(ValueError, match="multiple of block_size"):
        KVCache.borrowed(cache.tensor, 5)


# ---------------------------------------------------------------------------------------------- prefix cache
def text_context(cache: KVCache, tokens: list[int], gen: torch.Generator) -> Ref:
    r = Ref(Context(cache))
    covered = r.ctx.match_prefix(tokens)
    if covered:  # adopted rows: take their values as reference
        r.kv = torch.stack([torch.stack(r.ctx.rows(layer)) for layer in range(LAYERS)])
    r.append(len(tokens) - covered, gen)
    r.ctx.register_prefix(tokens)
    return r


def test_prefix_cache_shares_full_blocks(gen: torch.Generator) -> None:
    cache = make_cache(enable_prefix_caching=True)
    m = cache.manager
    toks = list(range(100, 110))
    a = text_context(cache, toks, gen)  # two full blocks (registered), a partial third
    assert len(m.prefix_cache) == 2 and m.usage()["cached_blocks"] == 2
    b = Ref(Context(cache))
    assert b.ctx.match_prefix(toks[:8] + [1, 2, 3]) == 8
    assert b.ctx.block_table == a.ctx.block_table[:2] and b.ctx.length == b.ctx.rope == 8
    assert [m.refcount(x) for x in b.ctx.block_table] == [3, 3]  # a, the cache, b
    b.kv = a.kv[:, :, :8].clone()
    b.check()
    b.append(3, gen)
    a.check()
    b.check()
    c = Context(cache)
    assert c.match_prefix(toks[:4] + [0, 0, 0, 0]) == 4  # the second block's tokens differ
    d = Context(cache)
    assert d.match_prefix([7] * 12) == 0
    assert d.match_prefix(toks[:3]) == 0  # no full block
    with pytest.raises(RuntimeError, match="empty"):
        c.match_prefix(toks)
    with pytest.raises(ValueError, match="committed"):
        a.ctx.register_prefix(toks + [1])
    for x in (a, b):  # the cache keeps the blocks after every context is gone
        x.ctx.release()
    c.release()
    assert m.num_used == 2
    assert Context(cache).match_prefix(toks) == 8


def test_prefix_cache_disabled_is_a_no_op() -> None:
    cache = make_cache()
    ctx = Context(cache)
    assert cache.manager.prefix_cache is None
    assert ctx.match_prefix(list(range(8))) == 0 and ctx.register_prefix([]) == 0


def test_prefix_cache_lru_eviction_under_pressure(gen: torch.Generator) -> None:
    cache = make_cache(7, enable_prefix_caching=True)  # six usable blocks
    m = cache.manager
    p1, p2, p3 = list(range(8)), list(range(10, 18)), list(range(20, 28))
    for p in (p1, p2):  # two cached prefixes of two blocks each, no context left holding them
        text_context(cache, p, gen).ctx.release()
    assert m.num_used == 4 and len(m.prefix_cache) == 4
    probe = Context(cache)
    assert probe.match_prefix(p1) == 8  # p1 becomes the most recently used
    probe.release()
    assert m.can_allocate(6) and not m.can_allocate(7)
    r = text_context(cache, p3, gen)  # needs 2 blocks: the free ones first, no eviction
    assert len(m.prefix_cache) == 6 and m.num_used == 6
    held = r.ctx  # p3's blocks are held by a live context: never evicted
    assert m.can_allocate(4) and not m.can_allocate(5)
    got = m.allocate(2)  # evicts the least recently used prefix nobody holds: p2
    assert len(m.prefix_cache) == 4
    assert Context(cache).match_prefix(p2) == 0
    assert Context(cache).match_prefix(p1) == 8
    got += m.allocate(1)  # p1's second block goes before its first
    assert Context(cache).match_prefix(p1) == 4
    assert Context(cache).match_prefix(p3) == 8
    with pytest.raises(PoolExhausted, match="3 blocks wanted"):
        m.allocate(3)  # one evictable block left (p1's first); p3 is held
    m.decref(got)
    held.release()
    m.prefix_cache.clear()
    assert m.num_used == 0
