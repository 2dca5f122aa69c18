"""Weight dtype names: one vocabulary for `--dtype`, `Omni(dtype=...)` and a deploy config's `dtype`."""

from __future__ import annotations

DTYPES: dict[str, str | None] = {
    "auto": None, "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
    "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32",
}
"""Each name and the torch dtype it means (`torch.<value>`); "auto" (None): bf16 on CUDA, fp32 on the CPU.
Names only, so that the CLI's choices and the deploy schema need no torch."""

VAE_PRECISIONS = ("float32", "tf32")
"""How the VAE's convolutions compute (`vae_precision`): full float32 as the reference (the default), or
float32 tensors through TF32 tensor cores on a GPU (faster; pixels move by about a level)."""
