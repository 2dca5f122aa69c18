"""Next-token choice. With top_k = 0 and top_p = 1 sampling is exactly the reference's
softmax(logits / temperature) followed by one multinomial draw."""

from __future__ import annotations

import torch


def choose_token(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int, top_p: float,
                 generator: torch.Generator) -> int:
    """logits: (vocab,) float32 on any device; sampling draws from a CPU generator for reproducibility."""
    if not do_sample:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
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
    return int(torch.multinomial(probs, 1, generator=generator))
