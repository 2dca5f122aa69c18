"""Turning a validated request into what its programs need, before any work: its input list prepared (each
image loaded and resized, each text tokenized), the output size — and the checks that need them (image and
output sizes, prompt + output against the model's context), so that a bad request costs no forward. Also the
upper bound of KV blocks a request can hold, which admission reserves."""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from bagel_serve.config.model_config import BagelConfig
from bagel_serve.engine.request import Request, RequestError
from bagel_serve.engine.tokenizer import GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT, BagelTokenizer
from bagel_serve.imaging import ImageInputError, load_image, resize, resize_size, to_tensor
from bagel_serve.model.layout import LatentPiece, VitPiece, flattened_position_ids, latent_grid, patchify


Item = list[int] | Image.Image
"""A prepared input item: a text segment's token ids (`<|im_start|> … <|im_end|>`), or an image loaded and
resized by the VAE transform (what both its VAE and its ViT block are made from, as in the reference)."""


@dataclass
class Prepared:
    items: list[Item]
    """The request's input list (`Request.items`), prepared, in order."""
    height: int = 0
    width: int = 0
    """The output image's size (image outputs)."""
    negative_ids: list[int] | None = None

    @property
    def images(self) -> list[Image.Image]:
        return [x for x in self.items if isinstance(x, Image.Image)]

    @property
    def text_ids(self) -> list[int]:
        """Every text segment's ids, in order (the tokens a repetition penalty counts as seen)."""
        return [t for x in self.items if not isinstance(x, Image.Image) for t in x]


def think_prompt(req: Request) -> str:
    return GEN_THINK_SYSTEM_PROMPT if req.outputs_image else VLM_THINK_SYSTEM_PROMPT


def prepare(index: int, req: Request, cfg: BagelConfig, tok: BagelTokenizer, max_model_len: int) -> Prepared:
    """Load and resize the input images, tokenize the texts, settle the output size, checking everything
    that can fail."""
    items: list[Item] = []
    for k, x in enumerate(req.items):
        if isinstance(x, str):
            items.append(tok.segment(x))
            continue
        what = f"request {index}: " + (f"inputs[{k}]" if req.inputs is not None else "image")
        try:
            items.append(resize(load_image(x, what=what), cfg.vae_transform))
        except ImageInputError as e:
            raise RequestError(str(e)) from None
    prep = Prepared(items, negative_ids=tok.segment(req.negative_prompt) if req.negative_prompt else None)
    if req.outputs_image:
        prep.height, prep.width = _output_size(index, req, cfg, prep.images)
    _check_length(index, req, prep, cfg, tok, max_model_len)
    return prep


DEFAULT_IMAGE_SIDE = 1024
"""The side of a text2img output whose size is not given (as the official app's), capped at the model's
maximum."""


def default_text2img_size(cfg: BagelConfig) -> tuple[int, int]:
    """(height, width) of a text2img output whose size is not given (the server reports it to clients)."""
    side = min(DEFAULT_IMAGE_SIDE, cfg.max_image_side)
    return side, side


def _output_size(index: int, req: Request, cfg: BagelConfig, images: list[Image.Image]) -> tuple[int, int]:
    max_side = cfg.max_image_side
    for k, image in enumerate(images):  # each is VAE-encoded: its latent grid must fit the position table
        if max(image.size) > max_side:
            which = f"image {k} of inputs" if req.inputs is not None else "image"
            raise RequestError(f"request {index}: {which} resizes to {image.width}x{image.height}, above this "
                               f"model's {max_side} px maximum")
    # img2img keeps the last resized input's size, as the reference's `image_shapes` does.
    default_h, default_w = (images[-1].height, images[-1].width) if images else default_text2img_size(cfg)
    height, width = req.height or default_h, req.width or default_w
    for name, v in (("height", height), ("width", width)):
        if v > max_side:
            raise RequestError(f"request {index}: {name} {v} is above this model's maximum of {max_side} px",
                               field=name, reason=f"{v} is above this model's maximum of {max_side} px")
    if req.noise is not None:
        h, w = latent_grid(height, width, cfg.latent_downsample)
        want = (h * w, cfg.patch_latent_dim)
        if tuple(req.noise.shape) != want:
            raise RequestError(f"request {index}: noise must have shape {want} for height {height}, width {width}, "
                               f"got {tuple(req.noise.shape)}")
    return height, width


