"""VAE tiling and VAE patch parallelism: the FLUX autoencoder run over overlapping tiles, optionally spread
over the ranks of a process group.

Why: the decoder's activations grow with the image (128 channels at full resolution), so a 2048² decode
holds several GiB at once; tiles bound that to one tile's worth, and spreading tiles over ranks cuts the
time by about the number of ranks.

Conventions (vllm-omni's, §5.8 of the spec notes): decode takes latent tiles of 64 with stride 56, encode
takes pixel tiles of 512 with stride 448; either way neighbouring tiles overlap by 64 pixels (8 latent
rows), and the overlap is blended with linear ramps, vertically and horizontally. Tile starts are
multiples of the stride; the last tile of a row or column is cut at the image edge, and a tile is only
made when its predecessor stops short of the edge. Each output position is the weighted mean of the tiles
covering it, a tile's weight being (ramp up from its first edge) x (ramp down to its last edge) per axis,
ramps only towards a neighbour: where two tiles overlap their weights sum to one.

What tiling changes: a tile sees only its own neighbourhood, so its group-norm statistics and the
mid-block attention are the tile's rather than the image's; the result is an approximation of the untiled
one (see tests/test_vae_tiling.py for how close). An input that fits one tile runs untiled, so it gives
exactly `vae.decode` / `vae.encode`.

Encoding keeps the reference's posterior *sample*: the tiles give the encoder's mean and log-variance,
which are blended, and the noise is then drawn once for the whole latent from `generator` in exactly the
shape and order of the untiled path (`AutoEncoder.latent_from_moments`). The tiled and untiled latents
therefore differ only by the tiling of the network, never by the noise.

Patch parallelism: with a group of W > 1 ranks, tiles go to ranks by a greedy longest-processing-time
balance on tile area, every rank runs its tiles, the tiles are exchanged with one `all_gather` of
zero-padded tiles (a tensor collective: gloo on CPU, NCCL on GPU; the plan is deterministic, so no
metadata travels), and every rank blends all tiles in the same order. Every rank ends with the identical
full output, bitwise equal to the one-rank tiled result when each tile computes the same on every rank
(same device model and kernels; see `tiled_decode`). Every rank must call with the same arguments (shapes
are checked with one small collective) and, for a sampled encode, a generator in the same state: each
rank draws the noise itself, so every rank's generator advances as on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from bagel_serve.config.validate import ValidationError, check, short
from bagel_serve.model.autoencoder import AutoEncoder

__all__ = ["Tile", "tile_spans", "tile_grid", "assign_tiles", "blend_tiles", "tiled_decode", "tiled_encode"]


@dataclass(frozen=True)
class Tile:
    """One tile: rows [y0, y1) and columns [x0, x1) of the input, in the input's units."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def area(self) -> int:
        return (self.y1 - self.y0) * (self.x1 - self.x0)


