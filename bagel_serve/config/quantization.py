"""Weight quantization: the names a run may ask for, and the one setting the model loader takes.

`quantization: fp8` (deploy YAML, pipeline-wide or in every stage; `--quantization fp8`;
`Omni(quantization="fp8")`) stores the generation expert's projections as e4m3 with per-output-channel scales
and multiplies them with per-row e4m3 activations (`layers.fp8`); `fp8_und` does the same for the
understanding expert, which is off by default because it changes text outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

QUANTIZATIONS = ("fp8",)
FP8_UND_NEEDS_FP8 = ("fp8_und (--fp8-und, Omni(fp8_und=True)) quantises the understanding expert on top of "
                     "FP8 quantization: it needs quantization: fp8 (--quantization fp8, Omni(quantization='fp8'))")


@dataclass(frozen=True)
class QuantizationConfig:
    """What the loader quantises: `method` (one of QUANTIZATIONS) for the generation expert's projections,
    and with `fp8_und` the understanding expert's too."""

    method: str = "fp8"
    fp8_und: bool = False

    def __post_init__(self) -> None:
        if self.method not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.method!r}")
