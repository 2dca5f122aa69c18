"""Deploy YAML schema, base_config merging, the pipeline registry and the runnable check."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from bagel_serve.config.deploy import DeployConfig, DeployConfigError, ParallelConfig
from bagel_serve.config.deploy_loader import apply_overrides, bundled_deploy_config, load_deploy_config, parse_deploy_config, resolve_deploy_path
from bagel_serve.config.pipelines import PIPELINES, default_deploy_config, is_bagel_model_config, resolve_pipeline
from bagel_serve.config.quantization import QuantizationConfig

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
    assert path.name == f"{name}.yaml" and path.parent.name == "deploy" and path.parent.parent.name == "bagel_serve"
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
    # Sized for a continuous-batching engine (CFG contexts are not separate sequences).
    assert (s0.stage_id, s0.max_num_seqs, s0.max_num_batched_tokens, s0.gpu_memory_utilization) == (0, 256, 32768, 0.45)
    assert s0.enable_prefix_caching is False and s0.devices == "0"
    # The official BAGEL behaviour: greedy, no repetition penalty, no fixed seed (not vllm-omni's deviations).
    assert s0.default_sampling_params == {}
    assert (s1.max_num_seqs, s1.gpu_memory_utilization, s1.devices) == (16, 0.45, "0")
    assert s1.input_connectors == {"from_stage_0": "shared_memory_connector"}
    assert s1.default_sampling_params == {}
    assert {k: c.name for k, c in cfg.connectors.items()} == {"shared_memory_connector": "SharedMemoryConnector"}


def test_single_stage_yaml_values() -> None:
    cfg = load_deploy_config(bundled_deploy_config("bagel_single_stage"))
    (s,) = cfg.stages
    assert (s.max_num_batched_tokens, s.max_num_seqs, s.enforce_eager, s.vae_use_tiling) == (32768, 256, False, False)
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


def test_default_deploy_config_is_two_stage() -> None:
    """As in the seed: a BAGEL checkpoint runs Thinker -> DiT unless a config says otherwise."""
    assert default_deploy_config(BAGEL_JSON).name == "bagel.yaml"
    assert default_deploy_config(BAGEL_JSON, think=True).name == "bagel_think.yaml"
    assert default_deploy_config(None).name == "bagel.yaml"
    assert resolve_pipeline(None, BAGEL_JSON).name == "bagel"
    with pytest.raises(DeployConfigError, match="not recognised as BAGEL"):
        default_deploy_config({"model_type": "llama"})


# --- fields ------------------------------------------------------------------------------------------------


def test_flat_parallel_keys_fold_into_parallel_config(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, """\
        stages:
          - stage_id: 0
            devices: "0,1,2,3,4,5"
            tensor_parallel_size: 2
            cfg_parallel_size: 3
            use_hsdp: false
            parallel_config:
              vae_patch_parallel_size: 2
              tensor_parallel_size: 2
    """))
    pc = cfg.stages[0].parallel_config
    assert (pc.tensor_parallel_size, pc.cfg_parallel_size, pc.vae_patch_parallel_size) == (2, 3, 2)
    assert cfg.stages[0].tensor_parallel_size == 2 and pc.world_size == 6 and cfg.stages[0].num_ranks == 6


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
    assert "stages[0].cfg_parallel_size: must be one of 1, 2, 3, got 'two'" in msg


def test_devices_normalised(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, """\
        stages:
          - {stage_id: 0, devices: 1}
          - {stage_id: 1, devices: "0, 1", tensor_parallel_size: 2}
          - {stage_id: 2, devices: [2, 3], tensor_parallel_size: 2}
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
    ("max_num_seqs: three", "stages[0].max_num_seqs: must be an integer >= 1, got 'three'"),
    ("enforce_eager: 1", "stages[0].enforce_eager: must be true or false, got 1"),
    ("enforce_eager: 'no'", "stages[0].enforce_eager: must be true or false, got 'no'"),
    ("max_num_seqs: true", "stages[0].max_num_seqs: must be an integer >= 1, got True"),
    ("max_num_seqs: 2.0", "stages[0].max_num_seqs: must be an integer >= 1, got 2.0"),
    ("parallel_config: [1, 2]", "stages[0].parallel_config: must be a mapping, got [1, 2]"),
    ("default_sampling_params: [seed]", "stages[0].default_sampling_params: must be a mapping, got ['seed']"),
    ("gpu_memory_utilization: high", "stages[0].gpu_memory_utilization: must be a finite number in (0, 1] or null, got 'high'"),
    ("gpu_memory_utilization: .nan", "stages[0].gpu_memory_utilization: must be a finite number in (0, 1] or null, got nan"),
    ("kv_cache_blocks: 0", "stages[0].kv_cache_blocks: must be an integer >= 1 or null, got 0"),
    ("default_sampling_params: {seed: x}", "stages[0].default_sampling_params.seed: must be an integer in [0, 9223372036854775807] or null, got 'x'"),
    ("input_connectors: {from_stage_0: 3}", "stages[0].input_connectors.from_stage_0: must be a string, got 3"),
])
def test_wrong_types_name_the_path(tmp_path: Path, snippet: str, expected: str) -> None:
    assert expected in load_error(tmp_path, f"stages:\n  - stage_id: 0\n    {snippet}\n")


