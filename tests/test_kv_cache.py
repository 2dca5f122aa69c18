"""The paged KV pool and its contexts: allocation, sharing, copy-on-write, attention rows, release,
prefix caching. Small random tensors on CPU, two layers."""

from __future__ import annotations

import gc

import pytest
import torch

from bagel_serve.engine.kv_cache import Context, KVPool, PoolExhausted

LAYERS, HEADS, DIM = 2, 2, 4


def make_pool(**kw) -> KVPool:
    kw.setdefault("block_size", 4)
    return KVPool(LAYERS, HEADS, DIM, torch.float32, "cpu", **kw)


class Ref:
    """A context plus the rows it should hold, per layer."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.k = [torch.empty(0, HEADS, DIM) for _ in range(LAYERS)]
        self.v = [torch.empty(0, HEADS, DIM) for _ in range(LAYERS)]

    def fork(self) -> "Ref":
        r = Ref(self.ctx.fork())
        r.k, r.v = list(self.k), list(self.v)
        return r

    def append(self, n: int, gen: torch.Generator) -> None:
        self.ctx.reserve(n)
        for layer in range(LAYERS):
            k, v = torch.randn(n, HEADS, DIM, generator=gen), torch.randn(n, HEADS, DIM, generator=gen)
            ks, vs = self.ctx.attend_keys(layer, k, v, commit=True)
            self.k[layer] = torch.cat([self.k[layer], k])
            self.v[layer] = torch.cat([self.v[layer], v])
            assert torch.equal(ks, self.k[layer]) and torch.equal(vs, self.v[layer])
        self.ctx.commit(n)

    def check(self) -> None:
        assert self.ctx.length == self.k[0].shape[0]
        for layer in range(LAYERS):
            ks, vs = self.ctx.keys(layer)
            assert torch.equal(ks, self.k[layer]) and torch.equal(vs, self.v[layer])


def shares_pool_storage(t: torch.Tensor, pool: KVPool) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(ptr == s.untyped_storage().data_ptr() for s in pool._k + pool._v)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ---------------------------------------------------------------------------------------------- pool
def test_allocate_free_refcounts() -> None:
    pool = make_pool(slab_blocks=8)
    assert pool.capacity_blocks == 0 and pool.num_blocks_used == 0  # nothing allocated up front
    a = pool.allocate(3)
    assert a == [0, 1, 2]
    assert [pool.refcount(b) for b in a] == [1, 1, 1]
    assert pool.capacity_blocks == 8 and pool.num_blocks_used == 3 and pool.num_blocks_free == 5
    pool.incref([1])
    pool.decref(a)
    assert pool.refcount(1) == 1 and pool.num_blocks_used == 1
    assert pool.allocate(1) == [0]  # lowest free first
    pool.decref([1])
    pool.decref([0])
    assert pool.num_blocks_used == 0
    with pytest.raises(RuntimeError, match="double free"):
        pool.decref([0])
    with pytest.raises(RuntimeError, match="free block"):
        pool.incref([0])
    assert pool.allocate(0) == []


def test_allocate_prefers_consecutive_runs() -> None:
    pool = make_pool(slab_blocks=16)
    pool.allocate(6)
    pool.decref([1, 3, 4])
    assert pool.allocate(2) == [3, 4]  # lowest run of two, not the lowest two blocks
    assert pool.allocate(2) == [6, 7]
    assert pool.allocate(1, after=7) == [8]  # extends the caller's last block
    pool.decref([2])  # now 1, 2 and 9.. are free
    assert pool.allocate(2, after=8) == [9, 10]
    assert pool.allocate(3) == [11, 12, 13]
    assert pool.allocate(3) == [1, 2, 14]  # no run of three left: the lowest ones


def test_growth_by_slabs_and_exhaustion() -> None:
    pool = make_pool(slab_blocks=4, max_blocks=10)
    assert pool.usage()["slabs"] == 0
    pool.allocate(3)
    assert pool.capacity_blocks == 4 and pool.num_slabs == 1
    pool.allocate(1)
    assert pool.capacity_blocks == 4  # the free list sufficed
    b = pool.allocate(2)
    assert pool.capacity_blocks == 8 and pool.num_slabs == 2 and b == [4, 5]
    assert pool.can_allocate(4) and not pool.can_allocate(5)
    pool.allocate(4)  # two left in the slab, the last two of max_blocks in a capped slab
    assert pool.capacity_blocks == 10 and pool.num_slabs == 3
    with pytest.raises(PoolExhausted, match=r"1 blocks wanted, 0 free, max_blocks 10"):
        pool.allocate(1)
    assert isinstance(PoolExhausted("x"), RuntimeError)
    u = pool.usage()
    assert u["used_blocks"] == 10 and u["total_blocks"] == 10 and u["free_blocks"] == 0
    assert u["used_rows"] == 40 and u["bytes_per_block"] == 2 * LAYERS * 4 * HEADS * DIM * 4
    assert u["used_bytes"] == 10 * u["bytes_per_block"] == u["total_bytes"]


def test_big_request_gets_one_slab_and_trim() -> None:
    pool = make_pool(slab_blocks=4)
    pool.allocate(3)
    big = pool.allocate(6)
    assert big == list(range(4, 10)) and pool.num_slabs == 2  # one slab holding the whole request
    pool.decref(big)
    assert pool.trim() == 6 and pool.capacity_blocks == 4
    assert pool.allocate(1) == [3]


def test_pool_grown_in_inference_mode_is_writable_outside(gen: torch.Generator) -> None:
    pool = make_pool()
    with torch.inference_mode():
        r = Ref(Context(pool))
        r.append(3, gen)
    r.append(3, gen)  # in-place writes outside inference mode work
    r.check()


# ---------------------------------------------------------------------------------------------- contexts
def test_append_spanning_blocks_and_view_fast_path(gen: torch.Generator) -> None:
    pool = make_pool()
    r = Ref(Context(pool))
    for n in (3, 1, 7, 4, 9):
        r.append(n, gen)
        r.check()
    assert r.ctx.num_blocks == 6 and r.ctx.block_table == tuple(range(6))
    ks, vs = r.ctx.keys(1)
    assert ks._base is not None and shares_pool_storage(ks, pool) and shares_pool_storage(vs, pool)
    ks, _ = r.ctx.attend_keys(0, torch.zeros(2, HEADS, DIM), torch.zeros(2, HEADS, DIM), commit=False)
    assert ks.shape[0] == 26 and not shares_pool_storage(ks, pool)


def test_fork_shares_blocks_and_copies_only_partial_last_block(gen: torch.Generator) -> None:
    pool = make_pool()
    base = Ref(Context(pool))
    base.append(10, gen)  # blocks 0, 1 full, block 2 holds 2 rows
    used = pool.num_blocks_used
    a, b = base.fork(), base.fork()
    assert pool.num_blocks_used == used == 3
    assert a.ctx.block_table == base.ctx.block_table and a.ctx.rope == base.ctx.rope == 10
    assert [pool.refcount(x) for x in base.ctx.block_table] == [3, 3, 3]
    a.append(5, gen)  # copy-on-write of block 2, plus one fresh block for rows 12..14
    assert pool.num_blocks_used == used + 2
    assert a.ctx.block_table[:2] == base.ctx.block_table[:2] and a.ctx.block_table[2] != base.ctx.block_table[2]
    assert [pool.refcount(x) for x in base.ctx.block_table] == [3, 3, 2]
    base.check()
    b.check()
    a.check()
    b.append(1, gen)  # block 2 still shared with base: copied again
    assert pool.num_blocks_used == used + 3
    base.check()
    a.check()
    b.check()
    base.append(2, gen)  # now the only holder of its block 2: appends in place
    assert pool.num_blocks_used == used + 3
    for r in (base, a, b):
        r.check()


def test_fork_at_block_boundary_copies_nothing(gen: torch.Generator) -> None:
    pool = make_pool()
    base = Ref(Context(pool))
    base.append(8, gen)
    child = base.fork()
    child.append(3, gen)
    assert pool.num_blocks_used == 3 and child.ctx.block_table[:2] == base.ctx.block_table
    base.check()
    child.check()


def test_attend_without_commit_writes_nothing(gen: torch.Generator) -> None:
    pool = make_pool()
    base = Ref(Context(pool))
    base.append(6, gen)
    child = base.fork()
    used = pool.num_blocks_used
    for layer in range(LAYERS):
        k, v = torch.randn(5, HEADS, DIM, generator=gen), torch.randn(5, HEADS, DIM, generator=gen)
        ks, vs = child.ctx.attend_keys(layer, k, v, commit=False)
        assert torch.equal(ks, torch.cat([base.k[layer], k])) and torch.equal(vs, torch.cat([base.v[layer], v]))
    child.ctx.commit(0)
    assert pool.num_blocks_used == used and child.ctx.length == 6
    base.check()
    child.check()
    empty = Context(pool)
    k = torch.randn(3, HEADS, DIM, generator=gen)
    assert empty.attend_keys(0, k, k, commit=False)[0] is k


def test_non_contiguous_tables_gather(gen: torch.Generator) -> None:
    pool = make_pool(slab_blocks=64)
    a, b = Ref(Context(pool)), Ref(Context(pool))
    for _ in range(10):  # interleaved growth: each context's blocks alternate with the other's
        a.append(4, gen)
        b.append(4, gen)
    assert a.ctx.block_table == tuple(range(0, 20, 2)) and b.ctx.block_table == tuple(range(1, 20, 2))
    plan = a.ctx._read_plan(a.ctx.length)  # ten stretches of one slab: one index gather
    assert len(plan.groups) == 1 and plan.groups[0][2] is None
    for r in (a, b):
        r.check()
        ks, _ = r.ctx.keys(0)
        assert not shares_pool_storage(ks, pool)
    # Fragment further: free every other filler context, then grow a context through the holes.
    fillers = [Ref(Context(pool)) for _ in range(6)]
    for f in fillers:
        f.append(4, gen)
    for f in fillers[::2]:
        f.ctx.release()
    c = Ref(Context(pool))
    c.append(3, gen)
    c.append(6, gen)
    c.append(4, gen)
    assert len(set(c.ctx.block_table)) == 4
    assert any(y != x + 1 for x, y in zip(c.ctx.block_table, c.ctx.block_table[1:]))
    for r in [a, b, c] + fillers[1::2]:
        r.check()
    plan = c.ctx._read_plan(c.ctx.length)
    c.append(1, gen)  # appending within the last block reuses the whole-table gather
    assert c.ctx._read_plan(c.ctx.length) is plan
    c.check()
    for layer in range(LAYERS):  # no-commit over a gathered context
        k = torch.randn(2, HEADS, DIM, generator=gen)
        ks, vs = c.ctx.attend_keys(layer, k, -k, commit=False)
        assert torch.equal(ks, torch.cat([c.k[layer], k])) and torch.equal(vs, torch.cat([c.v[layer], -k]))


def test_tables_spanning_slabs(gen: torch.Generator) -> None:
    pool = make_pool(slab_blocks=2)
    a, b = Ref(Context(pool)), Ref(Context(pool))
    for n in (5, 3, 6, 2, 9):
        a.append(n, gen)
        b.append(n + 1, gen)
    assert pool.num_slabs > 2
    for r in (a, b):
        r.check()
        for layer in range(LAYERS):
            k = torch.randn(3, HEADS, DIM, generator=gen)
            ks, vs = r.ctx.attend_keys(layer, k, k, commit=False)
            assert torch.equal(ks, torch.cat([r.k[layer], k])) and torch.equal(vs, torch.cat([r.v[layer], k]))
    plan = a.ctx._read_plan(a.ctx.length)
    slabs = {p[0] for p in plan.parts} if hasattr(plan, "parts") else {g[0] for g in plan.groups}
    assert len(slabs) > 1  # a read over several slabs was exercised
    # Consecutive block ids across a slab boundary are not one slice either.
    pool2 = make_pool(slab_blocks=2)
    pool2.allocate(1)
    c = Ref(Context(pool2))
    c.append(4, gen)
    c.append(4, gen)
    assert c.ctx.block_table == (1, 2) and pool2.num_slabs == 2
    c.check()
    assert not shares_pool_storage(c.ctx.keys(0)[0], pool2)


@pytest.mark.parametrize("slab_blocks,plan_kind", [(3, "_Segments"), (6, "_Gather")])
def test_table_alternating_between_slabs(gen: torch.Generator, slab_blocks: int, plan_kind: str) -> None:
    S = slab_blocks
    pool = make_pool(slab_blocks=S)
    held = [pool.allocate(1)[0] for _ in range(2 * S)]  # two slabs: blocks [0, S) and [S, 2S)
    assert held == list(range(2 * S)) and pool.num_slabs == 2
    c = Ref(Context(pool))
    order = [b for j in range(S - 1) for b in (S + j, j)]
    for b in order:  # free one block at a time: the context alternates between the slabs
        pool.decref([b])
        c.append(4, gen)
    pool.decref([S - 1, 2 * S - 1])
    c.append(8, gen)  # one write over blocks S-1 (slab 0) and 2S-1 (slab 1)
    assert c.ctx.block_table == tuple(order + [S - 1, 2 * S - 1])
    plan = c.ctx._read_plan(c.ctx.length)
    assert type(plan).__name__ == plan_kind
    if plan_kind == "_Gather":
        assert len(plan.groups) == 2 and all(isinstance(pos, torch.Tensor) for _, _, pos in plan.groups)
    c.check()
    for layer in range(LAYERS):
        k = torch.randn(2, HEADS, DIM, generator=gen)
        ks, vs = c.ctx.attend_keys(layer, k, k, commit=False)
        assert torch.equal(ks, torch.cat([c.k[layer], k])) and torch.equal(vs, torch.cat([c.v[layer], k]))
    # Writes through the same kind of plan land in the same rows.
    n = c.ctx.num_blocks * 4
    k = torch.randn(n, HEADS, DIM, generator=gen)
    pool._write(1, plan, k, -k)
    ks, vs = c.ctx.keys(1)
    assert torch.equal(ks, k) and torch.equal(vs, -k)


def test_commit_needs_reserve(gen: torch.Generator) -> None:
    ctx = Context(make_pool())
    ctx.reserve(2)
    k = torch.randn(3, HEADS, DIM, generator=gen)
    with pytest.raises(RuntimeError, match="reserve"):
        ctx.attend_keys(0, k, k, commit=True)
    with pytest.raises(TypeError, match="KVPool"):
        Context(2)  # type: ignore[arg-type]


def test_release_returns_blocks_and_is_idempotent(gen: torch.Generator) -> None:
    pool = make_pool()
    base = Ref(Context(pool))
    base.append(9, gen)
    child = base.fork()
    child.append(4, gen)
    assert pool.num_blocks_used == 5
    base.ctx.release()
    assert pool.num_blocks_used == 4  # child still holds blocks 0 and 1
    child.check()
    base.ctx.release()
    child.ctx.release()
    assert pool.num_blocks_used == 0 and base.ctx.num_blocks == 0 and base.ctx.released
    with pytest.raises(RuntimeError, match="released"):
        base.ctx.fork()
    with pytest.raises(RuntimeError, match="released"):
        base.ctx.reserve(1)
    del base, child
    gc.collect()
    assert pool.num_blocks_used == 0  # no double free from the finalizer


def test_garbage_collected_contexts_release(gen: torch.Generator) -> None:
    pool = make_pool()
    r = Ref(Context(pool))
    r.append(9, gen)
    f = r.fork()
    f.append(1, gen)
    assert pool.num_blocks_used == 4
    del r
    gc.collect()
    assert pool.num_blocks_used == 3
    del f
    gc.collect()
    assert pool.num_blocks_used == 0 and pool.num_blocks_free == pool.capacity_blocks
    # A context in a reference cycle, collected by the cyclic collector.
    c = Context(pool)
    c.reserve(5)
    c.cycle = c  # type: ignore[attr-defined]
    del c
    gc.collect()
    assert pool.num_blocks_used == 0
    # The pool going away together with its contexts is harmless.
    pool2 = make_pool()
    c2 = Context(pool2)
    c2.reserve(3)
    del pool2, c2
    gc.collect()


# ---------------------------------------------------------------------------------------------- prefix cache
def text_context(pool: KVPool, tokens: list[int], gen: torch.Generator) -> Ref:
    r = Ref(Context(pool))
    covered = r.ctx.match_prefix(tokens)
    if covered:  # adopted rows: take their values as reference
        for layer in range(LAYERS):
            r.k[layer], r.v[layer] = (t.clone() for t in r.ctx.keys(layer))
    r.append(len(tokens) - covered, gen)
    r.ctx.register_prefix(tokens)
    return r


def test_prefix_cache_shares_full_blocks(gen: torch.Generator) -> None:
    pool = make_pool(enable_prefix_caching=True)
    toks = list(range(100, 110))
    a = text_context(pool, toks, gen)  # blocks 0, 1 full (registered), block 2 partial
    assert len(pool.prefix_cache) == 2 and pool.usage()["cached_blocks"] == 2
    b = Ref(Context(pool))
    assert b.ctx.match_prefix(toks[:8] + [1, 2, 3]) == 8
    assert b.ctx.block_table == a.ctx.block_table[:2] and b.ctx.length == b.ctx.rope == 8
    assert [pool.refcount(x) for x in b.ctx.block_table] == [3, 3]  # a, the cache, b
    for layer in range(LAYERS):
        ks, vs = b.ctx.keys(layer)
        assert torch.equal(ks, a.k[layer][:8]) and torch.equal(vs, a.v[layer][:8])
    b.k = [t[:8] for t in a.k]
    b.v = [t[:8] for t in a.v]
    b.append(3, gen)
    a.check()
    b.check()
    c = Context(pool)
    assert c.match_prefix(toks[:4] + [0, 0, 0, 0]) == 4  # the second block's tokens differ
    d = Context(pool)
    assert d.match_prefix([7] * 12) == 0
    assert d.match_prefix(toks[:3]) == 0  # no full block
    with pytest.raises(RuntimeError, match="empty"):
        c.match_prefix(toks)
    with pytest.raises(ValueError, match="committed"):
        a.ctx.register_prefix(toks + [1])
    # the cache keeps the blocks after every context is gone
    for x in (a, b):
        x.ctx.release()
    c.release()
    assert pool.num_blocks_used == 2
    e = Context(pool)
    assert e.match_prefix(toks) == 8


def test_prefix_cache_disabled_is_a_no_op() -> None:
    pool = make_pool()
    ctx = Context(pool)
    assert pool.prefix_cache is None
    assert ctx.match_prefix(list(range(8))) == 0 and ctx.register_prefix([]) == 0


def test_prefix_cache_lru_eviction_under_pressure(gen: torch.Generator) -> None:
    pool = make_pool(enable_prefix_caching=True, max_blocks=6, slab_blocks=6)
    p1, p2, p3 = list(range(8)), list(range(10, 18)), list(range(20, 28))
    for p in (p1, p2):  # two cached prefixes of two blocks each, no context left holding them
        text_context(pool, p, gen).ctx.release()
    assert pool.num_blocks_used == 4 and len(pool.prefix_cache) == 4
    probe = Context(pool)
    assert probe.match_prefix(p1) == 8  # p1 becomes the most recently used
    probe.release()
    assert pool.can_allocate(6) and not pool.can_allocate(7)
    r = text_context(pool, p3, gen)  # needs 2 blocks: free ones first, no eviction
    assert len(pool.prefix_cache) == 6 and pool.num_blocks_used == 6
    held = r.ctx  # p3's blocks are held by a live context: never evicted
    assert pool.can_allocate(4) and not pool.can_allocate(5)
    got = pool.allocate(2)  # evicts the least recently used prefix nobody holds: p2
    assert len(pool.prefix_cache) == 4
    assert Context(pool).match_prefix(p2) == 0
    assert Context(pool).match_prefix(p1) == 8
    got += pool.allocate(1)  # p1's second block goes before its first
    assert Context(pool).match_prefix(p1) == 4
    assert Context(pool).match_prefix(p3) == 8
    with pytest.raises(PoolExhausted, match="3 blocks wanted"):
        pool.allocate(3)  # one evictable block left (p1's first); p3 is held
    pool.decref(got)
    held.release()
    pool.prefix_cache.clear()
    assert pool.num_blocks_used == 0


def test_prefix_cache_on_an_unbounded_pool_keeps_a_bounded_idle_set(gen: torch.Generator,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """No bound means nothing ever needs room, so whenever a context registers blocks the cache trims
    what only it holds to UNBOUNDED_IDLE_BLOCKS, least recently used first (a prefix's deeper blocks
    before its first)."""
    from bagel_serve.engine.kv_cache import PrefixCache

    monkeypatch.setattr(PrefixCache, "UNBOUNDED_IDLE_BLOCKS", 3)
    pool = make_pool(enable_prefix_caching=True)
    prompts = [list(range(i * 100, i * 100 + 8)) for i in range(4)]  # two full blocks each
    for p in prompts:
        text_context(pool, p, gen).ctx.release()
    # After the last registration 3 idle blocks were kept beside the 2 the registering context held.
    assert len(pool.prefix_cache) == 5 and pool.num_blocks_used == 5
    assert [Context(pool).match_prefix(p) for p in prompts] == [0, 4, 8, 8]