def _image_rows(req: Request, image: Image.Image, cfg: BagelConfig) -> int:
    """Rows an input image adds to a context: its ViT block, and for image outputs its VAE block too."""
    p = cfg.vit.patch_size
    w, h = resize_size(image.width, image.height, cfg.vit_transform)
    rows = (h // p) * (w // p) + 2
    if req.outputs_image:
        gh, gw = latent_grid(image.height, image.width, cfg.latent_downsample)
        rows += gh * gw + 2
    return rows


def context_rows(req: Request, prep: Prepared, cfg: BagelConfig, tok: BagelTokenizer) -> tuple[int, int]:
    """(rows of the longest context before decoding, most rows decoding can add to it)."""
    rows = sum(_image_rows(req, x, cfg) if isinstance(x, Image.Image) else len(x) for x in prep.items)
    if req.think:
        rows += len(tok.segment(think_prompt(req)))
    if not req.outputs_image:
        return rows, req.max_tokens
    grown = 0
    if req.think:
        grown += req.max_think_tokens + 2  # the plan, re-tokenized, as a text segment
    gh, gw = latent_grid(prep.height, prep.width, cfg.latent_downsample)
    return rows, grown + gh * gw + 2  # denoising attends over the context plus the latent block


def _check_length(index: int, req: Request, prep: Prepared, cfg: BagelConfig, tok: BagelTokenizer,
                  max_model_len: int) -> None:
    prompt, more = context_rows(req, prep, cfg, tok)
    if prompt > max_model_len:
        what, verb = ("inputs", "take") if req.inputs is not None else ("prompt", "takes")
        raise RequestError(f"request {index}: the {what} {verb} {prompt} positions, more than the model's context "
                           f"of {max_model_len} (max_model_len)", field=what,
                           reason=f"{verb} {prompt} positions, more than the model's context of {max_model_len}")
    if prompt + more > max_model_len:
        name = "max_tokens" if not req.outputs_image else ("max_think_tokens" if req.think else "height")
        what = {"max_tokens": f"max_tokens {req.max_tokens}", "max_think_tokens": f"max_think_tokens {req.max_think_tokens}",
                "height": f"a {prep.width}x{prep.height} image"}[name]
        raise RequestError(f"request {index}: the prompt ({prompt} positions) and {what} need {prompt + more} "
                           f"positions, more than the model's context of {max_model_len} (max_model_len)",
                           field=name, reason=f"needs {prompt + more} positions with the prompt, more than the "
                                              f"model's context of {max_model_len}")


def estimate_blocks(req: Request, prep: Prepared, cfg: BagelConfig, tok: BagelTokenizer, block_size: int) -> int:
    """An upper bound on the KV blocks a request's contexts can hold at once (for admission): every row it may
    commit as if each of its contexts (at most three) held them all, plus a partial block per context."""
    rows, more = context_rows(req, prep, cfg, tok)
    if prep.negative_ids:
        rows += len(prep.negative_ids)
    if not req.outputs_image:
        return -(-(rows + more) // block_size) + 1
    if req.think:
        rows += 2 * req.max_think_tokens + 2  # decoded tokens, then the plan as a text segment
    return 3 * (-(-rows // block_size) + 1)


def vit_piece(image: Image.Image, cfg: BagelConfig) -> VitPiece:
    """The ViT block of an (already VAE-resized) image: resized again for the ViT, patchified."""
    vit_img = resize(image, cfg.vit_transform)
    patch = cfg.vit.patch_size
    patches = patchify(to_tensor(vit_img), patch)
    pos = flattened_position_ids(vit_img.height // patch, vit_img.width // patch, cfg.vit_max_num_patch_per_side)
    return VitPiece(patches, pos)


def latent_piece(latent_tokens, t: float, height: int, width: int, cfg: BagelConfig) -> LatentPiece:
    """A VAE block of packed latent tokens for an image of that size, at flow time t."""
    h, w = latent_grid(height, width, cfg.latent_downsample)
    return LatentPiece(latent_tokens, t, flattened_position_ids(h, w, cfg.max_latent_size))