def test_wrong_top_level_types(tmp_path: Path) -> None:
    assert "async_chunk: must be true or false, got 0" in load_error(tmp_path, SINGLE + "async_chunk: 0\n")
    assert "stages: must be a list, got" in load_error(tmp_path, "stages: {stage_id: 0}\n")
    assert "connectors: must be a mapping, got" in load_error(tmp_path, SINGLE + "connectors: [a]\n")


@pytest.mark.parametrize("snippet, expected", [
    ("parallel_config: {cfg_parallel_size: 4}", "stages[0].parallel_config.cfg_parallel_size: must be one of 1, 2, 3, got 4"),
    ("cfg_parallel_size: 4", "stages[0].cfg_parallel_size: must be one of 1, 2, 3, got 4"),
    ("gpu_memory_utilization: 0", "stages[0].gpu_memory_utilization: must be a finite number in (0, 1] or null, got 0"),
    ("gpu_memory_utilization: 1.5", "stages[0].gpu_memory_utilization: must be a finite number in (0, 1] or null, got 1.5"),
    ("max_num_seqs: 0", "stages[0].max_num_seqs: must be an integer >= 1, got 0"),
    ("parallel_config: {tensor_parallel_size: 0}", "stages[0].parallel_config.tensor_parallel_size: must be an integer >= 1, got 0"),
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
    assert PIPELINES["bagel_think"].stages == PIPELINES["bagel"].stages  # only the default deploy file differs
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
    assert resolve_pipeline(None, model_json).name == "bagel"  # the default: two stages, as in the seed
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


def test_checkpoint_without_config_json_is_bagel(tmp_path: Path) -> None:
    """config.json is optional: without it (None) both the default deploy file and the pipeline are BAGEL's."""
    one = load_deploy_config(write(tmp_path, "stages:\n  - stage_id: 0\n"))
    assert resolve_pipeline(one, None).name == "bagel_single_stage"
    assert resolve_pipeline(load_deploy_config(default_deploy_config(None)), None).name == "bagel"
    assert resolve_pipeline(None, None).name == "bagel"


# --- runnable check ---------------------------------------------------------------------------------------


def test_require_runnable_single_stage_passes() -> None:
    load_deploy_config(bundled_deploy_config("bagel_single_stage")).require_runnable()


@pytest.mark.parametrize("name", ["bagel", "bagel_think"])
def test_require_runnable_two_stage(name: str) -> None:
    """The two-stage files can run; where their stages may be placed is the worker backend's question."""
    load_deploy_config(bundled_deploy_config(name)).require_runnable()


@pytest.mark.parametrize("snippet", [
    "tensor_parallel_size: 2", "cfg_parallel_size: 2",
    "{tensor_parallel_size: 2, vae_patch_parallel_size: 2}",
    "parallel_config: {use_hsdp: true, hsdp_shard_size: 2}",
])
def test_require_runnable_parallel(tmp_path: Path, snippet: str) -> None:
    """Tensor, CFG and VAE patch parallel and HSDP run (their rules: tests/test_parallel_config.py)."""
    keys = f"parallel_config: {snippet}" if snippet.startswith("{") else snippet
    cfg = load_deploy_config(write(tmp_path, f"stages:\n  - stage_id: 0\n    devices: '0,1'\n    {keys}\n"))
    assert cfg.stages[0].num_ranks == 2
    cfg.require_runnable()


@pytest.mark.parametrize("snippet, expected", [
    ("ulysses_degree: 2", "sequence parallel (stages[0].parallel_config.ulysses_degree=2) is not built yet"),
    ("allgather_degree: 4", "sequence parallel (stages[0].parallel_config.allgather_degree=4) is not built yet"),
    ("parallel_config: {pipeline_parallel_size: 2}", "pipeline parallel"),
    ("parallel_config: {data_parallel_size: 2}", "data parallel"),
    ("parallel_config: {enable_expert_parallel: true}", "expert parallel"),
])
def test_require_runnable_refuses_unbuilt_parallelism(tmp_path: Path, snippet: str, expected: str) -> None:
    """Sequence, pipeline, data and expert parallelism load (devices are not counted for them) and are
    refused by name at start."""
    cfg = load_deploy_config(write(tmp_path, f"stages:\n  - stage_id: 0\n    {snippet}\n"))
    with pytest.raises(NotImplementedError, match=re.escape(expected)):
        cfg.require_runnable()


def test_quantization_runs(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, SINGLE + "quantization: fp8\n"))
    cfg.require_runnable()
    assert cfg.quantization_config() == QuantizationConfig("fp8", fp8_und=False, fp8_attention=False)


def test_fp8_attention_runs(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, SINGLE + "quantization: fp8\nfp8_attention: true\n"))
    cfg.require_runnable()
    assert cfg.quantization_config() == QuantizationConfig("fp8", fp8_und=False, fp8_attention=True)


