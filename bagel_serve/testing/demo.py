"""The built-in demo model: a tiny BAGEL with RANDOM weights, written on first use into a cache folder.

It exists so that every command can be tried on any machine in seconds, without a GPU or a 30 GB download.
Its outputs are noise; everything says so when it is used.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEMO_MODEL = "bagel-serve-demo"
DEMO_NOTICE = "bagel-serve-demo is a tiny model with RANDOM weights: its images and texts are noise (for trying the tools only)"
_VERSION = "v1"


def demo_cache_dir() -> Path:
    root = os.environ.get("BAGEL_SERVE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bagel-serve"
    return Path(root) / f"demo-{_VERSION}"


def ensure_demo_model() -> Path:
    """The demo checkpoint's directory, written (atomically) if it is not there yet."""
    target = demo_cache_dir()
    if (target / "ae.safetensors").exists():
        return target
    from bagel_serve.testing.checkpoint import write_checkpoint

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        write_checkpoint(tmp, "demo", seed=0)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "ae.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
