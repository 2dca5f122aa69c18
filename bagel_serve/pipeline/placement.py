"""Where each stage runs and what it owns: its device, whether it allocates a KV cache (and how big) or reads
another stage's in place, its scheduler limits — `StageSetup`, decided here from the deploy config — and
`build_stage`, which turns a setup and a model into a running `Stage` in whatever process it lands.

On CUDA, stages whose deploy `devices` equal stage 0's share the model's device; any other stage runs on
`cuda:<its first device id>`. Stages on one device pool their `gpu_memory_utilization` shares: in one process
they share one `Stage` (one cache); with one process per stage the first allocates the cache and the others
borrow it (the DiT reads the Thinker's blocks in place). A stage with its own copy of the weights (another
GPU, or a Ray actor) allocates its own cache from its own share.
"""

from __future__ import annotations

import dataclasses
import random
import socket
from dataclasses import dataclass, field
from typing import Any

import torch

from bagel_serve.config.deploy import DeployConfig, StageConfig
from bagel_serve.config.pipelines import PipelineSpec
from bagel_serve.config.engine_options import EngineOptions
from bagel_serve.config.quantization import QuantizationConfig
from bagel_serve.distributed.parallel_state import RankLayout
from bagel_serve.engine.kv_budget import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    cpu_blocks,
    cuda_blocks,
    profile_activation_bytes,
    weights_bytes,
)
from bagel_serve.engine.diffusion import VaeMode, warm_up_vae
from bagel_serve.engine.kv_cache import BLOCK_SIZE, KVCache
from bagel_serve.engine.scheduler import SchedulerConfig
from bagel_serve.engine.stage_engine import Stage
from bagel_serve.engine.tokenizer import BagelTokenizer
from bagel_serve.pipeline.lockstep import agree_blocks


@dataclass(frozen=True)
class Numerics:
    """Settings a worker copies from its parent so that it computes the same numbers."""

    num_threads: int | None
    """None: the worker keeps the thread count its own environment gave torch (the stage's deploy `env`
    sets OMP_NUM_THREADS)."""
    matmul_precision: str

    @classmethod
    def here(cls) -> "Numerics":
        return cls(torch.get_num_threads(), torch.get_float32_matmul_precision())

    def apply(self) -> None:
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        torch.set_float32_matmul_precision(self.matmul_precision)


@dataclass(frozen=True)
class WeightSource:
    """Where the ranks of a multi-rank stage read their weights: each loads its own (its tensor-parallel
    slices, or the whole model to shard or replicate) instead of mapping the parent's copy."""

    model_dir: str
    dtype: torch.dtype
    quantization: QuantizationConfig | None = None


@dataclass(frozen=True)
class StageSetup:
    """Everything a stage needs besides its model."""

    stage: int
    num_stages: int
    scheduler: SchedulerConfig
    device: str
    numerics: Numerics
    batch_timeout: float = 5.0
    kv_blocks: int | None = None
    """KV cache size in blocks (None: sized on the device)."""
    borrows_cache: bool = False
    """Reads another stage's cache in place and allocates only a token one of its own."""
    utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    counts_weights: bool = True
    """The weights on this stage's device count against its utilization (once per copy on a device)."""
    other_processes: int = 0
    """Other processes computing on this device (each keeps an activation reserve)."""
    decodes: bool = True
    """Runs text decoding (so CUDA graphs pay); the DiT stage does not."""
    denoises: bool = True
    enable_prefix_caching: bool = False
    enforce_eager: bool = False
    max_model_len: int | None = None
    lend: bool = False
    """Hand contexts over in place (one host) instead of copying them into the message."""
    to_cpu: bool = False
    """Copied contexts go through the CPU (for transports that pickle by value)."""
    env: dict[str, str] = field(default_factory=dict)
    """The stage's deploy `env`: a worker process or Ray actor is started with it (so that what torch and CUDA
    read at import, like OMP_NUM_THREADS or PYTORCH_CUDA_ALLOC_CONF, takes effect); `Omni` sets it in
    os.environ for the stages that run in its own process."""
    vae_mode: VaeMode = VaeMode()
    """How the VAE runs: in tiles (`vae_use_tiling`, or VAE patch parallelism over the stage's ranks), with TF32
    convolutions (`vae_precision`)."""
    denoise_graph_sizes: tuple[tuple[int, int], ...] | None = None
    """Image sizes whose denoising steps run as CUDA graphs (`denoise_graph_sizes`; None: the default)."""
    ranks: RankLayout | None = None
    """A stage of several ranks (one process each): the layout, with this process's rank; None: one rank."""
    rank_devices: tuple[str, ...] = ()
    """The device of each rank of a multi-rank stage."""
    weights: WeightSource | None = None
    """Where a multi-rank stage's ranks load their weights."""

    @property
    def num_ranks(self) -> int:
        return 1 if self.ranks is None else self.ranks.world

    @property
    def captured_denoise_sizes(self) -> tuple[tuple[int, int], ...] | None:
        """The `denoise_graph_sizes` this stage captures graphs for (None: the default ones): none for a stage
        that does not denoise, or runs eager."""
        return self.denoise_graph_sizes if self.denoises and not self.enforce_eager else ()

    def for_rank(self, rank: int) -> "StageSetup":
        """This setup as rank `rank` of the stage sees it (its own device)."""
        if self.ranks is None:
            if rank:
                raise ValueError(f"stage {self.stage} has one rank, not {rank + 1}")
            return self
        return dataclasses.replace(self, ranks=dataclasses.replace(self.ranks, rank=rank),
                                   device=self.rank_devices[rank])