# --- overrides ---------------------------------------------------------------------------------------------


def test_apply_overrides() -> None:
    cfg = load_deploy_config(bundled_deploy_config("bagel"))
    out = apply_overrides(cfg, {"tensor_parallel_size": 2, "quantization": None, "stage_1_devices": "2,3",
                                "gpu_memory_utilization": 0.5},
                          stage_overrides={"0": {"gpu_memory_utilization": 0.4, "devices": "0,1"}})
    assert [s.tensor_parallel_size for s in out.stages] == [2, 2]
    assert out.quantization is None and [s.devices for s in out.stages] == ["0,1", "2,3"]
    assert [s.gpu_memory_utilization for s in out.stages] == [0.4, 0.5]
    assert cfg.stages[0].tensor_parallel_size == 1  # the original is untouched
    with pytest.raises(DeployConfigError, match="must be one of 1, 2, 3"):
        apply_overrides(cfg, {"cfg_parallel_size": 4})
    with pytest.raises(DeployConfigError, match="unknown key"):
        apply_overrides(cfg, {"max_num_seq": 4})
    with pytest.raises(DeployConfigError, match="no such stage"):
        apply_overrides(cfg, stage_overrides={5: {"devices": "1"}})


def test_no_overrides_leave_the_config_as_loaded() -> None:
    """Nothing given (every flag None, no stage overrides): no copy, no second validation, no "(with
    overrides)" in the messages that name the file."""
    cfg = load_deploy_config(bundled_deploy_config("bagel"))
    assert apply_overrides(cfg) is cfg
    assert apply_overrides(cfg, {"max_num_seqs": None, "quantization": None}, {}) is cfg
    assert "(with overrides)" in apply_overrides(cfg, {"max_num_seqs": 2}).source


def test_parse_from_dict() -> None:
    cfg = parse_deploy_config({"pipeline": "bagel_single_stage", "stages": [{"stage_id": 0}]})
    assert isinstance(cfg, DeployConfig) and cfg.stages[0].max_num_seqs == 1 and cfg.source is None
    with pytest.raises(DeployConfigError, match=r"^<cli>: stages\[0\]\.devices"):
        parse_deploy_config({"stages": [{"stage_id": 0, "devices": None}]}, source="<cli>")


