"""FP8 attention for large images' denoising steps (`fp8_attention`): cuDNN's FP8 SDPA, and its definition.

Why: with the projections in FP8 (`layers.fp8`), bf16 attention is about a fifth of a guided 1024x1024 step on
an H200. cuDNN's FP8 kernel ran the step's attention shapes at 763-852 TFLOP/s against 592-619 for its bf16
one (docs/PERFORMANCE.md). torch has no FP8 SDPA, so it is called through cuDNN's frontend (the optional
`nvidia-cudnn-frontend` package, extra `fp8-attention`), one graph per sequence shape, built on first use.
On Hopper its output is e4m3 (a bf16 output needs Blackwell), which the FP8 o_proj takes as it is.

The numerics (`fp8_attention_reference`, the CPU path and the judge of the kernel): per sequence, Q, K and V
are e4m3 with one scale each (`kernels.gather.pack_attention_rows_fp8`); scores and softmax in float32 from
their dequantised values; the probabilities rounded to e4m3 at scale 448; the output their product with V,
rounded to e4m3 at twice V's scale. cuDNN runs an online softmax, so it rounds probabilities against running
row maxima and sums in its own order: it matches the definition closely, not to the bit (a GPU test bounds
the difference). Only denoising sequences of at least `FP8_ATTENTION_MIN_QUERIES` queries take this path:
text attention (prompts, decode) never does, and smaller images keep bf16 attention inside their CUDA graphs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from bagel_serve.layers.fp8 import Fp8UnsupportedError
from bagel_serve.layers.kernels.gather import ATTENTION_SCALES, P_SCALE, sequence_scales
from bagel_serve.layers.kernels.quant import FP8_DTYPE, FP8_MAX, quantize_tensor_native

FP8_ATTENTION_MIN_QUERIES = 2048
"""Denoising sequences with at least this many queries (1024x1024 images have 4,098) run FP8 attention; the
same cut-off as cuDNN's bf16 path (`attention_backends.CUDNN_MIN_QUERIES`)."""
FP8_ATTENTION_MIN_CAPABILITY = (9, 0)
CUDNN_MIN_BACKEND = 90100
FLAG = "fp8_attention (--fp8-attention, Omni(fp8_attention=True))"
_SLOT = {name: i for i, name in enumerate(ATTENTION_SCALES)}


def check_fp8_attention_device(device: torch.device | str, capability: tuple[int, int] | None = None) -> None:
    """Refuse, before anything loads, a CUDA device cuDNN's FP8 attention does not run on (`capability`
    overrides the query, for tests), or a missing cuDNN frontend. The CPU runs the definition."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    cap = tuple(capability) if capability is not None else torch.cuda.get_device_capability(device)
    if cap < FP8_ATTENTION_MIN_CAPABILITY:
        need = ".".join(map(str, FP8_ATTENTION_MIN_CAPABILITY))
        raise Fp8UnsupportedError(f"{FLAG} needs a GPU of compute capability {need} or newer (cuDNN's FP8 "
                                  f"attention: Hopper, Blackwell); {device} has {cap[0]}.{cap[1]}. Leave it off.")
    _cudnn()


def _cudnn() -> Any:
    try:
        import cudnn
    except ImportError as e:
        raise Fp8UnsupportedError(f"{FLAG} runs cuDNN's FP8 attention through its Python frontend, which is not "
                                  f"installed: pip install 'bagel-serve[fp8-attention]' (nvidia-cudnn-frontend)"
                                  ) from e
    if cudnn.backend_version() < CUDNN_MIN_BACKEND:
        raise Fp8UnsupportedError(f"{FLAG} needs cuDNN {CUDNN_MIN_BACKEND // 10000}.{CUDNN_MIN_BACKEND // 100 % 100} "
                                  f"or newer, this process has {cudnn.backend_version()}")
    return cudnn


def use_fp8_attention(modules: Iterable[torch.nn.Module]) -> None:
    """Mark attention modules (`layers.attention.Attention`) to run their denoising sequences in FP8."""
    for m in modules:
        m.fp8 = True


def fp8_attention_reference(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, scales: torch.Tensor
                            ) -> torch.Tensor:
    """The definition on quantised operands: q8 (Lq, Hq, D), k8/v8 (Lk, Hkv, D) e4m3, `scales` one sequence's
    [SCALE_SLOTS, SCALE_SLOT] (`kernels.gather.ATTENTION_SCALES`) -> the e4m3 output (Lq, Hq, D)."""
    s = scales[:, 0].float()
    lq, hq, d = q8.shape
    group = hq // k8.shape[1]
    qf = (q8.float() * s[_SLOT["descale_q"]]).transpose(0, 1)
    kf = (k8.float() * s[_SLOT["descale_k"]]).repeat_interleave(group, dim=1).transpose(0, 1)
    vf = (v8.float() * s[_SLOT["descale_v"]]).repeat_interleave(group, dim=1).transpose(0, 1)
    probs = torch.softmax(torch.matmul(qf, kf.transpose(1, 2)) * (1.0 / math.sqrt(d)), dim=-1)
    probs = (probs * P_SCALE).to(FP8_DTYPE).float() / P_SCALE
    o = torch.matmul(probs, vf).transpose(0, 1) * s[_SLOT["scale_o"]]
    return o.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_attention_native(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One sequence's FP8 attention in torch ops (the CPU path): (Lq, Hq, D) queries against (Lk, Hkv, D) keys
    and values, unmasked, quantised as the GPU path quantises them; the output dequantised into q's dtype."""
    (q8, sq), (k8, sk), (v8, sv) = (quantize_tensor_native(x) for x in (q, k, v))
    scales = sequence_scales(sq, sk, sv)
    return (fp8_attention_reference(q8, k8, v8, scales).float() * scales[_SLOT["descale_o"], 0]).to(q.dtype)


