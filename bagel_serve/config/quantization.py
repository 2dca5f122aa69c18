"""Weight quantization: the names a run may ask for, and the one setting the model loader takes.

`quantization: fp8` (deploy YAML, pipeline-wide or in every stage; `--quantization fp8`;
`Omni(quantization="fp8")`) stores the generation expert's projections as e4m3 with per-output-channel scales
and multiplies them with per-row e4m3 activations (`layers.fp8`); `fp8_und` does the same for the
understanding expert, which is off by default because it changes text outputs. `fp8_attention` runs the
attention of denoising steps of large images (at least 2,048 image queries, e.g. 1024x1024) in FP8 through
cuDNN (Hopper or newer, the `fp8-attention` extra; emulated on the CPU); off by default because it changes
images more than FP8 projections alone. Text attention (prompts, decode) never runs in FP8.
"""

from __future__ import annotations

from dataclasses import dataclass

QUANTIZATIONS = ("fp8",)
FP8_UND_NEEDS_FP8 = ("fp8_und (--fp8-und, Omni(fp8_und=True)) quantises the understanding expert on top of "
                     "FP8 quantization: it needs quantization: fp8 (--quantization fp8, Omni(quantization='fp8'))")
FP8_ATTENTION_NEEDS_FP8 = ("fp8_attention (--fp8-attention, Omni(fp8_attention=True)) runs the denoising attention "
                           "in FP8 on top of FP8 quantization: it needs quantization: fp8 (--quantization fp8, "
                           "Omni(quantization='fp8'))")


@dataclass(frozen=True)
class QuantizationConfig:
    """What the loader quantises: `method` (one of QUANTIZATIONS) for the generation expert's projections,
    with `fp8_und` the understanding expert's too, and with `fp8_attention` the attention of denoising steps
    of large images (image sequences of at least 2,048 queries; smaller ones keep bf16 attention inside their
    CUDA graphs): queries, keys, values and probabilities in e4m3, one scale per tensor and sequence."""

    method: str = "fp8"
    fp8_und: bool = False
    fp8_attention: bool = False

    def __post_init__(self) -> None:
        if self.method not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.method!r}")