def stage_devices(model_device: torch.device, deploy: DeployConfig, num_stages: int) -> list[torch.device]:
    if model_device.type != "cuda":
        return [model_device] * num_stages
    first = deploy.stage(0).device_ids
    out = []
    for s in range(num_stages):
        ids = deploy.stage(s).device_ids
        out.append(model_device if ids == first else torch.device("cuda", ids[0]))
    return out


def rank_layout(st: StageConfig, model_device: torch.device) -> tuple[RankLayout, tuple[str, ...]] | None:
    """The layout of a stage of several ranks and each rank's device (None for a stage of one rank). On CUDA
    rank r runs on the stage's r-th listed GPU; on the CPU every rank is a process on the CPU."""
    pc = st.parallel_config
    world = pc.num_ranks
    if world == 1:
        return None
    layout = RankLayout(rank=0, world=world, tp=pc.tensor_parallel_size, cfg=pc.cfg_parallel_size,
                        hsdp_shard=pc.resolved_hsdp_shard_size if pc.use_hsdp else 1,
                        hsdp_replicate=pc.hsdp_replicate_size if pc.use_hsdp else 1, use_hsdp=pc.use_hsdp,
                        vae_patch_parallel=pc.vae_patch_parallel_size,
                        init_method=f"tcp://127.0.0.1:{free_port()}", seed=random.randrange(2**31))
    if model_device.type == "cuda":
        return layout, tuple(f"cuda:{i}" for i in st.device_ids)
    return layout, tuple(str(model_device) for _ in range(world))


