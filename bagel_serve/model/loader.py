"""From a checkpoint (local directory or Hugging Face repo id) to modules on the device.

The model is built on the meta device, its parameters are allocated once on the target device and dtype,
and each checkpoint tensor is read from safetensors and handed to its parameter's `weight_loader`, which
puts it into place (a merged QKV or gate-up parameter takes three or two checkpoint tensors). The
checkpoint's names are the contract: `checkpoint_manifest` says, for every tensor the model expects, which
parameter (and which part of it) it fills, so loading is strict in the checkpoint's own terms — a missing,
unexpected or mis-shaped tensor fails with its checkpoint name.

With a quantization config, the chosen projections get an FP8 quant method on the meta skeleton, load in the
model dtype like every other parameter, and are quantised one layer at a time once all weights are in
place (each layer frees its model-dtype weight as it goes, so two copies of the expert never coexist).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from bagel_serve.config.model_config import BagelConfig, ConfigError, load_bagel_config
from bagel_serve.config.quantization import QuantizationConfig
from bagel_serve.layers.conv import Conv2d
from bagel_serve.layers.attention import Attention
from bagel_serve.layers.fp8 import check_fp8_device, use_fp8
from bagel_serve.layers.fp8_attention import check_fp8_attention_device, use_fp8_attention
from bagel_serve.layers.linear import LinearBase
from bagel_serve.model.autoencoder import AutoEncoder
from bagel_serve.model.bagel import Bagel

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


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a parameter (or persistent buffer) and, for merged parameters, the
    part of it (`shard`, as the owning layer's `weight_loader` understands it)."""

    name: str
    shard: object
    shape: tuple[int, ...]
    owner: nn.Module = field(compare=False, repr=False)
    """The module the parameter belongs to (its `weight_loader`, if it has one, puts the tensor in place)."""


def checkpoint_manifest(module: nn.Module) -> dict[str, Target]:
    """Every checkpoint tensor the module expects, by checkpoint name, with its full shape."""
    out: dict[str, Target] = {}
    for key, t in module.state_dict(keep_vars=True).items():
        owner_path, _, leaf = key.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        describe = getattr(owner, "checkpoint_tensors", None)
        if describe is None:
            out[key] = Target(key, None, tuple(t.shape), owner)
            continue
        parent = owner_path.rpartition(".")[0]
        for shard, (source, shape) in describe(leaf).items():
            where = owner_path if source is None else (f"{parent}.{source}" if parent else source)
            out[f"{where}.{leaf}"] = Target(key, shard, tuple(shape), owner)
    return out


def _check_keys(module: nn.Module, shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, Target]:
    manifest = checkpoint_manifest(module)
    expected = {k: t.shape for k, t in manifest.items()}
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
    return manifest


def _load_into(module: nn.Module, files: dict[str, Path], manifest: dict[str, Target], device: torch.device,
               dtype: torch.dtype, bar: tqdm | None = None) -> None:
    """Allocate the module's tensors on `device` in `dtype` and fill them from the checkpoint files."""
    module.to(dtype)
    module.to_empty(device=device)
    state = module.state_dict(keep_vars=True)
    by_file: dict[Path, list[str]] = {}
    for k, p in files.items():
        by_file.setdefault(p, []).append(k)
    for path, keys in by_file.items():
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for k in keys:
                target = manifest[k]
                param = state[target.name]
                weight_loader = getattr(target.owner, "weight_loader", None)
                if weight_loader is None:
                    t = f.get_tensor(k)
                    param.data.copy_(t)
                else:
                    t = _Unread(f.get_slice(k))
                    weight_loader(param, t, target.shard)
                if bar is not None:
                    bar.update(t.numel() * t.element_size())


class _Unread:
    """A checkpoint tensor not read yet: a layer's `weight_loader` narrows it to the part it keeps (its
    tensor-parallel slice), and only that part is read from the file."""

    def __init__(self, part: Any) -> None:
        self._part = part
        self.shape = torch.Size(part.get_shape())
        self._dtype = _SAFETENSORS_DTYPES[part.get_dtype()]

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = tuple([slice(None)] * dim + [slice(start, start + length)])
        return self._part[index]

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self._dtype.itemsize


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


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


@dataclass
class _Skeleton:
    model_dir: Path
    config: BagelConfig
    bagel: Bagel
    files: dict[str, Path]
    manifest: dict[str, Target]
    vae: AutoEncoder
    ae_files: dict[str, Path]
    ae_manifest: dict[str, Target]


