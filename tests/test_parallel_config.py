"""The deploy-config side of parallelism (docs/parallelism.md): rank counts, the rules checked at start with
their numbers, where the engine options apply, and the bundled example files. No weights are read."""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest
import torch

from bagel_serve.config.deploy import DeployConfigError, ParallelConfig, StageConfig
from bagel_serve.config.deploy_loader import bundled_deploy_config, load_deploy_config, parse_deploy_config
from bagel_serve.config.devices import DeviceError, check_stage_devices
from bagel_serve.config.engine_options import EngineOptions
from bagel_serve.config.model_config import LLMConfig, load_bagel_config
from bagel_serve.config.parallel_checks import check_parallel_against_model, tensor_parallel_sizes
from bagel_serve.config.pipelines import PIPELINES, resolve_pipeline
from bagel_serve.config.validate import build
from bagel_serve.entrypoints.omni import resolve_deploy
from bagel_serve.testing.checkpoint import LLM_FULL

BAGEL_7B = LLMConfig.from_dict(LLM_FULL)  # 28 attention heads, 4 key/value heads


def parse(text: str) -> object:
    import yaml

    return parse_deploy_config(yaml.safe_load(textwrap.dedent(text)), source="my.yaml")


def error(text: str) -> str:
    with pytest.raises(DeployConfigError) as info:
        parse(text)
    return str(info.value)


def stage(**keys: object) -> str:
    """A single-stage file whose stage 0 has `keys` (flow-style values)."""
    body = "".join(f"    {k}: {v}\n" for k, v in keys.items())
    return f"pipeline: bagel_single_stage\nstages:\n  - stage_id: 0\n{body}"


# --- num_ranks ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keys, ranks, shard, described", [
    ({}, 1, 1, "1 rank (no parallel size above 1)"),
    ({"tensor_parallel_size": 2}, 2, 1, "tensor_parallel_size 2 = 2 ranks"),
    ({"tensor_parallel_size": 2, "cfg_parallel_size": 3}, 6, 1, "tensor_parallel_size 2 x cfg_parallel_size 3 = 6 ranks"),
    ({"use_hsdp": True, "hsdp_shard_size": 4}, 4, 4, "hsdp_shard_size 4 x hsdp_replicate_size 1 = 4 ranks"),
    ({"use_hsdp": True, "hsdp_shard_size": 2, "hsdp_replicate_size": 2}, 4, 2,
     "hsdp_shard_size 2 x hsdp_replicate_size 2 = 4 ranks"),
    ({"use_hsdp": True, "cfg_parallel_size": 2}, 2, 2, "cfg_parallel_size 2 = 2 ranks"),  # auto: world / replicate
    ({"use_hsdp": True, "cfg_parallel_size": 2, "hsdp_shard_size": 1, "hsdp_replicate_size": 2}, 2, 1,
     "cfg_parallel_size 2 = 2 ranks"),
])
def test_num_ranks(keys: dict, ranks: int, shard: int, described: str) -> None:
    pc = build(ParallelConfig, keys, "parallel_config")
    assert (pc.num_ranks, pc.resolved_hsdp_shard_size, pc.describe_ranks()) == (ranks, shard, described)


def test_stage_devices_one_per_rank() -> None:
    cfg = parse(stage(devices='"4,5,6,7"', tensor_parallel_size=2, cfg_parallel_size=2))
    s = cfg.stages[0]
    assert (s.num_ranks, s.device_ids, s.parallel_config.world_size) == (4, [4, 5, 6, 7], 4)


def test_vae_patch_parallel_turns_tiling_on(caplog: pytest.LogCaptureFixture) -> None:
    assert not build(StageConfig, {"stage_id": 0}).vae_tiling_enabled
    assert build(StageConfig, {"stage_id": 0, "vae_use_tiling": True}).vae_tiling_enabled
    s = build(StageConfig, {"stage_id": 0, "devices": "0,1,2,3,4,5,6", "tensor_parallel_size": 7,
                            "vae_patch_parallel_size": 7})
    with caplog.at_level(logging.INFO, logger="bagel_serve.config.deploy"):
        assert s.vae_tiling_enabled and s.vae_tiling_enabled
    notes = [r.getMessage() for r in caplog.records]
    assert notes == ["vae_patch_parallel_size=7 requires vae_use_tiling; enabling it"]  # once


# --- the rules, with their numbers -----------------------------------------------------------------------------


