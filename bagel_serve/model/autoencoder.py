"""The FLUX autoencoder that BAGEL uses to move between pixels and its latent space.

Module and parameter names follow FLUX's `ae.safetensors` exactly, so the published file loads with
a strict `load_state_dict` and no key remapping. The numerics follow the reference path: encoding
*samples* the posterior (it consumes RNG, which matters for reproducing edited images), the latent is
scaled/shifted with the FLUX constants, and the decoded image is turned into bytes by truncation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bagel_serve.config.model_config import VAE_NORM_GROUPS, AutoEncoderParams
from bagel_serve.layers.conv import Conv2d

_EPS = 1e-6


def group_norm_split(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """Group norm of (B, C, H, W) from one split-reduction pass for the statistics and one fused pass for the
    output (x * scale + shift per channel), written into `out` when given (it may be `x` itself)."""
    b, c = x.shape[:2]
    var, mean = torch.var_mean(x.view(b, groups, -1), dim=-1, correction=0, keepdim=True)
    scale = torch.rsqrt(var + eps) * weight.view(1, groups, c // groups)  # (b, groups, c / groups)
    shift = bias.view(1, groups, c // groups) - mean * scale
    if out is None:
        return torch.addcmul(shift.view(b, c, 1, 1), x, scale.view(b, c, 1, 1))
    return torch.addcmul(shift.view(b, c, 1, 1), x, scale.view(b, c, 1, 1), out=out)


class GroupNorm(nn.GroupNorm):
    """On the GPU, float32 group statistics by torch's split reduction instead of its group-norm kernel, which
    gives each (image, group) pair one thread block: at the decoder's 1024x1024 levels that is 32 blocks for
    the whole card (3.9 ms against 0.64 ms per norm on an H200, the same statistics to 4e-6). The CPU keeps
    torch's kernel, which the parity suite holds to the reference."""

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """`inplace`: on the GPU, write the result over `x` (the caller's last use of it), which keeps one
        full-size tensor fewer alive; the values are the same either way."""
        if x.device.type != "cuda" or x.dtype != torch.float32 or x.dim() != 4:
            return super().forward(x)
        return group_norm_split(x, self.num_groups, self.weight, self.bias, self.eps, out=x if inplace else None)


def _norm(channels: int) -> nn.GroupNorm:
    return GroupNorm(num_groups=VAE_NORM_GROUPS, num_channels=channels, eps=_EPS, affine=True)


def _swish_(x: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """x * sigmoid(x), in place over a temporary (a norm's output) and a few channels at a time: the same
    operations as the reference's, without two more full-size tensors alive at the 1024x1024 levels."""
    for c in range(0, x.shape[1], chunk):
        part = x[:, c : c + chunk]
        part.mul_(torch.sigmoid(part))
    return x


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, consume: bool = False) -> torch.Tensor:
        """`consume`: x is the previous layer's output and nothing reads it after this block. A block that
        changes the channel count then takes its shortcut first, normalises x in place and releases x's memory
        once conv1 has read it (the caller's reference is left empty). The decoder's peak is the first block of
        its 1024x1024 level (256 -> 128 channels): x is 1 GiB in float32, and x, its norm (or, normalised in
        place, the shortcut, conv1's and conv2's outputs) alive together made 2.5 GiB; now at most x, the
        shortcut and conv1's output are (2 GiB). Same operations, same values."""
        reshapes = self.in_channels != self.out_channels
        if reshapes:
            shortcut = self.nin_shortcut(x)
            h = self.norm1(x, inplace=consume)
        else:
            shortcut = x
            h = self.norm1(x)
        h = self.conv1(_swish_(h))
        if consume and reshapes and x._base is None and x.untyped_storage().nbytes() == x.numel() * x.element_size():
            x.untyped_storage().resize_(0)
        return self.conv2(_swish_(self.norm2(h, inplace=True)), residual=shortcut)


ATTN_SCORES_BYTES = 256 * 2**20
"""Most float32 attention scores an `AttnBlock` holds at once; above it the queries go in chunks. The block
attends with one 512-wide head in float32, for which torch's attention materialises the scores: at a 1024x1024
image (16,384 latent positions) 1 GiB of scores and 1 GiB of their softmax at once, the decoder's peak
(2.47 GiB above the weights on an H200) before it was chunked."""


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (only used at the lowest resolution)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = Conv2d(channels, channels, kernel_size=1)
        self.k = Conv2d(channels, channels, kernel_size=1)
        self.v = Conv2d(channels, channels, kernel_size=1)
        self.proj_out = Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, hh * ww).transpose(2, 3)

        q, k, v = tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h))
        n = hh * ww
        rows = max(1, ATTN_SCORES_BYTES // (b * n * q.element_size()))
        if rows >= n:
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # each query's softmax is its own: chunks of queries give the same rows
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, a : a + rows], k, v) for a in range(0, n, rows)],
                            dim=2)
        out = out.transpose(2, 3).reshape(b, c, hh, ww)
        return self.proj_out(out, residual=x)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        # Stride 2 pads the right and bottom edges only (`layers.conv`): FLUX's alignment of the outputs.
        self.conv = Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


