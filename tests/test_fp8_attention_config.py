"""The `fp8_attention` option (FP8 attention in the denoising steps of large images): how it is asked for
(`Omni(fp8_attention=True)`, `--fp8-attention`, the deploy keys pipeline-wide and per stage), that it needs
`quantization: fp8` as `fp8_und` does, and that it reaches the `QuantizationConfig` the loader takes. What it
does to the attention is tested with the kernels."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bagel_serve import Omni
from bagel_serve.config.deploy import DeployConfig, DeployConfigError
from bagel_serve.config.deploy_loader import load_deploy_config
from bagel_serve.config.engine_options import EngineOptionError, EngineOptions
from bagel_serve.config.quantization import QuantizationConfig
from bagel_serve.entrypoints.cli_args import add_engine_arguments, add_reporting_arguments, engine_kwargs
from bagel_serve.entrypoints.omni import resolve_deploy

SINGLE_STAGE = "bagel_single_stage.yaml"


def load(tmp_path: Path, text: str) -> DeployConfig:
    path = tmp_path / "d.yaml"
    path.write_text(text)
    return load_deploy_config(path)


def test_off_unless_asked(tmp_path: Path) -> None:
    assert QuantizationConfig().fp8_attention is False
    assert load(tmp_path, "quantization: fp8\nstages:\n  - stage_id: 0\n").quantization_config().fp8_attention is False


def test_bad_value_names_the_option() -> None:
    with pytest.raises(EngineOptionError, match=r"fp8_attention \(--fp8-attention\)"):
        EngineOptions.from_kwargs({"fp8_attention": "yes"})


def test_fp8_attention_needs_fp8(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(DeployConfigError, match=r"fp8_attention: true needs quantization: fp8.*--quantization fp8"):
        Omni(tiny_checkpoint, device="cpu", deploy_config=SINGLE_STAGE, fp8_attention=True)
    with pytest.raises(DeployConfigError, match=r"yaml: fp8_attention: true needs quantization: fp8"):
        load(tmp_path, "fp8_attention: true\nstages:\n  - stage_id: 0\n")
    with pytest.raises(DeployConfigError, match=r"stages\[0\]\.fp8_attention: true needs quantization: fp8"):
        load(tmp_path, "stages:\n  - stage_id: 0\n    fp8_attention: true\n")
    # fp8_und's rule is unchanged by it.
    with pytest.raises(DeployConfigError, match=r"stages\[0\]\.fp8_und: true needs quantization: fp8"):
        load(tmp_path, "fp8_attention: false\nstages:\n  - stage_id: 0\n    fp8_und: true\n")


def test_pipeline_wide_key(tmp_path: Path) -> None:
    cfg = load(tmp_path, "quantization: fp8\nfp8_attention: true\nstages:\n  - stage_id: 0\n  - stage_id: 1\n")
    cfg.require_runnable()
    assert cfg.quantization_config() == QuantizationConfig("fp8", fp8_und=False, fp8_attention=True)


def test_as_a_stage_key(tmp_path: Path) -> None:
    q = load(tmp_path, "stages:\n  - stage_id: 0\n    quantization: fp8\n    fp8_attention: true\n").quantization_config()
    assert q == QuantizationConfig("fp8", fp8_und=False, fp8_attention=True)
    # A stage's own value wins over the pipeline-wide one.
    cfg = load(tmp_path, "quantization: fp8\nfp8_attention: true\nstages:\n  - stage_id: 0\n    fp8_attention: false\n")
    assert cfg.quantization_config().fp8_attention is False
    cfg = load(tmp_path, "quantization: fp8\nfp8_und: true\nfp8_attention: true\nstages:\n  - stage_id: 0\n")
    assert cfg.quantization_config() == QuantizationConfig("fp8", fp8_und=True, fp8_attention=True)


def test_stages_must_agree(tmp_path: Path) -> None:
    cfg = load(tmp_path, "quantization: fp8\nstages:\n  - stage_id: 0\n  - stage_id: 1\n    fp8_attention: true\n")
    shown = "stages[0]: quantization='fp8', fp8_und=False, fp8_attention=False, " \
            "stages[1]: quantization='fp8', fp8_und=False, fp8_attention=True"
    with pytest.raises(NotImplementedError, match=r"stages share one copy of the weights") as exc:
        cfg.require_runnable()
    assert shown in str(exc.value)
    with pytest.raises(DeployConfigError, match=r"fp8_attention=True"):
        cfg.quantization_config()
    cfg = load(tmp_path, "quantization: fp8\nstages:\n  - stage_id: 0\n    fp8_attention: true\n"
                         "  - stage_id: 1\n    fp8_attention: true\n")
    cfg.require_runnable()
    assert cfg.quantization_config().fp8_attention is True


@pytest.mark.parametrize("deploy", [SINGLE_STAGE, "bagel.yaml"])
@pytest.mark.parametrize("flags, asked", [(["--quantization", "fp8", "--fp8-attention"], True),
                                          (["--quantization", "fp8"], False)])
def test_flag_and_keyword_reach_the_quantization_config(deploy: str, flags: list[str], asked: bool) -> None:
    parser = argparse.ArgumentParser()
    add_reporting_arguments(add_engine_arguments(parser))
    from_cli = EngineOptions.from_kwargs(engine_kwargs(parser.parse_args(flags)))
    from_omni = EngineOptions.from_kwargs({"quantization": "fp8", **({"fp8_attention": True} if asked else {})})
    assert from_cli == from_omni
    plan = resolve_deploy(deploy, from_cli)
    plan.config.require_runnable()  # set pipeline-wide, so every stage agrees
    assert plan.config.quantization_config() == QuantizationConfig("fp8", fp8_und=False, fp8_attention=asked)
