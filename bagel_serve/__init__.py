"""bagel-serve: an inference and serving engine for BAGEL-7B-MoT and models of its family.

The public names are imported lazily, so `bagel-serve --help` and the config tools do not pay for torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Omni", "Request", "RequestError", "RequestOutput", "__version__"]

_LAZY = {
    "Omni": "bagel_serve.entrypoints.omni",
    "Request": "bagel_serve.engine.request",
    "RequestError": "bagel_serve.engine.request",
    "RequestOutput": "bagel_serve.engine.request",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bagel_serve' has no attribute {name!r}")
