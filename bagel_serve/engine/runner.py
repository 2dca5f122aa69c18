"""The single-stage runner: every request is a small program that asks for forwards, and the runner
packs the forwards that all live requests ask for at the same moment into one LLM call.

A request program (a generator) yields a list of `Work` items — context appends, decode tokens,
denoising branches — and receives one result per item: logits for text items that want them,
velocities for latent items. Context building, think decoding and denoising are written once, as the
reference procedure reads, and batching across requests and CFG branches falls out of the packing.
"""

from __future__ import annotations

import random
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Generator

import torch
from PIL import Image

from bagel_serve.config.model_config import BagelConfig
from bagel_serve.engine.batch import LatentPiece, Packer, Piece, SeqSpec, TextPiece, VitPiece
from bagel_serve.engine.diffusion import combine_cfg, flow_schedule, guidance_active
from bagel_serve.engine.kv_cache import Context, KVPool
from bagel_serve.engine.request import Request, RequestError, RequestOutput
from bagel_serve.engine.sampling import choose_token
from bagel_serve.engine.tokenizer import GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT, BagelTokenizer
from bagel_serve.imaging import (
    ImageInputError,
    flattened_position_ids,
    load_image,
    pack_latent,
    patchify,
    resize,
    to_tensor,
    unpack_latent,
)
from bagel_serve.model.autoencoder import AutoEncoder, decoded_to_uint8
from bagel_serve.model.bagel import Bagel


@dataclass
class Work:
    context: Context
    piece: Piece
    commit: bool = True
    want_output: bool = False
    phase: str = "context_prefill"


@dataclass
class RunStats:
    """What one `generate` call did and how long each phase took (seconds are real only when timed).

    A packed forward that serves several phases at once counts in each of them.
    """

    requests: int = 0
    wall_s: float = 0.0
    forwards: int = 0
    decoded_tokens: int = 0
    denoise_steps: int = 0
    denoise_branch_evals: int = 0
    images: int = 0
    phase_s: dict[str, float] = field(default_factory=dict)
    queue_s: float = 0.0
    """Summed time requests waited in a stage's queue before admission."""
    admitted: int = 0
    """Admissions (a request of a two-stage pipeline is admitted once per stage)."""
    kv_peak_blocks: int = 0
    kv_block_bytes: int = 0
    kv_total_blocks: int = 0

    def summary(self) -> str:
        if self.wall_s:
            lines = [f"{self.requests} request(s) in {self.wall_s:.2f} s, {self.forwards} packed forwards"]
        else:  # one stage's share of a run
            lines = [f"{self.admitted} request(s) admitted, {self.forwards} packed forwards"]
        for phase, sec in self.phase_s.items():
            lines.append(f"  {phase:<16} {sec:8.3f} s")
        dec = self.phase_s.get("decode", 0.0) + self.phase_s.get("think_decode", 0.0)
        if self.decoded_tokens:
            lines.append(f"  decoded tokens {self.decoded_tokens}" + (f" ({self.decoded_tokens / dec:.1f} tok/s)" if dec else ""))
        if self.denoise_steps:
            den = self.phase_s.get("denoise", 0.0)
            lines.append(f"  denoising steps {self.denoise_steps} ({self.denoise_branch_evals} branch evaluations)"
                         + (f", {self.denoise_steps / den:.2f} steps/s" if den else ""))
        if self.images:
            lines.append(f"  images {self.images}" + (f" ({self.images / self.wall_s:.3f} images/s)" if self.wall_s else ""))
        if self.admitted:
            lines.append(f"  queue wait {self.queue_s / self.admitted:.3f} s per admission (mean)")
        if self.kv_peak_blocks:
            lines.append(f"  KV pool peak {self.kv_peak_blocks} blocks ({self.kv_peak_blocks * self.kv_block_bytes / 2**30:.3f} GiB)"
                         f" of {self.kv_total_blocks} allocated")
        return "\n".join(lines)


Program = Generator[list[Work], list[torch.Tensor | None], RequestOutput]
TokenCallback = Callable[[int], None]


