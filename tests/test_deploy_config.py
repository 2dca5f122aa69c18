"""Deploy YAML schema, base_config merging, the pipeline registry and the runnable check."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from bagel_serve.config.deploy import (
    PIPELINES,
    DeployConfig,
    DeployConfigError,
    ParallelConfig,
    apply_overrides,
    bundled_deploy_config,
    default_deploy_config,
    is_bagel_model_config,
    load_deploy_config,
    parse_deploy_config,
    resolve_pipeline,
)

BAGEL_JSON = {"llm_config": {}, "vit_config": {}, "vae_config": {}}  # what the real checkpoint's config.json has

SINGLE = """\
pipeline: bagel_single_stage
stages:
  - stage_id: 0
    max_num_seqs: 1
"""


def write(tmp_path: Path, text: str, name: str = "deploy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(DeployConfigError) as info:
        load_deploy_config(path)
    msg = str(info.value)
    assert msg.startswith(str(path)), msg
    return msg


# --- bundled files ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, stages", [("bagel", 2), ("bagel_think", 2), ("bagel_single_stage", 1)])
def test_bundled_files_load_and_resolve(name: str, stages: int) -> None:
    path = bundled_deploy_config(name)
    assert path.name == f"{name}.yaml" and path.parent.name == "deploy"
    cfg = load_deploy_config(path)
    assert len(cfg.stages) == stages
    assert cfg.async_chunk is False
    assert resolve_pipeline(cfg, BAGEL_JSON) is PIPELINES[name]
    if name != "bagel":  # bagel.yaml has no `pipeline:` (detected from the model, as in vllm-omni)
        assert resolve_pipeline(cfg, None).name == name


def test_bagel_yaml_values() -> None:
    cfg = load_deploy_config(bundled_deploy_config("bagel"))
    assert cfg.pipeline is None  # detected from the model, as in vllm-omni
    s0, s1 = cfg.stages
    assert (s0.stage_id, s0.max_num_seqs, s0.max_num_batched_tokens, s0.gpu_memory_utilization) == (0, 3, 32768, 0.45)
    assert s0.enable_prefix_caching is False and s0.devices == "0"
    assert s0.default_sampling_params == {"temperature": 0.4, "top_p": 0.9, "top_k": 1, "max_tokens": 2048,
                                          "seed": 52, "detokenize": True, "repetition_penalty": 1.05}
    assert (s1.max_num_seqs, s1.enforce_eager, s1.devices) == (1, True, "0")
    assert s1.input_connectors == {"from_stage_0": "shared_memory_connector"}
    assert s1.default_sampling_params == {"seed": 52}
    assert cfg.connectors["shared_memory_connector"].name == "SharedMemoryConnector"
    assert cfg.connectors["rdma_connector"].extra["zmq_port"] == 50051


def test_single_stage_yaml_values() -> None:
    cfg = load_deploy_config(bundled_deploy_config("bagel_single_stage"))
    (s,) = cfg.stages
    assert (s.max_num_batched_tokens, s.max_num_seqs, s.enforce_eager, s.vae_use_tiling) == (32768, 32, True, False)
    assert s.parallel_config == ParallelConfig() and s.parallel_config.is_neutral
    assert s.default_sampling_params == {}
    assert cfg.single_stage


def test_bagel_think_inherits_bagel_stages() -> None:
    base = load_deploy_config(bundled_deploy_config("bagel"))
    think = load_deploy_config(bundled_deploy_config("bagel_think"))
    assert think.pipeline == "bagel_think" and think.base_config == "bagel.yaml"
    assert think.stages == base.stages
    assert think.connectors == base.connectors


def test_bundled_unknown_name() -> None:
    with pytest.raises(DeployConfigError, match="bagel_single_stage"):
        bundled_deploy_config("nope")


def test_default_deploy_config_is_single_stage_for_now() -> None:
    assert default_deploy_config(BAGEL_JSON).name == "bagel_single_stage.yaml"
    assert default_deploy_config(BAGEL_JSON, think=True).name == "bagel_single_stage.yaml"
    assert default_deploy_config(None).name == "bagel_single_stage.yaml"
    with pytest.raises(DeployConfigError, match="not recognised as BAGEL"):
        default_deploy_config({"model_type": "llama"})


# --- fields ------------------------------------------------------------------------------------------------


def test_flat_parallel_keys_fold_into_parallel_config(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, """\
        stages:
          - stage_id: 0
            tensor_parallel_size: 2
            cfg_parallel_size: 3
            use_hsdp: false
            parallel_config:
              vae_patch_parallel_size: 2
              tensor_parallel_size: 2
    """))
    pc = cfg.stages[0].parallel_config
    assert (pc.tensor_parallel_size, pc.cfg_parallel_size, pc.vae_patch_parallel_size) == (2, 3, 2)
    assert cfg.stages[0].tensor_parallel_size == 2 and pc.world_size == 6


def test_flat_and_nested_conflict(tmp_path: Path) -> None:
    msg = load_error(tmp_path, """\
        stages:
          - stage_id: 0
            tensor_parallel_size: 2
            parallel_config: {tensor_parallel_size: 4}
    """)
    assert "stages[0].tensor_parallel_size: 2 conflicts with parallel_config.tensor_parallel_size: 4" in msg


def test_flat_key_type_error_names_flat_path(tmp_path: Path) -> None:
    msg = load_error(tmp_path, "stages:\n  - stage_id: 0\n    cfg_parallel_size: two\n")
    assert "stages[0].cfg_parallel_size: expected int, got 'two'" in msg


def test_devices_normalised(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, """\
        stages:
          - {stage_id: 0, devices: 1}
          - {stage_id: 1, devices: "0, 1"}
          - {stage_id: 2, devices: [2, 3]}
    """))
    assert [s.devices for s in cfg.stages] == ["1", "0,1", "2,3"]
    assert cfg.stages[2].device_ids == [2, 3]
    assert "stages[0].devices" in load_error(tmp_path, "stages:\n  - {stage_id: 0, devices: 'cuda:0'}\n")


def test_env_values_become_strings(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, "stages:\n  - {stage_id: 0, env: {OMP_NUM_THREADS: 4, A: b}}\n"))
    assert cfg.stages[0].env == {"OMP_NUM_THREADS": "4", "A": "b"}


def test_stages_sorted_by_id(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, "stages:\n  - {stage_id: 1}\n  - {stage_id: 0}\n"))
    assert [s.stage_id for s in cfg.stages] == [0, 1]


# --- errors ------------------------------------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    msg = load_error(tmp_path, SINGLE + "asyn_chunk: false\n")
    assert "asyn_chunk: unknown key (known: " in msg and "async_chunk" in msg
    assert "did you mean 'async_chunk'" in msg


def test_unknown_stage_key(tmp_path: Path) -> None:
    msg = load_error(tmp_path, "stages:\n  - stage_id: 0\n  - stage_id: 1\n    max_num_seq: 3\n")
    assert "stages[1].max_num_seq: unknown key (known: " in msg
    assert "max_num_seqs" in msg and "tensor_parallel_size" in msg  # flat parallel keys are known keys


def test_unknown_parallel_config_key(tmp_path: Path) -> None:
    msg = load_error(tmp_path, """\
        stages:
          - stage_id: 0
          - stage_id: 1
            parallel_config:
              tensor_paralel_size: 2
    """)
    assert "stages[1].parallel_config.tensor_paralel_size: unknown key (known: " in msg
    assert "cfg_parallel_size" in msg


@pytest.mark.parametrize("snippet, expected", [
    ("max_num_seqs: three", "stages[0].max_num_seqs: expected int, got 'three'"),
    ("enforce_eager: 1", "stages[0].enforce_eager: expected bool, got 1"),
    ("max_num_seqs: true", "stages[0].max_num_seqs: expected int, got True"),
    ("parallel_config: [1, 2]", "stages[0].parallel_config: expected mapping, got [1, 2]"),
    ("default_sampling_params: [seed]", "stages[0].default_sampling_params: expected mapping, got ['seed']"),
    ("gpu_memory_utilization: high", "stages[0].gpu_memory_utilization: expected number or null, got 'high'"),
    ("default_sampling_params: {seed: x}", "stages[0].default_sampling_params.seed: expected int, got 'x'"),
    ("input_connectors: {from_stage_0: 3}", "stages[0].input_connectors.from_stage_0: expected str, got 3"),
])
def test_wrong_types_name_the_path(tmp_path: Path, snippet: str, expected: str) -> None:
    assert expected in load_error(tmp_path, f"stages:\n  - stage_id: 0\n    {snippet}\n")


def test_wrong_top_level_types(tmp_path: Path) -> None:
    assert "async_chunk: expected bool, got 0" in load_error(tmp_path, SINGLE + "async_chunk: 0\n")
    assert "stages: expected list, got" in load_error(tmp_path, "stages: {stage_id: 0}\n")
    assert "connectors: expected mapping, got" in load_error(tmp_path, SINGLE + "connectors: [a]\n")


@pytest.mark.parametrize("snippet, expected", [
    ("parallel_config: {cfg_parallel_size: 4}", "stages[0].parallel_config.cfg_parallel_size: must be one of 1, 2, 3, got 4"),
    ("cfg_parallel_size: 4", "stages[0].cfg_parallel_size: must be one of 1, 2, 3, got 4"),
    ("gpu_memory_utilization: 0", "stages[0].gpu_memory_utilization: must be > 0.0"),
    ("gpu_memory_utilization: 1.5", "stages[0].gpu_memory_utilization: must be <= 1.0"),
    ("max_num_seqs: 0", "stages[0].max_num_seqs: must be >= 1, got 0"),
    ("parallel_config: {tensor_parallel_size: 0}", "stages[0].parallel_config.tensor_parallel_size: must be >= 1"),
    ("parallel_config: {allgather_degree: 2, ulysses_degree: 2}", "AllGather-KV is exclusive"),
    ("parallel_config: {use_hsdp: true, tensor_parallel_size: 2}", "HSDP cannot be combined"),
    ("parallel_config: {use_hsdp: true}", "needs an explicit hsdp_shard_size"),
])
def test_ranges(tmp_path: Path, snippet: str, expected: str) -> None:
    assert expected in load_error(tmp_path, f"stages:\n  - stage_id: 0\n    {snippet}\n")


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "stages:\n  - stage_id: 0\n    devices: [0, 1\n    max_num_seqs: 1\n")
    with pytest.raises(DeployConfigError) as info:
        load_deploy_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:") and "invalid YAML" in msg
    line = int(msg[len(str(path)) + 1:].split(":")[0])
    assert 3 <= line <= 5


@pytest.mark.parametrize("text, expected", [
    ("", "empty"),
    ("# only a comment\n", "empty"),
    ("- stage_id: 0\n", "must be a mapping, got list"),
    ("pipeline: bagel_single_stage\n", "stages: required key is missing"),
    ("stages: []\n", "at least one stage"),
])
def test_empty_or_not_a_mapping(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in load_error(tmp_path, text)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DeployConfigError, match="not found"):
        load_deploy_config(tmp_path / "nope.yaml")


def test_duplicate_stage_ids(tmp_path: Path) -> None:
    msg = load_error(tmp_path, "stages:\n  - stage_id: 0\n  - stage_id: 0\n")
    assert "stages[1].stage_id: duplicate stage id 0" in msg


def test_non_contiguous_stage_ids(tmp_path: Path) -> None:
    assert "stages: stage ids must be 0..1, got [0, 2]" in load_error(tmp_path, "stages:\n  - stage_id: 0\n  - stage_id: 2\n")
    assert "stages[0].stage_id: required key is missing" in load_error(tmp_path, "stages:\n  - devices: '0'\n")


def test_connector_references(tmp_path: Path) -> None:
    msg = load_error(tmp_path, """\
        stages:
          - stage_id: 0
          - stage_id: 1
            input_connectors: {from_stage_0: shm}
    """)
    assert "stages[1].input_connectors.from_stage_0: connector 'shm' is not defined" in msg
    assert "from_stage_<id>" in load_error(tmp_path, "stages:\n  - {stage_id: 0, input_connectors: {stage0: x}}\n")


# --- base_config -------------------------------------------------------------------------------------------


def test_base_config_deep_merge(tmp_path: Path) -> None:
    write(tmp_path, """\
        async_chunk: false
        dtype: bfloat16
        stages:
          - stage_id: 0
            max_num_seqs: 3
            default_sampling_params: {seed: 52, top_k: 1}
          - stage_id: 1
            enforce_eager: true
    """, "base.yaml")
    (tmp_path / "sub").mkdir()
    child = write(tmp_path, """\
        base_config: ../base.yaml
        stages:
          - stage_id: 1
            devices: "1"
          - stage_id: 0
            default_sampling_params: {seed: 7}
    """, "sub/child.yaml")
    cfg = load_deploy_config(child)
    s0, s1 = cfg.stages
    assert s0.max_num_seqs == 3 and s0.default_sampling_params == {"seed": 7, "top_k": 1}
    assert s1.enforce_eager and s1.devices == "1"
    assert cfg.dtype == "bfloat16" and cfg.base_config == "../base.yaml"


def test_base_config_missing_file(tmp_path: Path) -> None:
    msg = load_error(tmp_path, "base_config: missing.yaml\npipeline: bagel_think\n")
    assert "base_config: 'missing.yaml' not found" in msg and str(tmp_path / "missing.yaml") in msg


def test_base_config_cycle(tmp_path: Path) -> None:
    write(tmp_path, "base_config: b.yaml\n", "a.yaml")
    write(tmp_path, "base_config: a.yaml\n", "b.yaml")
    with pytest.raises(DeployConfigError, match="cycle"):
        load_deploy_config(tmp_path / "a.yaml")


def test_base_config_falls_back_to_bundled(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, "base_config: bagel.yaml\npipeline: bagel_think\n"))
    assert resolve_pipeline(cfg, None).name == "bagel_think" and len(cfg.stages) == 2


def test_malformed_base_names_the_base(tmp_path: Path) -> None:
    base = write(tmp_path, "stages: [\n", "base.yaml")
    child = write(tmp_path, "base_config: base.yaml\n")
    with pytest.raises(DeployConfigError) as info:
        load_deploy_config(child)
    assert str(info.value).startswith(f"{base}:")


# --- pipelines ---------------------------------------------------------------------------------------------


def test_pipeline_registry() -> None:
    assert set(PIPELINES) == {"bagel", "bagel_think", "bagel_single_stage"}
    assert [r.name for r in PIPELINES["bagel"].stages] == ["thinker", "dit"]
    assert [r.kind for r in PIPELINES["bagel_think"].stages] == ["ar", "diffusion"]
    assert PIPELINES["bagel"].kv_handoff == "prefill_finished"
    assert PIPELINES["bagel_think"].kv_handoff == "request_finished"
    assert [r.name for r in PIPELINES["bagel_single_stage"].stages] == ["dit"]


def test_unknown_pipeline(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, SINGLE.replace("bagel_single_stage", "bagel_singel_stage")))
    with pytest.raises(DeployConfigError) as info:
        resolve_pipeline(cfg, BAGEL_JSON)
    msg = str(info.value)
    assert "unknown pipeline 'bagel_singel_stage'" in msg
    assert "bagel, bagel_think, bagel_single_stage" in msg


def test_stage_count_mismatch(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, SINGLE.replace("bagel_single_stage", "bagel")))
    with pytest.raises(DeployConfigError, match=r"pipeline 'bagel' has 2 stage\(s\) .* defines 1"):
        resolve_pipeline(cfg, BAGEL_JSON)


def test_async_chunk_rejected_for_two_stage(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, "async_chunk: true\nstages:\n  - stage_id: 0\n  - stage_id: 1\n"))
    with pytest.raises(DeployConfigError, match="async_chunk"):
        resolve_pipeline(cfg, BAGEL_JSON)


@pytest.mark.parametrize("model_json", [
    {"model_type": "bagel"},
    {"llm_config": {}, "vit_config": {}},
    {"architectures": ["BagelForConditionalGeneration"]},
])
def test_topology_detection(tmp_path: Path, model_json: dict) -> None:
    assert is_bagel_model_config(model_json)
    assert resolve_pipeline(None, model_json).name == "bagel_single_stage"  # the default while single-stage only
    two = load_deploy_config(write(tmp_path, "stages:\n  - stage_id: 0\n  - stage_id: 1\n"))
    one = load_deploy_config(write(tmp_path, "stages:\n  - stage_id: 0\n", "one.yaml"))
    assert resolve_pipeline(two, model_json).name == "bagel"
    assert resolve_pipeline(one, model_json).name == "bagel_single_stage"


def test_topology_detection_real_golden_config(golden_a_config: dict) -> None:
    assert is_bagel_model_config(golden_a_config)


def test_topology_detection_unknown_model(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, "stages:\n  - stage_id: 0\n"))
    for deploy in (cfg, None):
        with pytest.raises(DeployConfigError, match="cannot determine the pipeline.*'llama'"):
            resolve_pipeline(deploy, {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(DeployConfigError, match="no config.json given"):
        resolve_pipeline(cfg, None)


# --- runnable check ---------------------------------------------------------------------------------------


def test_require_runnable_single_stage_passes() -> None:
    load_deploy_config(bundled_deploy_config("bagel_single_stage")).require_runnable()


@pytest.mark.parametrize("name", ["bagel", "bagel_think"])
def test_require_runnable_two_stage(name: str) -> None:
    """The two-stage files can run; where their stages may be placed is the worker backend's question."""
    load_deploy_config(bundled_deploy_config(name)).require_runnable()


