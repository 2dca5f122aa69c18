"""The VAE's float32 convolutions as implicit GEMMs on tensor cores, with float32's accuracy.

cuDNN runs a float32 convolution with TF32 off on the CUDA cores (about 27 TFLOP/s at the decoder's shapes on
an H200, most of a 512x512 decode); with TF32 on it is fast but keeps 10 mantissa bits of every input, which
moves pixels. This kernel keeps the tensor cores and float32's accuracy by Triton's "tf32x3": each operand is
split into a TF32 head and a TF32 tail, and the three products that matter (head·head, head·tail, tail·head)
accumulate in float32, so each product is exact to about 2^-21 relative, below the float32 rounding of the
sums themselves (measured against float64: 3e-7 of the largest output, cuDNN's float32 2e-6). With
`torch.backends.cudnn.allow_tf32` set (`vae_precision: tf32`) the convolutions stay with cuDNN, whose TF32
kernels are faster than a TF32 version of this one.

One kernel covers every convolution the VAE has, and fuses what surrounds two of them:
- any kernel size with symmetric zero padding, stride 1 or 2; a stride-2 convolution reads zeros past the
  bottom and right edges, which is the encoder's (0, 1, 0, 1) padding;
- `upsample=2`: the convolution of the nearest-neighbour upsampled input, read from the input itself (the
  upsampled copy, 4x the input, is never built);
- `residual`: added after the bias, as `conv(x) + residual` rounds it.
Any memory format in; out in the memory format of `residual` when given (the tensor the result replaces: the
attention block's channels-last view plus its NCHW input is NCHW), else of x. The decoder runs NCHW. The
weight is read with its own strides; `pack_weight` gives it the channels-last layout under which the reduction
dimension is contiguous.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bagel_serve.layers.kernels import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # the native path needs neither
    triton = None


def _out_size(size: int, k: int, stride: int, padding: int, upsample: int) -> int:
    return (size * upsample + 2 * padding - k) // stride + 1


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int,
           upsample: int, residual: torch.Tensor | None) -> tuple[int, int]:
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv2d wants x (B, C, H, W) and weight (O, C, kh, kw), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    if stride not in (1, 2) or upsample not in (1, 2) or (stride == 2 and upsample == 2) or padding < 0:
        raise ValueError(f"conv2d: stride {stride}, upsample {upsample}, padding {padding} is not supported")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    kh, kw = weight.shape[2:]
    ho = _out_size(x.shape[2], kh, stride, padding, upsample)
    wo = _out_size(x.shape[3], kw, stride, padding, upsample)
    if stride == 2:  # the far edges' zero row and column (the encoder's asymmetric padding)
        ho, wo = _out_size(x.shape[2] + 1, kh, 2, padding, 1), _out_size(x.shape[3] + 1, kw, 2, padding, 1)
    if residual is not None and residual.shape != (x.shape[0], weight.shape[0], ho, wo):
        raise ValueError(f"residual must be {(x.shape[0], weight.shape[0], ho, wo)}, got {tuple(residual.shape)}")
    return ho, wo


def conv2d_native(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                  padding: int = 1, upsample: int = 1, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The definition, in torch's ops: nearest upsampling, the far edges' zero padding for stride 2, the
    convolution (cuDNN's on the GPU, under its TF32 flag), then the residual."""
    _check(x, weight, bias, stride, padding, upsample, residual)
    if upsample == 2:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    if stride == 2:
        x = F.pad(x, (0, 1, 0, 1))
    y = F.conv2d(x, weight.contiguous(), bias, stride=stride, padding=padding)
    if residual is None:
        return y
    return y.contiguous(memory_format=_memory_format(residual)).add_(residual)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    nhwc = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if nhwc else torch.contiguous_format


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """The same weight in channels-last memory, where each output channel's reduction runs (tap, channel)
    with the channels contiguous: the kernel's weight tiles are then unit-stride loads."""
    return weight.contiguous(memory_format=torch.channels_last)


def supports(weight: torch.Tensor) -> bool:
    """Whether the kernel takes this weight's shape: at least 16 input and output channels (Triton's
    smallest dot), so the RGB ends of the VAE (3 channels) stay with cuDNN."""
    return weight.shape[0] >= 16 and weight.shape[1] >= 16