@pytest.mark.parametrize("keys, message", [
    ({"devices": '"0,1"', "tensor_parallel_size": 2, "cfg_parallel_size": 3},
     "my.yaml: stages[0].devices: '0,1' names 2 devices but tensor_parallel_size 2 x cfg_parallel_size 3 = 6 ranks: "
     "list one device per rank, e.g. devices: \"0,1,2,3,4,5\""),
    ({"devices": '"0"', "tensor_parallel_size": 2},
     "my.yaml: stages[0].devices: '0' names 1 device but tensor_parallel_size 2 = 2 ranks: list one device per rank, "
     "e.g. devices: \"0,1\" (a stage without devices gets \"0\")"),
    ({"cfg_parallel_size": 3},  # no devices: the default "0"
     "my.yaml: stages[0].devices: '0' names 1 device but cfg_parallel_size 3 = 3 ranks: list one device per rank, "
     "e.g. devices: \"0,1,2\" (a stage without devices gets \"0\")"),
    ({"devices": '"2,3"'},
     "my.yaml: stages[0].devices: '2,3' names 2 devices but 1 rank (no parallel size above 1): list one device per "
     "rank, e.g. devices: \"2\""),
    ({"devices": '"0,0"', "tensor_parallel_size": 2},
     "my.yaml: stages[0].devices: '0,0' names device 0 twice: each rank needs a device of its own"),
    ({"devices": '"0,1"', "parallel_config": "{use_hsdp: true, hsdp_shard_size: 4}"},
     "my.yaml: stages[0].devices: '0,1' names 2 devices but hsdp_shard_size 4 x hsdp_replicate_size 1 = 4 ranks"),
    ({"devices": '"0,1"', "parallel_config": "{use_hsdp: true, hsdp_shard_size: 2, hsdp_replicate_size: 2}"},
     "my.yaml: stages[0].devices: '0,1' names 2 devices but hsdp_shard_size 2 x hsdp_replicate_size 2 = 4 ranks"),
    ({"devices": '"0,1,2,3"', "tensor_parallel_size": 2, "vae_patch_parallel_size": 4},
     "my.yaml: stages[0].parallel_config.vae_patch_parallel_size: 4 is more than the stage's 2 ranks "
     "(tensor_parallel_size 2 = 2 ranks): VAE patch parallel spreads the tiles over the stage's own ranks, so it must "
     "be at most 2"),
    ({"vae_patch_parallel_size": 2},
     "my.yaml: stages[0].parallel_config.vae_patch_parallel_size: 2 is more than the stage's 1 rank"),
    ({"devices": '"0,1,2"', "cfg_parallel_size": 3, "parallel_config": "{use_hsdp: true, hsdp_shard_size: 2}"},
     "my.yaml: stages[0].parallel_config.hsdp_shard_size: hsdp_replicate_size * hsdp_shard_size = 1 x 2 = 2 must "
     "equal the world size 3 (cfg_parallel_size 3 = 3 ranks)"),
    ({"devices": '"0,1,2"', "cfg_parallel_size": 3, "parallel_config": "{use_hsdp: true, hsdp_replicate_size: 2}"},
     "my.yaml: stages[0].parallel_config.hsdp_replicate_size: 2 must divide the world size 3 (cfg_parallel_size 3 = "
     "3 ranks) for hsdp_shard_size -1 (auto) to be world size / hsdp_replicate_size"),
    ({"devices": '"0,1"', "parallel_config": "{use_hsdp: true}"},
     "my.yaml: stages[0].parallel_config.hsdp_shard_size: standalone HSDP (no other parallelism) needs an explicit "
     "hsdp_shard_size"),
    ({"devices": '"0,1"', "tensor_parallel_size": 2, "parallel_config": "{use_hsdp: true, hsdp_shard_size: 2}"},
     "my.yaml: stages[0].parallel_config.use_hsdp: HSDP cannot be combined with tensor or data parallelism "
     "(tensor_parallel_size=2, data_parallel_size=1): HSDP shards whole decoder layers; use one or the other"),
    ({"hsdp_shard_size": 2},
     "my.yaml: stages[0].parallel_config.hsdp_shard_size: 2 needs use_hsdp: true (without it nothing is sharded)"),
])
def test_layout_errors_name_the_numbers(keys: dict, message: str) -> None:
    assert error(stage(**keys)).startswith(message)