def _skeletons(model: str | os.PathLike) -> _Skeleton:
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
    manifest = _check_keys(bagel, shapes, f"{model_dir} weights")

    # Check the autoencoder file too before any weights are read, so a bad ae.safetensors fails fast.
    ae_path = model_dir / AE_FILE
    if not ae_path.exists():
        raise CheckpointError(f"missing checkpoint file: {ae_path}")
    ae_files = {k: ae_path for k in _keys_of(ae_path)}
    with torch.device("meta"):
        vae = AutoEncoder(cfg.vae)
    ae_manifest = _check_keys(vae, _shapes(ae_files), str(ae_path))
    return _Skeleton(model_dir, cfg, bagel, files, manifest, vae, ae_files, ae_manifest)


def load_skeleton(model: str | os.PathLike, *, dtype: torch.dtype, vae_dtype: torch.dtype = torch.float32) -> LoadedModel:
    """The checkpoint's modules on the meta device, in `dtype`, with no weights read: for a process that
    validates and routes requests while workers elsewhere hold the weights (the Ray backend)."""
    sk = _skeletons(model)
    sk.bagel.to(dtype).eval().requires_grad_(False)
    sk.vae.to(vae_dtype).eval().requires_grad_(False)
    return LoadedModel(sk.config, sk.bagel, sk.vae, sk.model_dir)


EXPERT_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
"""An LLM layer's projections of the understanding expert; the generation expert's are the same names with
`_moe_gen` (`self_attn.qkv_proj_moe_gen`, `mlp_moe_gen.gate_up_proj`, ...)."""


def expert_projections(bagel: Bagel, *, und: bool) -> list[LinearBase]:
    """Every LLM layer's generation-expert projections (QKV, O, gate-up, down), with `und` the
    understanding expert's too: what FP8 quantises. Embeddings, norms, the LM head, the ViT, the connector,
    the latent and time embedders and the VAE are never in it."""
    out: list[LinearBase] = []
    for layer in bagel.language_model.model.layers:
        for name in EXPERT_PROJECTIONS:
            owner, _, leaf = name.partition(".")
            gen = f"{owner}.{leaf}_moe_gen" if owner == "self_attn" else f"{owner}_moe_gen.{leaf}"
            out.append(layer.get_submodule(gen))
            if und:
                out.append(layer.get_submodule(name))
    return out


def process_weights_after_loading(module: nn.Module, device: torch.device) -> None:
    """Let every linear's quant method convert its loaded weight (FP8: quantise, free the original) and every
    VAE convolution lay its weight out for its kernel, then give the freed memory back to the device."""
    for m in module.modules():
        if isinstance(m, (LinearBase, Conv2d)):
            m.process_weights_after_loading()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def check_quantization_device(device: torch.device | str, dtype: torch.dtype, quantization: QuantizationConfig
                              ) -> None:
    """Refuse a device (or a process without the libraries) the quantization cannot run on, before any
    weight is read."""
    check_fp8_device(device, dtype)
    if quantization.fp8_attention:
        check_fp8_attention_device(device)


def load_model(
    model: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    vae_dtype: torch.dtype = torch.float32,
    progress: bool = False,
    quantization: QuantizationConfig | None = None,
    fp8_device_checked: bool = False,
) -> LoadedModel:
    """Load BAGEL and its autoencoder. bf16 on CUDA and float32 on CPU unless `dtype` says otherwise;
    the autoencoder stays float32 (the reference decodes in float32). `quantization`: FP8 for the
    generation expert's projections (and the understanding expert's with `fp8_und`); a GPU without FP8
    support is refused before anything is read (`fp8_device_checked`: the caller checked the GPU the weights
    go to after loading here)."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if quantization is not None and not fp8_device_checked:
        check_quantization_device(device, dtype, quantization)
    sk = _skeletons(model)
    if quantization is not None:
        use_fp8(expert_projections(sk.bagel, und=quantization.fp8_und))
        if quantization.fp8_attention:
            use_fp8_attention(m for m in sk.bagel.modules() if isinstance(m, Attention))
    ae_path = sk.model_dir / AE_FILE
    total = sum(p.stat().st_size for p in set(sk.files.values()) | {ae_path})
    with tqdm(total=total, unit="B", unit_scale=True, desc="loading weights", disable=not progress) as bar:
        _load_into(sk.bagel, sk.files, sk.manifest, device, dtype, bar)
        _load_into(sk.vae, sk.ae_files, sk.ae_manifest, device, vae_dtype, bar)
        bar.update(bar.total - bar.n)  # the files' headers are part of the total but not of the tensors
    sk.bagel.eval().requires_grad_(False)
    sk.vae.eval().requires_grad_(False)
    # Also returns the tensors read on their way into place to the device: nothing here reuses their memory.
    process_weights_after_loading(sk.bagel, device)
    process_weights_after_loading(sk.vae, device)
    return LoadedModel(sk.config, sk.bagel, sk.vae, sk.model_dir)
