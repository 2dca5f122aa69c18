"""Bad inputs fail with a clear error of the right type that names the offending thing.

Checkpoint errors are `CheckpointError`s naming the file or tensor; request errors are `RequestError`s
naming the request and the field (or the image path), raised before heavy work where possible, and a
failed request leaves the engine usable.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from bagel_serve import Omni
from bagel_serve.engine.request import RequestError
from bagel_serve.model.loader import CheckpointError

# ---------------------------------------------------------------------------------------------- fixtures
# `tiny_checkpoint` (session scoped, written once) comes from conftest.py.


@pytest.fixture(scope="session")
def edit_png(golden_a: Path) -> Path:
    """An 80x64 RGB PNG from the golden inputs."""
    return golden_a / "inputs" / "edit_rgb_80x64.png"


@pytest.fixture(scope="module")
def omni(tiny_checkpoint: Path) -> Omni:
    return Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_single_stage.yaml")


@pytest.fixture
def no_weight_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checkpoint errors must come from the headers, before any weights are read (the 7B load is slow)."""
    import bagel_serve.model.loader as loader

    def no_load(*args, **kwargs):
        raise AssertionError("weights were read before the checkpoint was validated")

    monkeypatch.setattr(loader, "_load_into", no_load)


@pytest.fixture
def ckpt_copy(tiny_checkpoint: Path, tmp_path: Path, no_weight_reads: None) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def sharded_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bagel_serve.testing.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("sharded") / "ckpt", "tiny", seed=0, shard_bytes=8 * 2**20)


@pytest.fixture
def sharded_copy(sharded_checkpoint: Path, tmp_path: Path, no_weight_reads: None) -> Path:
    """A private copy of a sharded tiny checkpoint (model-*.safetensors + index, no ema.safetensors)."""
    ckpt = Path(shutil.copytree(sharded_checkpoint, tmp_path / "ckpt"))
    assert not (ckpt / "ema.safetensors").exists()
    return ckpt


