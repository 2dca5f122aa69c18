"""BAGEL's token layout: what rows a piece of context becomes, which expert runs them, their RoPE positions.

The rules, all from the reference procedure:
- a text segment is `<|im_start|> tokens <|im_end|>` (the tokenizer builds it); its rows are causal, run by
  the understanding expert, at consecutive RoPE positions;
- an image block is its patches (ViT tokens) or latents (VAE tokens) plus two boundary tokens
  (`<|vision_start|>`, `<|vision_end|>`); every row of the block shares one RoPE position and the context's
  position advances by one for the whole block; the block attends fully (not causally);
- boundary tokens and ViT tokens are understanding rows, VAE latent tokens are generation rows;
- in the cache a block's rows are the two boundary rows, then its patches or latents (attention over a
  block is order-free, so this order only has to be the same everywhere);
- ViT patches and VAE latents become tokens in fixed row-major orderings the model was trained with
  (`patchify`, `pack_latent`), and index 2-D position tables row-major (`flattened_position_ids`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextPiece:
    """Text tokens (causal), e.g. `<|im_start|> … <|im_end|>` or one decode token."""

    ids: torch.Tensor


@dataclass
class VitPiece:
    """A ViT image block: patches of one image (`patchify` order) with their position-table ids."""

    patches: torch.Tensor
    position_ids: torch.Tensor


@dataclass
class LatentPiece:
    """A VAE latent block (a clean conditioning image at t=0, or the image being denoised at flow time t)."""

    latents: torch.Tensor
    t: float
    position_ids: torch.Tensor


Piece = TextPiece | VitPiece | LatentPiece


def und_rows(piece: Piece) -> int:
    """Rows the understanding expert runs (text; ViT patches and boundary tokens; a latent block's boundary
    tokens)."""
    if isinstance(piece, TextPiece):
        return piece.ids.shape[0]
    if isinstance(piece, VitPiece):
        return piece.patches.shape[0] + 2
    return 2


def gen_rows(piece: Piece) -> int:
    """Rows the generation expert runs (latent tokens)."""
    return piece.latents.shape[0] if isinstance(piece, LatentPiece) else 0


def piece_rows(piece: Piece) -> int:
    return und_rows(piece) + gen_rows(piece)


def is_causal(piece: Piece) -> bool:
    return isinstance(piece, TextPiece)


def rope_advance(piece: Piece) -> int:
    """How far the context's next RoPE position moves once the piece is in it."""
    return piece.ids.shape[0] if isinstance(piece, TextPiece) else 1


def piece_positions(piece: Piece, rope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE positions of a piece's (understanding rows, generation rows) in a context at position `rope`."""
    if isinstance(piece, TextPiece):
        return torch.arange(rope, rope + piece.ids.shape[0]), torch.empty(0, dtype=torch.long)
    return torch.full((und_rows(piece),), rope), torch.full((gen_rows(piece),), rope)


def latent_grid(height: int, width: int, downsample: int) -> tuple[int, int]:
    """(rows, columns) of latent tokens of an image of that size (`downsample` pixels per token side)."""
    return height // downsample, width // downsample


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """(C, H, W) -> (nh*nw, patch*patch*C): patches row-major, each flattened in (py, px, c) order,
    the order the ViT's linear patch embedding was converted for."""
    c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    nh, nw = h // patch, w // patch
    x = x.reshape(c, nh, patch, nw, patch).permute(1, 3, 2, 4, 0)
    return x.reshape(nh * nw, patch * patch * c)


def flattened_position_ids(nh: int, nw: int, max_per_side: int) -> torch.Tensor:
    """Row-major ids r*max_per_side + c into a (max_per_side x max_per_side) position table.

    Grids larger than the table are rejected: their ids would silently alias other positions.
    """
    if nh <= 0 or nw <= 0:
        raise ValueError(f"patch grid must be non-empty, got {nh}x{nw}")
    if nh > max_per_side or nw > max_per_side:
        raise ValueError(f"patch grid {nh}x{nw} exceeds the position table side {max_per_side}")
    rows = torch.arange(nh, dtype=torch.long)
    cols = torch.arange(nw, dtype=torch.long)
    return (rows[:, None] * max_per_side + cols[None, :]).flatten()


def pack_latent(latent: torch.Tensor, p: int) -> torch.Tensor:
    """(z, p*h, p*w) latent -> (h*w, p*p*z) tokens; within a token the index is (py*p + px)*z + ch."""
    z, hh, ww = latent.shape
    if hh % p or ww % p:
        raise ValueError(f"latent size {hh}x{ww} is not a multiple of the latent patch size {p}")
    h, w = hh // p, ww // p
    x = latent.reshape(z, h, p, w, p).permute(1, 3, 2, 4, 0)
    return x.reshape(h * w, p * p * z)


def unpack_latent(tokens: torch.Tensor, h: int, w: int, z_channels: int, p: int) -> torch.Tensor:
    """Exact inverse of `pack_latent`: (h*w, p*p*z) -> (z, p*h, p*w)."""
    if tuple(tokens.shape) != (h * w, p * p * z_channels):
        raise ValueError(
            f"expected latent tokens of shape ({h * w}, {p * p * z_channels}) for a {h}x{w} grid, "
            f"got {tuple(tokens.shape)}"
        )
    x = tokens.reshape(h, w, p, p, z_channels).permute(4, 0, 2, 1, 3)
    return x.reshape(z_channels, h * p, w * p)
