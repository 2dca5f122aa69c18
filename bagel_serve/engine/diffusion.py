"""Flow-matching schedule and classifier-free guidance, exactly as the reference combines them."""

from __future__ import annotations

import torch

RENORM_TYPES = ("global", "channel", "text_channel")


def flow_schedule(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluated times and step sizes: shifted linspace(1, 0, steps), the final t = 0 never evaluated."""
    t = torch.linspace(1, 0, steps)
    t = shift * t / (1 + (shift - 1) * t)
    return t[:-1], t[:-1] - t[1:]


def guidance_active(t: float, interval: tuple[float, float]) -> bool:
    """The reference guides only when lo < t <= hi, on the shifted t."""
    return interval[0] < t <= interval[1]


def combine_cfg(
    v_c: torch.Tensor,
    v_t: torch.Tensor | None,
    v_i: torch.Tensor | None,
    text_scale: float,
    img_scale: float,
    renorm_type: str,
    renorm_min: float,
) -> torch.Tensor:
    """Guided velocity of one image (rows = its latent tokens)."""
    if text_scale <= 1.0:
        return v_c
    a = v_t + text_scale * (v_c - v_t)
    if renorm_type == "text_channel":
        r = (torch.norm(v_c, dim=-1, keepdim=True) / (torch.norm(a, dim=-1, keepdim=True) + 1e-8)).clamp(renorm_min, 1.0)
        b = a * r
        return v_i + img_scale * (b - v_i) if img_scale > 1.0 else b
    b = v_i + img_scale * (a - v_i) if img_scale > 1.0 else a
    if renorm_type == "global":
        r = (torch.norm(v_c) / (torch.norm(b) + 1e-8)).clamp(renorm_min, 1.0)
    else:
        r = (torch.norm(v_c, dim=-1, keepdim=True) / (torch.norm(b, dim=-1, keepdim=True) + 1e-8)).clamp(renorm_min, 1.0)
    return b * r
