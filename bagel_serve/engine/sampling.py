"""Next-token choice for a whole batch of decode steps on the device, with one transfer to the host.

Greedy rows take the argmax. Sampled rows draw from softmax(logits / temperature), optionally cut to the
top-k tokens and to the smallest nucleus of mass top_p, with the exponential race (argmax of p / E with
E ~ Exp(1), which picks token i with probability p_i); E comes from the request's own generator on the
model's device, one draw of the vocabulary per step, so a request samples the same tokens whatever else is
in its batch. A repetition penalty (>1 discourages, as in vLLM and HF: positive logits divided, negative
ones multiplied) applies to the tokens of the prompt and of what was generated so far.
"""

from __future__ import annotations

from typing import Sequence

import torch


class Sampler:
    """One request's decoding settings and random state, shared by all its decode steps."""

    def __init__(self, *, do_sample: bool, temperature: float, top_k: int, top_p: float, seed: int,
                 device: torch.device, repetition_penalty: float = 1.0, prompt_ids: Sequence[int] = ()) -> None:
        self.greedy = not do_sample or temperature == 0
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.repetition_penalty = repetition_penalty
        self.generator = None if self.greedy else torch.Generator(device=device).manual_seed(seed)
        self._prompt_ids = list(prompt_ids)
        self._seen: torch.Tensor | None = None

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def can_burst(self) -> bool:
        """Whether the next token is the plain argmax of the logits, with no state to draw or update: what
        the device can do for several steps in a row without the host (a decode burst)."""
        return self.greedy and not self.penalized

    def penalize(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (vocab,) float32 with the repetition penalty applied."""
        if self._seen is None:
            self._seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            if self._prompt_ids:
                self._seen[torch.tensor(self._prompt_ids, device=logits.device)] = True
        p = self.repetition_penalty
        return torch.where(self._seen, torch.where(logits > 0, logits / p, logits * p), logits)

    def saw(self, token: torch.Tensor) -> None:
        if self._seen is not None:
            self._seen[token] = True


def _filter(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """probs (vocab,) with everything outside the top-k and the top-p nucleus set to zero."""
    if top_k and top_k < probs.shape[0]:
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, dim=0)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = (cum - sorted_p) >= top_p * cum[-1]
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return probs


def sample(logits: torch.Tensor, samplers: Sequence[Sampler]) -> list[int]:
    """logits (rows, vocab), one sampler per row -> the chosen token of each row."""
    if all(s.can_burst for s in samplers):
        return logits.argmax(dim=-1).tolist()
    logits = logits.float()
    rows = []
    for i, s in enumerate(samplers):
        row = s.penalize(logits[i]) if s.penalized else logits[i]
        if not s.greedy:
            probs = _filter(torch.softmax(row / s.temperature, dim=-1), s.top_k, s.top_p)
            race = torch.empty_like(probs).exponential_(1.0, generator=s.generator)
            row = probs / race
        rows.append(row)
    tokens = torch.stack(rows).argmax(dim=-1)
    for s, t in zip(samplers, tokens):
        s.saw(t)
    return tokens.tolist()
