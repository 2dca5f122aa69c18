"""From a checkpoint (local directory or Hugging Face repo id) to modules on the device.

The model is built on the meta device and each tensor is read from safetensors straight into its place
in the target dtype, so the weights never exist twice in memory. Loading is strict: a missing,
unexpected or mis-shaped tensor fails with its name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from bagel_serve.config.model_config import BagelConfig, ConfigError, load_bagel_config
from bagel_serve.model.autoencoder import AutoEncoder
from bagel_serve.model.bagel import Bagel
from bagel_serve.testing.demo import DEMO_MODEL, ensure_demo_model

EMA_FILE = "ema.safetensors"
INDEX_FILE = "model.safetensors.index.json"
AE_FILE = "ae.safetensors"
LATENT_POS_KEY = "latent_pos_embed.pos_embed"
HUB_FILES = ["*.json", "*.safetensors", "merges.txt", "vocab.json"]


class CheckpointError(RuntimeError):
    """The checkpoint cannot be found or does not match the model it describes."""


@dataclass
class LoadedModel:
    config: BagelConfig
    model: Bagel
    vae: AutoEncoder
    model_dir: Path


def resolve_model_dir(model: str | os.PathLike, *, local_files_only: bool = False) -> Path:
    """A local directory as is; otherwise an HF repo id, from the cache or downloaded."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    name = str(model)
    if name == DEMO_MODEL:
        return ensure_demo_model()
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"model {name!r} is neither a checkpoint directory nor a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        if local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise CheckpointError(
                f"model {name!r} is not in the Hugging Face cache and downloads are off (HF_HUB_OFFLINE). "
                f"Fetch it on a connected machine with `hf download {name}` and copy the cache, "
                f"or pass the path of a local checkpoint directory."
            ) from None
    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except RepositoryNotFoundError:
        raise CheckpointError(f"Hugging Face repo {name!r} does not exist or is private (log in with `hf auth login`)") from None
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(
            f"could not download {name!r} ({type(e).__name__}: {e}). Check the network, or download it elsewhere with "
            f"`hf download {name}` and pass the local directory."
        ) from None


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file, from ema.safetensors or a sharded index."""
    index = model_dir / INDEX_FILE
    ema = model_dir / EMA_FILE
    if ema.exists():
        return {k: ema for k in _keys_of(ema)}
    if index.exists():
        try:
            with open(index, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not valid JSON: {e}") from None
        except OSError as e:
            raise CheckpointError(f"cannot read {index}: {e.strerror or e}") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map (a mapping of tensor names to shard files)")
        missing = sorted({v for v in weight_map.values() if not (model_dir / v).exists()})
        if missing:
            raise CheckpointError(f"missing checkpoint files listed in {index}: {', '.join(missing)}")
        return {k: model_dir / v for k, v in weight_map.items()}
    raise CheckpointError(f"missing checkpoint file: {ema} (nor a sharded {INDEX_FILE})")


def _keys_of(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def _shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as e:  # a truncated / corrupt shard of a sharded checkpoint is first opened here
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
        with f:
            for k in f.keys():
                if files.get(k) == path:
                    shapes[k] = tuple(f.get_slice(k).get_shape())
    return shapes


def _check_keys(module: nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    misshaped = [f"{k}: file {shapes[k]}, model {expected[k]}" for k in sorted(expected) if k in shapes and shapes[k] != expected[k]]
    problems = []
    for label, items in (("missing tensors", missing), ("unexpected tensors", unexpected), ("mis-shaped tensors", misshaped)):
        if items:
            shown = "; ".join(items[:8]) + (f"; … ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError(f"{source} does not match the model config: " + " | ".join(problems))


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    owner = module.get_submodule(".".join(path)) if path else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        owner._buffers[leaf] = tensor


def _load_into(module: nn.Module, files: dict[str, Path], device: torch.device, dtype: torch.dtype,
               bar: tqdm | None = None) -> None:
    by_file: dict[Path, list[str]] = {}
    for k, p in files.items():
        by_file.setdefault(p, []).append(k)
    open_device = "cpu" if device.type == "meta" else str(device)
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt", device=open_device) as f:
            for k in keys:
                t = f.get_tensor(k)
                _assign(module, k, t.to(dtype=dtype))
                if bar is not None:
                    bar.update(t.numel() * t.element_size())


def read_config(model_dir: Path) -> BagelConfig:
    """The checkpoint's model config; a missing or inconsistent file is a CheckpointError naming it."""
    try:
        return load_bagel_config(model_dir)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_model(cfg: BagelConfig, device: torch.device | str = "meta") -> Bagel:
    """The module skeleton; on the meta device it holds shapes only."""
    with torch.device(device):
        return Bagel(cfg)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _skeletons(model: str | os.PathLike) -> tuple[Path, BagelConfig, Bagel, dict[str, Path], AutoEncoder, dict[str, Path]]:
    """Config and meta-device modules of a checkpoint, every weight file checked against them (names and
    shapes) before anything is read."""
    model_dir = resolve_model_dir(model)
    cfg = read_config(model_dir)
    files = _weight_files(model_dir)
    shapes = _shapes(files)
    if LATENT_POS_KEY in shapes:
        side = int(round(shapes[LATENT_POS_KEY][0] ** 0.5))
        if side * side == shapes[LATENT_POS_KEY][0] and side != cfg.max_latent_size:
            cfg = cfg.with_max_latent_size(side)
    bagel = build_model(cfg)
    _check_keys(bagel, shapes, f"{model_dir} weights")

    # Check the autoencoder file too before any weights are read, so a bad ae.safetensors fails fast.
    ae_path = model_dir / AE_FILE
    if not ae_path.exists():
        raise CheckpointError(f"missing checkpoint file: {ae_path}")
    ae_files = {k: ae_path for k in _keys_of(ae_path)}
    with torch.device("meta"):
        vae = AutoEncoder(cfg.vae)
    _check_keys(vae, _shapes(ae_files), str(ae_path))
    return model_dir, cfg, bagel, files, vae, ae_files


def load_skeleton(model: str | os.PathLike, *, dtype: torch.dtype, vae_dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The checkpoint's modules on the meta device, in `dtype`, with no weights read: for a process that
    validates and routes requests while workers elsewhere hold the weights (the Ray backend)."""
    model_dir, cfg, bagel, _, vae, _ = _skeletons(model)
    bagel.to(dtype).eval().requires_grad_(False)
    vae.to(vae_dtype).eval().requires_grad_(False)
    return LoadedModel(cfg, bagel, vae, model_dir)


def load_model(
    model: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> LoadedModel:
    """Load BAGEL and its autoencoder. bf16 on CUDA and float32 on CPU unless `dtype` says otherwise;
    the autoencoder stays float32 (the reference decodes in float32)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    model_dir, cfg, bagel, files, vae, ae_files = _skeletons(model)
    ae_path = model_dir / AE_FILE
    total = sum(p.stat().st_size for p in set(files.values()) | {ae_path})
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress) as bar:
        _load_into(bagel, files, device, dtype, bar)
        _load_into(vae, ae_files, device, vae_dtype, bar)
        bar.update(bar.total - bar.n)  # the files' headers are part of the total but not of the tensors
    bagel.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    return LoadedModel(cfg, bagel, vae, model_dir)
