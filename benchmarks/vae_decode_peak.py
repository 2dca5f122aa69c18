"""The VAE decoder's peak memory at 1024x1024 (float32, random FLUX-shaped weights: the peak depends on shapes
only) with its memory bounds and with the upsampling bands turned off, and the tensors alive at the peak (from
the allocator's history), so that a new peak shows where it is.

    PYTHONPATH=. python benchmarks/vae_decode_peak.py
"""

from __future__ import annotations

import time

import torch

from bagel_serve.config.model_config import AutoEncoderParams
from bagel_serve.engine.diffusion import vae_convs
from bagel_serve.model import autoencoder as A


def decode(ae: A.AutoEncoder, z: torch.Tensor, label: str) -> torch.Tensor:
    """Decode z; print the peak allocated above what was allocated before, and the seconds."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.inference_mode(), vae_convs():
        out = ae.decode(z)
    torch.cuda.synchronize()
    print(f"{label:28s} peak {(torch.cuda.max_memory_allocated() - base) / 2**30:.3f} GiB  "
          f"{time.perf_counter() - t0:.3f} s", flush=True)
    return out


def alive_at_peak(snapshot: dict) -> None:
    """Replay the allocator's trace; print the largest blocks alive at its peak, with where they were made."""
    live: dict[int, tuple[int, list]] = {}
    cur = best = 0
    at: dict[int, tuple[int, list]] = {}
    for e in snapshot["device_traces"][0]:
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], e.get("frames", []))
            cur += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])[0]
        if cur > best:
            best, at = cur, dict(live)
    print(f"recorded peak {best / 2**30:.3f} GiB; alive then:")
    for size, frames in sorted(at.values(), key=lambda x: -x[0])[:8]:
        where = [f"{f['filename'].split('/')[-1]}:{f['line']}:{f['name']}" for f in frames
                 if "autoencoder" in f["filename"]][:3]
        print(f"  {size / 2**20:9.1f} MiB  {where}")


def main() -> None:
    ae = A.AutoEncoder(AutoEncoderParams.from_dict(None)).cuda().eval().requires_grad_(False)
    z = torch.randn(1, 16, 128, 128, device="cuda")
    decode(ae, z, "warm-up")
    bounded = decode(ae, z, "bounded (default)")
    band = A.UPSAMPLE_BAND_BYTES
    A.UPSAMPLE_BAND_BYTES = 1 << 60
    decode(ae, z, "warm-up")
    whole = decode(ae, z, "upsampling not banded")
    u = lambda t: A.decoded_to_uint8(t).int()  # noqa: E731
    print("bounded vs not banded: max abs", (bounded - whole).abs().max().item(),
          "uint8 max", (u(bounded) - u(whole)).abs().max().item())
    A.UPSAMPLE_BAND_BYTES = band
    torch.cuda.memory._record_memory_history(max_entries=200000)
    decode(ae, z, "recorded")
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    alive_at_peak(snapshot)


if __name__ == "__main__":
    main()
