"""VAE tiling and VAE patch parallelism (`bagel_serve.model.vae_tiling`) on golden config A's autoencoder.

Tolerances, measured (float32 CPU, deterministic: fixed weights, seeded inputs). The golden VAE has random
weights and group norm everywhere, so a tile's statistics are its own and tiling moves the result by far
more than a trained VAE's seams would; that is the size of the numbers below, not a blending error (the
blend itself is checked exactly by `test_blend_reconstructs_crops_exactly`):

* decode, latent 12x16 (96x128 px), tiles 10 stride 6 (4 tiles of two shapes, 32 px band): relative L2
  error against `vae.decode` 0.2017; DECODE_TOL = 0.26. The same tiles pasted without blending: 0.3228.
* encode (posterior mean, scaled latent), 80x128 uniform-noise image, tiles 64 stride 32 (6 tiles of two
  shapes, 4-latent band): 0.2621 against `vae.encode(sample=False)`; ENCODE_TOL = 0.34. Pasted: 0.4615.

Patch parallelism runs two real gloo processes and must reproduce the one-rank tiled result bitwise.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from bagel_serve.config.model_config import AutoEncoderParams
from bagel_serve.config.validate import ValidationError
from bagel_serve.model.autoencoder import AutoEncoder
from bagel_serve.model.vae_tiling import (Tile, assign_tiles, blend_tiles, tile_grid, tile_spans, tiled_decode,
                                          tiled_encode)

DECODE_TOL = 0.26
ENCODE_TOL = 0.34
DEC = {"tile_latent": 10, "stride_latent": 6}  # 4 tiles of two shapes on a 12x16 latent
ENC = {"tile": 64, "stride": 32}  # 6 tiles of two shapes on an 80x128 image


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def load_ae(golden_a: Path, vae_config: dict) -> AutoEncoder:
    ae = AutoEncoder(AutoEncoderParams.from_dict(vae_config))
    ae.load_state_dict(load_file(golden_a / "checkpoint" / "ae.safetensors"), strict=True)
    return ae.eval().requires_grad_(False)


def latent_input() -> torch.Tensor:
    return torch.randn(1, 4, 12, 16, generator=torch.Generator().manual_seed(1))


def image_input() -> torch.Tensor:
    return torch.rand(1, 3, 80, 128, generator=torch.Generator().manual_seed(2)) * 2 - 1


def pasted(outputs: list[torch.Tensor], tiles: list[Tile], num: int, den: int) -> torch.Tensor:
    """The deliberately wrong blend: tiles written over each other in order, no ramps."""
    b, c = outputs[0].shape[:2]
    full = torch.zeros(b, c, max(t.y1 for t in tiles) * num // den, max(t.x1 for t in tiles) * num // den)
    for out, t in zip(outputs, tiles):
        full[:, :, t.y0 * num // den: t.y1 * num // den, t.x0 * num // den: t.x1 * num // den] = out
    return full


@pytest.fixture(scope="module")
def ae(golden_a: Path, golden_a_config: dict) -> AutoEncoder:
    return load_ae(golden_a, golden_a_config["vae_config"])


@pytest.fixture(scope="module")
def one_rank(ae: AutoEncoder) -> dict[str, torch.Tensor]:
    """The one-rank tiled results the tolerance and patch-parallel tests share (computed once)."""
    gen = torch.Generator().manual_seed(7)
    encode = tiled_encode(ae, image_input(), generator=gen, sample=True, **ENC)
    return {"decode": tiled_decode(ae, latent_input(), **DEC), "encode": encode, "rng": gen.get_state()}


# ----------------------------------------------------------------------------- the plan


def test_tile_spans_follow_the_stride_and_stop_at_the_edge() -> None:
    assert tile_spans(256, 64, 56) == [(0, 64), (56, 120), (112, 176), (168, 232), (224, 256)]  # 2048² decode
    assert tile_spans(120, 64, 56) == [(0, 64), (56, 120)]  # no tile that the previous one already covers
    assert tile_spans(64, 64, 56) == [(0, 64)]
    assert tile_spans(30, 64, 56) == [(0, 30)]
    assert len(tile_grid(16, 24, 12, 8)) == 6 and tile_grid(16, 24, 12, 8)[1] == Tile(0, 12, 8, 20)


def test_assign_tiles_balances_area_and_covers_every_tile_once() -> None:
    tiles = tile_grid(256, 256, 64, 56)  # 16 full tiles, 8 half tiles, one quarter tile
    owned = assign_tiles(tiles, 2)
    assert sorted(i for o in owned for i in o) == list(range(25))
    loads = [sum(tiles[i].area for i in o) for o in owned]
    assert abs(loads[0] - loads[1]) <= max(t.area for t in tiles)
    assert all(o == sorted(o) for o in owned) and assign_tiles(tiles, 2) == owned
    assert assign_tiles(tiles[:2], 3)[2] == []  # more ranks than tiles: a rank may have none


@pytest.mark.parametrize(("num", "den", "tile", "stride"), [(8, 1, 12, 8), (1, 8, 96, 64), (8, 1, 10, 7)])
def test_blend_reconstructs_crops_exactly(num: int, den: int, tile: int, stride: int) -> None:
    """Tiles that are exact crops of one image blend back into it: the ramps are a partition of unity and
    every tile lands where it belongs: to two float32 roundings for a power-of-two band (the weights are
    then exact), to a few otherwise; bitwise where one tile alone covers a position."""
    in_h, in_w = (16, 24) if num > 1 else (128, 192)
    full = torch.randn(2, 3, in_h * num // den, in_w * num // den, generator=torch.Generator().manual_seed(0))
    tiles = tile_grid(in_h, in_w, tile, stride)
    crops = [full[:, :, t.y0 * num // den: t.y1 * num // den, t.x0 * num // den: t.x1 * num // den] for t in tiles]
    band = (tile - stride) * num // den
    out = blend_tiles(crops, tiles, scale=(num, den), band=band)
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(out, full, rtol=2 * eps if band & (band - 1) == 0 else 8 * eps, atol=1e-30)
    alone = torch.zeros(full.shape[2:], dtype=torch.int64)
    for t in tiles:
        alone[t.y0 * num // den: t.y1 * num // den, t.x0 * num // den: t.x1 * num // den] += 1
    assert torch.equal(out[..., alone == 1], full[..., alone == 1])


# ----------------------------------------------------------------------------- one process


def test_one_tile_is_untiled_exactly(ae: AutoEncoder) -> None:
    z = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(3))
    ref = ae.decode(z)
    assert torch.equal(tiled_decode(ae, z), ref)
    assert torch.equal(tiled_decode(ae, z, tile_latent=8, stride_latent=4), ref)
    x = image_input()[:, :, :64, :64]
    g_ref, g_tiled = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(tiled_encode(ae, x, generator=g_tiled, sample=True), ae.encode(x, generator=g_ref, sample=True))
    assert torch.equal(g_tiled.get_state(), g_ref.get_state())
    assert torch.equal(tiled_encode(ae, x, generator=None, sample=False, tile=64, stride=8), ae.encode(x, sample=False))


def test_tiled_decode_matches_untiled_within_tolerance(ae: AutoEncoder, one_rank: dict) -> None:
    z = latent_input()
    ref = ae.decode(z)
    err = rel(one_rank["decode"], ref)
    tiles = tile_grid(*z.shape[2:], DEC["tile_latent"], DEC["stride_latent"])
    wrong = rel(pasted([ae.decode(z[:, :, t.y0:t.y1, t.x0:t.x1]) for t in tiles], tiles, 8, 1), ref)
    print(f"decode: tiled rel error {err:.4f}, pasted without blending {wrong:.4f}")
    assert err < DECODE_TOL < wrong


def test_tiled_encode_matches_untiled_and_draws_the_untiled_noise(ae: AutoEncoder, one_rank: dict) -> None:
    x = image_input()
    ref_mean = ae.encode(x, sample=False)
    mean = tiled_encode(ae, x, generator=None, sample=False, **ENC)
    err = rel(mean, ref_mean)
    tiles = tile_grid(*x.shape[2:], ENC["tile"], ENC["stride"])
    moments = pasted([ae.encoder(x[:, :, t.y0:t.y1, t.x0:t.x1]) for t in tiles], tiles, 1, 8)
    wrong = rel(ae.scale_factor * (moments[:, : ae.params.z_channels] - ae.shift_factor), ref_mean)
    print(f"encode: tiled rel error {err:.4f}, pasted without blending {wrong:.4f}")
    assert err < ENCODE_TOL < wrong

    g_ref = torch.Generator().manual_seed(7)
    ref = ae.encode(x, generator=g_ref, sample=True)
    assert torch.equal(one_rank["rng"], g_ref.get_state())  # the same draws, no more
    # The noise term is the untiled one scaled by the tiled std: it correlates with the untiled noise term
    # far better than an independent draw would (relative difference about sqrt(2)).
    other = ae.encode(x, generator=torch.Generator().manual_seed(8), sample=True)
    assert rel(one_rank["encode"] - mean, ref - ref_mean) < 0.5 < rel(other - ref_mean, ref - ref_mean)


def test_bad_arguments_name_the_argument(ae: AutoEncoder) -> None:
    z, x = latent_input(), image_input()
    for kwargs, name in (({"tile_latent": 0}, "tile_latent"), ({"tile_latent": 8.0}, "tile_latent"),
                         ({"tile_latent": 12, "stride_latent": 13}, "stride_latent")):
        with pytest.raises(ValidationError, match=f"^{name}:"):
            tiled_decode(ae, z, **kwargs)
    with pytest.raises(ValidationError, match="^z:"):
        tiled_decode(ae, z[0])
    with pytest.raises(ValidationError, match="^tile:.*multiple of 8"):
        tiled_encode(ae, x, generator=None, sample=False, tile=100)
    with pytest.raises(ValidationError, match="^x: width"):
        tiled_encode(ae, x[:, :, :, :100], generator=None, sample=False)


# ----------------------------------------------------------------------------- two gloo processes


def _rank_main(rank: int, world: int, store: str, out_dir: str, golden_a: str, vae_config: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        both = dist.new_group([0, 1])
        alone = [dist.new_group([r]) for r in range(world)][rank]  # every rank takes part in every new_group
        ae = load_ae(Path(golden_a), vae_config)
        z, x = latent_input(), image_input()
        res: dict[str, torch.Tensor] = {}
        calls = {"decoder": 0, "encoder": 0}
        for name in calls:
            getattr(ae, name).register_forward_pre_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
        res["decode"] = tiled_decode(ae, z, group=both, **DEC)
        gen = torch.Generator().manual_seed(7)
        res["encode"] = tiled_encode(ae, x, generator=gen, sample=True, group=both, **ENC)
        res["rng"] = gen.get_state()
        res["tiles_run"] = torch.tensor([calls["decoder"], calls["encoder"]])  # by this rank itself
        res["decode_size1"] = tiled_decode(ae, z, group=alone, **DEC)  # a group of one runs alone
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_patch_parallel_two_gloo_ranks_match_one_rank_bitwise(one_rank: dict, golden_a: Path,
                                                              golden_a_config: dict, tmp_path: Path) -> None:
    """Both ranks end with the one-rank tiled result of this process, bitwise, each having run only its
    share of the tiles; a group of one runs alone."""
    ctx = mp.spawn(_rank_main, args=(2, str(tmp_path / "store"), str(tmp_path), str(golden_a),
                                     golden_a_config["vae_config"]), nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("patch-parallel ranks did not finish in 120 s")
    dec_owned = assign_tiles(tile_grid(*latent_input().shape[2:], DEC["tile_latent"], DEC["stride_latent"]), 2)
    enc_owned = assign_tiles(tile_grid(*image_input().shape[2:], ENC["tile"], ENC["stride"]), 2)
    for r in range(2):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["tiles_run"].tolist() == [len(dec_owned[r]), len(enc_owned[r])]  # each rank ran its share only
        for what in ("decode", "encode", "rng"):
            assert torch.equal(res[what], one_rank[what]), (r, what)
        assert torch.equal(res["decode_size1"], one_rank["decode"])
