"""FLUX autoencoder against the reference (golden config A, float32 CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bagel_serve.imaging import ImageTransformConfig, load_image, resize, to_tensor
from bagel_serve.model.layout import pack_latent, unpack_latent
from bagel_serve.config.model_config import AutoEncoderParams
from bagel_serve.model.autoencoder import AutoEncoder, decoded_to_uint8

TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def uint8_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[int, int]:
    """(max |a-b| in levels, number of differing values)."""
    d = (a.to(torch.int16) - b.to(torch.int16)).abs()
    return int(d.max()), int((d > 0).sum())


@pytest.fixture(scope="module")
def ae(golden_a: Path, golden_a_config: dict) -> AutoEncoder:
    model = AutoEncoder(AutoEncoderParams.from_dict(golden_a_config["vae_config"]))
    state = load_file(golden_a / "checkpoint" / "ae.safetensors")
    assert all(v.dtype == torch.float32 for v in state.values())
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def vae_transform(golden_a_config: dict) -> ImageTransformConfig:
    return ImageTransformConfig.from_dict(golden_a_config["vae_image_transform"])


@pytest.fixture(scope="module")
def components(golden_a: Path) -> dict[str, torch.Tensor]:
    return load_file(golden_a / "cases" / "components.safetensors")


@pytest.fixture(scope="module")
def img2img(golden_a: Path, golden_a_cases: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    c = next(c for c in golden_a_cases["cases"] if c["name"] == "img2img")
    return c, load_file(golden_a / c["tensors_file"])


# ----------------------------------------------------------------------------- params / structure


def test_params_defaults_are_flux() -> None:
    p = AutoEncoderParams.from_dict(None)
    assert p == AutoEncoderParams()
    assert (p.ch, p.ch_mult, p.num_res_blocks, p.z_channels, p.downsample) == (128, (1, 2, 4, 4), 2, 16, 8)
    assert (p.scale_factor, p.shift_factor) == (0.3611, 0.1159)


def test_params_from_dict(golden_a_config: dict) -> None:
    p = AutoEncoderParams.from_dict({**golden_a_config["vae_config"], "some_future_key": 1})
    assert p.ch_mult == (1, 2, 2, 2) and p.ch == 32 and p.z_channels == 4 and p.num_res_blocks == 1


@pytest.mark.parametrize(
    ("override", "field"),
    [({"ch": 48}, "^ch must"), ({"ch_mult": [1, 2, 0, 4]}, "^ch_mult"), ({"ch_mult": []}, "^ch_mult"),
     ({"downsample": 16}, "^downsample"), ({"z_channels": 0}, "^z_channels"), ({"ch_mult": 4}, "^ch_mult")],
)
def test_params_validation(override: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AutoEncoderParams.from_dict(override)


def test_meta_construction_matches_real_ae_manifest(golden_dir: Path) -> None:
    manifest = json.loads((golden_dir / "bagel-7b-mot-manifest.json").read_text())["ae_safetensors"]
    with torch.device("meta"):
        model = AutoEncoder(AutoEncoderParams())
    assert next(model.parameters()).device.type == "meta"
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {t["key"]: t["shape"] for t in manifest["tensors"]}
    assert sum(v.numel() for v in model.parameters()) == manifest["num_params"] == 83_819_683


# ----------------------------------------------------------------------------- components


def test_vae_input_preprocessing(golden_a: Path, vae_transform: ImageTransformConfig,
                                 components: dict[str, torch.Tensor]) -> None:
    x = to_tensor(resize(load_image(golden_a / "inputs" / "edit_rgb_80x64.png"), vae_transform))[None]
    assert torch.equal(x, components["vae_input"])


def test_encoder_moments(ae: AutoEncoder, components: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        mean, logvar = ae.encode_moments(components["vae_input"])
        z = ae.encode(components["vae_input"], sample=False)
    assert rel(mean, components["vae_encoder_mean"]) < TOL
    assert rel(logvar, components["vae_encoder_logvar"]) < TOL
    assert rel(z, components["vae_decode_input_z"]) < TOL


def test_decode_components(ae: AutoEncoder, components: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        out = ae.decode(components["vae_decode_input_z"])
    assert rel(out, components["vae_decode_output"]) < TOL
    pixels = decoded_to_uint8(out)[0]
    assert pixels.dtype == torch.uint8 and pixels.shape == components["vae_decode_uint8"].shape
    max_diff, n_diff = uint8_diff(pixels, components["vae_decode_uint8"])
    print(f"components decode: max uint8 diff {max_diff}, {n_diff} values differ")
    assert max_diff <= 1


def test_decoded_to_uint8_truncates() -> None:
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0]).reshape(1, 3, 1, 2)
    out = decoded_to_uint8(x)
    assert out.shape == (1, 1, 2, 3) and out.dtype == torch.uint8
    # 0.0 -> 127.5 -> 127 (truncated, not rounded); 0.999 -> 254.87 -> 254
    assert out.permute(0, 3, 1, 2).flatten().tolist() == [0, 0, 127, 254, 255, 255]


# ----------------------------------------------------------------------------- img2img case


def test_img2img_posterior_sampling(ae: AutoEncoder, golden_a: Path, vae_transform: ImageTransformConfig,
                                    img2img: tuple[dict, dict[str, torch.Tensor]]) -> None:
    c, t = img2img
    image = next(i["image"] for i in c["inputs"] if "image" in i)
    x = to_tensor(resize(load_image(golden_a / "inputs" / image), vae_transform))[None]
    assert torch.equal(x, t["vae_0_input_image"])

    # The posterior draw is the first RNG consumer after torch.manual_seed(seed) in the reference.
    seed = c["torch_manual_seed"]
    assert seed == 7
    eps = torch.randn(t["vae_0_posterior_mean"].shape, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(eps, t["vae_0_posterior_eps"])

    with torch.no_grad():
        mean, logvar = ae.encode_moments(x)
        encoded = ae.encode(x, generator=torch.Generator().manual_seed(seed))
    assert rel(mean, t["vae_0_posterior_mean"]) < TOL
    assert rel(logvar, t["vae_0_posterior_logvar"]) < TOL
    assert rel(encoded, t["vae_0_encoded"]) < TOL
    # The initial noise is the next draw of the same generator stream.
    gen = torch.Generator().manual_seed(seed)
    torch.randn(mean.shape, generator=gen)
    assert torch.equal(torch.randn(t["init_noise"].shape, generator=gen), t["init_noise"])


def test_img2img_latent_unpack_and_decode(ae: AutoEncoder, img2img: tuple[dict, dict[str, torch.Tensor]]) -> None:
    _, t = img2img
    z = t["vae_decode_input"][0]
    zc, hh, ww = z.shape
    p = 2
    packed = pack_latent(z, p)
    assert torch.equal(packed, t["final_latent_packed"])
    unpacked = unpack_latent(t["final_latent_packed"], hh // p, ww // p, zc, p)
    assert torch.equal(unpacked, z)

    with torch.no_grad():
        out = ae.decode(unpacked[None])
    assert rel(out, t["vae_decode_output"]) < TOL
    max_diff, n_diff = uint8_diff(decoded_to_uint8(out)[0], t["image_uint8"])
    print(f"img2img decode: max uint8 diff {max_diff}, {n_diff} values differ")
    assert max_diff <= 1


def test_split_group_norm_matches_torch():
    """The GPU's group norm (statistics by a split reduction) computes torch's group norm."""
    from bagel_serve.model.autoencoder import group_norm_split

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 9, 7, generator=g) * 3 + 1
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    got = group_norm_split(x, 32, w, b, 1e-6)
    want = torch.nn.functional.group_norm(x, 32, w, b, 1e-6)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # A wrong grouping would not pass: 16 groups of 4 channels normalise differently.
    assert (group_norm_split(x, 16, w, b, 1e-6) - want).abs().max() > 1e-2


def test_memory_bounded_paths_decode_the_same(ae: AutoEncoder, components: dict[str, torch.Tensor],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder's memory bounds (attention queries in chunks, the upsampling convolutions in bands of rows),
    forced on at this small size, decode what the whole-tensor paths decode (float32 sums may differ in the
    last bits: other matmul and convolution shapes); a band or chunk placed wrong would be far off."""
    from bagel_serve.model import autoencoder as A

    z = components["vae_decode_input_z"]
    with torch.no_grad():
        whole = ae.decode(z)
        monkeypatch.setattr(A, "ATTN_SCORES_BYTES", 1000)
        monkeypatch.setattr(A, "UPSAMPLE_BAND_BYTES", 4096)
        bounded = ae.decode(z)
    torch.testing.assert_close(bounded, whole, rtol=1e-5, atol=1e-5)
    assert max_abs_uint8(bounded, whole) <= 1