if triton is not None:

    # The image's size, and the strides that follow from it, are not specialised on: Triton's divisibility
    # hints would compile again for every new image size, at a request instead of at start. The geometry and
    # the fused residual are (seven variants, compiled at start by `diffusion.warm_up_vae`); as run-time values
    # they cost 5-8 % of a 3x3 convolution's time on an H200 and saved about 1 s of a cold compile of 9.5-12.5 s
    # (Triton's on-disk cache then serves later starts: 0.95 s).
    @triton.jit(do_not_specialize=["M", "H", "W", "HO", "WO", "sxn", "sxc", "sxh", "syn", "syc", "syh", "srn", "src",
                                   "srh"])
    def _conv_kernel(x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, M, H, W, HO, WO, CIN, COUT,
                     sxn, sxc, sxh, sxw, swo, swi, swh, sww, syn, syc, syh, syw, srn, src, srh, srw,
                     KH: tl.constexpr, KW: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                     UP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Output pixels are the GEMM's rows, output channels its columns, (tap, input channel) its reduction.
        The column blocks of one row block are neighbouring programs, so they share its input tiles in L2."""
        pid = tl.program_id(0)
        n_blocks = tl.cdiv(COUT, BLOCK_N)
        pid_m = pid // n_blocks
        pid_n = pid - pid_m * n_blocks
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < COUT
        img = offs_m // (HO * WO)
        rem = offs_m - img * (HO * WO)
        oh = rem // WO
        ow = rem - oh * WO
        x_img = x_ptr + img.to(tl.int64) * sxn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_blocks = tl.cdiv(CIN, BLOCK_K)
        for step in range(0, KH * KW * k_blocks):
            tap = step // k_blocks
            cs = (step - tap * k_blocks) * BLOCK_K + offs_k
            kh = tap // KW
            kw = tap - kh * KW
            ih = oh * STRIDE + kh - PAD  # in the upsampled image's coordinates when UP > 1
            iw = ow * STRIDE + kw - PAD
            ok = m_ok & (ih >= 0) & (ih < H * UP) & (iw >= 0) & (iw < W * UP)
            ih = tl.where(ok, ih, 0) // UP
            iw = tl.where(ok, iw, 0) // UP
            c_ok = cs < CIN
            a = tl.load(x_img[:, None] + (ih * sxh + iw * sxw)[:, None] + cs[None, :] * sxc,
                        mask=ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(w_ptr + offs_n[None, :] * swo + cs[:, None] * swi + kh * swh + kw * sww,
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + offs_n, mask=n_ok, other=0.0)[None, :]
        out_ok = m_ok[:, None] & n_ok[None, :]
        if HAS_RES:
            r = tl.load(r_ptr + img.to(tl.int64)[:, None] * srn + (oh * srh + ow * srw)[:, None]
                        + offs_n[None, :] * src, mask=out_ok, other=0.0)
            acc = acc + r
        tl.store(y_ptr + img.to(tl.int64)[:, None] * syn + (oh * syh + ow * syw)[:, None] + offs_n[None, :] * syc,
                 acc, mask=out_ok)


BLOCKS = {3: {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 2},
          1: {"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}}
"""The kernel's tiles by kernel size, the fastest of `bench_vae_conv.py --sweep` on an H200 (2026-12-02) at the
decoder's shapes: 3x3 at 67-75 TFLOP/s, cuDNN's float32 at 27-42; the 1x1 shortcut at 26 (cuDNN 24)."""


def conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                  padding: int = 1, upsample: int = 1, residual: torch.Tensor | None = None,
                  precision: str = "tf32x3", blocks: dict | None = None) -> torch.Tensor:
    """`conv2d_native` in one launch, float32 in and out. `precision`: Triton's dot precision ("tf32x3":
    float32's accuracy; the benchmark also times "tf32"); `blocks`: tiles other than `BLOCKS`."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    ho, wo = _check(x, weight, bias, stride, padding, upsample, residual)
    if x.dtype != torch.float32 or weight.dtype != torch.float32 or not supports(weight):
        raise ValueError(f"conv2d_triton wants float32 with >= 16 channels each way, got {x.dtype} "
                         f"{tuple(weight.shape)}")
    b_, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    cfg = dict(BLOCKS[3 if kh * kw > 1 else 1], **(blocks or {}))
    y = torch.empty((b_, cout, ho, wo), dtype=x.dtype, device=x.device,
                    memory_format=_memory_format(residual if residual is not None else x))
    m = b_ * ho * wo
    if m == 0:
        return y
    r = residual if residual is not None else y
    bn = min(cfg["BLOCK_N"], max(16, triton.next_power_of_2(cout)))
    bk = min(cfg["BLOCK_K"], max(16, triton.next_power_of_2(cin)))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(cout, bn),)
    _conv_kernel[grid](
        x, weight, bias if bias is not None else y, r, y, m, h, w, ho, wo, cin, cout,
        *x.stride(), *weight.stride(), *y.stride(), *r.stride(),
        KH=kh, KW=kw, STRIDE=stride, PAD=padding, UP=upsample, HAS_BIAS=bias is not None,
        HAS_RES=residual is not None, PRECISION=precision, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=bn, BLOCK_K=bk,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y


def uses_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The dispatch rule: float32 CUDA tensors of a shape the kernel takes, cuDNN's TF32 off, Triton in use."""
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and supports(weight)
            and not torch.backends.cudnn.allow_tf32 and use_triton(x, weight))


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
           padding: int = 1, upsample: int = 1, residual: torch.Tensor | None = None) -> torch.Tensor:
    """A VAE convolution: the kernel where `uses_kernel`, torch's ops otherwise."""
    if uses_kernel(x, weight):
        return conv2d_triton(x, weight, bias, stride, padding, upsample, residual)
    return conv2d_native(x, weight, bias, stride, padding, upsample, residual)
