"""A stage's parallel layout (`parallel_config`, vllm-omni's `DiffusionParallelConfig`): the keys, how many
rank processes they make (`ParallelConfig.num_ranks`), and the rules between them that the file alone can
check. The rules that need more than one stage's layout live with what they need: a stage's `devices`
(`StageConfig`), the pipeline's stage roles (`pipelines.resolve_pipeline`), the model's head counts
(`parallel_checks.check_parallel_against_model`), the machine's GPUs (`devices.check_stage_devices`).
`docs/parallelism.md` describes every option and rule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bagel_serve.config.validate import ValidationError, opt

__all__ = ["ParallelConfig", "CFG_PARALLEL_SIZES", "FLAT_PARALLEL_KEYS", "VAE_PARALLEL_MODES", "plural"]

CFG_PARALLEL_SIZES = (1, 2, 3)
"""`cfg_parallel_size`: 1 (off), 2 (the text CFG branch on a rank of its own), 3 (both CFG branches)."""
VAE_PARALLEL_MODES = ("tile", "spatial_shard_height", "spatial_shard_width")
"""`vae_parallel_mode` values a file may hold; only `tile` runs (the others are refused by name)."""

FLAT_PARALLEL_KEYS: tuple[str, ...] = (
    "tensor_parallel_size", "cfg_parallel_size", "vae_patch_parallel_size", "vae_parallel_mode",
    "use_hsdp", "hsdp_shard_size", "hsdp_replicate_size",
    "sequence_parallel_size", "ulysses_degree", "ring_degree", "allgather_degree",
)
"""Parallel keys that may also be written flat in a stage, as in vllm-omni; they fold into parallel_config."""

# Features not built here: refused by name at start (`ParallelConfig.unsupported`).
_NOT_BUILT = {
    "sequence_parallel_size": "sequence parallel", "ulysses_degree": "sequence parallel",
    "ring_degree": "sequence parallel", "allgather_degree": "sequence parallel",
    "ulysses_mode": "sequence parallel", "pipeline_parallel_size": "pipeline parallel",
    "data_parallel_size": "data parallel", "enable_expert_parallel": "expert parallel",
}


def plural(n: int, word: str) -> str:
    """`1 device`, `2 devices`."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass(frozen=True)