def max_abs_uint8(a: torch.Tensor, b: torch.Tensor) -> int:
    return uint8_diff(decoded_to_uint8(a)[0], decoded_to_uint8(b)[0])[0]


def test_banded_upsample_reads_the_right_rows() -> None:
    """Every band of the banded upsample convolution, including the first and last (the image's zero padding),
    is the whole convolution's rows, for bands that split the rows evenly or not."""
    from bagel_serve.model.autoencoder import Upsample

    torch.manual_seed(0)
    up = Upsample(8)
    x = torch.randn(2, 8, 21, 12)
    with torch.no_grad():
        want = up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
        for bands in (2, 3, 5, 10, 21):
            torch.testing.assert_close(up._banded(x, bands), want, rtol=1e-6, atol=1e-6)


def test_inplace_group_norm_writes_the_same_values() -> None:
    from bagel_serve.model.autoencoder import group_norm_split

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 64, 6, 5, generator=g)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    want = group_norm_split(x, 32, w, b, 1e-6)
    y = x.clone()
    assert group_norm_split(y, 32, w, b, 1e-6, out=y) is y
    assert torch.equal(y, want)


def test_a_consuming_block_computes_the_same_and_frees_its_input(ae: AutoEncoder) -> None:
    """A channel-changing block that may consume its input gives the same values as one that keeps it, and
    leaves the input's memory released; a block that keeps its channels never touches its input."""
    block = ae.decoder.up[0].block[0]
    assert block.in_channels != block.out_channels
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, block.in_channels, 6, 4, generator=g)
    with torch.no_grad():
        want = block(x.clone())
        y = x.clone()
        got = block(y, consume=True)
    assert torch.equal(got, want)
    assert y.untyped_storage().nbytes() == 0
    same = ae.decoder.up[0].block[1]
    assert same.in_channels == same.out_channels
    h = torch.randn(1, same.in_channels, 6, 4, generator=g)
    keep = h.clone()
    with torch.no_grad():
        same(h, consume=True)
    assert torch.equal(h, keep)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the convolution kernel runs on CUDA only")
