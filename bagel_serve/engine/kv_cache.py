"""Attention contexts: the cached K/V rows of one prompt, with prefix sharing.

A `Context` is a view (length, rope position) onto a `KVStore`. Forking a context is free: both views
share the store, and only the view whose length equals the store's written length (the "tip") may
append in place; any other view copies its own prefix first (copy-on-write). This is how the CFG
contexts share their common prefix with the full context, as DESIGN.md asks, without deep copies.
Rows are kept after k-norm and RoPE, as the reference caches them.
"""

from __future__ import annotations

import torch

_MIN_GROWTH = 256


class KVStore:
    def __init__(self, num_layers: int, capacity: int, like: torch.Tensor) -> None:
        shape = (capacity, *like.shape[1:])
        self.k = [torch.empty(shape, dtype=like.dtype, device=like.device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=like.dtype, device=like.device) for _ in range(num_layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class Context:
    """One prompt's cache as seen by attention: K/V rows [0, length) and the next RoPE position."""

    def __init__(self, num_layers: int, store: KVStore | None = None, length: int = 0, rope: int = 0) -> None:
        self.num_layers = num_layers
        self.store = store
        self.length = length
        self.rope = rope
        self._pending = 0

    def fork(self) -> "Context":
        return Context(self.num_layers, self.store, self.length, self.rope)

    @property
    def is_tip(self) -> bool:
        return self.store is not None and self.store.length == self.length

    def keys(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.store is None:
            raise RuntimeError("empty context has no keys")
        return self.store.k[layer][: self.length], self.store.v[layer][: self.length]

    def reserve(self, n: int, like: torch.Tensor) -> None:
        """Make room to append n rows in place, copying our prefix if we are not the tip."""
        needed = self.length + n
        if not (self.is_tip and self.store.capacity >= needed):
            grow = max(needed, self.length + max(_MIN_GROWTH, self.length // 2))
            store = KVStore(self.num_layers, grow, like)
            if self.store is not None and self.length:
                for layer in range(self.num_layers):
                    store.k[layer][: self.length] = self.store.k[layer][: self.length]
                    store.v[layer][: self.length] = self.store.v[layer][: self.length]
            self.store = store
        # Claim the rows now, so that no other view of this store writes them in the same forward.
        self.store.length = needed

    def attend_keys(
        self, layer: int, k_new: torch.Tensor, v_new: torch.Tensor, commit: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values to attend over: our rows followed by the new ones.

        With commit (after `reserve`) the new rows are written into the store and stay. Without it they
        go into the store's spare rows when we are the tip, and are otherwise concatenated: either way
        nothing visible to another context changes.
        """
        n = k_new.shape[0]
        end = self.length + n
        if commit or (self.is_tip and self.store.capacity >= end):
            # Committed rows were claimed by `reserve`; spare rows past the tip belong to no view.
            self.store.k[layer][self.length : end] = k_new
            self.store.v[layer][self.length : end] = v_new
            if commit:
                self._pending = n
            return self.store.k[layer][:end], self.store.v[layer][:end]
        if self.store is None or self.length == 0:
            return k_new, v_new
        k_old, v_old = self.keys(layer)
        return torch.cat([k_old, k_new]), torch.cat([v_old, v_new])

    def commit(self, rope_advance: int) -> None:
        """Accept the rows written by the forward that just ran."""
        self.length += self._pending
        self._pending = 0
        self.rope += rope_advance
