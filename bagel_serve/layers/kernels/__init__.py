"""Fused Triton kernels for the decode hot path, each beside a plain-torch twin that defines it.

Every op module exposes `op_native` (the formula, in torch), `op_triton` (the kernel) and `op` (the
dispatcher). The dispatch rule lives here, once, so that all ops agree on it: a call goes to Triton iff
its tensors are on CUDA, Triton imports, and `BAGEL_SERVE_DISABLE_TRITON` is not `1`. CPU tensors always
take the native path in the dispatchers; the tests call the `*_triton` functions directly under
Triton's interpreter (`TRITON_INTERPRET=1`).
"""

from __future__ import annotations

import functools
import os

import torch

DISABLE_ENV = "BAGEL_SERVE_DISABLE_TRITON"
# Triton's interpreter (the tests' CPU path) is chosen by this variable when `triton.jit` decorates, so
# reading it once at import agrees with what the kernels were built for.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether `import triton` works here (cached: the answer cannot change within a process)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install that fails while importing
        return False
    return True


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """The dispatch rule: all given tensors on CUDA, Triton importable, and not disabled by the environment.

    The environment is read on every call (a dictionary lookup) so a test or a benchmark can flip it at
    run time; under CUDA-graph capture the choice is made once, at capture.
    """
    if os.environ.get(DISABLE_ENV) == "1":
        return False
    if not all(t.is_cuda for t in tensors if t is not None):
        return False
    return triton_available()


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def power_of_2_parts(n: int, parts: int = 4) -> tuple[int, ...]:
    """`parts` powers of two (0 for an unused part, largest first) whose sum covers n: its highest set bits,
    the last part rounded up to a power of two when n has more set bits than parts. Triton tensors have
    power-of-two shapes; a row held as such parts wastes no lanes where one padded block would (18,944 =
    16,384 + 2,048 + 512, against a block of 32,768)."""
    if n <= 0 or parts < 1:
        raise ValueError(f"power_of_2_parts wants n >= 1 and parts >= 1, got n={n}, parts={parts}")
    out: list[int] = []
    rest = int(n)
    while rest and len(out) < parts - 1:
        top = 1 << (rest.bit_length() - 1)
        out.append(top)
        rest -= top
    if rest:
        out.append(next_power_of_2(rest))
    return tuple(out) + (0,) * (parts - len(out))


try:
    import triton
    import triton.language as tl
except Exception:  # no triton, or a broken one: the native paths need neither
    triton = None

if triton is not None:
    _INTERPRET = tl.constexpr(INTERPRET)

    @triton.jit
    def cast_rne(x, dtype: tl.constexpr):
        """`x.to(dtype)` with round-to-nearest-even, also under the interpreter.

        Compiled kernels convert with `cvt.rn`, which is what `.to` emits. Triton 3.6's interpreter instead
        truncates float32 -> bf16 (and its explicit "rtne" mode rounds half up without carrying into the
        exponent), so there the rounding is done on the bits: add 0x7FFF plus the lowest kept bit, shift.
        """
        if _INTERPRET and dtype == tl.bfloat16 and x.dtype == tl.float32:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)


__all__ = ["DISABLE_ENV", "INTERPRET", "next_power_of_2", "power_of_2_parts", "triton_available", "use_triton"]
