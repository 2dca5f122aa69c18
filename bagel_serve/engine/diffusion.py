"""The image half of a request: flow-matching schedule, classifier-free guidance, the denoising program
that stage 1 (the DiT) runs from a hand-off, and the VAE at both ends.

The schedule and the guidance are exactly the reference's: shifted linspace(1, 0, steps) with the final t = 0
never evaluated, guidance only where lo < t <= hi on the shifted t, the CFG combination with its renorm, and
x <- x - v dt on float32 latents. Each guided step asks for the velocity of every branch context it needs
at once, so the branches share one forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

from bagel_serve.config.model_config import BagelConfig
from bagel_serve.distributed import parallel_state as ps
from bagel_serve.engine.kv_cache import Context
from bagel_serve.engine.request import Request, RequestOutput
from bagel_serve.engine.sequence import Work
from bagel_serve.engine.step_cache import StepCache
from bagel_serve.imaging import to_tensor
from bagel_serve.model.layout import LatentPiece, flattened_position_ids, latent_grid, pack_latent, unpack_latent
from bagel_serve.model.autoencoder import AutoEncoder, decoded_to_uint8
from bagel_serve.model.loader import process_weights_after_loading
from bagel_serve.model.vae_tiling import tiled_decode, tiled_encode


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



COND, TEXT_DROPPED, IMAGE_DROPPED = "cond", "text_dropped", "image_dropped"
"""The CFG branches of a denoising step, by name (each has its own step-cache state)."""
BRANCH_INDEX = {COND: 0, TEXT_DROPPED: 1, IMAGE_DROPPED: 2}
"""A branch's place, which picks its rank under CFG parallelism (`Work.cfg_branch`)."""


@dataclass(frozen=True)
class VaeMode:
    """How a stage runs the VAE: in tiles (`vae_use_tiling`, or VAE patch parallelism), and with TF32
    convolutions (`vae_precision: tf32`) instead of the reference's full float32."""

    tiled: bool = False
    tf32: bool = False


class ImagePrograms:
    """Stage 1's programs (the DiT): denoise from a hand-off's contexts, then decode the image.

    `velocity_head` is the model's velocity head (`Bagel.velocity`: final generation norm, then llm2vae):
    with step caching a predicted branch's hidden rows go through it without a transformer forward."""

    def __init__(self, cfg: BagelConfig, vae: AutoEncoder, device: torch.device, clock: Callable[[], float],
                 velocity_head: Callable[[torch.Tensor], torch.Tensor], vae_mode: VaeMode = VaeMode()) -> None:
        self.cfg = cfg
        self.vae_mode = vae_mode
        self.vae = vae
        self.device = device
        self.now = clock
        self.velocity_head = velocity_head

    def image_program(self, h: Handoff):
        h.check()
        req, out = h.request, h.output
        rng = torch.Generator()
        rng.set_state(h.rng_state)
        latent = yield from self._denoise(req, h, rng)
        if req.return_latents:
            out.latents = latent.cpu()
        t0 = self.now()
        out.images = [decode_image(self.vae, latent, h.height, h.width, self.cfg, self.vae_mode)
                      ] if ps.decodes_images() else []
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
        cache = StepCache() if req.enable_taylorseer else None
        try:
            for t, dt in zip(times.tolist(), dts.to(dev)):
                branches = self._branches(req, h, guidance_active(t, req.cfg_interval), cache)
                vs = yield from self._velocities(branches, LatentPiece(x, t, pos), cache)
                if TEXT_DROPPED in vs:
                    v = combine_cfg(vs[COND], vs[TEXT_DROPPED], vs.get(IMAGE_DROPPED, vs[COND]), req.cfg_text_scale,
                                    req.cfg_img_scale, req.cfg_renorm_type, req.cfg_renorm_min)
                else:
                    v = vs[COND]
                x = x - v * dt
        finally:
            if cache is not None:
                cache.clear()  # the factors (hundreds of MB per branch at 1024x1024) go with the request
        return x

    @staticmethod
    def _branches(req: Request, h: Handoff, guided: bool, cache: StepCache | None) -> dict[str, Context | None]:
        """The CFG branches one step evaluates and their contexts; None marks a branch whose velocity is the
        conditional one's (not computed).

        For text2img the image-dropped context is the full one, so that branch equals the conditional one.
        With step caching that holds while the two have been evaluated equally often: the conditional branch
        runs every step, so then the image-dropped one ran at every step too, on the same inputs, and its
        cache state is the same. Once an unguided step came first (cfg_interval's high end below 1) the
        image-dropped branch starts its own schedule later, and is evaluated on its own over the full context.
        """
        out: dict[str, Context | None] = {COND: h.full}
        if guided and h.cfg_text is not None:
            out[TEXT_DROPPED] = h.cfg_text
            if h.cfg_img is not None:
                out[IMAGE_DROPPED] = h.cfg_img
            elif h.img_is_full and req.cfg_img_scale > 1.0:
                same = cache is None or cache.evaluations(IMAGE_DROPPED) == cache.evaluations(COND)
                out[IMAGE_DROPPED] = None if same else h.full
        return out

    def _velocities(self, branches: dict[str, Context | None], piece: LatentPiece, cache: StepCache | None):
        """Each branch's velocity: the full ones from one shared forward (none runs when no branch is full),
        the predicted ones through the velocity head from their cached expansion."""
        full = [b for b, c in branches.items() if c is not None and (cache is None or cache.is_full(b))]
        works = [Work(branches[b], piece, commit=False, want_output=True, want_hidden=cache is not None,
                      phase="denoise", cfg_branch=BRANCH_INDEX[b]) for b in full]
        results = (yield works) if works else []
        vs: dict[str, torch.Tensor] = {}
        for b, r in zip(full, results):
            if cache is None:
                vs[b] = r
            else:
                vs[b], hidden = r
                cache.refresh(b, hidden)
        for b, c in branches.items():
            if c is not None and b not in vs:
                vs[b] = self.velocity_head(cache.predict(b)).float()
        for b, c in branches.items():
            if c is None:
                vs[b] = vs[COND]
                if cache is not None:
                    cache.follow(b, COND)
        return vs