# --- where a deploy config argument points ------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["bagel_single_stage.yaml", "bagel_single_stage", "deploy/bagel_single_stage.yaml",
                                  "vllm_omni/deploy/bagel_single_stage.yaml"])
def test_bare_names_and_seed_paths_resolve_to_bundled(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # from any directory
    assert resolve_deploy_path(spec) == bundled_deploy_config("bagel_single_stage")
    assert load_deploy_config(spec).stages[0].max_num_seqs == 256


def test_existing_file_wins_over_bundled_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "deploy").mkdir()
    own = write(tmp_path, SINGLE, "deploy/bagel_single_stage.yaml")
    monkeypatch.chdir(tmp_path)
    assert resolve_deploy_path("deploy/bagel_single_stage.yaml") == Path("deploy/bagel_single_stage.yaml")
    assert load_deploy_config("deploy/bagel_single_stage.yaml").stages[0].max_num_seqs == 1
    assert own.is_file()


def test_unknown_deploy_name_lists_the_bundled(tmp_path: Path) -> None:
    with pytest.raises(DeployConfigError, match=r"nope.yaml: deploy config not found .*bagel_single_stage.yaml"):
        load_deploy_config("nope.yaml")
    with pytest.raises(DeployConfigError, match="not found"):
        load_deploy_config(tmp_path / "deploy" / "nope.yaml")
    with pytest.raises(DeployConfigError, match="is a directory"):
        load_deploy_config(tmp_path)


def test_garbage_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00")
    with pytest.raises(DeployConfigError, match=rf"^{path}: not a text file"):
        load_deploy_config(path)


# --- default_sampling_params ----------------------------------------------------------------------------------


def test_sampling_params_typed(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, """\
        stages:
          - stage_id: 0
            default_sampling_params: {temperature: 0.4, top_p: 0.9, top_k: 1, max_tokens: 2048, seed: 52,
                                      repetition_penalty: 1.05, detokenize: true}
    """))
    p = cfg.stages[0].sampling_params
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed, p.repetition_penalty) == (0.4, 0.9, 1, 2048, 52, 1.05)


@pytest.mark.parametrize("snippet, expected", [
    ("{min_p: 0.1}", "stages[0].default_sampling_params.min_p: unknown key (known: detokenize, "
                     "enable_taylorseer, max_tokens, repetition_penalty, seed, temperature, top_k, top_p)"),
    ("{temperature: .nan}", "default_sampling_params.temperature: must be a finite number >= 0 or null, got nan"),
    ("{temperature: -1}", "default_sampling_params.temperature: must be a finite number >= 0 or null, got -1"),
    ("{seed: 18446744073709551616}", "default_sampling_params.seed: must be an integer in [0, 9223372036854775807]"),
    ("{top_p: 0}", "default_sampling_params.top_p: must be a finite number in (0, 1] or null, got 0"),
    ("{max_tokens: 0}", "default_sampling_params.max_tokens: must be an integer in [1, 1048576] or null, got 0"),
    ("{repetition_penalty: .inf}", "default_sampling_params.repetition_penalty: must be a finite number > 0"),
    ("{detokenize: false}", "default_sampling_params.detokenize: false cannot be honoured"),
])
def test_sampling_params_refused_by_name(tmp_path: Path, snippet: str, expected: str) -> None:
    assert expected in load_error(tmp_path, f"stages:\n  - stage_id: 0\n    default_sampling_params: {snippet}\n")