def free_port() -> int:
    """A TCP port free on this host now, for the ranks of a stage to meet on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stage_setups(pipeline: PipelineSpec, deploy: DeployConfig, options: EngineOptions, model_device: torch.device,
                 *, backend: str, weights: WeightSource | None = None) -> list[StageSetup]:
    """One setup per stage for `backend` ("inline": one process; "process": one process per stage (one per
    rank for a stage of several) mapping the parent's weights; "ray": one actor per stage, each with its own
    weights). `weights`: where multi-rank stages load theirs."""
    n = pipeline.num_stages
    devices = stage_devices(model_device, deploy, n)
    layouts = [rank_layout(deploy.stage(s), model_device) for s in range(n)]
    if any(layouts) and (backend != "process" or weights is None):
        raise ValueError("stages of several ranks run as worker processes (worker_backend process) that load "
                         "their own weights")
    numerics = Numerics.here()
    # On CUDA, how many stages compute on each GPU: a GPU one stage's rank shares with another stage splits
    # the default memory share between them.
    ids = [deploy.stage(s).device_ids if model_device.type == "cuda" else [0] for s in range(n)]
    users = {d: sum(1 for t in range(n) if d in ids[t]) for d in {d for i in ids for d in i}}
    setups = []
    for s, dev in enumerate(devices):
        st = deploy.stage(s)
        role = pipeline.stages[s]
        # A stage that sets its own thread count keeps it rather than copying ours.
        own_threads = dataclasses.replace(numerics, num_threads=None) if "OMP_NUM_THREADS" in st.env else numerics
        common = dict(stage=s, num_stages=n, device=str(dev), numerics=own_threads,
                      batch_timeout=float(options.batch_timeout),
                      scheduler=SchedulerConfig(st.max_num_seqs, st.max_num_batched_tokens),
                      kv_blocks=st.kv_cache_blocks, decodes=role.kind == "ar" or n == 1,
                      denoises=role.kind == "diffusion", enable_prefix_caching=deploy.prefix_caching_enabled(s),
                      enforce_eager=st.enforce_eager,
                      vae_mode=VaeMode(st.vae_tiling_enabled, st.vae_precision == "tf32"),
                      denoise_graph_sizes=None if st.denoise_graph_sizes is None
                      else tuple(tuple(x) for x in st.denoise_graph_sizes),
                      max_model_len=st.max_model_len, env=dict(st.env))
        if layouts[s] is not None:
            # A stage of several ranks keeps its own cache on each rank and copies hand-offs both ways; HSDP
            # runs eager (graphs cannot capture its all-gathers).
            layout, rank_devices = layouts[s]
            share = st.gpu_memory_utilization or DEFAULT_GPU_MEMORY_UTILIZATION / max(users[d] for d in ids[s])
            setups.append(StageSetup(**{**common, "device": rank_devices[0],
                                        "enforce_eager": st.enforce_eager or layout.use_hsdp},
                                     utilization=share, ranks=layout, rank_devices=rank_devices, weights=weights,
                                     to_cpu=True))
            continue
        peers = [t for t in range(n) if devices[t] == dev and layouts[t] is None]
        sharing = max(len(peers), users[ids[s][0]])  # with a multi-rank stage's rank on this GPU too
        shares = [deploy.stage(t).gpu_memory_utilization for t in peers]
        pooled = min(1.0, sum(x if x is not None else DEFAULT_GPU_MEMORY_UTILIZATION / sharing for x in shares))
        own = st.gpu_memory_utilization if st.gpu_memory_utilization is not None else DEFAULT_GPU_MEMORY_UTILIZATION / sharing
        if backend == "ray":
            setups.append(StageSetup(**common, utilization=own, to_cpu=True))
        elif backend == "process":
            first = peers[0] == s
            lend = not any(layouts)  # a stage of several ranks takes (and gives) copies
            setups.append(StageSetup(**common, utilization=pooled, borrows_cache=not first, lend=lend, to_cpu=not lend,
                                     counts_weights=first, other_processes=len(peers) - 1 if first else 0))
        else:
            setups.append(StageSetup(**common, utilization=pooled, borrows_cache=peers[0] != s))
    return setups


def build_stage(setup: StageSetup, model: Any, vae: Any, tok: BagelTokenizer) -> Stage:
    """The stage's `Stage`: on its device (the weights are copied there once when they live elsewhere), with
    its KV cache sized and allocated, its attention kernels set up and its CUDA graphs captured."""
    device = torch.device(setup.device)
    if device != model.device:
        model, vae = model.to(device), vae.to(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cache = _make_cache(setup, model, vae, tok)
    stage = Stage(model, vae, tok, cache, max_num_seqs=setup.scheduler.max_num_seqs, max_model_len=setup.max_model_len,
                  enforce_eager=setup.enforce_eager or not setup.decodes, vae_mode=setup.vae_mode,
                  denoise_graph_sizes=setup.captured_denoise_sizes)
    stage.runner.warm_up()
    if device.type == "cuda":
        stage.vae_warmup_s = warm_up_vae(vae, setup.vae_mode, encodes=setup.stage == 0, decodes=setup.denoises)
    if stage.runner.graphs is not None:
        stage.runner.graphs.capture()
    if stage.runner.denoise_graphs is not None:
        stage.runner.denoise_graphs.capture()
    return stage


def _make_cache(setup: StageSetup, model: Any, vae: Any, tok: BagelTokenizer) -> KVCache:
    llm, device = model.config.llm, model.device
    kv_heads = model.language_model.model.layers[0].self_attn.num_kv_heads  # this rank's, under TP
    block_bytes = KVCache.bytes_per_block_of((llm.num_hidden_layers, 2, 0, kv_heads, llm.head_dim),
                                             model.dtype, BLOCK_SIZE)
    if setup.borrows_cache:
        blocks = 2
    elif setup.kv_blocks is not None:
        blocks = setup.kv_blocks
    elif device.type == "cuda":
        max_rows = min(setup.scheduler.max_num_batched_tokens, setup.max_model_len or llm.max_position_embeddings)
        activations = profile_activation_bytes(model, vae, tok.special, max_rows=max_rows, denoises=setup.denoises,
                                               vae_mode=setup.vae_mode)
        blocks = cuda_blocks(total_bytes=torch.cuda.get_device_properties(device).total_memory,
                             utilization=setup.utilization,
                             weights_bytes=weights_bytes(model, vae) if setup.counts_weights else 0,
                             activation_bytes=activations, other_processes=setup.other_processes,
                             block_bytes=block_bytes,
                             graphs=(setup.decodes and not setup.enforce_eager) or setup.captured_denoise_sizes != (),
                             where=f"{device} (stage {setup.stage})")
        # More than every admitted request's three contexts at full length can never be used.
        max_len = setup.max_model_len or llm.max_position_embeddings
        blocks = min(blocks, 3 * setup.scheduler.max_num_seqs * -(-max_len // BLOCK_SIZE) + 1)
    else:
        blocks = cpu_blocks(block_bytes)
    if setup.ranks is not None:
        blocks = agree_blocks(blocks, device)
    return KVCache(llm.num_hidden_layers, kv_heads, llm.head_dim, blocks, dtype=model.dtype,
                   device=device, enable_prefix_caching=setup.enable_prefix_caching, shared=setup.lend)


def ray_bundles(devices: list[torch.device]) -> tuple[list[dict[str, float]], list[float]]:
    """One bundle per stage: a CPU, and a GPU or an equal share of one among stages on the same device."""
    gpus = [1.0 / sum(1 for e in devices if e == d) if d.type == "cuda" else 0.0 for d in devices]
    return [{"CPU": 1.0, **({"GPU": g} if g else {})} for g in gpus], gpus