def _rewrite_ema(ckpt: Path, edit) -> None:
    path = ckpt / "ema.safetensors"
    state = load_file(str(path))
    edit(state)
    path.unlink()
    save_file(state, str(path), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------- checkpoints


def test_missing_ema(ckpt_copy: Path) -> None:
    (ckpt_copy / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing checkpoint file: .*ema\.safetensors"):
        Omni(ckpt_copy, device="cpu")


def test_missing_ae(ckpt_copy: Path) -> None:
    (ckpt_copy / "ae.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing checkpoint file: .*ae\.safetensors"):
        Omni(ckpt_copy, device="cpu")


def test_checkpoint_without_config_json_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """config.json is optional (the flat llm/vit configs suffice, the other fields take the official values):
    the default two-stage deploy file, which has no `pipeline:` key, still resolves to BAGEL's pipeline."""
    from bagel_serve.testing import checkpoint

    official = {"latent_patch_size": 2, "max_latent_size": 64, "vit_max_num_patch_per_side": 70, "vae_config": {}}
    monkeypatch.setitem(checkpoint.PRESETS, "flat", {**checkpoint.PRESETS["demo"], "top": official})
    ckpt = checkpoint.write_checkpoint(tmp_path / "ckpt", "flat")
    (ckpt / "config.json").unlink()
    with Omni(ckpt, device="cpu", worker_backend="inline") as omni:
        assert omni.pipeline.name == "bagel"
        (out,) = omni.generate([{"modality": "text2text", "prompt": "hi", "max_tokens": 2}])
    assert out.ok, out.error


def test_missing_llm_config(ckpt_copy: Path) -> None:
    # config.json nests an llm_config that the loader falls back to; without both there is no LLM config.
    (ckpt_copy / "llm_config.json").unlink()
    top = json.loads((ckpt_copy / "config.json").read_text())
    del top["llm_config"]
    (ckpt_copy / "config.json").write_text(json.dumps(top))
    with pytest.raises(CheckpointError, match=r"missing checkpoint file: .*llm_config\.json"):
        Omni(ckpt_copy, device="cpu")


def test_truncated_ema(ckpt_copy: Path) -> None:
    path = ckpt_copy / "ema.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"ema\.safetensors is not a readable safetensors file"):
        Omni(ckpt_copy, device="cpu")


def test_truncated_ae(ckpt_copy: Path) -> None:
    path = ckpt_copy / "ae.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"ae\.safetensors is not a readable safetensors file"):
        Omni(ckpt_copy, device="cpu")


def test_misshaped_tensor(ckpt_copy: Path) -> None:
    def edit(state: dict[str, torch.Tensor]) -> None:
        assert tuple(state["vae2llm.weight"].shape) == (64, 16)
        state["vae2llm.weight"] = torch.zeros(64, 12, dtype=state["vae2llm.weight"].dtype)

    _rewrite_ema(ckpt_copy, edit)
    with pytest.raises(CheckpointError, match=r"mis-shaped tensors: vae2llm\.weight: file \(64, 12\), model \(64, 16\)"):
        Omni(ckpt_copy, device="cpu")


def test_missing_tensor(ckpt_copy: Path) -> None:
    _rewrite_ema(ckpt_copy, lambda state: state.pop("vae2llm.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensors: vae2llm\.bias"):
        Omni(ckpt_copy, device="cpu")


def test_unexpected_tensor(ckpt_copy: Path) -> None:
    _rewrite_ema(ckpt_copy, lambda state: state.__setitem__("extra_head.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensors: extra_head\.weight"):
        Omni(ckpt_copy, device="cpu")


def _shards(ckpt: Path) -> list[str]:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return sorted(set(index["weight_map"].values()))


def test_sharded_missing_shard(sharded_copy: Path) -> None:
    shards = _shards(sharded_copy)
    assert len(shards) >= 2
    (sharded_copy / shards[-1]).unlink()
    with pytest.raises(CheckpointError, match=rf"missing checkpoint files listed in .*: {re.escape(shards[-1])}"):
        Omni(sharded_copy, device="cpu")


def test_sharded_truncated_shard(sharded_copy: Path) -> None:
    shard = sharded_copy / _shards(sharded_copy)[0]
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=rf"{re.escape(shard.name)} is not a readable safetensors file"):
        Omni(sharded_copy, device="cpu")


def test_model_path_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "checkpoint"
    with pytest.raises(CheckpointError, match=r"neither a checkpoint directory nor a Hugging Face repo id"):
        Omni(missing, device="cpu")


def test_repo_id_offline_not_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hf_constants

    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    # huggingface_hub reads these env variables once, at import: patch its constants too.
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    with pytest.raises(CheckpointError, match=r"not in the Hugging Face cache.*`hf download nobody/no-such-model`"):
        Omni("nobody/no-such-model", device="cpu")


# ---------------------------------------------------------------------------------------------- requests


def _no_forward(works):
    raise AssertionError("a forward ran before the bad request was rejected")


def _bad(omni: Omni, match: str, **fields) -> None:
    """`fields` (a request dict) must fail with a RequestError whose message matches, before any forward."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(omni.stage.runner, "execute", _no_forward)
        with pytest.raises(RequestError, match=match):
            omni.generate([fields])


def test_unknown_modality(omni: Omni) -> None:
    _bad(omni, r"request 0: modality must be one of .*got 'text2video'", modality="text2video", prompt="x")


def test_unknown_field(omni: Omni) -> None:
    _bad(omni, r"request 0: unknown field\(s\) num_steps", modality="text2img", prompt="x", num_steps=4)


def test_missing_modality(omni: Omni) -> None:
    _bad(omni, r"request 0: 'modality' is required", prompt="x")


def test_error_names_the_request_index(omni: Omni) -> None:
    with pytest.raises(RequestError, match=r"request 1: steps"):
        omni.generate([{"modality": "text2text", "prompt": "x"}, {"modality": "text2img", "steps": 1}])


@pytest.mark.parametrize("modality", ["img2img", "img2text"])
def test_image_required(omni: Omni, modality: str) -> None:
    _bad(omni, rf"request 0: image is required for {modality}", modality=modality, prompt="x")


def test_image_not_used_by_text2img(omni: Omni, edit_png: Path) -> None:
    _bad(omni, r"request 0: image is not used by text2img", modality="text2img", prompt="x", image=str(edit_png))


@pytest.mark.parametrize("name", ["height", "width"])
def test_size_not_multiple_of_16(omni: Omni, name: str) -> None:
    _bad(omni, rf"request 0: {name} must be a multiple of 16, >= 16, got 72", modality="text2img", prompt="x",
         **{name: 72})


def test_height_above_model_maximum(omni: Omni) -> None:
    assert omni.config.max_image_side == 128
    _bad(omni, r"request 0: height 256 is above this model's maximum of 128 px", modality="text2img", prompt="x",
         height=256, width=64, steps=2)


def test_img2img_height_above_model_maximum(omni: Omni, edit_png: Path) -> None:
    _bad(omni, r"request 0: height 256 is above this model's maximum of 128 px", modality="img2img", prompt="x",
         image=str(edit_png), height=256, steps=2)


@pytest.mark.parametrize("steps", [1, 0])
def test_steps_too_few(omni: Omni, steps: int) -> None:
    _bad(omni, rf"request 0: steps must be an integer in \[2, 1000\], got {steps}", modality="text2img",
         prompt="x", steps=steps)


@pytest.mark.parametrize(
    "interval, match",
    [
        ((0.8, 0.2), r"cfg_interval must satisfy 0 <= low <= high <= 1, got \[0\.8, 0\.2\]"),
        ((-0.1, 1.0), r"cfg_interval must satisfy 0 <= low <= high <= 1, got \[-0\.1, 1\.0\]"),
        ((0.0, 1.5), r"cfg_interval must satisfy 0 <= low <= high <= 1, got \[0\.0, 1\.5\]"),
        ((0.4,), r"cfg_interval must be two finite numbers \[low, high\], got \(0\.4,\)"),
        ((0.1, 0.4, 1.0), r"cfg_interval must be two finite numbers \[low, high\], got \(0\.1, 0\.4, 1\.0\)"),
        (0.4, r"cfg_interval must be two finite numbers \[low, high\], got 0\.4"),
        ((float("nan"), 1.0), r"cfg_interval must be two finite numbers \[low, high\], got \(nan, 1\.0\)"),
    ],
    ids=["reversed", "below-0", "above-1", "one-value", "three-values", "scalar", "nan"],
)
def test_bad_cfg_interval(omni: Omni, interval, match: str) -> None:
    _bad(omni, r"request 0: " + match, modality="text2img", prompt="x", cfg_interval=interval)


def test_unknown_cfg_renorm_type(omni: Omni) -> None:
    _bad(omni, r"request 0: cfg_renorm_type must be one of .*got 'local'", modality="text2img", prompt="x",
         cfg_renorm_type="local")


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_cfg_renorm_min_out_of_range(omni: Omni, value: float) -> None:
    _bad(omni, rf"request 0: cfg_renorm_min must be a finite number in \[0, 1\], got {value}", modality="text2img", prompt="x",
         cfg_renorm_min=value)


def test_negative_max_tokens(omni: Omni) -> None:
    _bad(omni, r"request 0: max_tokens must be an integer in \[1, 1048576\], got -1", modality="text2text",
         prompt="x", max_tokens=-1)


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf")])
def test_bad_text_temperature(omni: Omni, value: float) -> None:
    _bad(omni, rf"request 0: text_temperature must be a finite number >= 0, got {value}", modality="text2text",
         prompt="x", text_temperature=value)


def test_non_numeric_text_temperature(omni: Omni) -> None:
    _bad(omni, r"request 0: text_temperature must be a finite number >= 0, got 'hot'", modality="text2text",
         prompt="x", text_temperature="hot")


def test_non_numeric_cfg_renorm_min(omni: Omni) -> None:
    _bad(omni, r"request 0: cfg_renorm_min must be a finite number in \[0, 1\], got 'low'", modality="text2img",
         prompt="x", cfg_renorm_min="low")


def test_noise_wrong_shape(omni: Omni) -> None:
    # 64x64 on the tiny model: (64/16)^2 = 16 latent tokens of 2*2*4 = 16 channels.
    _bad(omni, r"request 0: noise must have shape \(16, 16\) for height 64, width 64, got \(10, 16\)", modality="text2img",
         prompt="x", height=64, width=64, steps=2, noise=torch.randn(10, 16))
    out = omni.generate([{"modality": "text2img", "prompt": "x", "height": 64, "width": 64, "steps": 2,
                          "noise": torch.randn(16, 16)}])
    assert out[0].images[0].size == (64, 64)


def test_noise_wrong_shape_img2img(omni: Omni, edit_png: Path) -> None:
    # The 80x64 input resizes to 80x64 with the tiny VAE transform (stride 16): 5*4 = 20 latent tokens.
    _bad(omni, r"request 0: noise must have shape \(20, 16\) for height 64, width 80, got \(16, 16\)", modality="img2img",
         prompt="x", image=str(edit_png), steps=2, noise=torch.randn(16, 16))


def test_image_path_does_not_exist(omni: Omni, tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    _bad(omni, rf"request 0: image: file not found: {re.escape(str(path))}", modality="img2text", prompt="x",
         image=str(path))


def test_image_is_a_text_file(omni: Omni, tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    path.write_text("this is not a picture\n")
    _bad(omni, rf"request 0: image: not a recognized image file: {re.escape(str(path))}", modality="img2img",
         prompt="x", image=str(path))


def test_image_truncated_png(omni: Omni, edit_png: Path, tmp_path: Path) -> None:
    data = edit_png.read_bytes()
    path = tmp_path / "half.png"
    path.write_bytes(data[: len(data) // 2])
    _bad(omni, rf"request 0: image: corrupt or truncated image file: {re.escape(str(path))}", modality="img2text",
         prompt="x", image=str(path))


def test_engine_still_works_after_failures(omni: Omni) -> None:
    """Runs after the failures above on the same Omni: a failed request must not leave state behind."""
    with pytest.raises(RequestError):
        omni.generate([{"modality": "text2text", "prompt": "hi", "max_tokens": 3},
                       {"modality": "text2img", "prompt": "x", "height": 64, "width": 64, "steps": 2,
                        "noise": torch.randn(10, 16)}])
    (out,) = omni.generate([{"modality": "text2text", "prompt": "Hello", "max_tokens": 3}])
    assert 1 <= len(out.token_ids) <= 3 and isinstance(out.text, str)