@pytest.mark.parametrize("snippet, expected", [
    ("tensor_parallel_size: 2", "tensor parallel"),
    ("cfg_parallel_size: 2", "CFG parallel"),
    ("vae_patch_parallel_size: 2", "VAE patch parallel"),
    ("parallel_config: {use_hsdp: true, hsdp_shard_size: 2}", "HSDP"),
    ("ulysses_degree: 2", "sequence parallel"),
])
def test_require_runnable_parallel(tmp_path: Path, snippet: str, expected: str) -> None:
    cfg = load_deploy_config(write(tmp_path, f"stages:\n  - stage_id: 0\n    {snippet}\n"))
    with pytest.raises(NotImplementedError, match=f"{expected} .*is not built yet"):
        cfg.require_runnable()


def test_require_runnable_quantization(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, SINGLE + "quantization: fp8\n"))
    with pytest.raises(NotImplementedError, match="quantization"):
        cfg.require_runnable()


# --- overrides ---------------------------------------------------------------------------------------------


def test_apply_overrides() -> None:
    cfg = load_deploy_config(bundled_deploy_config("bagel"))
    out = apply_overrides(cfg, {"cfg_parallel_size": 3, "quantization": None, "stage_1_devices": "1",
                                "gpu_memory_utilization": 0.5},
                          stage_overrides={"0": {"gpu_memory_utilization": 0.4}})
    assert [s.cfg_parallel_size for s in out.stages] == [3, 3]
    assert out.quantization is None and out.stages[1].devices == "1"
    assert [s.gpu_memory_utilization for s in out.stages] == [0.4, 0.5]
    assert cfg.stages[0].cfg_parallel_size == 1  # the original is untouched
    with pytest.raises(DeployConfigError, match="must be one of 1, 2, 3"):
        apply_overrides(cfg, {"cfg_parallel_size": 4})
    with pytest.raises(DeployConfigError, match="unknown key"):
        apply_overrides(cfg, {"max_num_seq": 4})
    with pytest.raises(DeployConfigError, match="no such stage"):
        apply_overrides(cfg, stage_overrides={5: {"devices": "1"}})


def test_parse_from_dict() -> None:
    cfg = parse_deploy_config({"pipeline": "bagel_single_stage", "stages": [{"stage_id": 0}]})
    assert isinstance(cfg, DeployConfig) and cfg.stages[0].max_num_seqs == 1 and cfg.source is None
    with pytest.raises(DeployConfigError, match=r"^<cli>: stages\[0\]\.devices"):
        parse_deploy_config({"stages": [{"stage_id": 0, "devices": None}]}, source="<cli>")
