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
from dataclasses import dataclass
from typing import Generator

import torch
from PIL import Image

from bagel_serve.config.model_config import BagelConfig
from bagel_serve.engine.batch import LatentPiece, Packer, Piece, SeqSpec, TextPiece, VitPiece
from bagel_serve.engine.diffusion import combine_cfg, flow_schedule, guidance_active
from bagel_serve.engine.kv_cache import Context
from bagel_serve.engine.request import Request, RequestError, RequestOutput
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


Program = Generator[list[Work], list[torch.Tensor | None], RequestOutput]


class Runner:
    def __init__(self, model: Bagel, vae: AutoEncoder, tokenizer: BagelTokenizer) -> None:
        self.model = model
        self.vae = vae
        self.tok = tokenizer
        self.cfg: BagelConfig = model.config
        self.packer = Packer(model, tokenizer.special)
        self.vocab_limit = model.config.llm.vocab_size

    # ------------------------------------------------------------------ scheduling
    @torch.inference_mode()
    def generate(self, requests: list[Request], progress: bool = False) -> list[RequestOutput]:
        programs: dict[int, Program] = {}
        pending: dict[int, list[Work]] = {}
        outputs: dict[int, RequestOutput] = {}
        for i, req in enumerate(requests):
            prog = self._program(i, req)
            programs[i] = prog
            self._advance(i, prog, None, pending, outputs)
        while pending:
            order = list(pending)
            works = [w for i in order for w in pending[i]]
            results = self._forward(works)
            pos = 0
            for i in order:
                n = len(pending[i])
                mine, pos = results[pos : pos + n], pos + n
                self._advance(i, programs[i], mine, pending, outputs)
        return [outputs[i] for i in range(len(requests))]

    @staticmethod
    def _advance(i: int, prog: Program, sent, pending: dict, outputs: dict) -> None:
        try:
            pending[i] = prog.send(sent) if sent is not None else next(prog)
        except StopIteration as stop:
            pending.pop(i, None)
            outputs[i] = stop.value

    def _forward(self, works: list[Work]) -> list[torch.Tensor | None]:
        specs = [SeqSpec(w.context, w.piece, w.commit) for w in works]
        hidden, _, seqs = self.packer.run(specs)
        results: list[torch.Tensor | None] = []
        for w, s in zip(works, seqs):
            if not w.want_output:
                results.append(None)
            elif isinstance(w.piece, LatentPiece):
                a, n = s.segments[1]
                results.append(self.model.velocity(hidden[a : a + n]).float())
            else:
                a, n = s.segments[0]
                results.append(self.model.lm_logits(hidden[a + n - 1 : a + n]).float()[0])
        return results

    # ------------------------------------------------------------------ request programs
    def _program(self, index: int, req: Request) -> Program:
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        rng = torch.Generator().manual_seed(seed)
        sample_rng = torch.Generator().manual_seed(seed + 1)
        out = RequestOutput(request_index=index, modality=req.modality, seed=seed)
        image = self._input_image(req, index) if req.needs_image else None
        if not req.outputs_image:
            ctx = self._empty()
            if req.think:
                yield [self._text_work(ctx, VLM_THINK_SYSTEM_PROMPT)]
            if image is not None:
                yield [self._vit_work(ctx, image)]
            yield [self._text_work(ctx, req.prompt)]
            ids = yield from self._decode(ctx, req.max_tokens, req.do_sample, req.text_temperature, sample_rng)
            out.token_ids = ids
            out.text = self.tok.decode_generation(ids)
            if req.think:
                out.think_text = _think_part(out.text)
            return out

        base = self._empty()
        if req.think:
            yield [self._text_work(base, GEN_THINK_SYSTEM_PROMPT)]
        if image is None:
            full, cfg_text = base.fork(), base.fork()
            height, width = self._output_size(req, index)
            yield [self._text_work(full, req.prompt)]
            cfg_img = full.fork()
        else:
            full = base.fork()
            # The output keeps the VAE-resized input size unless the request asks for another.
            width, height = req.width or image.width, req.height or image.height
            yield [self._latent_work(full, self._encode_image(image, rng), 0.0, image.height, image.width)]
            yield [self._vit_work(full, image)]
            cfg_text, cfg_img = full.fork(), base.fork()
            yield [self._text_work(full, req.prompt), self._text_work(cfg_img, req.prompt)]
        if req.negative_prompt:
            yield [self._text_work(cfg_text, req.negative_prompt)]
        if req.think:
            decode_ctx = full.fork()
            ids = yield from self._decode(decode_ctx, req.max_think_tokens, req.do_sample, req.text_temperature, sample_rng)
            out.token_ids = ids
            out.think_text = self.tok.decode_generation(ids)
            same_as_full = False
            yield [self._text_work(full, out.think_text)]
        else:
            same_as_full = True  # text2img without think: the image-dropped context *is* the full one
        same_as_full = same_as_full and image is None
        latent = yield from self._denoise(req, full, cfg_text, cfg_img, same_as_full, height, width, rng)
        if req.return_latents:
            out.latents = latent.cpu()
        out.images = [self._decode_image(latent, height, width)]
        return out

    def _decode(self, ctx: Context, max_tokens: int, do_sample: bool, temperature: float, rng: torch.Generator):
        """The reference `generate_text`: feed `<|im_start|>`, then each predicted token, until
        `<|im_end|>` is predicted or max_tokens tokens (start token included) were fed."""
        ids = [self.tok.special.bos]
        while True:
            (logits,) = yield [Work(ctx, TextPiece(torch.tensor([ids[-1]])), commit=True, want_output=True)]
            if do_sample:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                nxt = int(torch.multinomial(probs, 1, generator=rng))
            else:
                nxt = int(torch.argmax(logits))
            if nxt == self.tok.special.eos or len(ids) >= max_tokens:
                return ids
            ids.append(nxt)

    def _denoise(self, req: Request, full: Context, cfg_text: Context, cfg_img: Context, img_is_full: bool,
                 height: int, width: int, rng: torch.Generator):
        cfg, dev = self.cfg, self.model.device
        h, w = height // cfg.latent_downsample, width // cfg.latent_downsample
        n = h * w
        if req.noise is not None:
            if tuple(req.noise.shape) != (n, cfg.patch_latent_dim):
                raise RequestError(f"noise must have shape ({n}, {cfg.patch_latent_dim}) for {height}x{width}, got {tuple(req.noise.shape)}")
            x = req.noise.to(device=dev, dtype=torch.float32)
        else:
            x = torch.randn(n, cfg.patch_latent_dim, generator=rng).to(dev)
        pos = flattened_position_ids(h, w, cfg.max_latent_size)
        times, dts = flow_schedule(req.steps, req.timestep_shift)
        for t, dt in zip(times.tolist(), dts.to(dev)):
            guided = guidance_active(t, req.cfg_interval) and req.cfg_text_scale > 1.0
            branches = [full]
            if guided:
                branches.append(cfg_text)
                if req.cfg_img_scale > 1.0 and not img_is_full:
                    branches.append(cfg_img)
            works = [Work(c, LatentPiece(x, t, pos), commit=False, want_output=True) for c in branches]
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
        return Context(self.cfg.llm.num_hidden_layers)

    def _text_work(self, ctx: Context, text: str) -> Work:
        return Work(ctx, TextPiece(torch.tensor(self.tok.segment(text))))

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

    def _input_image(self, req: Request, index: int) -> Image.Image:
        try:
            img = load_image(req.image, what=f"request {index} image")
        except ImageInputError as e:
            raise RequestError(f"request {index}: image: {e}") from None
        resized = resize(img, self.cfg.vae_transform)
        max_side = self.cfg.max_image_side
        if req.modality == "img2img" and max(resized.size) > max_side:
            raise RequestError(f"request {index}: image resizes to {resized.size[0]}x{resized.size[1]}, above this model's {max_side} px maximum")
        return resized

    def _output_size(self, req: Request, index: int) -> tuple[int, int]:
        max_side = self.cfg.max_image_side
        height = req.height if req.height is not None else min(1024, max_side)
        width = req.width if req.width is not None else min(1024, max_side)
        for name, v in (("height", height), ("width", width)):
            if v > max_side:
                raise RequestError(f"request {index}: {name} {v} is above this model's maximum of {max_side} px")
        return height, width


def _float32_convs():
    """cuDNN convolutions without TF32: the reference decodes in full float32 and TF32 moves pixels."""
    b = torch.backends.cudnn
    return b.flags(enabled=b.enabled, benchmark=b.benchmark, deterministic=b.deterministic, allow_tf32=False)


def _think_part(text: str) -> str | None:
    start, end = text.find("<think>"), text.find("</think>")
    if start < 0:
        return None
    return text[start + len("<think>") : end if end > start else len(text)].strip()
