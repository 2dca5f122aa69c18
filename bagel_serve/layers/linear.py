"""Linear layers that know how they are sharded, fused and quantised.

Every projection of the model is one of these. A layer owns its parameters through a `quant_method`
(how the weight is stored and multiplied: unquantised here, FP8 in `layers.fp8`) and a `weight_loader` on each
parameter that puts one checkpoint tensor into its place: the slice of a merged projection it fills
(QKV, gate-up) and, under tensor parallelism, only this rank's part of it. Every layer has a
`weight_loader(param, tensor, shard)` for its parameters (the model loader looks it up on the parameter's
layer) and says which checkpoint tensors it is made of (`checkpoint_tensors`), so the loader stays strict
and its errors name the checkpoint's tensors.

Column-parallel layers split their output features over the tensor-parallel ranks, row-parallel ones their
input features (their outputs are partial sums, reduced by the caller: the MoT pair reduces both experts'
rows at once). Nothing here assumes one rank.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from bagel_serve.distributed.parallel_state import tp_rank, tp_world_size

ShardId = int | str | None


class LinearMethod(Protocol):
    """How a linear layer stores its weight and computes `x @ W.T + b`.

    The loader fills the parameters `create_weights` made (in the model dtype, through `weight_loader`),
    then calls `process_weights_after_loading` once (where a quantised method converts them).
    `wants_fp8_input` tells the kernel producing this layer's input (RMSNorm, SiLU-and-mul) to hand it over
    as e4m3 rows with scales (`kernels.quant.Fp8Rows`) instead of model-dtype rows."""

    wants_fp8_input: bool

    def create_weights(self, layer: "LinearBase", input_size: int, output_size: int, bias: bool,
                       dtype: torch.dtype) -> None: ...

    def process_weights_after_loading(self, layer: "LinearBase") -> None: ...

    def output_dtype(self, layer: "LinearBase") -> torch.dtype: ...

    def apply(self, layer: "LinearBase", x: Any, out: torch.Tensor | None = None) -> torch.Tensor: ...


class UnquantizedLinearMethod:
    """Plain weights in the model dtype; `out` lets the MoT pair write both experts into one buffer."""

    wants_fp8_input = False

    def process_weights_after_loading(self, layer: "LinearBase") -> None:
        pass

    def output_dtype(self, layer: "LinearBase") -> torch.dtype:
        return layer.weight.dtype

    def create_weights(self, layer: "LinearBase", input_size: int, output_size: int, bias: bool,
                       dtype: torch.dtype) -> None:
        layer.weight = nn.Parameter(torch.empty(output_size, input_size, dtype=dtype), requires_grad=False)
        if bias:
            layer.bias = nn.Parameter(torch.empty(output_size, dtype=dtype), requires_grad=False)
        else:
            layer.register_parameter("bias", None)

    def apply(self, layer: "LinearBase", x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        bias = layer.bias if layer.adds_bias else None
        if out is None:
            return F.linear(x, layer.weight, bias)
        # The same kernels F.linear runs for 2-D input, writing into the caller's rows.
        if bias is not None:
            return torch.addmm(bias, x, layer.weight.t(), out=out)
        return torch.mm(x, layer.weight.t(), out=out)


class LinearBase(nn.Module):
    """`input_size`/`output_size` are the full (checkpoint) sizes; parameters hold this rank's part."""

    def __init__(self, input_size: int, output_size: int, *, bias: bool, local_input: int, local_output: int,
                 quant_method: LinearMethod | None = None, params_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = local_input
        self.output_size_per_partition = local_output
        self.quant_method = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self, local_input, local_output, bias,
                                         params_dtype or torch.get_default_dtype())

    @property
    def adds_bias(self) -> bool:
        return self.bias is not None

    @property
    def wants_fp8_input(self) -> bool:
        """Whether this layer's input should arrive as e4m3 rows with scales (its quant method's choice)."""
        return self.quant_method.wants_fp8_input

    @property
    def output_dtype(self) -> torch.dtype:
        return self.quant_method.output_dtype(self)

    def forward(self, x: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        """`x`: [M, K] rows (a tensor, or e4m3 rows with scales for an FP8 layer); `out`: [M, N] to write into."""
        return self.quant_method.apply(self, x, out)

    def process_weights_after_loading(self) -> None:
        """After the checkpoint filled the parameters: let the quant method convert them (e.g. to FP8)."""
        self.quant_method.process_weights_after_loading(self)

    # ------------------------------------------------------------------ loading
    def checkpoint_tensors(self, param_name: str) -> dict[ShardId, tuple[str | None, tuple[int, ...]]]:
        """For one of our parameters: shard id -> (sibling module name in the checkpoint, or None for our own
        name; the tensor's full shape in the checkpoint)."""
        return {None: (None, self._full_shape(param_name))}

    def _full_shape(self, param_name: str) -> tuple[int, ...]:
        return (self.output_size, self.input_size) if param_name == "weight" else (self.output_size,)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        _copy(param.data, loaded)


def _copy(dst: torch.Tensor, src: Any) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"expected a tensor of shape {tuple(dst.shape)}, got {tuple(src.shape)}")
    dst.copy_(src if isinstance(src, torch.Tensor) else src.narrow(0, 0, src.shape[0]))


