"""FP8 linears: dynamic W8A8 e4m3, per-row activation scales and per-output-channel weight scales.

`Fp8LinearMethod` is a linear layer's `quant_method`: its weight is loaded in the model dtype through the
usual `weight_loader`, then `process_weights_after_loading` quantises it per output row
(`kernels.quant`) and frees the original. `apply` takes the rows either as `Fp8Rows` (quantised by the
kernel that produced them: RMSNorm, SiLU-and-mul) or as a plain tensor, which it quantises itself (the
attention output feeding o_proj). On CUDA the GEMM is `torch._scaled_mm` with row-wise scales (sm_89+) and
fast accumulation; on the CPU it is emulated in float32 as `(x_q * s_x) @ (w_q * s_w).T + b`, rounded to the
output dtype.

Fast accumulation (the tensor cores' own partial sums, not promoted to float32 as the GEMM goes) runs the
DiT's GEMMs 5-12 % faster on an H200 and moves a GEMM's output 2e-3 to 4e-3 (relative L2) from the float32
emulation, against 1.7e-3 with promotion; a 50-step 1024x1024 text2img ends as far from the bf16 run with it
as without it (final latents' relative L2 0.2300 against 0.2297; `docs/PERFORMANCE.md`, 2026-12-02).

`SplitRows` carries one forward's rows split at the expert boundary, each block in the form its expert's
linear takes (e.g. und rows in bf16 and gen rows in e4m3); slicing by row range gives views, so the MoT pair
(`layers.mot`) still hands each expert its range without copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from bagel_serve.layers.kernels.quant import FP8_DTYPE, Fp8Rows, quantize_rows
from bagel_serve.layers.linear import LinearBase, UnquantizedLinearMethod

FP8_MIN_CAPABILITY = (8, 9)
"""FP8 tensor cores (and `torch._scaled_mm`) start with Ada (sm_89); Hopper is 9.0."""

Activation = torch.Tensor | Fp8Rows


class Fp8UnsupportedError(RuntimeError):
    """FP8 quantization was asked for on a GPU without FP8 tensor cores."""


def check_fp8_device(device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                     capability: tuple[int, int] | None = None) -> None:
    """Refuse a CUDA device older than sm_89 (`capability` overrides the query, for tests), and on CUDA a
    model dtype other than bf16 (the row-wise FP8 GEMM writes bf16). The CPU emulates FP8 in any dtype."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    if dtype != torch.bfloat16:
        raise Fp8UnsupportedError(f"quantization=fp8 (--quantization fp8) runs with bf16 weights on CUDA (the "
                                  f"row-wise FP8 GEMM writes bf16), got dtype {str(dtype).replace('torch.', '')}; "
                                  f"leave --dtype out or pass --dtype bfloat16")
    cap = tuple(capability) if capability is not None else torch.cuda.get_device_capability(device)
    if cap < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device) if capability is None else "this GPU"
        raise Fp8UnsupportedError(
            f"quantization=fp8 (--quantization fp8) needs a CUDA GPU of compute capability "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} or newer (FP8 tensor cores: Ada, Hopper, Blackwell); "
            f"{device} ({name}) has {cap[0]}.{cap[1]}. Run without quantization on this GPU.")


