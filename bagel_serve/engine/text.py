"""The context half of a request (stage 0, the Thinker): building every context the reference builds, and
decoding text — the answer of text modalities, the think plan of image ones.

Written as the reference procedure reads (`InterleaveInferencer`): a program yields the works it needs
and receives their results, and batching across requests and CFG branches falls out of the packing.

Decoding follows the reference's `generate_text`: feed `<|im_start|>`, then each predicted token, until
`<|im_end|>` is predicted — except that `max_tokens` counts generated tokens (the OpenAI convention:
`max_tokens=1` gives one token) while the reference's `max_think_token_n` counts the start token too, so
its n is our n - 1 — and the token predicted at the limit is kept rather than dropped, without the forward
the reference spends on it.
"""

from __future__ import annotations

import random
import weakref
from typing import Callable, Generator

import torch
from PIL import Image

from bagel_serve.config.model_config import BagelConfig
from bagel_serve.engine.diffusion import Handoff, VaeMode, encode_image
from bagel_serve.engine.kv_cache import Context, KVCache
from bagel_serve.engine.preprocess import Prepared, latent_piece, think_prompt, vit_piece
from bagel_serve.engine.request import Request, RequestOutput
from bagel_serve.engine.sampling import Sampler
from bagel_serve.engine.sequence import DECODE_STEPS, Work
from bagel_serve.engine.tokenizer import BagelTokenizer
from bagel_serve.model.autoencoder import AutoEncoder
from bagel_serve.model.layout import TextPiece

TokenCallback = Callable[[int], None]