# --- every key drives code or is refused by name ------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    (SINGLE + "platforms: {npu: {stages: []}}\n", "platforms (npu) cannot be honoured"),
    (SINGLE + "session_mode: multi\n", "session_mode='multi' is not supported"),
    (SINGLE + "distributed_executor_backend: external_launcher\n",
     "distributed_executor_backend='external_launcher' is not supported"),
    (SINGLE + "enable_chunked_prefill: false\n", "enable_chunked_prefill=false cannot be honoured"),
    (SINGLE + "data_parallel_size: 2\n", "data parallel (data_parallel_size=2) is not built yet"),
    ("stages:\n  - {stage_id: 0, enable_chunked_prefill: false}\n", "stages[0].enable_chunked_prefill=false"),
    ("stages:\n  - {stage_id: 0, num_replicas: 2}\n", "stage replicas (stages[0].num_replicas=2)"),
    ("stages:\n  - {stage_id: 0, vae_parallel_mode: spatial_shard_height}\n",
     "VAE patch parallel (stages[0].parallel_config.vae_parallel_mode='spatial_shard_height')"),
    ("stages:\n  - {stage_id: 0, parallel_config: {ulysses_mode: advanced_uaa}}\n",
     "sequence parallel (stages[0].parallel_config.ulysses_mode='advanced_uaa')"),
    ("stages:\n  - stage_id: 0\n  - {stage_id: 1, default_sampling_params: {seed: 52}}\n",
     "stages[1].default_sampling_params (seed) cannot be honoured: requests take their defaults from stage 0"),
    ("connectors: {rdma: {name: MooncakeTransferEngineConnector}}\n"
     "stages:\n  - stage_id: 0\n  - {stage_id: 1, input_connectors: {from_stage_0: rdma}}\n",
     "connector 'rdma' (MooncakeTransferEngineConnector, bound at stages[1].input_connectors.from_stage_0) is not built"),
    ("connectors: {shm: {name: SharedMemoryConnector, extra: {shm_threshold_bytes: 65536}}}\n"
     "stages:\n  - stage_id: 0\n  - {stage_id: 1, input_connectors: {from_stage_0: shm}}\n",
     "connectors.shm.extra (shm_threshold_bytes) cannot be honoured"),
])
def test_unsupported_keys_refused_by_name(tmp_path: Path, text: str, expected: str) -> None:
    cfg = load_deploy_config(write(tmp_path, text))  # loads and validates ...
    with pytest.raises(NotImplementedError) as info:  # ... but does not run
        cfg.require_runnable()
    assert expected in str(info.value) and str(info.value).startswith(cfg.source)


def test_accepted_compat_keys_run(tmp_path: Path) -> None:
    """Keys whose value is what the engine does (or that need nothing here) load and run."""
    cfg = load_deploy_config(write(tmp_path, """\
        trust_remote_code: true
        distributed_executor_backend: mp
        enable_chunked_prefill: true
        edges: [{from: 0, to: 1}]
        connectors:
          shm: {name: SharedMemoryConnector}
          rdma: {name: MooncakeTransferEngineConnector, extra: {zmq_port: 50051}}   # defined, not bound
        stages:
          - {stage_id: 0, enforce_eager: true, max_model_len: 4096, kv_cache_blocks: 64,
             default_sampling_params: {detokenize: true}, output_connectors: {to_stage_1: shm}}
          - {stage_id: 1, input_connectors: {from_stage_0: shm}, env: {OMP_NUM_THREADS: 2}}
    """))
    cfg.require_runnable()
    assert resolve_pipeline(cfg, BAGEL_JSON).name == "bagel"
    assert cfg.stages[0].kv_cache_blocks == 64 and cfg.stages[1].env == {"OMP_NUM_THREADS": "2"}


def test_edges_must_be_the_pipelines_graph(tmp_path: Path) -> None:
    cfg = load_deploy_config(write(tmp_path, "edges: [{from: 1, to: 0}]\nstages:\n  - stage_id: 0\n  - stage_id: 1\n"))
    with pytest.raises(DeployConfigError, match=r"edges: \[\(1, 0\)\] is not the stage graph of pipeline 'bagel'"):
        resolve_pipeline(cfg, BAGEL_JSON)
    assert "edges[0].weight: unknown key" in load_error(
        tmp_path, "edges: [{from: 0, to: 1, weight: 2}]\nstages:\n  - stage_id: 0\n  - stage_id: 1\n")


