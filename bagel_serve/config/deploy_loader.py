"""Reading deploy configs: where a name points, YAML parsing, `base_config` overlays and overrides.

Bundled files ship inside the package (`bagel_serve/deploy/*.yaml`), so an installed bagel-serve finds them
from any directory. `resolve_deploy_path` says what a `--deploy-config` / `deploy_config=` value means:

* an existing file is that file;
* a bare name (`bagel_single_stage.yaml`, or `bagel_single_stage`) is the bundled file of that name;
* a path that does not exist and whose directory is named `deploy` (`deploy/bagel.yaml` from a checkout,
  the seed's `vllm_omni/deploy/bagel.yaml`) is the bundled file of that name, when there is one.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any, Mapping

import yaml

from bagel_serve.config.deploy import DeployConfig, DeployConfigError, StageConfig
from bagel_serve.config.parallel import FLAT_PARALLEL_KEYS
from bagel_serve.config.validate import ValidationError, build, known_keys, short, yaml_fields

__all__ = ["load_deploy_config", "parse_deploy_config", "apply_overrides", "resolve_deploy_path",
           "bundled_deploy_dir", "bundled_deploy_config"]

_BUNDLED = Path(__file__).resolve().parent.parent / "deploy"


# ---------------------------------------------------------------------------------------------------------
# Bundled files and names.


def bundled_deploy_dir() -> Path:
    """The directory of the deploy files shipped with the package."""
    if not _BUNDLED.is_dir():
        raise DeployConfigError(f"bundled deploy configs not found at {_BUNDLED} (a broken install?); "
                                f"pass the path of a deploy config")
    return _BUNDLED


def _bundled_names() -> list[str]:
    return sorted(p.stem for p in _BUNDLED.glob("*.yaml")) if _BUNDLED.is_dir() else []


def bundled_deploy_config(name: str) -> Path:
    """Path of a bundled deploy file: `bundled_deploy_config("bagel")` -> `.../bagel_serve/deploy/bagel.yaml`."""
    d = bundled_deploy_dir()
    fname = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    path = d / fname
    if not path.is_file():
        raise DeployConfigError(f"no bundled deploy config {name!r} in {d} (bundled: {', '.join(_bundled_names())})")
    return path


def resolve_deploy_path(spec: str | Path) -> Path:
    """The file a deploy config argument names (see the module docstring); DeployConfigError if none."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise DeployConfigError(f"{path}: is a directory, not a deploy config file")
    bare = len(path.parts) == 1
    if bare or path.parent.name == "deploy":
        name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
        candidate = _BUNDLED / name
        if candidate.is_file():
            return candidate
    bundled = ", ".join(f"{n}.yaml" for n in _bundled_names())
    raise DeployConfigError(f"{path}: deploy config not found (a file path, or the name of a bundled config: {bundled})")


# ---------------------------------------------------------------------------------------------------------
# YAML and base_config.


def _merge(base: Any, child: Any, path: str) -> Any:
    """Deep-merge `child` over `base`: mappings merge key by key, `stages` lists by stage_id, other values replace."""
    if isinstance(base, dict) and isinstance(child, dict):
        out = dict(base)
        for key, value in child.items():
            sub = f"{path}.{key}" if path else str(key)
            if key in out:
                if key == "stages" and not path and isinstance(out[key], list) and isinstance(value, list):
                    out[key] = _merge_stages(out[key], value)
                else:
                    out[key] = _merge(out[key], value, sub)
            else:
                out[key] = copy.deepcopy(value)
        return out
    return copy.deepcopy(child)