class TextPrograms:
    """Stage 0's programs over one KV cache. With prefix caching (the deploy config's
    `enable_prefix_caching`), text prompts that start like earlier ones — the think system prompts above all —
    adopt the blocks already computed for them instead of being prefilled again."""

    def __init__(self, cfg: BagelConfig, tok: BagelTokenizer, cache: KVCache, vae: AutoEncoder,
                 clock: Callable[[], float], vae_mode: VaeMode = VaeMode()) -> None:
        self.cfg = cfg
        self.vae_mode = vae_mode
        self.tok = tok
        self.cache = cache
        self.vae = vae
        self.now = clock
        # With prefix caching: the token ids of every context whose rows are text segments only, from RoPE
        # position 0 (its rows are a function of these ids alone, and may be shared). A context whose length
        # no longer equals its entry got something else (an image, decoded tokens) and is not shared.
        self._text_ids: weakref.WeakKeyDictionary[Context, tuple[int, ...]] = weakref.WeakKeyDictionary()

    def context_program(self, index: int, req: Request, prep: Prepared, on_token: TokenCallback | None = None):
        """Text requests end with their output; image requests with a `Handoff` carrying the full and CFG
        contexts, which the image program (stage 1, the DiT) denoises and decodes."""
        seed = req.seed if req.seed is not None else random.randrange(2**31)
        rng = torch.Generator().manual_seed(seed)
        out = RequestOutput(request_index=index, modality=req.modality, seed=seed)
        think_ids = self.tok.segment(think_prompt(req)) if req.think else None
        full = self.empty()
        if think_ids:
            yield from self._prefill((full, think_ids))
        if not req.outputs_image:
            for item in prep.items:  # understanding: images as ViT blocks only; no CFG contexts
                if isinstance(item, Image.Image):
                    yield [Work(full, vit_piece(item, self.cfg))]
                else:
                    yield from self._prefill((full, item))
            ids = yield from self._decode(full, req, req.max_tokens, self._sampler(req, seed, think_ids, prep),
                                          "decode", on_token)
            out.token_ids = ids
            out.text = self.tok.decode_generation(ids)
            if req.think:
                out.think_text = _think_part(out.text)
            return out

        guided = req.cfg_text_scale > 1.0
        # Without images or think the image-dropped context *is* the full one: never compute it twice.
        img_is_full = not prep.images and not req.think
        want_img = guided and req.cfg_img_scale > 1.0 and not img_is_full
        cfg_text, cfg_img = yield from self._cfg_contexts(full, prep, rng, out, want_img)
        if prep.negative_ids:
            yield from self._prefill((cfg_text, prep.negative_ids))
        if req.think:
            ids = yield from self._decode(full.fork(), req, req.max_think_tokens,
                                          self._sampler(req, seed, think_ids, prep), "think_decode", on_token)
            out.token_ids = ids
            out.think_text = self.tok.decode_generation(ids)
            yield from self._prefill((full, self.tok.segment(out.think_text)))
        if not guided:
            cfg_text.release()
            cfg_text = None
        return Handoff(
            request=req, output=out, height=prep.height, width=prep.width, rng_state=rng.get_state(), full=full,
            cfg_text=cfg_text, cfg_img=cfg_img, img_is_full=img_is_full,
        )

    def _cfg_contexts(self, full: Context, prep: Prepared, rng: torch.Generator, out: RequestOutput,
                      want_img: bool):
        """Lay the input list into `full` and build the CFG contexts beside it, as the reference's
        `interleave_inference` does: every text and image goes into the full context; the text-dropped context
        is the full one as it was before the latest text (or after the latest image) — a fork sharing its
        blocks —; the image-dropped context (only when `want_img`: its guidance is on) receives the texts only.
        Until the first image the image-dropped context equals the full one, so it is forked from it only then
        (or at the end), never prefilled twice. Images are VAE-encoded in order (each draws its posterior
        sample from `rng`, as the reference does). Returns (text-dropped, image-dropped or None)."""
        cfg_text: Context | None = None
        cfg_img: Context | None = None
        for item in prep.items:
            if cfg_text is not None:
                cfg_text.release()
            if not isinstance(item, Image.Image):
                cfg_text = self._fork(full)
                yield from self._prefill((full, item), *([(cfg_img, item)] if cfg_img is not None else []))
                continue
            if cfg_img is None and want_img:
                cfg_img = self._fork(full)
            t0 = self.now()
            encoded = encode_image(self.vae, item, rng, self.cfg, self.vae_mode)
            out.timings["vae_encode"] = out.timings.get("vae_encode", 0.0) + self.now() - t0
            yield [Work(full, latent_piece(encoded, 0.0, item.height, item.width, self.cfg))]
            yield [Work(full, vit_piece(item, self.cfg))]
            cfg_text = full.fork()
        if cfg_img is None and want_img:
            cfg_img = full.fork()
        return cfg_text, cfg_img

    def empty(self) -> Context:
        return Context(self.cache)

    def _sampler(self, req: Request, seed: int, think_ids: list[int] | None, prep: Prepared) -> Sampler:
        penalty = req.repetition_penalty
        prompt = [*(think_ids or []), *prep.text_ids] if penalty != 1.0 else ()
        # Its own generator (seed + 1), so that sampling the plan never shifts the image noise.
        return Sampler(do_sample=req.do_sample, temperature=req.text_temperature, top_k=req.top_k, top_p=req.top_p,
                       seed=seed + 1, device=self.cache.device, repetition_penalty=penalty, prompt_ids=prompt)

    def _decode(self, ctx: Context, req: Request, max_tokens: int, sampler: Sampler, phase: str,
                on_token: TokenCallback | None):
        """Feed `<|im_start|>`, then each predicted token, until `<|im_end|>` is predicted or max_tokens
        tokens were generated; returns the generated tokens.

        After the first token (which comes alone, as soon as possible) each work of a sampler that can burst
        lets the runner take up to DECODE_STEPS steps on the device before the host looks (it returns the
        tokens it made); tokens past an end token only ever reach this decode context, which nothing else
        reads. Other samplers ask for one step at a time: a step reserves rows for every step it asks for."""
        ids: list[int] = []
        fed = self.tok.special.bos
        while True:
            steps = min(DECODE_STEPS, max_tokens - len(ids)) if ids and sampler.can_burst else 1
            (toks,) = yield [Work(ctx, TextPiece(torch.tensor([fed])), want_output=True, phase=phase,
                                  sampler=sampler, steps=steps)]
            for nxt in toks:
                if nxt == self.tok.special.eos:
                    return ids
                ids.append(nxt)
                if on_token is not None:
                    on_token(nxt)
                if len(ids) >= max_tokens:
                    return ids
            fed = toks[-1]

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
        if self.cache.manager.prefix_cache is None:
            return None
        if ctx.length == 0 and ctx.rope == 0:
            return ()
        history = self._text_ids.get(ctx)
        return history if history is not None and len(history) == ctx.length == ctx.rope else None

    def _prefill(self, *segments: tuple[Context, list[int]]) -> Generator[list[Work], list, None]:
        """Prefill one text segment (token ids) into each context, as one unit of work.

        With prefix caching, a context that holds only text first adopts (when empty: `match_prefix` needs
        that) the cached blocks that start its token ids — rows computed from the same ids at the same
        positions — and only the rest is prefilled, as a chunked prefill would; a wholly cached segment asks
        for no forward. Its full blocks are then registered for later requests. No logits are needed: the
        decode feeds its start token itself."""
        works: list[Work] = []
        histories: list[tuple[Context, tuple[int, ...]]] = []
        for ctx, ids in segments:
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


def tokens_made(tokens: list[int], eos: int) -> int:
    """How many of a decode work's tokens the request generated: up to and including the first end token
    (a burst runs all its steps on the device; `_decode` throws away what came after the end)."""
    return tokens.index(eos) + 1 if eos in tokens else len(tokens)


def _think_part(text: str) -> str | None:
    start, end = text.find("<think>"), text.find("</think>")
    if start < 0:
        return None
    return text[start + len("<think>") : end if end > start else len(text)].strip()