class CudnnFp8Attention:
    """cuDNN's FP8 SDPA on one sequence's packed operands, one graph per shape (queries, keys, heads, kv
    heads, head dim), built on first use (about 0.1 s; the first of a process about 1.3 s, paid at start by
    `warm_up`)."""

    def __init__(self) -> None:
        self._graphs: dict[tuple[int, ...], tuple[Any, dict[str, Any], torch.Tensor, torch.Tensor]] = {}
        self._handle: Any = None

    def __call__(self, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, scales: torch.Tensor,
                 out: torch.Tensor) -> None:
        """q8 (Lq, Hq, D), k8/v8 (Lk, Hkv, D) contiguous e4m3; `scales` the sequence's [SCALE_SLOTS, SCALE_SLOT]
        float32 (`kernels.gather.ATTENTION_SCALES`) -> out (Lq, Hq, D) e4m3 at scale `scale_o`."""
        cudnn = _cudnn()
        if self._handle is None:
            self._handle = cudnn.create_handle()
        cudnn.set_stream(handle=self._handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
        key = (q8.shape[0], k8.shape[0], q8.shape[1], k8.shape[1], q8.shape[2], q8.device.index or 0)
        if key not in self._graphs:
            self._graphs[key] = self._build(cudnn, *key[:5], q8.device)
        graph, t, workspace, amax = self._graphs[key]
        pack = {t["q"]: q8.view(torch.uint8), t["k"]: k8.view(torch.uint8), t["v"]: v8.view(torch.uint8),
                t["o"]: out.view(torch.uint8), t["amax_s"]: amax[0, :1], t["amax_o"]: amax[1, :1]}
        for name in ATTENTION_SCALES:
            pack[t[name]] = scales[_SLOT[name], :1]
        graph.execute(pack, workspace, handle=self._handle)

    def _build(self, cudnn: Any, lq: int, lk: int, hq: int, hkv: int, d: int, device: torch.device
               ) -> tuple[Any, dict[str, Any], torch.Tensor, torch.Tensor]:
        fp8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=f32, compute_data_type=f32, handle=self._handle)

        def rows(name: str, n: int, heads: int) -> Any:  # (n, heads, d) row-major, as dims (1, heads, n, d)
            return g.tensor(name=name, dim=[1, heads, n, d], stride=[n * heads * d, d, heads * d, 1], data_type=fp8)

        t = {"q": rows("q", lq, hq), "k": rows("k", lk, hkv), "v": rows("v", lk, hkv)}
        for name in ATTENTION_SCALES:
            t[name] = g.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)
        o, _, amax_s, amax_o = g.sdpa_fp8(q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"],
                                          descale_k=t["descale_k"], descale_v=t["descale_v"],
                                          descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
                                          is_inference=True, attn_scale=1.0 / math.sqrt(d), use_causal_mask=False,
                                          name="sdpa_fp8")
        o.set_output(True).set_dim([1, hq, lq, d]).set_stride([lq * hq * d, d, hq * d, 1]).set_data_type(fp8)
        for a in (amax_s, amax_o):
            a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
        t.update(o=o, amax_s=amax_s, amax_o=amax_o)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        workspace = torch.empty(max(1, g.get_workspace_size()), dtype=torch.uint8, device=device)
        return g, t, workspace, torch.empty((2, 4), dtype=torch.float32, device=device)  # 16-byte slots