def _merge_stages(base: list, child: list) -> list:
    def index(stages: list, which: str) -> dict[Any, int]:
        ids: dict[Any, int] = {}
        for i, s in enumerate(stages):
            if not isinstance(s, dict):
                raise ValidationError(f"stages[{i}]", f"must be a mapping, got {short(s)} ({which})")
            if "stage_id" not in s:
                raise ValidationError(f"stages[{i}].stage_id", f"required key is missing ({which})")
            if s["stage_id"] in ids:
                raise ValidationError(f"stages[{i}].stage_id", f"duplicate stage id {s['stage_id']!r} ({which})")
            ids[s["stage_id"]] = i
        return ids

    base_ids = index(base, "in base_config")
    index(child, "in the overriding file")
    out = [copy.deepcopy(s) for s in base]
    for s in child:
        if s["stage_id"] in base_ids:
            i = base_ids[s["stage_id"]]
            out[i] = _merge(out[i], s, f"stages[{i}]")
        else:
            out.append(copy.deepcopy(s))
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DeployConfigError(f"{path}: deploy config not found") from None
    except UnicodeDecodeError as err:
        raise DeployConfigError(f"{path}: not a text file (invalid UTF-8 at byte {err.start})") from None
    except OSError as err:
        raise DeployConfigError(f"{path}: cannot read deploy config: {err.strerror or err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        what = err.problem or "malformed"
        if err.context:
            ctx = err.context_mark
            started = f" (started at line {ctx.line + 1})" if ctx is not None and mark is not ctx else ""
            what = f"{err.context}{started}: {what}"
        raise DeployConfigError(f"{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise DeployConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        raise DeployConfigError(f"{path}: deploy config is empty (expected a mapping with at least `stages:`)")
    if not isinstance(data, dict):
        raise DeployConfigError(f"{path}: the top level of a deploy config must be a mapping, "
                                f"got {type(data).__name__}")
    return data


def _load_merged(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    key = path.resolve()
    if key in chain:
        cycle = " -> ".join(str(p) for p in (*chain, key))
        raise DeployConfigError(f"{chain[0]}: base_config cycle: {cycle}")
    data = _read_yaml(path)
    base = data.get("base_config")
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise DeployConfigError(f"{path}: base_config: must be a string, got {short(base)}")
    candidates = [path.parent / base]
    if not Path(base).is_absolute() and _BUNDLED.is_dir():
        candidates.append(_BUNDLED / base)
    base_path = next((c for c in candidates if c.is_file()), None)
    if base_path is None:
        tried = ", ".join(str(c) for c in candidates)
        raise DeployConfigError(f"{path}: base_config: {base!r} not found (tried {tried})")
    merged_base = _load_merged(base_path, (*chain, key))
    merged_base.pop("base_config", None)
    try:
        return _merge(merged_base, data, "")
    except ValidationError as err:
        raise DeployConfigError(f"{path} (merging base_config {base!r}): {err}") from None


# ---------------------------------------------------------------------------------------------------------
# Public entry points.


def parse_deploy_config(data: Mapping[str, Any], source: str | None = None) -> DeployConfig:
    """Validate an already-loaded (and base-merged) mapping into a DeployConfig."""
    prefix = f"{source}: " if source else ""
    if not isinstance(data, Mapping):
        raise DeployConfigError(f"{prefix}the top level of a deploy config must be a mapping, "
                                f"got {type(data).__name__}")
    raw = copy.deepcopy(dict(data))
    try:
        cfg = build(DeployConfig, raw, "", source=source, raw=copy.deepcopy(raw))
    except ValidationError as err:
        raise DeployConfigError(f"{prefix}{err}") from None
    stages = sorted(cfg.stages, key=lambda s: s.stage_id)
    return dataclasses.replace(cfg, stages=stages)


def load_deploy_config(path: str | Path) -> DeployConfig:
    """Read, base-merge and validate a deploy YAML (a path or a bundled name, see `resolve_deploy_path`).
    Raises DeployConfigError naming the file and the YAML path."""
    path = resolve_deploy_path(path)
    merged = _load_merged(path, ())
    source = str(path)
    if "base_config" in merged:
        source += f" (with base_config {merged['base_config']!r})"
    return parse_deploy_config(merged, source=source)


def apply_overrides(config: DeployConfig, global_overrides: Mapping[str, Any] | None = None,
                    stage_overrides: Mapping[int | str, Mapping[str, Any]] | None = None) -> DeployConfig:
    """Return `config` with command-line style overrides applied and re-validated.

    Precedence (highest first), as in vllm-omni: `stage_overrides` ({stage_id: {key: value}}) > keys of the
    form `stage_<id>_<key>` in `global_overrides` > other `global_overrides` > the YAML. A global key that is
    a pipeline-wide field (e.g. `quantization`, `dtype`) sets it; a stage key (e.g. `tensor_parallel_size`,
    `gpu_memory_utilization`, `kv_cache_blocks`) is applied to every stage (`EngineOptions.deploy_overrides`
    gives the diffusion options as `stage_<id>_<key>`, for the diffusion stages only). None values are
    skipped (flag not given); with nothing given `config` itself comes back, not a revalidated copy whose
    errors would blame overrides nobody gave.
    """
    if not stage_overrides and all(v is None for v in (global_overrides or {}).values()):
        return config
    raw = copy.deepcopy(config.raw)
    top_keys = set(yaml_fields(DeployConfig)) - {"stages"}
    stage_keys = set(known_keys(StageConfig)) - {"stage_id"}
    ids = [s.get("stage_id") for s in raw.get("stages", [])]

    def set_stage(stage: dict, key: str, value: Any) -> None:
        if key in FLAT_PARALLEL_KEYS and isinstance(stage.get("parallel_config", {}), dict):
            stage.pop(key, None)
            stage["parallel_config"] = {**(stage.get("parallel_config") or {}), key: value}
        elif isinstance(value, dict) and isinstance(stage.get(key), dict):
            stage[key] = _merge(stage[key], value, key)
        else:
            stage[key] = value

    per_stage: dict[int, dict[str, Any]] = {}
    for key, value in (global_overrides or {}).items():
        if value is None:
            continue
        m = re.match(r"^stage_(\d+)_(.+)$", key)
        if m:
            per_stage.setdefault(int(m.group(1)), {})[m.group(2)] = value
        elif key in top_keys:
            raw[key] = value
        elif key in stage_keys:
            for stage in raw["stages"]:
                set_stage(stage, key, value)
        else:
            known = ", ".join(sorted(top_keys | stage_keys))
            raise DeployConfigError(f"overrides: {key}: unknown key (known: {known})")
    for sid, values in (stage_overrides or {}).items():
        try:
            sid = int(sid)
        except (TypeError, ValueError):
            raise DeployConfigError(f"overrides: stage {sid!r}: stage ids are integers (stage ids: {ids})") from None
        if not isinstance(values, Mapping):
            raise DeployConfigError(f"overrides: stage {sid}: must be a mapping of settings, got {short(values)}")
        per_stage.setdefault(sid, {}).update(values)
    for sid, values in sorted(per_stage.items()):
        if sid not in ids:
            raise DeployConfigError(f"overrides: stage {sid}: no such stage (stage ids: {ids})")
        stage = raw["stages"][ids.index(sid)]
        for key, value in values.items():
            if key not in stage_keys:
                raise DeployConfigError(f"overrides: stage {sid}: {key}: unknown key "
                                        f"(known: {', '.join(sorted(stage_keys))})")
            if value is not None:
                set_stage(stage, key, value)
    source = f"{config.source} (with overrides)" if config.source else "overrides"
    return parse_deploy_config(raw, source=source)
