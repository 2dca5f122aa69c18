"""Model configuration read from a BAGEL checkpoint directory.

The real BAGEL-7B-MoT repo ships `llm_config.json` and `vit_config.json` (what the official loader reads)
plus a nested `config.json` (what serving frameworks read). We read the two flat files as the authority,
apply the overrides the official loader forces, and take the BAGEL-level fields from `config.json` when
present, falling back to the values the official app hard-codes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from bagel_serve.imaging import VAE_TRANSFORM_DEFAULT, VIT_TRANSFORM_DEFAULT, ImageTransformConfig


class ConfigError(ValueError):
    """A checkpoint's configuration files are missing or inconsistent."""


@dataclass(frozen=True)
class LLMConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LLMConfig":
        cfg = cls(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=int(d["num_attention_heads"]),
            num_key_value_heads=int(d.get("num_key_value_heads", d["num_attention_heads"])),
            vocab_size=int(d["vocab_size"]),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(d.get("rope_theta", 1_000_000.0)),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        )
        if d.get("rope_scaling"):
            raise ConfigError("llm_config: rope_scaling is not supported (BAGEL uses default RoPE)")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError("llm_config: hidden_size must be divisible by num_attention_heads")
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ConfigError("llm_config: num_attention_heads must be divisible by num_key_value_heads")
        if cfg.head_dim % 2 or cfg.hidden_size % 4:
            raise ConfigError("llm_config: head_dim must be even and hidden_size divisible by 4")
        return cfg