class Runner:
    """Runs request programs over one model. With `enable_prefix_caching` (the deploy config's key of that
    name), text prompts that start like earlier ones — the think system prompts above all — adopt the KV
    blocks already computed for them instead of being prefilled again."""

    def __init__(self, model: Bagel, vae: AutoEncoder, tokenizer: BagelTokenizer, *,
                 enable_prefix_caching: bool = False) -> None:
        self.model = model
        self.vae = vae
        self.tok = tokenizer
        self.cfg: BagelConfig = model.config
        self.packer = Packer(model, tokenizer.special)
        llm = model.config.llm
        # Every context of this runner lives in one paged KV pool (grows by slabs as contexts need rows).
        self.pool = KVPool(llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim, model.dtype, model.device,
                           enable_prefix_caching=enable_prefix_caching)
        # With prefix caching: the token ids of every context whose rows are text segments only, from RoPE
        # position 0 (so its rows are a function of these ids alone, and may be shared). A context whose
        # length no longer equals its entry got something else (an image, decoded tokens) and is not shared.
        self._text_ids: weakref.WeakKeyDictionary[Context, tuple[int, ...]] = weakref.WeakKeyDictionary()
        self._timed = False

    # ------------------------------------------------------------------ forwards (the engine schedules them)
    @torch.inference_mode()
    def run_alone(self, program: Generator) -> object:
        """Drive one program to its end with no scheduler (its forwards unpacked): for tests and debugging."""
        sent = None
        while True:
            try:
                works = program.send(sent) if sent is not None else next(program)
            except StopIteration as stop:
                return stop.value
            sent = self._forward(works)

    def _now(self) -> float:
        if self._timed and self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        return time.perf_counter()

    def _forward(self, works: list[Work]) -> list[torch.Tensor | None]:
        specs = [SeqSpec(w.context, w.piece, w.commit) for w in works]
        hidden, _, seqs = self.packer.run(specs)
        results: list[torch.Tensor | None] = [None] * len(works)
        last_rows: list[int] = []  # the last row of each text piece that wants logits
        wanting: list[int] = []
        for i, (w, s) in enumerate(zip(works, seqs)):
            if not w.want_output:
                continue
            if isinstance(w.piece, LatentPiece):
                a, n = s.segments[1]
                results[i] = self.model.velocity(hidden[a : a + n]).float()
            else:
                a, n = s.segments[0]
                last_rows.append(a + n - 1)
                wanting.append(i)
        if wanting:
            # One LM-head call for every decoding sequence: the head's weights are read once, not per sequence.
            rows = torch.tensor(last_rows, device=hidden.device)
            for i, logits in zip(wanting, self.model.lm_logits(hidden[rows]).float()):
                results[i] = logits
        return results

    # ------------------------------------------------------------------ request programs
    def program(self, index: int, req: Request, prep: "_Prepared", on_token: TokenCallback | None = None) -> Program:
        """The whole request, as the single-stage topology runs it."""
        result = yield from self.context_program(index, req, prep, on_token)
        if isinstance(result, Handoff):
            result = yield from self.image_program(result)
        return result

    def context_program(self, index: int, req: Request, prep: "_Prepared", on_token: TokenCallback | None = None):
        """Stage 0 (the Thinker): build every context, decode text or the think plan.

        Text requests end here with their output; image requests end with a `Handoff` carrying the full
        and CFG contexts, which the image program (stage 1, the DiT) denoises and decodes.
        """
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        rng = torch.Generator().manual_seed(seed)
        sample_rng = torch.Generator().manual_seed(seed + 1)
        out = RequestOutput(request_index=index, modality=req.modality, seed=seed)
        image, height, width = prep.image, prep.height, prep.width
        if not req.outputs_image:
            ctx = self._empty()
            if req.think:
                yield from self._prefill_text((ctx, VLM_THINK_SYSTEM_PROMPT))
            if image is not None:
                yield [self._vit_work(ctx, image)]
            yield from self._prefill_text((ctx, req.prompt))
            ids = yield from self._decode(ctx, req, req.max_tokens, sample_rng, "decode", on_token)
            out.token_ids = ids
            out.text = self.tok.decode_generation(ids)
            if req.think:
                out.think_text = _think_part(out.text)
            return out

        base = self._empty()
        if req.think:
            yield from self._prefill_text((base, GEN_THINK_SYSTEM_PROMPT))
        if image is None:
            full, cfg_text = self._fork(base), self._fork(base)
            yield from self._prefill_text((full, req.prompt))
            cfg_img = full.fork()
        else:
            full = base.fork()
            t0 = self._now()
            encoded = self._encode_image(image, rng)
            out.timings["vae_encode"] = self._now() - t0
            yield [self._latent_work(full, encoded, 0.0, image.height, image.width)]
            yield [self._vit_work(full, image)]
            cfg_text, cfg_img = full.fork(), self._fork(base)
            yield from self._prefill_text((full, req.prompt), (cfg_img, req.prompt))
        if req.negative_prompt:
            yield from self._prefill_text((cfg_text, req.negative_prompt))
        if req.think:
            ids = yield from self._decode(full.fork(), req, req.max_think_tokens, sample_rng, "think_decode", on_token)
            out.token_ids = ids
            out.think_text = self.tok.decode_generation(ids)
            yield from self._prefill_text((full, out.think_text))
        # For text2img without think the image-dropped context *is* the full one: never compute it twice.
        img_is_full = image is None and not req.think
        guided = req.cfg_text_scale > 1.0
        return Handoff(
            request=req, output=out, height=height, width=width, rng_state=rng.get_state(), full=full,
            cfg_text=cfg_text if guided else None,
            cfg_img=cfg_img if guided and req.cfg_img_scale > 1.0 and not img_is_full else None,
            img_is_full=img_is_full,
        )

    def image_program(self, h: "Handoff"):
        """Stage 1 (the DiT): denoise with the handed-over contexts, then decode the image."""
        h.check()
        req, out = h.request, h.output
        rng = torch.Generator()
        rng.set_state(h.rng_state)
        latent = yield from self._denoise(req, h.full, h.cfg_text, h.cfg_img, h.img_is_full, h.height, h.width, rng)
        if req.return_latents:
            out.latents = latent.cpu()
        t0 = self._now()
        out.images = [self._decode_image(latent, h.height, h.width)]
        out.timings["vae_decode"] = self._now() - t0
        return out

    def _decode(self, ctx: Context, req: Request, max_tokens: int, rng: torch.Generator, phase: str,
                on_token: TokenCallback | None):
        """The reference `generate_text`: feed `<|im_start|>`, then each predicted token, until
        `<|im_end|>` is predicted or max_tokens tokens (start token included) were fed."""
        ids = [self.tok.special.bos]
        while True:
            (logits,) = yield [Work(ctx, TextPiece(torch.tensor([ids[-1]])), commit=True, want_output=True, phase=phase)]
            nxt = choose_token(logits, do_sample=req.do_sample, temperature=req.text_temperature, top_k=req.top_k,
                               top_p=req.top_p, generator=rng)
            if nxt == self.tok.special.eos or len(ids) >= max_tokens:
                return ids
            ids.append(nxt)
            if on_token is not None:
                on_token(nxt)

    def _denoise(self, req: Request, full: Context, cfg_text: Context, cfg_img: Context, img_is_full: bool,
                 height: int, width: int, rng: torch.Generator):
        cfg, dev = self.cfg, self.model.device
        h, w = height // cfg.latent_downsample, width // cfg.latent_downsample
        n = h * w
        if req.noise is not None:  # its shape was checked by prepare
            x = req.noise.to(device=dev, dtype=torch.float32)
        else:
            x = torch.randn(n, cfg.patch_latent_dim, generator=rng).to(dev)
        pos = flattened_position_ids(h, w, cfg.max_latent_size)
        times, dts = flow_schedule(req.steps, req.timestep_shift)
        for t, dt in zip(times.tolist(), dts.to(dev)):
            guided = guidance_active(t, req.cfg_interval) and cfg_text is not None
            branches = [full]
            if guided:
                branches.append(cfg_text)
                if cfg_img is not None:
                    branches.append(cfg_img)
            works = [Work(c, LatentPiece(x, t, pos), commit=False, want_output=True, phase="denoise") for c in branches]
            vs = yield works
            if guided:
                v_i = vs[2] if len(vs) > 2 else vs[0]
                v = combine_cfg(vs[0], vs[1], v_i, req.cfg_text_scale, req.cfg_img_scale, req.cfg_renorm_type, req.cfg_renorm_min)
            else:
                v = vs[0]
            x = x - v * dt
        return x

    # ------------------------------------------------------------------ pieces
    def _empty(self) -> Context:
        return Context(self.pool)

    def _fork(self, ctx: Context) -> Context:
        """`ctx.fork()` that keeps ctx's text-only token history, so that the fork's text is cached too."""
        other = ctx.fork()
        history = self._text_history(ctx)
        if history is not None:
            self._text_ids[other] = history
        return other

    def _text_history(self, ctx: Context) -> tuple[int, ...] | None:
        """With prefix caching, the token ids of a context whose rows are text segments only (from RoPE
        position 0); None without prefix caching or when the context holds anything else."""
        if self.pool.prefix_cache is None:
            return None
        if ctx.length == 0 and ctx.rope == 0:
            return ()
        history = self._text_ids.get(ctx)
        return history if history is not None and len(history) == ctx.length == ctx.rope else None

    def _prefill_text(self, *segments: tuple[Context, str]) -> Generator[list[Work], list[torch.Tensor | None], None]:
        """Prefill one text segment into each context, as one unit of work.

        With prefix caching, a context that holds only text first adopts (when empty: `match_prefix`
        needs that) the cached blocks that start its token ids — rows computed from the same ids at the
        same positions — and only the rest is prefilled, as a chunked prefill would; a wholly cached
        segment asks for no forward. Its full blocks are then registered for later requests. No logits
        are needed: the decode feeds its start token itself.
        """
        works: list[Work] = []
        histories: list[tuple[Context, tuple[int, ...]]] = []
        for ctx, text in segments:
            ids = self.tok.segment(text)
            history = self._text_history(ctx)
            if history is not None:
                history += tuple(ids)
                histories.append((ctx, history))
                if ctx.length == 0:
                    ids = ids[ctx.match_prefix(history):]
            if ids:
                works.append(Work(ctx, TextPiece(torch.tensor(ids))))
        if works:
            yield works
        for ctx, history in histories:
            ctx.register_prefix(history)
            self._text_ids[ctx] = history

    def _vit_work(self, ctx: Context, image: Image.Image) -> Work:
        vit_img = resize(image, self.cfg.vit_transform)
        patch = self.cfg.vit.patch_size
        patches = patchify(to_tensor(vit_img), patch)
        pos = flattened_position_ids(vit_img.height // patch, vit_img.width // patch, self.cfg.vit_max_num_patch_per_side)
        return Work(ctx, VitPiece(patches, pos))

    def _latent_work(self, ctx: Context, latent_tokens: torch.Tensor, t: float, height: int, width: int) -> Work:
        d = self.cfg.latent_downsample
        pos = flattened_position_ids(height // d, width // d, self.cfg.max_latent_size)
        return Work(ctx, LatentPiece(latent_tokens, t, pos))

    def _encode_image(self, image: Image.Image, rng: torch.Generator) -> torch.Tensor:
        x = to_tensor(image)[None].to(self.model.device, torch.float32)
        with _float32_convs():
            z = self.vae.encode(x, generator=rng, sample=True)[0]
        return pack_latent(z, self.cfg.latent_patch_size)

    def _decode_image(self, latent: torch.Tensor, height: int, width: int) -> Image.Image:
        cfg = self.cfg
        d = cfg.latent_downsample
        z = unpack_latent(latent.float(), height // d, width // d, cfg.latent_channels, cfg.latent_patch_size)
        with _float32_convs():
            pixels = decoded_to_uint8(self.vae.decode(z[None].to(self.vae.encoder.conv_in.weight.dtype)))[0]
        return Image.fromarray(pixels.cpu().numpy(), mode="RGB")

    def estimate_blocks(self, req: Request, prep: "_Prepared") -> int:
        """An upper bound on the KV pool blocks a request's contexts can hold at once (for admission).

        Counts every row the request may commit — system prompt, image blocks, prompt, negative prompt,
        the decoded tokens and the re-tokenized plan — as if each of its (at most three) contexts held all of
        them, plus one partial block per context.
        """
        cfg, tok = self.cfg, self.tok
        rows = len(tok.segment(req.prompt)) + (len(tok.segment(req.negative_prompt)) if req.negative_prompt else 0)
        if req.think:
            rows += len(tok.segment(GEN_THINK_SYSTEM_PROMPT if req.outputs_image else VLM_THINK_SYSTEM_PROMPT))
        if prep.image is not None:
            p = cfg.vit.patch_size
            vit = resize(prep.image, cfg.vit_transform)
            rows += (vit.height // p) * (vit.width // p) + 2
            if req.outputs_image:
                d = cfg.latent_downsample
                rows += (prep.image.height // d) * (prep.image.width // d) + 2
        if not req.outputs_image:
            return -(-(rows + req.max_tokens) // self.pool.block_size) + 1
        if req.think:
            rows += 2 * req.max_think_tokens + 2  # decoded tokens, then the plan as a text segment
        return 3 * (-(-rows // self.pool.block_size) + 1)

    def prepare(self, index: int, req: Request) -> "_Prepared":
        """Load the input image and settle the output size, checking both (and any given noise) before
        any request of the batch starts, so that a bad request costs no work."""
        image = None
        if req.needs_image:
            try:
                image = resize(load_image(req.image, what=f"request {index}: image"), self.cfg.vae_transform)
            except ImageInputError as e:
                raise RequestError(str(e)) from None
        if not req.outputs_image:
            return _Prepared(image, 0, 0)
        max_side = self.cfg.max_image_side
        if image is not None and max(image.size) > max_side:
            raise RequestError(f"request {index}: image resizes to {image.width}x{image.height}, above this model's "
                               f"{max_side} px maximum")
        # text2img defaults to 1024 (capped at the model's maximum); img2img keeps the resized input's size.
        default_h, default_w = (image.height, image.width) if image is not None else (min(1024, max_side),) * 2
        height, width = req.height or default_h, req.width or default_w
        for name, v in (("height", height), ("width", width)):
            if v > max_side:
                raise RequestError(f"request {index}: {name} {v} is above this model's maximum of {max_side} px",
                                   field=name, reason=f"{v} is above this model's maximum of {max_side} px")
        if req.noise is not None:
            d = self.cfg.latent_downsample
            want = ((height // d) * (width // d), self.cfg.patch_latent_dim)
            if tuple(req.noise.shape) != want:
                raise RequestError(f"request {index}: noise must have shape {want} for height {height}, width {width}, "
                                   f"got {tuple(req.noise.shape)}")
        return _Prepared(image, height, width)


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
    """Blocks of stage 0's KV pool reserved for this request (admission ledger) until its contexts go."""

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


@dataclass
class _Prepared:
    image: Image.Image | None
    height: int
    width: int


def _float32_convs():
    """cuDNN convolutions without TF32: the reference decodes in full float32 and TF32 moves pixels."""
    b = torch.backends.cudnn
    return b.flags(enabled=b.enabled, benchmark=b.benchmark, deterministic=b.deterministic, allow_tf32=False)


def _think_part(text: str) -> str | None:
    start, end = text.find("<think>"), text.find("</think>")
    if start < 0:
        return None
    return text[start + len("<think>") : end if end > start else len(text)].strip()