UPSAMPLE_BAND_BYTES = 256 * 2**20
"""Largest upsampled tensor an `Upsample` builds whole; above it the upsampled rows are built and convolved in
bands. At a 1024x1024 image the last upsample's input is 256 channels at 512x512: whole, its 1 GiB upsampled
copy and the 1 GiB convolution output were alive together (2.25 GiB with the input)."""


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv.uses_kernel(x):  # the kernel reads the upsampled pixels from x: no copy to bound
            return self.conv(x, upsample=2)
        b, c, h, w = x.shape
        bands = min(h, -(-(4 * x.numel() * x.element_size()) // UPSAMPLE_BAND_BYTES))
        if bands <= 1:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self._banded(x, bands)

    def _banded(self, x: torch.Tensor, bands: int) -> torch.Tensor:
        """conv(upsample(x)) a band of output rows at a time: each band convolves the upsampled rows it reads
        (one more above and below, zeros at the image's edges as the padding gives) with no vertical padding.
        Every output is the same sum as the whole convolution's, up to the order cuDNN adds in (float32)."""
        b, c, h, w = x.shape
        out = torch.empty((b, self.conv.out_channels, 2 * h, 2 * w), dtype=x.dtype, device=x.device)
        bounds = [h * i // bands for i in range(bands + 1)]  # input rows; output rows are twice these
        for lo, hi in zip(bounds, bounds[1:]):
            a, z = max(lo - 1, 0), min(hi + 1, h)
            up = F.interpolate(x[:, :, a:z], scale_factor=2.0, mode="nearest")
            up = up[:, :, 2 * lo - 1 - 2 * a if lo else 0 : 2 * hi + 1 - 2 * a]  # output rows 2lo-1 .. 2hi
            up = F.pad(up, (0, 0, 1 if lo == 0 else 0, 1 if hi == h else 0))
            out[:, :, 2 * lo : 2 * hi] = F.conv2d(up, self.conv.weight, self.conv.bias, padding=(0, 1))
        return out


class _Mid(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams) -> None:
        super().__init__()
        self.conv_in = Conv2d(p.in_channels, p.ch, kernel_size=3, stride=1, padding=1)
        in_mult = (1,) + tuple(p.ch_mult)
        self.down = nn.ModuleList()
        block_in = p.ch
        for level, mult in enumerate(p.ch_mult):
            block_in = p.ch * in_mult[level]
            block_out = p.ch * mult
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(p.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            if level != len(p.ch_mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _Mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = Conv2d(block_in, 2 * p.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h, consume=True)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish_(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams) -> None:
        super().__init__()
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = Conv2d(p.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _Mid(block_in)
        # Built from the deepest level up, but stored by level index so keys read `up.{level}`.
        stages: list[nn.Module] = [nn.Module() for _ in p.ch_mult]
        for level in reversed(range(len(p.ch_mult))):
            block_out = p.ch * p.ch_mult[level]
            stage = stages[level]
            stage.block = nn.ModuleList()
            for _ in range(p.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            if level != 0:
                stage.upsample = Upsample(block_in)
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(block_in)
        self.conv_out = Conv2d(block_in, p.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(len(self.up))):
            stage = self.up[level]
            for block in stage.block:
                h = block(h, consume=True)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(_swish_(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams) -> None:
        super().__init__()
        self.params = params
        self.scale_factor = float(params.scale_factor)
        self.shift_factor = float(params.shift_factor)
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, logvar) of images in [-1, 1]; `logvar` is unclamped, as in the reference."""
        mean, logvar = torch.chunk(self.encoder(x), 2, dim=1)
        return mean, logvar

    def encode(
        self,
        x: torch.Tensor,
        generator: torch.Generator | None = None,
        sample: bool = True,
    ) -> torch.Tensor:
        """Scaled latent of images in [-1, 1].

        The reference samples the posterior; eps is always drawn on the CPU (from `generator`, or the
        default CPU generator) and then moved, so results are the same whatever device the VAE is on
        and the RNG stream lines up with the reference's `randn_like` on CPU.
        """
        mean, logvar = self.encode_moments(x)
        return self.latent_from_moments(mean, logvar, generator, sample)

    def latent_from_moments(
        self,
        mean: torch.Tensor,
        logvar: torch.Tensor,
        generator: torch.Generator | None = None,
        sample: bool = True,
    ) -> torch.Tensor:
        """`encode`'s second half, on its own so that a tiled encoder (`vae_tiling`) draws the posterior
        noise exactly as the untiled one does: one CPU draw of the whole latent's shape."""
        if sample:
            eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device="cpu").to(mean.device)
            z = mean + torch.exp(0.5 * logvar) * eps
        else:
            z = mean
        return self.scale_factor * (z - self.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image in about [-1, 1] from a scaled latent (what `encode` and the denoiser produce)."""
        return self.decoder(z / self.scale_factor + self.shift_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def decoded_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) decoder output -> (B, H, W, 3) uint8.

    The cast truncates rather than rounds because the reference does; rounding would shift most
    pixels by one level relative to reference images.
    """
    if x.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    pixels = (x * 0.5 + 0.5).clamp(0, 1) * 255
    return pixels.permute(0, 2, 3, 1).to(torch.uint8)