def test_unbuilt_parallelism_is_refused_by_name_not_counted() -> None:
    """Sequence parallelism loads whatever `devices` says (counting them could not make it run) and is
    refused by name at start; so is every vae_parallel_mode but `tile`."""
    cfg = parse(stage(devices='"0"', ulysses_degree=2, vae_parallel_mode="spatial_shard_width"))
    with pytest.raises(NotImplementedError) as info:
        cfg.require_runnable()
    assert "sequence parallel (stages[0].parallel_config.ulysses_degree=2) is not built yet" in str(info.value)
    assert ("VAE patch parallel (stages[0].parallel_config.vae_parallel_mode='spatial_shard_width') is not built: "
            "only vae_parallel_mode 'tile' is") in str(info.value)


@pytest.mark.parametrize("key, value, keys", [
    ("cfg_parallel_size", 2, "cfg_parallel_size: 2"),
    ("vae_patch_parallel_size", 2, "tensor_parallel_size: 2, vae_patch_parallel_size: 2"),
])
def test_diffusion_parallelism_refused_on_the_thinker(key: str, value: int, keys: str) -> None:
    cfg = parse(f"""\
        stages:
          - {{stage_id: 0, devices: "0,1", {keys}}}
          - {{stage_id: 1, devices: "2"}}
    """)
    with pytest.raises(DeployConfigError) as info:
        resolve_pipeline(cfg, None)
    what = "CFG parallel spreads the denoising branches" if key == "cfg_parallel_size" else \
        "VAE patch parallel spreads the VAE tiles of the decoded image"
    assert str(info.value) == (f"my.yaml: stages[0].parallel_config.{key}: {value} on stage 0 (thinker, autoregressive) "
                               f"of pipeline 'bagel': {what} over the ranks of the diffusion stage; set it on "
                               f"stage 1 ({key} 1 here)")


def test_tensor_parallel_must_divide_the_heads(golden_a: Path) -> None:
    golden = load_bagel_config(golden_a / "checkpoint").llm  # 4 attention heads, 2 key/value heads
    assert tensor_parallel_sizes(BAGEL_7B) == [1, 2, 4] and tensor_parallel_sizes(golden) == [1, 2]
    two_stage = parse("""\
        stages:
          - {stage_id: 0, devices: "0,1", tensor_parallel_size: 2}
          - {stage_id: 1, devices: "0,1,2", tensor_parallel_size: 3}
    """)
    with pytest.raises(DeployConfigError) as info:
        check_parallel_against_model(two_stage, BAGEL_7B)
    assert str(info.value) == ("my.yaml: stages[1].parallel_config.tensor_parallel_size: 3 must divide the model's 28 "
                               "attention heads and 4 key/value heads (this model takes tensor_parallel_size 1, 2, 4)")
    tp4 = parse(stage(devices='"0,1,2,3"', tensor_parallel_size=4))
    check_parallel_against_model(tp4, BAGEL_7B)
    with pytest.raises(DeployConfigError, match=r"tensor_parallel_size: 4 must divide the model's 4 attention heads "
                                                r"and 2 key/value heads \(this model takes tensor_parallel_size 1, 2\)"):
        check_parallel_against_model(tp4, golden)


def test_omni_checks_the_heads_before_reading_weights(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import bagel_serve.model.loader as loader
    from bagel_serve import Omni

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were read before the layout was checked")

    monkeypatch.setattr(loader, "_load_into", no_load)
    with pytest.raises(DeployConfigError, match=r"stages\[0\]\.parallel_config\.tensor_parallel_size: 4 must divide "
                                                r"the model's 4 attention heads and 2 key/value heads"):
        Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_single_stage.yaml", tensor_parallel_size=4,
             stage_overrides={"0": {"devices": "0,1,2,3"}})


def test_cuda_devices_are_checked_against_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = parse(stage(devices='"0,1,2,3"', tensor_parallel_size=2, cfg_parallel_size=2))
    check_stage_devices(cfg, "cpu")  # CPU ranks are processes: the indices are only counted
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DeviceError) as info:
        check_stage_devices(cfg, "cuda")
    assert str(info.value) == ("my.yaml: stages[0].devices: '0,1,2,3' names GPUs 2 and 3 for tensor_parallel_size 2 x "
                               "cfg_parallel_size 2 = 4 ranks, but this machine has 2 CUDA GPU(s) (indices 0..1)")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    check_stage_devices(cfg, "cuda")


# --- engine options: where they apply --------------------------------------------------------------------------