@dataclass(frozen=True)
class SplitRows:
    """Rows [0, split) in `head` and the rest in `tail`, each a tensor or `Fp8Rows` of the same width."""

    head: Activation
    tail: Activation

    @property
    def split(self) -> int:
        return self.head.shape[0]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.split + self.tail.shape[0], self.tail.shape[1]))

    @property
    def device(self) -> torch.device:
        return self.tail.device

    def __getitem__(self, rows: slice) -> "Activation | SplitRows":
        """Rows [a, b): a view of one block when the range lies in it, else a SplitRows of both blocks' views."""
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("SplitRows are sliced by contiguous row ranges only")
        a, b, _ = rows.indices(self.shape[0])
        b = max(a, b)
        s = self.split
        if b <= s:
            return self.head[a:b]
        if a >= s:
            return self.tail[a - s : b - s]
        return SplitRows(self.head[a:], self.tail[: b - s])


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy of it at a fresh (256-byte aligned) address: a row slice of a scale vector may start at
    any float, and the row-wise FP8 GEMMs (cuBLASLt, CUTLASS) load their scale vectors with 16-byte loads."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def fp8_linear(x: Fp8Rows, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype, out: torch.Tensor | None = None, fast_accum: bool = True) -> torch.Tensor:
    """`(x.data * x.scale) @ (weight * weight_scale).T + bias` in `out_dtype` (into `out` if given).

    weight: [N, K] e4m3, row-major; weight_scale: [1, N] float32; x.data [M, K] row-major, x.scale [M, 1].
    `fast_accum`: let the GPU's FP8 tensor cores keep their partial sums at their own reduced precision
    instead of promoting them to float32 as the GEMM goes (the default, as the FP8 linears run it; the CPU
    emulation is float32 either way)."""
    if x.data.is_cuda:
        data = x.data if x.data.is_contiguous() else x.data.contiguous()
        args = (data, weight.t(), _aligned(x.scale), weight_scale)
        if out is not None and out.is_contiguous() and out.dtype == out_dtype:
            return torch._scaled_mm(*args, bias=bias, out_dtype=out_dtype, out=out, use_fast_accum=fast_accum)
        y = torch._scaled_mm(*args, bias=bias, out_dtype=out_dtype, use_fast_accum=fast_accum)
        if out is None:
            return y
        out.copy_(y)  # `out` is not a dense row block cuBLAS can write into: one copy
        return out
    y = x.dequantize() @ (weight.float() * weight_scale.t()).t()
    if bias is not None:
        y = y + bias.float()
    y = y.to(out_dtype)
    if out is None:
        return y
    out.copy_(y)
    return out


class Fp8LinearMethod:
    """e4m3 weights with one float32 scale per output feature; activations quantised per row; the GPU GEMM
    with fast accumulation unless `fast_accum=False` (module docstring)."""

    wants_fp8_input = True

    def __init__(self, fast_accum: bool = True) -> None:
        self.out_dtype: torch.dtype | None = None
        """The model dtype the weight was loaded in, and the output dtype (set when the weight is quantised)."""
        self.fast_accum = fast_accum

    def create_weights(self, layer: LinearBase, input_size: int, output_size: int, bias: bool,
                       dtype: torch.dtype) -> None:
        # The checkpoint's tensors arrive in the model dtype through the usual weight_loader.
        UnquantizedLinearMethod().create_weights(layer, input_size, output_size, bias, dtype)

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        """Quantise the loaded weight per output row and free the original (idempotent)."""
        if self.out_dtype is not None:
            return
        w = layer.weight.data
        q = quantize_rows(w)
        self.out_dtype = w.dtype
        layer.weight = nn.Parameter(q.data, requires_grad=False)
        layer.weight_scale = nn.Parameter(q.scale.view(1, -1), requires_grad=False)

    def output_dtype(self, layer: LinearBase) -> torch.dtype:
        return self.out_dtype if self.out_dtype is not None else layer.weight.dtype

    def apply(self, layer: LinearBase, x: Activation, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.out_dtype is None:
            raise RuntimeError("an FP8 linear ran before its weight was quantised (process_weights_after_loading)")
        if isinstance(x, torch.Tensor):
            x = quantize_rows(x)
        bias = layer.bias if layer.adds_bias else None
        return fp8_linear(x, layer.weight, layer.weight_scale, bias, self.out_dtype, out, self.fast_accum)


def use_fp8(layers: Iterable[LinearBase]) -> None:
    """Give each layer an `Fp8LinearMethod` before its weights load (on the meta skeleton): the loader fills
    the model-dtype weight as usual, and `process_weights_after_loading` quantises it."""
    for layer in layers:
        if not isinstance(layer.quant_method, UnquantizedLinearMethod) or layer.weight.dtype == FP8_DTYPE:
            raise ValueError(f"{type(layer).__name__} is already quantised")
        layer.quant_method = Fp8LinearMethod()
