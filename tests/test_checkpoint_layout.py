"""The model skeleton matches the real BAGEL-7B-MoT layout, and our writer's checkpoints load back."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from bagel_serve import Omni
from bagel_serve.engine.tokenizer import GEN_THINK_SYSTEM_PROMPT, VLM_THINK_SYSTEM_PROMPT, BagelTokenizer
from bagel_serve.model.autoencoder import AutoEncoder
from bagel_serve.model.loader import build_model, checkpoint_manifest
from bagel_serve.testing.checkpoint import preset_config, write_checkpoint


def test_full_size_skeleton_matches_official_manifest(golden_dir: Path) -> None:
    manifest = json.loads((golden_dir / "bagel-7b-mot-manifest.json").read_text())
    cfg = preset_config("full")
    model = build_model(cfg)  # meta device: shapes only
    # The checkpoint tensors the model expects (merged QKV / gate-up parameters take several each).
    ours = {k: list(t.shape) for k, t in checkpoint_manifest(model).items()}
    ref = {t["key"]: t["shape"] for t in manifest["ema_safetensors"]["tensors"]}
    assert ours == ref
    assert sum(v.numel() for v in model.state_dict().values()) == manifest["ema_safetensors"]["num_params"]
    with torch.device("meta"):
        ae = AutoEncoder(cfg.vae)
    ae_ref = {t["key"]: t["shape"] for t in manifest["ae_safetensors"]["tensors"]}
    assert {k: list(v.shape) for k, v in ae.state_dict().items()} == ae_ref
    assert sum(v.numel() for v in ae.state_dict().values()) == manifest["ae_safetensors"]["num_params"]


def test_tiny_checkpoint_layout(tiny_checkpoint: Path) -> None:
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {"ema.safetensors", "ae.safetensors", "config.json", "llm_config.json", "vit_config.json",
            "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= names
    with safe_open(str(tiny_checkpoint / "ema.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    vit = json.loads((tiny_checkpoint / "vit_config.json").read_text())
    assert vit["num_hidden_layers"] == 3  # the file lists one more layer than the model uses, like the real one


def test_real_tokenizer_special_ids_and_prompts(tiny_checkpoint: Path) -> None:
    tok = BagelTokenizer(tiny_checkpoint)
    assert (tok.special.bos, tok.special.eos, tok.special.start_of_image, tok.special.end_of_image) == (
        151644, 151645, 151652, 151653)
    # <think> is plain text in Qwen2.5 (not an added token), and segments carry no role words.
    assert all(i < 151643 for i in tok.encode("<think> plan </think>"))
    seg = tok.segment("Hello")
    assert seg[0] == 151644 and seg[-1] == 151645 and tok.decode(seg[1:-1]) == "Hello"
    for prompt in (VLM_THINK_SYSTEM_PROMPT, GEN_THINK_SYSTEM_PROMPT):
        assert tok.decode(tok.encode(prompt)) == prompt
        assert " \nThe " in prompt


def test_golden_tokenizer_ids(golden_a: Path, golden_a_cases: dict) -> None:
    tok = BagelTokenizer(golden_a / "checkpoint")
    for case in golden_a_cases["tokenizer_check"]["cases"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["decoded"]


def test_sharded_checkpoint_and_stale_max_latent_size(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """Sharded weights load through the index; a stale config max_latent_size is corrected from the table."""
    sharded = write_checkpoint(tmp_path / "sharded", "tiny", seed=0, shard_bytes=4 * 2**20,
                               overrides={"max_latent_size": 4})
    assert (sharded / "model.safetensors.index.json").exists()
    assert not (sharded / "ema.safetensors").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    a = Omni(sharded, device="cpu", deploy_config="bagel_single_stage.yaml")
    assert a.config.max_latent_size == 8
    b = Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_single_stage.yaml")
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_load_dtype(tiny_checkpoint: Path) -> None:
    o = Omni(tiny_checkpoint, device="cpu", dtype="bf16", deploy_config="bagel_single_stage.yaml")
    assert o.model.dtype == torch.bfloat16
    assert o.stage.vae.decoder.conv_in.weight.dtype == torch.float32
    assert Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_single_stage.yaml").model.dtype == torch.float32