def _rank_slice(t: Any, dim: int, size: int) -> torch.Tensor:
    """This rank's `size` entries of `t` along `dim`. `t` is a tensor or a checkpoint tensor not read yet
    (anything with `shape` and a `narrow` that reads only that part, `model.loader`): under tensor
    parallelism each rank reads only its slices from the file."""
    return t.narrow(dim, tp_rank() * size, size)


def _divide(n: int, what: str) -> int:
    world = tp_world_size()
    if n % world:
        raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size {world}")
    return n // world


class ReplicatedLinear(LinearBase):
    """The whole weight on every rank (small projections: embedders, heads of the image path)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, **kw: Any) -> None:
        super().__init__(input_size, output_size, bias=bias, local_input=input_size, local_output=output_size, **kw)


class ColumnParallelLinear(LinearBase):
    """Output features split over the ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True, **kw: Any) -> None:
        super().__init__(input_size, output_size, bias=bias, local_input=input_size,
                         local_output=_divide(output_size, "output features"), **kw)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        _copy(param.data, _rank_slice(loaded, 0, self.output_size_per_partition))


class RowParallelLinear(LinearBase):
    """Input features split over the ranks: each rank's output is a partial sum (reduced by the caller);
    the bias is added by rank 0 only, so the sum holds it once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, **kw: Any) -> None:
        super().__init__(input_size, output_size, bias=bias, local_input=_divide(input_size, "input features"),
                         local_output=output_size, **kw)

    @property
    def adds_bias(self) -> bool:
        return self.bias is not None and tp_rank() == 0

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        if len(loaded.shape) == 2:
            loaded = _rank_slice(loaded, 1, self.input_size_per_partition)
        _copy(param.data, loaded)


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel projections of the same input as one GEMM (gate and up of an MLP).

    `sources[i]` is the checkpoint module whose tensor fills output block i (`output_sizes[i]` features)."""

    def __init__(self, input_size: int, output_sizes: list[int], sources: list[str], bias: bool = False,
                 **kw: Any) -> None:
        if len(sources) != len(output_sizes):
            raise ValueError("one checkpoint source per output block")
        self.output_sizes = list(output_sizes)
        self.sources = list(sources)
        self.local_sizes = [_divide(n, f"{s} output features") for n, s in zip(output_sizes, sources)]
        super().__init__(input_size, sum(output_sizes), bias=bias, local_input=input_size,
                         local_output=sum(self.local_sizes), **kw)

    def checkpoint_tensors(self, param_name: str) -> dict[ShardId, tuple[str | None, tuple[int, ...]]]:
        tail = (self.input_size,) if param_name == "weight" else ()
        return {i: (src, (n, *tail)) for i, (src, n) in enumerate(zip(self.sources, self.output_sizes))}

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None) -> None:
        i = int(shard_id)
        size = self.local_sizes[i]
        _copy(param.data.narrow(0, sum(self.local_sizes[:i]), size), _rank_slice(loaded, 0, size))


class QKVParallelLinear(MergedColumnParallelLinear):
    """Query, key and value projections as one GEMM, heads split over the ranks.

    Output layout (per rank): this rank's query heads, then its key heads, then its value heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 sources: tuple[str, str, str], **kw: Any) -> None:
        self.num_heads = _divide(num_heads, "query heads")
        self.num_kv_heads = _divide(num_kv_heads, "key/value heads")
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim],
                         list(sources), bias=bias, **kw)