@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "cudnn"])
def test_the_gpus_vae_holds_the_goldens(ae: AutoEncoder, components: dict[str, torch.Tensor], kernel: bool,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """On the GPU, readied as a stage readies it (the weights laid out for the kernel, the kernels compiled),
    the float32 VAE (the convolution kernel, or cuDNN with TF32 off) encodes and decodes the reference's values
    as the CPU does."""
    import copy

    from bagel_serve.engine.diffusion import VaeMode, warm_up_vae
    from bagel_serve.layers.kernels import DISABLE_ENV

    monkeypatch.setenv(DISABLE_ENV, "0" if kernel else "1")
    gpu = copy.deepcopy(ae).cuda()
    assert warm_up_vae(gpu, VaeMode(), encodes=True, decodes=True) > 0
    assert gpu.decoder.mid.block_1.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    z = components["vae_decode_input_z"].cuda()
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert gpu.decoder.up[1].upsample.conv.uses_kernel(gpu.decoder.conv_in(z)) == kernel
        out = gpu.decode(z).cpu()
        mean, logvar = (t.cpu() for t in gpu.encode_moments(components["vae_input"].cuda()))
    assert rel(out, components["vae_decode_output"]) < TOL
    assert uint8_diff(decoded_to_uint8(out)[0], components["vae_decode_uint8"])[0] <= 1
    assert rel(mean, components["vae_encoder_mean"]) < TOL
    assert rel(logvar, components["vae_encoder_logvar"]) < TOL
