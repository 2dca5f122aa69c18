"""BAGEL's token layout: what rows a piece of context becomes, which expert runs them, their RoPE positions.

The rules, all from the reference procedure:
- a text segment is `<|im_start|> tokens <|im_end|>` (the tokenizer builds it); its rows are causal, run by
  the understanding expert, at consecutive RoPE positions;
- an image block is its patches (ViT tokens) or latents (VAE tokens) plus two boundary tokens
  (`<|vision_start|>`, `<|vision_end|>`); every row of the block shares one RoPE position and the context's
  position advances by one for the whole block; the block attends fully (not causally);
- boundary tokens and ViT tokens are understanding rows, VAE latent tokens are generation rows;
- in the cache a block's rows are the two boundary rows, then its patches or latents (attention over a
  block is order-free, so this order only has to be the same everywhere).
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