def tile_spans(length: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) of the tiles along one axis: starts at multiples of `stride`, the last one cut at
    `length`, and a next tile only while the previous one ends before `length`. One span when
    `length <= tile`."""
    spans = [(0, min(tile, length))]
    while spans[-1][1] < length:
        start = spans[-1][0] + stride
        spans.append((start, min(start + tile, length)))
    return spans


def tile_grid(height: int, width: int, tile: int, stride: int) -> list[Tile]:
    """The tiles of a `height` x `width` input, row-major (the order they are blended in)."""
    return [Tile(y0, y1, x0, x1) for y0, y1 in tile_spans(height, tile, stride)
            for x0, x1 in tile_spans(width, tile, stride)]


def assign_tiles(tiles: list[Tile], world_size: int) -> list[list[int]]:
    """Indices of the tiles each rank runs, by greedy longest-processing-time on tile area: tiles from the
    largest (ties by index) each to the least loaded rank (ties by rank). Every rank computes the same
    answer. Each rank's list is in index order."""
    load = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(tiles)), key=lambda i: (-tiles[i].area, i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        load[r] += tiles[i].area
        owned[r].append(i)
    return [sorted(o) for o in owned]


def _axis_weights(n: int, band: int, head: bool, tail: bool) -> torch.Tensor:
    """Blend weights of one tile along one axis (float32, length n): a linear ramp over `band` positions
    towards a predecessor (`head`) and towards a successor (`tail`), sampled at position centres so that
    two overlapping ramps sum to one (exactly, for a power-of-two band)."""
    w = torch.ones(n, dtype=torch.float64)
    if band:
        ramp = (torch.arange(band, dtype=torch.float64) + 0.5) / band
        if head:
            w[:band] *= ramp
        if tail:
            w[n - band:] *= ramp.flip(0)
    return w.float()


def blend_tiles(outputs: list[torch.Tensor], tiles: list[Tile], *, scale: tuple[int, int], band: int) -> torch.Tensor:
    """The full output, in float32, from every tile's output (the grid `tile_grid` made): `scale` =
    (num, den) maps input to output units (decode 8/1, encode 1/8), `band` is the overlap in output units.
    Tiles are accumulated in list order, so the result depends only on the tiles, never on which rank
    computed them."""
    num, den = scale
    in_h, in_w = max(t.y1 for t in tiles), max(t.x1 for t in tiles)
    b, c = outputs[0].shape[:2]
    device = outputs[0].device
    acc = torch.zeros(b, c, in_h * num // den, in_w * num // den, dtype=torch.float32, device=device)
    # The grid is a product of row spans and column spans, so the weight sum is an outer product too.
    wsum_y = torch.zeros(acc.shape[2], dtype=torch.float32)
    wsum_x = torch.zeros(acc.shape[3], dtype=torch.float32)
    for y0, y1 in sorted({(t.y0, t.y1) for t in tiles}):
        wsum_y[y0 * num // den: y1 * num // den] += _axis_weights((y1 - y0) * num // den, band, y0 > 0, y1 < in_h)
    for x0, x1 in sorted({(t.x0, t.x1) for t in tiles}):
        wsum_x[x0 * num // den: x1 * num // den] += _axis_weights((x1 - x0) * num // den, band, x0 > 0, x1 < in_w)
    for out, t in zip(outputs, tiles, strict=True):
        y0, y1, x0, x1 = (v * num // den for v in (t.y0, t.y1, t.x0, t.x1))
        wy = _axis_weights(y1 - y0, band, t.y0 > 0, t.y1 < in_h)
        wx = _axis_weights(x1 - x0, band, t.x0 > 0, t.x1 < in_w)
        acc[:, :, y0:y1, x0:x1].addcmul_(out.to(torch.float32), (wy[:, None] * wx[None, :]).to(device))
    return acc.div_((wsum_y[:, None] * wsum_x[None, :]).to(device))


def _group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _check_same_call(group: dist.ProcessGroup, device: torch.device, values: list[int]) -> None:
    """Every rank must tile the same input the same way; otherwise the tile exchange would hang or mix
    tiles. One all_gather of a few integers says so on every rank at once."""
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    seen = [p.tolist() for p in parts]
    if any(s != seen[0] for s in seen):
        raise ValueError(f"tiled VAE: ranks disagree on (batch, channels, height, width, tile, stride): {seen}")


def _run_tiles(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tiles: list[Tile],
               out_shapes: list[tuple[int, ...]], dtype: torch.dtype,
               group: dist.ProcessGroup | None) -> list[torch.Tensor]:
    """fn over every tile of x, every tile's output present on every rank (as `dtype`, in tile order).
    With a group of W > 1, each rank runs its share and one all_gather of padded tiles exchanges them."""

    def run(i: int) -> torch.Tensor:
        t = tiles[i]
        out = fn(x[:, :, t.y0:t.y1, t.x0:t.x1].contiguous())
        if tuple(out.shape) != out_shapes[i]:
            raise RuntimeError(f"tiled VAE: tile {t} gave shape {tuple(out.shape)}, expected {out_shapes[i]}")
        return out.to(dtype)

    world = _group_size(group)
    if world == 1:
        return [run(i) for i in range(len(tiles))]
    owned = assign_tiles(tiles, world)
    rank = dist.get_rank(group)
    b, c = out_shapes[0][:2]
    hmax = max(s[2] for s in out_shapes)
    wmax = max(s[3] for s in out_shapes)
    slots = max(len(o) for o in owned)
    buf = torch.zeros(slots, b, c, hmax, wmax, dtype=dtype, device=x.device)
    for slot, i in enumerate(owned[rank]):
        out = run(i)
        buf[slot, :, :, : out.shape[2], : out.shape[3]] = out
        del out
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)
    del buf
    outputs: list[torch.Tensor | None] = [None] * len(tiles)
    for r, indices in enumerate(owned):
        for slot, i in enumerate(indices):
            _, _, h, w = out_shapes[i]
            outputs[i] = parts[r][slot, :, :, :h, :w]
    return outputs  # type: ignore[return-value]


def _check_4d(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValidationError(name, f"must be a (B, C, H, W) tensor, got {short(x)}")
    return x


def _check_tiling(tile: object, stride: object, names: tuple[str, str], multiple_of: int) -> tuple[int, int]:
    step = multiple_of if multiple_of > 1 else None
    tile = check(tile, int, names[0], {"gt": 0, "multiple_of": step}, style="python")
    stride = check(stride, int, names[1], {"gt": 0, "le": tile, "multiple_of": step}, style="python")
    return tile, stride


@torch.no_grad()
def tiled_decode(vae: AutoEncoder, z: torch.Tensor, *, group: dist.ProcessGroup | None = None,
                 tile_latent: int = 64, stride_latent: int = 56) -> torch.Tensor:
    """`vae.decode(z)` over overlapping latent tiles (`tile_latent`, `stride_latent`, in latent units),
    blended; spread over `group`'s ranks when it has more than one (None: this process alone, not the
    default group). A latent no larger than one tile is decoded untiled: the same numbers as
    `vae.decode`. The output has `vae.decode`'s dtype and shape, on every rank.

    Bitwise agreement with the one-rank result needs each tile to compute the same on every rank: the same
    device model and software, and no per-process kernel choice (`torch.backends.cudnn.benchmark` off).
    """
    z = _check_4d("z", z)
    tile_latent, stride_latent = _check_tiling(tile_latent, stride_latent, ("tile_latent", "stride_latent"), 1)
    b, _, h, w = z.shape
    f = vae.params.downsample
    if group is not None and _group_size(group) > 1:
        _check_same_call(group, z.device, [b, z.shape[1], h, w, tile_latent, stride_latent])
    tiles = tile_grid(h, w, tile_latent, stride_latent)
    if len(tiles) == 1:
        return vae.decode(z)
    out_ch = vae.params.out_ch
    shapes = [(b, out_ch, (t.y1 - t.y0) * f, (t.x1 - t.x0) * f) for t in tiles]
    dtype = vae.decoder.conv_out.weight.dtype
    outputs = _run_tiles(vae.decode, z, tiles, shapes, dtype, group)
    blended = blend_tiles(outputs, tiles, scale=(f, 1), band=(tile_latent - stride_latent) * f)
    return blended.to(dtype)


@torch.no_grad()
def tiled_encode(vae: AutoEncoder, x: torch.Tensor, *, generator: torch.Generator | None, sample: bool,
                 group: dist.ProcessGroup | None = None, tile: int = 512, stride: int = 448) -> torch.Tensor:
    """`vae.encode(x, generator=generator, sample=sample)` over overlapping pixel tiles (`tile`, `stride`,
    multiples of the VAE's downsampling factor, as must x's height and width be), spread over `group` like
    `tiled_decode`. An image no larger than one tile is encoded untiled: bit-identical to `vae.encode`.
    Otherwise the tiles' mean and log-variance are blended and the noise is drawn once for the whole
    latent from `generator`, in the untiled path's shape and order (so it consumes the same random
    numbers, and the result differs from `vae.encode` only by the tiling of the network)."""
    x = _check_4d("x", x)
    f = vae.params.downsample
    tile, stride = _check_tiling(tile, stride, ("tile", "stride"), f)
    b, c, h, w = x.shape
    for name, size in (("height", h), ("width", w)):
        if size % f:
            raise ValidationError("x", f"{name} must be a multiple of the VAE's downsampling factor {f}, got {size}")
    if group is not None and _group_size(group) > 1:
        _check_same_call(group, x.device, [b, c, h, w, tile, stride])
    tiles = tile_grid(h, w, tile, stride)
    if len(tiles) == 1:
        return vae.encode(x, generator=generator, sample=sample)
    moments = 2 * vae.params.z_channels
    shapes = [(b, moments, (t.y1 - t.y0) // f, (t.x1 - t.x0) // f) for t in tiles]
    dtype = vae.encoder.conv_out.weight.dtype
    outputs = _run_tiles(vae.encoder, x, tiles, shapes, dtype, group)
    blended = blend_tiles(outputs, tiles, scale=(1, f), band=(tile - stride) // f).to(dtype)
    mean, logvar = torch.chunk(blended, 2, dim=1)
    return vae.latent_from_moments(mean, logvar, generator, sample)