def options(**kwargs: object) -> EngineOptions:
    return EngineOptions.from_kwargs(kwargs)


def test_diffusion_options_apply_to_the_dit_stage() -> None:
    plan = resolve_deploy("bagel.yaml", options(cfg_parallel_size=2, vae_patch_parallel_size=2, vae_use_tiling=True,
                                                stage_overrides={"1": {"devices": "0,1"}}))
    thinker, dit = plan.config.stages
    assert (thinker.cfg_parallel_size, thinker.vae_patch_parallel_size, thinker.vae_use_tiling) == (1, 1, False)
    assert (dit.cfg_parallel_size, dit.vae_patch_parallel_size, dit.vae_use_tiling, dit.num_ranks) == (2, 2, True, 2)
    assert plan.pipeline is PIPELINES["bagel"]
    single = resolve_deploy("bagel_single_stage.yaml", options(use_hsdp=True, hsdp_shard_size=2,
                                                               stage_overrides={"0": {"devices": "0,1"}}))
    (s,) = single.config.stages
    assert (s.use_hsdp, s.num_ranks) == (True, 2)


def test_tensor_parallel_applies_to_every_stage_unless_a_stage_overrides_it() -> None:
    plan = resolve_deploy("bagel.yaml", options(tensor_parallel_size=2, stage_overrides={
        "0": {"devices": "0,1"}, "1": {"tensor_parallel_size": 1}}))
    assert [s.tensor_parallel_size for s in plan.config.stages] == [2, 1]
    with pytest.raises(DeployConfigError, match=r"stages\[1\]\.devices: '0' names 1 device but tensor_parallel_size "
                                                r"2 = 2 ranks"):
        resolve_deploy("bagel.yaml", options(tensor_parallel_size=2, stage_overrides={"0": {"devices": "0,1"}}))


def test_cfg_parallel_on_the_thinker_through_stage_overrides_is_refused() -> None:
    with pytest.raises(DeployConfigError, match=r"stages\[0\]\.parallel_config\.cfg_parallel_size: 2 on stage 0 "
                                                r"\(thinker, autoregressive\)"):
        resolve_deploy("bagel.yaml", options(stage_overrides={"0": {"devices": "0,1", "cfg_parallel_size": 2}}))


def test_deploy_overrides_route_the_diffusion_keys() -> None:
    out = options(tensor_parallel_size=2, cfg_parallel_size=3, hsdp_replicate_size=2).deploy_overrides((1,))
    assert out["tensor_parallel_size"] == 2 and "cfg_parallel_size" not in out
    assert (out["stage_1_cfg_parallel_size"], out["stage_1_hsdp_replicate_size"], out["stage_1_use_hsdp"]) == (3, 2, None)
    assert not any(k.startswith("stage_0_") for k in out)


# --- the bundled example files ---------------------------------------------------------------------------------

EXAMPLES = {  # name: (pipeline, ranks per stage, GPUs named)
    "bagel_tp2_vae_pp2": ("bagel_single_stage", [2], 2),
    "bagel_thinker_tp2": ("bagel", [2, 1], 2),
    "bagel_hsdp4": ("bagel_single_stage", [4], 4),
    "bagel_cfg3": ("bagel_single_stage", [3], 3),
}


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_files_load_validate_and_fit_bagel(name: str, golden_a: Path) -> None:
    pipeline, ranks, gpus = EXAMPLES[name]
    cfg = load_deploy_config(bundled_deploy_config(name))
    cfg.require_runnable()
    assert resolve_pipeline(cfg, None).name == pipeline
    assert [s.num_ranks for s in cfg.stages] == ranks
    check_parallel_against_model(cfg, BAGEL_7B)
    check_parallel_against_model(cfg, load_bagel_config(golden_a / "checkpoint").llm)  # TP 2 fits 4/2 heads too
    assert max(d for s in cfg.stages for d in s.device_ids) + 1 == gpus


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_files_on_one_device(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU a file's devices are only counted, so every example passes; on a one-GPU machine each fails
    only because it names GPUs that are not there, and passes once there are enough."""
    cfg = load_deploy_config(bundled_deploy_config(name))
    check_stage_devices(cfg, "cpu")
    gpus = EXAMPLES[name][2]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"names GPUs? 1.*but this machine has 1 CUDA GPU\(s\)"):
        check_stage_devices(cfg, "cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    check_stage_devices(cfg, "cuda")