class ParallelConfig:
    """How one stage spreads over rank processes, one device each. Tensor parallel, CFG parallel, VAE patch
    parallel (`tile` mode) and HSDP may be set; sequence, pipeline, data and expert parallelism are declared
    so that vllm-omni files load, and refused by name by `unsupported()`."""

    pipeline_parallel_size: int = opt(1, ge=1)
    data_parallel_size: int = opt(1, ge=1)
    tensor_parallel_size: int = opt(1, ge=1)
    enable_expert_parallel: bool = False
    sequence_parallel_size: int = opt(1, ge=1)
    ulysses_degree: int = opt(1, ge=1)
    ring_degree: int = opt(1, ge=1)
    allgather_degree: int = opt(1, ge=1)
    ulysses_mode: str = opt("strict", choices=("strict", "advanced_uaa"))
    cfg_parallel_size: int = opt(1, choices=CFG_PARALLEL_SIZES)
    vae_patch_parallel_size: int = opt(1, ge=1)
    vae_parallel_mode: str = opt("tile", choices=VAE_PARALLEL_MODES)
    use_hsdp: bool = False
    hsdp_shard_size: int = opt(-1, ge=-1)  # -1 = auto
    hsdp_replicate_size: int = opt(1, ge=1)

    @property
    def derived_sequence_parallel_size(self) -> int:
        """SP size implied by the degrees: allgather_degree if > 1, else ulysses_degree * ring_degree."""
        return self.allgather_degree if self.allgather_degree > 1 else self.ulysses_degree * self.ring_degree

    @property
    def effective_sequence_parallel_size(self) -> int:
        return max(self.sequence_parallel_size, self.derived_sequence_parallel_size)

    @property
    def world_size(self) -> int:
        """PP * DP * TP * SP * CFG: the ranks the model-splitting options make (HSDP not counted)."""
        return (self.pipeline_parallel_size * self.data_parallel_size * self.tensor_parallel_size
                * self.effective_sequence_parallel_size * self.cfg_parallel_size)

    @property
    def standalone_hsdp(self) -> bool:
        """HSDP with no other parallelism: then HSDP alone says how many ranks the stage runs."""
        return self.use_hsdp and self.world_size == 1

    @property
    def resolved_hsdp_shard_size(self) -> int:
        """Ranks one copy of a decoder layer is sharded over: `hsdp_shard_size`, or for -1 (auto, only valid
        combined with other parallelism) world_size // hsdp_replicate_size; 1 without HSDP."""
        if not self.use_hsdp:
            return 1
        if self.hsdp_shard_size != -1:
            return self.hsdp_shard_size
        return max(1, self.world_size // self.hsdp_replicate_size)

    @property
    def num_ranks(self) -> int:
        """The processes one replica of the stage runs, one device each: world_size (TP x CFG x ...) when
        above 1; for standalone HSDP hsdp_shard_size * hsdp_replicate_size (combined HSDP shards within the
        world, which the rules make equal to shard x replicate)."""
        if self.standalone_hsdp:
            return self.resolved_hsdp_shard_size * self.hsdp_replicate_size
        return self.world_size

    def describe_ranks(self) -> str:
        """How `num_ranks` comes about, for messages: "tensor_parallel_size 2 x cfg_parallel_size 3 = 6 ranks"."""
        if self.standalone_hsdp:
            factors = [("hsdp_shard_size", self.resolved_hsdp_shard_size),
                       ("hsdp_replicate_size", self.hsdp_replicate_size)]
        else:
            factors = [(name, value) for name, value in (
                ("pipeline_parallel_size", self.pipeline_parallel_size),
                ("data_parallel_size", self.data_parallel_size),
                ("tensor_parallel_size", self.tensor_parallel_size),
                ("sequence_parallel_size", self.effective_sequence_parallel_size),
                ("cfg_parallel_size", self.cfg_parallel_size)) if value > 1]
        if not factors:
            return "1 rank (no parallel size above 1)"
        return " x ".join(f"{name} {value}" for name, value in factors) + f" = {plural(self.num_ranks, 'rank')}"

    @property
    def is_neutral(self) -> bool:
        """True when every key has its default (one rank, nothing split)."""
        return self == ParallelConfig()

    def _check(self, path: str) -> None:
        p = f"{path}." if path else ""
        if self.allgather_degree > 1 and (self.ulysses_degree > 1 or self.ring_degree > 1):
            raise ValidationError(f"{p}allgather_degree",
                                  "AllGather-KV is exclusive with Ulysses/Ring (ulysses_degree and ring_degree must be 1)")
        derived = self.derived_sequence_parallel_size
        if self.sequence_parallel_size > 1 and derived > 1 and self.sequence_parallel_size != derived:
            raise ValidationError(f"{p}sequence_parallel_size",
                                  f"{self.sequence_parallel_size} does not match the degrees (allgather_degree if > 1, "
                                  f"else ulysses_degree * ring_degree = {derived})")
        if self.hsdp_shard_size == 0:
            raise ValidationError(f"{p}hsdp_shard_size", "must be -1 (auto) or >= 1, got 0")
        self._check_hsdp(p)
        if self.vae_patch_parallel_size > self.num_ranks:
            raise ValidationError(f"{p}vae_patch_parallel_size",
                                  f"{self.vae_patch_parallel_size} is more than the stage's "
                                  f"{plural(self.num_ranks, 'rank')} ({self.describe_ranks()}): VAE patch parallel "
                                  f"spreads the tiles over the stage's own ranks, so it must be at most {self.num_ranks}")

    def _check_hsdp(self, p: str) -> None:
        if not self.use_hsdp:
            for key in ("hsdp_shard_size", "hsdp_replicate_size"):
                value, default = getattr(self, key), getattr(ParallelConfig, key)
                if value != default:
                    raise ValidationError(f"{p}{key}", f"{value} needs use_hsdp: true (without it nothing is sharded)")
            return
        if self.tensor_parallel_size > 1 or self.data_parallel_size > 1:
            raise ValidationError(f"{p}use_hsdp",
                                  f"HSDP cannot be combined with tensor or data parallelism (tensor_parallel_size="
                                  f"{self.tensor_parallel_size}, data_parallel_size={self.data_parallel_size}): "
                                  f"HSDP shards whole decoder layers; use one or the other")
        world, shard, rep = self.world_size, self.hsdp_shard_size, self.hsdp_replicate_size
        if world == 1:
            if shard == -1:
                raise ValidationError(f"{p}hsdp_shard_size",
                                      "standalone HSDP (no other parallelism) needs an explicit hsdp_shard_size")
        elif shard != -1 and shard * rep != world:
            raise ValidationError(f"{p}hsdp_shard_size",
                                  f"hsdp_replicate_size * hsdp_shard_size = {rep} x {shard} = {rep * shard} must equal "
                                  f"the world size {world} ({self.describe_ranks()})")
        elif shard == -1 and world % rep:
            raise ValidationError(f"{p}hsdp_replicate_size",
                                  f"{rep} must divide the world size {world} ({self.describe_ranks()}) for "
                                  f"hsdp_shard_size -1 (auto) to be world size / hsdp_replicate_size")

    def unsupported(self, where: str) -> list[str]:
        """One line per key of a feature that is not built here and is not at its default."""
        default = ParallelConfig()
        out = [f"{_NOT_BUILT[f.name]} ({where}.parallel_config.{f.name}={getattr(self, f.name)!r}) is not built yet"
               for f in dataclasses.fields(self)
               if f.name in _NOT_BUILT and getattr(self, f.name) != getattr(default, f.name)]
        if self.vae_parallel_mode != "tile":
            out.append(f"VAE patch parallel ({where}.parallel_config.vae_parallel_mode={self.vae_parallel_mode!r}) "
                       f"is not built: only vae_parallel_mode 'tile' is (tiles spread over the stage's ranks)")
        return out