@dataclass(frozen=True)
class ViTConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    """Layers actually used: the file's count minus one (the official loader drops the last layer)."""
    num_attention_heads: int
    patch_size: int
    image_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViTConfig":
        act = d.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ConfigError(f"vit_config: hidden_act {act!r} is not supported (expected gelu_pytorch_tanh)")
        return cls(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_hidden_layers=int(d["num_hidden_layers"]) - 1,
            num_attention_heads=int(d["num_attention_heads"]),
            patch_size=int(d.get("patch_size", 14)),
            image_size=int(d.get("image_size", 980)),
            num_channels=int(d.get("num_channels", 3)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
        )


VAE_NORM_GROUPS = 32
"""GroupNorm groups of every autoencoder norm: its channel counts must divide by it."""


@dataclass
class AutoEncoderParams:
    """Hyper-parameters of the autoencoder; the defaults are the FLUX/BAGEL values (`load_ae`)."""

    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159
    downsample: int = 8

    def __post_init__(self) -> None:
        # Validate eagerly: a bad value would otherwise surface as an obscure GroupNorm or
        # state-dict shape error long after the config was read.
        self.ch_mult = tuple(self.ch_mult)
        for name in ("resolution", "in_channels", "ch", "out_ch", "num_res_blocks", "z_channels", "downsample"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.ch_mult or any(isinstance(m, bool) or not isinstance(m, int) or m <= 0 for m in self.ch_mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive integers, got {self.ch_mult!r}")
        if self.ch % VAE_NORM_GROUPS:
            raise ValueError(f"ch must be divisible by {VAE_NORM_GROUPS} (GroupNorm groups), got {self.ch}")
        for m in self.ch_mult:
            if (self.ch * m) % VAE_NORM_GROUPS:
                raise ValueError(
                    f"ch_mult entry {m} gives {self.ch * m} channels, not divisible by {VAE_NORM_GROUPS} (GroupNorm groups)"
                )
        if 2 ** (len(self.ch_mult) - 1) != self.downsample:
            raise ValueError(
                f"downsample={self.downsample} does not match ch_mult {self.ch_mult} "
                f"(which downsamples by {2 ** (len(self.ch_mult) - 1)})"
            )
        for name in ("scale_factor", "shift_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.scale_factor == 0:
            raise ValueError("scale_factor must be non-zero")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> AutoEncoderParams:
        """Build from a checkpoint's `vae_config`; the real BAGEL checkpoint has none, hence the
        FLUX defaults for `None`. Unknown keys are ignored so newer config files still load."""
        if d is None:
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "ch_mult" in kwargs:
            value = kwargs["ch_mult"]
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"ch_mult must be a list of integers, got {value!r}")
            kwargs["ch_mult"] = tuple(value)
        for name in ("scale_factor", "shift_factor"):
            if isinstance(kwargs.get(name), int) and not isinstance(kwargs[name], bool):
                kwargs[name] = float(kwargs[name])
        return cls(**kwargs)


@dataclass(frozen=True)
class BagelConfig:
    llm: LLMConfig
    vit: ViTConfig
    vae: AutoEncoderParams
    latent_patch_size: int = 2
    max_latent_size: int = 64
    vit_max_num_patch_per_side: int = 70
    vae_transform: ImageTransformConfig = VAE_TRANSFORM_DEFAULT
    vit_transform: ImageTransformConfig = VIT_TRANSFORM_DEFAULT
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def latent_channels(self) -> int:
        return self.vae.z_channels

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.vae.z_channels

    @property
    def latent_downsample(self) -> int:
        """Pixels per LLM image token along one side (VAE downsample × latent patch)."""
        return self.vae.downsample * self.latent_patch_size

    @property
    def max_image_side(self) -> int:
        return self.max_latent_size * self.latent_downsample

    def with_max_latent_size(self, n: int) -> "BagelConfig":
        return BagelConfig(self.llm, self.vit, self.vae, self.latent_patch_size, n,
                           self.vit_max_num_patch_per_side, self.vae_transform, self.vit_transform, self.raw)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"missing checkpoint file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_bagel_config(model_dir: str | Path) -> BagelConfig:
    """Read the configs of a BAGEL checkpoint directory.

    `max_latent_size` is provisional here: the loader corrects it from the rows of `latent_pos_embed`,
    because some published `config.json` files carry a stale value.
    """
    model_dir = Path(model_dir)
    top_path = model_dir / "config.json"
    top = _read_json(top_path) if top_path.exists() else {}
    llm_path, vit_path = model_dir / "llm_config.json", model_dir / "vit_config.json"
    llm_d = _read_json(llm_path) if llm_path.exists() or "llm_config" not in top else top["llm_config"]
    vit_d = _read_json(vit_path) if vit_path.exists() or "vit_config" not in top else top["vit_config"]
    llm_src = llm_path if llm_path.exists() else f"{top_path}: llm_config"
    vit_src = vit_path if vit_path.exists() else f"{top_path}: vit_config"
    for src, d in ((llm_src, llm_d), (vit_src, vit_d)):
        if not isinstance(d, dict):
            raise ConfigError(f"{src} must be a JSON object, got {type(d).__name__}")
    llm = _parse(LLMConfig.from_dict, llm_d, llm_src)
    vit = _parse(ViTConfig.from_dict, vit_d, vit_src)
    try:
        vae = AutoEncoderParams.from_dict(top.get("vae_config"))
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{top_path}: vae_config: {e}") from None

    def top_int(key: str, default: int) -> int:
        return _parse(lambda d: int(d.get(key, default)), top, f"{top_path}: {key}")

    vae_t = top.get("vae_image_transform")
    vit_t = top.get("vit_image_transform")
    return BagelConfig(
        llm=llm,
        vit=vit,
        vae=vae,
        latent_patch_size=top_int("latent_patch_size", 2),
        max_latent_size=top_int("max_latent_size", 64),
        vit_max_num_patch_per_side=top_int("vit_max_num_patch_per_side", 70),
        vae_transform=_parse(ImageTransformConfig.from_dict, vae_t, f"{top_path}: vae_image_transform") if vae_t else VAE_TRANSFORM_DEFAULT,
        vit_transform=_parse(ImageTransformConfig.from_dict, vit_t, f"{top_path}: vit_image_transform") if vit_t else VIT_TRANSFORM_DEFAULT,
        raw=top,
    )


def _parse(make: Any, d: Any, source: Any) -> Any:
    """`make(d)`, with a missing or mistyped field reported as a ConfigError naming `source`."""
    try:
        return make(d)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except KeyError as e:
        raise ConfigError(f"{source}: model config lacks required field {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as e:
        raise ConfigError(f"{source}: malformed model config ({type(e).__name__}: {e})") from None
