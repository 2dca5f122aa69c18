"""TaylorSeer step caching for denoising (opt-in per request: `enable_taylorseer`).

The official BAGEL code (its `generate_image(..., enable_taylorseer=True)`) runs a full transformer forward
only on some denoising steps of each CFG branch and predicts the others by a Taylor expansion over the
steps, from finite differences of the forwards it did run. It trades fidelity for speed: a predicted step
costs no transformer forward at all.

The official algorithm works per decoder layer: on a full step every layer computes normally and updates its
Taylor factors from its output; on a predicted step every layer ignores its input and returns its own
expansion. So on a predicted step only the last layer's expansion reaches the output, and the last layer's
factors are built from the final hidden rows (the residual stream after the last layer, before the final
norm) alone. Caching those rows per branch is therefore the same algorithm: the velocity of a predicted step
is the velocity head (final norm of the generation expert, llm2vae) applied to the expansion. Every
operation is row-wise, so caching only the latent rows changes nothing either.

Each CFG branch keeps its own state whose step counter advances only when that branch is evaluated (the
text-dropped branch only on guided steps), as in the official code. The arithmetic is the official one, in
the hidden rows' dtype (bf16 on a GPU, float32 on the CPU) and in the same order: a factor update is
`(new - old) / distance`, a prediction `sum_i (1 / i!) * f_i * x**i` with python-number coefficients.

Memory: up to MAX_ORDER + 1 tensors of (latent rows x hidden) per branch, e.g. 7 x 4096 x 3584 bf16 =
205 MB per branch at 1024x1024; `StepCache.clear` frees them when the request's denoising ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_ORDER = 6
"""Highest Taylor order (the official `max_order`): up to seven factors f_0 .. f_6 per branch."""
REFRESH_INTERVAL = 3
"""After the first full steps, one full step in every REFRESH_INTERVAL evaluations of a branch (the
official `fresh_threshold`): full at 7, 10, 13, ... after 0 .. 4."""
FIRST_FULL_STEPS = 5
"""The first evaluations of a branch that are always full (the official `first_enhance`); derivatives are
taken from evaluation FIRST_FULL_STEPS - 1 on."""


@dataclass
class TaylorState:
    """One CFG branch's cache: its schedule counters and the Taylor factors of its final hidden rows."""

    evaluations: int = 0
    """Evaluations of this branch so far: the index of its next one (the official `current['step']`)."""
    counter: int = 0
    """Predicted evaluations since the last full one (the official `cache_counter`)."""
    last_full: int = 0
    """The evaluation index of the last full evaluation (the official `activated_steps[-1]`; it starts at 0)."""
    factors: list[torch.Tensor] = field(default_factory=list)
    """f_0 (the hidden rows of the last full evaluation), f_1, ...: finite-difference derivatives per step."""

    def next_is_full(self) -> bool:
        """Whether the next evaluation must run the transformer (the official `cal_type`)."""
        return self.evaluations < FIRST_FULL_STEPS or self.counter == REFRESH_INTERVAL - 1

    def refresh(self, hidden: torch.Tensor) -> None:
        """Record a full evaluation's final hidden rows: f_0 = hidden, f_{i+1} = (f_i - old f_i) / d with d the
        distance between the last two full evaluations, while an old f_i exists and derivatives are due."""
        if not self.next_is_full():
            raise RuntimeError(f"evaluation {self.evaluations} of this branch is a predicted one, not full")
        step = self.evaluations
        distance = step - self.last_full
        self.counter, self.last_full = 0, step
        old = [] if step == 0 else self.factors
        new = [hidden]
        for i in range(MAX_ORDER):
            if i >= len(old) or step <= FIRST_FULL_STEPS - 2:
                break
            new.append((new[i] - old[i]) / distance)
        self.factors = new
        self.evaluations += 1

    def predict(self) -> torch.Tensor:
        """The final hidden rows of a predicted evaluation: sum_i f_i * x**i / i!, x = evaluations since the
        last full one."""
        if self.next_is_full():
            raise RuntimeError(f"evaluation {self.evaluations} of this branch must be full, not predicted")
        self.counter += 1
        x = self.evaluations - self.last_full
        out: torch.Tensor | None = None
        for i, f in enumerate(self.factors):
            term = (1 / math.factorial(i)) * f * (x**i)
            out = term if out is None else out + term
        self.evaluations += 1
        assert out is not None  # a branch's first evaluations are full, so f_0 exists here
        return out


class StepCache:
    """A request's TaylorSeer states, one per CFG branch (by name), created on first use."""

    def __init__(self) -> None:
        self._states: dict[str, TaylorState] = {}

    def _state(self, branch: str) -> TaylorState:
        return self._states.setdefault(branch, TaylorState())

    def is_full(self, branch: str) -> bool:
        """Whether this branch's next evaluation runs the transformer."""
        return self._state(branch).next_is_full()

    def refresh(self, branch: str, hidden: torch.Tensor) -> None:
        """A full evaluation of `branch` gave these final hidden rows (before the final norm)."""
        self._state(branch).refresh(hidden)

    def predict(self, branch: str) -> torch.Tensor:
        """The predicted final hidden rows of `branch`'s next evaluation (not full)."""
        return self._state(branch).predict()

    def evaluations(self, branch: str) -> int:
        """How often `branch` has been evaluated (full or predicted)."""
        return self._state(branch).evaluations

    def follow(self, branch: str, source: str) -> None:
        """Make `branch`'s state `source`'s, for a branch evaluated at the very steps and inputs `source` was
        (its state would be computed identically). The factor tensors are shared, never copied: updates
        replace them rather than write into them."""
        s = self._state(source)
        self._states[branch] = TaylorState(s.evaluations, s.counter, s.last_full, list(s.factors))

    def clear(self) -> None:
        """Free every branch's factors (the request's denoising has ended)."""
        self._states.clear()