def test_new_stage_limits_are_overridable_in_every_stage() -> None:
    cfg = load_deploy_config("bagel.yaml")
    out = apply_overrides(cfg, {"kv_cache_blocks": 128, "enforce_eager": True, "max_model_len": 2048,
                                "max_num_seqs": 8}, stage_overrides={"1": {"kv_cache_blocks": 32}})
    assert [s.kv_cache_blocks for s in out.stages] == [128, 32]
    assert all(s.enforce_eager and s.max_model_len == 2048 and s.max_num_seqs == 8 for s in out.stages)
    with pytest.raises(DeployConfigError, match="kv_cache_blocks: must be an integer >= 1 or null, got 0"):
        apply_overrides(cfg, {"kv_cache_blocks": 0})


def test_every_schema_key_is_documented() -> None:
    """docs/deploy-config.md says what each key does here (or that it is refused)."""
    import dataclasses

    from bagel_serve.config.deploy import ConnectorConfig, StageConfig
    from bagel_serve.config.sampling import SamplingParams
    from bagel_serve.config.validate import yaml_fields

    doc = (Path(__file__).resolve().parents[1] / "docs" / "deploy-config.md").read_text()
    for cls in (DeployConfig, StageConfig, ParallelConfig, ConnectorConfig, SamplingParams):
        for name in yaml_fields(cls):
            assert f"| `{name}` |" in doc, f"{cls.__name__}.{name} is not in docs/deploy-config.md"
    assert dataclasses.is_dataclass(SamplingParams)


def test_denoise_graph_sizes_default_override_and_model_check(tiny_checkpoint: Path) -> None:
    """512x512 by default where the model generates images that large (the tiny one does not: none), settable
    per stage ([] for none), and checked against the model before any weight loads: a side that is no
    multiple of the latent token side, or beyond the largest image, is refused by name."""
    from bagel_serve import Omni
    from bagel_serve.config.parallel_checks import check_graph_sizes_against_model
    from bagel_serve.engine.denoise_graphs import graph_sizes
    from bagel_serve.model.loader import read_config

    cfg = load_deploy_config("bagel.yaml")
    assert [s.denoise_graph_sizes for s in cfg.stages] == [None, None]
    out = apply_overrides(cfg, {}, stage_overrides={"1": {"denoise_graph_sizes": [[256, 384], [64, 64]]}})
    assert out.stages[1].denoise_graph_sizes == [(256, 384), (64, 64)] and out.stages[0].denoise_graph_sizes is None
    assert apply_overrides(cfg, {}, stage_overrides={"1": {"denoise_graph_sizes": []}}).stages[1].denoise_graph_sizes == []
    with pytest.raises(DeployConfigError, match=r"denoise_graph_sizes\[0\]"):
        apply_overrides(cfg, {}, stage_overrides={"1": {"denoise_graph_sizes": [512]}})
    model = read_config(tiny_checkpoint)
    step, top = model.latent_downsample, model.max_image_side
    assert graph_sizes(None, model) == () and graph_sizes(None, model.with_max_latent_size(64)) == ((512, 512),)
    assert graph_sizes(((step, step),), model) == ((step, step),)
    check_graph_sizes_against_model(cfg, model)
    check_graph_sizes_against_model(apply_overrides(cfg, {}, stage_overrides={"1": {"denoise_graph_sizes": [[step, top]]}}),
                                    model)
    for bad in ([step + 1, step], [top + step, step], [0, step]):
        bad_cfg = apply_overrides(cfg, {}, stage_overrides={"1": {"denoise_graph_sizes": [[step, step], bad]}})
        with pytest.raises(DeployConfigError, match=rf"stages\[1\]\.denoise_graph_sizes\[1\]: \[{bad[0]}, {bad[1]}\]: each "
                                                    rf"side must be a multiple of {step} from {step} to {top}"):
            check_graph_sizes_against_model(bad_cfg, model)
    with pytest.raises(DeployConfigError, match=r"denoise_graph_sizes\[0\]"):
        Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_single_stage.yaml",
             stage_overrides={"0": {"denoise_graph_sizes": [[step + 1, step]]}})