def encode_image(vae: AutoEncoder, image: Image.Image, rng: torch.Generator, cfg: BagelConfig,
                 mode: VaeMode = VaeMode()) -> torch.Tensor:
    """Packed latent tokens of an input image: the VAE posterior *sampled* (the reference's first draw).
    `mode.tiled`: encode in tiles (`model.vae_tiling`), spread over the VAE patch-parallel ranks if there are."""
    x = to_tensor(image)[None].to(vae.encoder.conv_in.weight.device, torch.float32)
    with vae_convs(mode.tf32):
        if mode.tiled:
            z = tiled_encode(vae, x, generator=rng, sample=True, group=ps.vae_group())[0]
        else:
            z = vae.encode(x, generator=rng, sample=True)[0]
    return pack_latent(z, cfg.latent_patch_size)


def decode_image(vae: AutoEncoder, latent: torch.Tensor, height: int, width: int, cfg: BagelConfig,
                 mode: VaeMode = VaeMode()) -> Image.Image:
    """The image of packed latent tokens. `mode.tiled`: decode in tiles with blended seams (`model.vae_tiling`),
    spread over the VAE patch-parallel ranks if there are."""
    gh, gw = latent_grid(height, width, cfg.latent_downsample)
    z = unpack_latent(latent.float(), gh, gw, cfg.latent_channels, cfg.latent_patch_size)
    z = z[None].to(vae.encoder.conv_in.weight.dtype)
    with vae_convs(mode.tf32):
        decoded = tiled_decode(vae, z, group=ps.vae_group()) if mode.tiled else vae.decode(z)
        pixels = decoded_to_uint8(decoded)[0]
    return Image.fromarray(pixels.cpu().numpy(), mode="RGB")


def warm_up_vae(vae: AutoEncoder, mode: VaeMode, *, encodes: bool, decodes: bool) -> float:
    """Ready a stage's VAE on its GPU and return the seconds it took: the convolution weights in the kernel's
    layout (the loader's step, again for a VAE moved here from where it was loaded; a no-op otherwise), and the
    convolution kernels compiled by an encode and a decode of a small image, so that the first request does not
    pay for them (9.5-12.5 s on an H200 with a cold Triton cache, 0.95 s from its on-disk cache). The kernels do
    not specialise on the image's size: this size stands for all."""
    t0 = time.perf_counter()
    dev = vae.encoder.conv_in.weight.device
    process_weights_after_loading(vae, dev)
    with torch.inference_mode(), vae_convs(mode.tf32):
        if encodes:
            vae.encode_moments(torch.zeros(1, vae.params.in_channels, 64, 64, device=dev))
        if decodes:
            vae.decode(torch.zeros(1, vae.params.z_channels, 8, 8, device=dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def vae_convs(tf32: bool = False):
    """cuDNN's convolution settings for the VAE: by default without TF32, as the reference (full float32;
    TF32 moves pixels); with `tf32`, TF32's tensor cores (`vae_precision: tf32`; docs/deploy-config.md has
    what was measured)."""
    b = torch.backends.cudnn
    return b.flags(enabled=b.enabled, benchmark=b.benchmark, deterministic=b.deterministic, allow_tf32=tf32)
