"""The image half of a request: flow-matching schedule, classifier-free guidance, the denoising program
that stage 1 (the DiT) runs from a hand-off, and the VAE at both ends.

The schedule and the guidance are exactly the reference's: shifted linspace(1, 0, steps) with the final t = 0
never evaluated, guidance only where lo < t <= hi on the shifted t, the CFG combination with its renorm, and
x <- x - v dt on float32 latents. Each guided step asks for the velocity of every branch context it needs
at once, so the branches share one forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from bagel_serve.config.model_config import BagelConfig
from bagel_serve.engine.kv_cache import Context
from bagel_serve.engine.request import Request, RequestOutput
from bagel_serve.engine.sequence import Work
from bagel_serve.imaging import to_tensor
from bagel_serve.model.layout import LatentPiece, flattened_position_ids, latent_grid, pack_latent, unpack_latent
from bagel_serve.model.autoencoder import AutoEncoder, decoded_to_uint8


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


@dataclass
class Handoff:
    """What stage 0 hands stage 1 for an image request: the contexts (their KV, RoPE position and length)
    and everything needed to continue exactly where a single stage would (the CPU RNG state included)."""

    request: Request
    output: RequestOutput
    height: int
    width: int
    rng_state: torch.Tensor
    full: Context
    cfg_text: Context | None
    cfg_img: Context | None
    img_is_full: bool
    reserved_blocks: int = 0
    """Blocks of stage 0's KV cache reserved for this request (admission ledger) until its contexts go."""

    def check(self) -> None:
        """A guided request must bring its CFG contexts: a missing one is an error, never a silent fallback."""
        req = self.request
        if req.cfg_text_scale > 1.0 and self.cfg_text is None:
            raise HandoffError(f"request {self.output.request_index}: the text-dropped CFG context is missing "
                               f"(cfg_text_scale {req.cfg_text_scale} > 1)")
        if req.cfg_text_scale > 1.0 and req.cfg_img_scale > 1.0 and not self.img_is_full and self.cfg_img is None:
            raise HandoffError(f"request {self.output.request_index}: the image-dropped CFG context is missing "
                               f"(cfg_img_scale {req.cfg_img_scale} > 1)")


class HandoffError(RuntimeError):
    """A stage-1 request arrived without a context it needs."""



class ImagePrograms:
    """Stage 1's programs (the DiT): denoise from a hand-off's contexts, then decode the image."""

    def __init__(self, cfg: BagelConfig, vae: AutoEncoder, device: torch.device, clock: Callable[[], float]) -> None:
        self.cfg = cfg
        self.vae = vae
        self.device = device
        self.now = clock

    def image_program(self, h: Handoff):
        h.check()
        req, out = h.request, h.output
        rng = torch.Generator()
        rng.set_state(h.rng_state)
        latent = yield from self._denoise(req, h, rng)
        if req.return_latents:
            out.latents = latent.cpu()
        t0 = self.now()
        out.images = [decode_image(self.vae, latent, h.height, h.width, self.cfg)]
        out.timings["vae_decode"] = self.now() - t0
        return out

    def _denoise(self, req: Request, h: Handoff, rng: torch.Generator):
        cfg, dev = self.cfg, self.device
        gh, gw = latent_grid(h.height, h.width, cfg.latent_downsample)
        if req.noise is not None:  # its shape was checked by prepare
            x = req.noise.to(device=dev, dtype=torch.float32)
        else:
            x = torch.randn(gh * gw, cfg.patch_latent_dim, generator=rng).to(dev)
        pos = flattened_position_ids(gh, gw, cfg.max_latent_size)
        times, dts = flow_schedule(req.steps, req.timestep_shift)
        for t, dt in zip(times.tolist(), dts.to(dev)):
            guided = guidance_active(t, req.cfg_interval) and h.cfg_text is not None
            branches = [h.full]
            if guided:
                branches.append(h.cfg_text)
                if h.cfg_img is not None:
                    branches.append(h.cfg_img)
            vs = yield [Work(c, LatentPiece(x, t, pos), commit=False, want_output=True, phase="denoise")
                        for c in branches]
            if guided:
                v_i = vs[2] if len(vs) > 2 else vs[0]
                v = combine_cfg(vs[0], vs[1], v_i, req.cfg_text_scale, req.cfg_img_scale, req.cfg_renorm_type,
                                req.cfg_renorm_min)
            else:
                v = vs[0]
            x = x - v * dt
        return x


def encode_image(vae: AutoEncoder, image: Image.Image, rng: torch.Generator, cfg: BagelConfig) -> torch.Tensor:
    """Packed latent tokens of an input image: the VAE posterior *sampled* (the reference's first draw)."""
    x = to_tensor(image)[None].to(vae.encoder.conv_in.weight.device, torch.float32)
    with _float32_convs():
        z = vae.encode(x, generator=rng, sample=True)[0]
    return pack_latent(z, cfg.latent_patch_size)


def decode_image(vae: AutoEncoder, latent: torch.Tensor, height: int, width: int, cfg: BagelConfig) -> Image.Image:
    gh, gw = latent_grid(height, width, cfg.latent_downsample)
    z = unpack_latent(latent.float(), gh, gw, cfg.latent_channels, cfg.latent_patch_size)
    with _float32_convs():
        pixels = decoded_to_uint8(vae.decode(z[None].to(vae.encoder.conv_in.weight.dtype)))[0]
    return Image.fromarray(pixels.cpu().numpy(), mode="RGB")


def _float32_convs():
    """cuDNN convolutions without TF32: the reference decodes in full float32 and TF32 moves pixels."""
    b = torch.backends.cudnn
    return b.flags(enabled=b.enabled, benchmark=b.benchmark, deterministic=b.deterministic, allow_tf32=False)
