"""The flags `generate` and `serve` share (the engine's options, the model, reporting) and the usage errors
both report: in a module of their own so that each command's module builds on them, and `cli` dispatches
to both without either importing the other."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bagel_serve.config.deploy import CFG_PARALLEL_SIZES
from bagel_serve.config.dtypes import DTYPES, VAE_PRECISIONS
from bagel_serve.config.engine_options import QUANTIZATIONS, WORKER_BACKENDS

DEFAULT_MODEL = "ByteDance-Seed/BAGEL-7B-MoT"


class CLIError(Exception):
    """A usage error: printed as `error: ...` with exit status 2."""

    status = 2


class RunError(CLIError):
    """The run failed (a request, a worker, an output file): printed as `error: ...` with exit status 1."""

    status = 1


MODEL_HELP = "checkpoint directory, Hugging Face repo id, or 'bagel-serve-demo' (tiny, random weights)"


def add_engine_arguments(p: argparse.ArgumentParser, *, model_option: bool = True) -> argparse._ArgumentGroup:
    """The engine's flags (model, topology, limits, timeouts), shared by `generate` and `serve`; without
    `model_option` the caller takes the model another way (serve's positional MODEL)."""
    g = p.add_argument_group("model and topology")
    if model_option:
        g.add_argument("--model", default=DEFAULT_MODEL, help=f"{MODEL_HELP} (default: {DEFAULT_MODEL})")
    g.add_argument("--deploy-config", default=None,
                   help="deploy YAML: a path, or the name of a bundled one (bagel.yaml, bagel_think.yaml, "
                        "bagel_single_stage.yaml) (default: bagel.yaml, the two-stage Thinker -> DiT pipeline; "
                        "bagel_think.yaml with --think)")
    g.add_argument("--stage-overrides", default=None,
                   help="JSON of per-stage settings, e.g. '{\"0\": {\"max_num_seqs\": 2}}' (default: none)")
    g.add_argument("--device", default=None, help="torch device: cuda, cuda:N or cpu (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="weight dtype; the VAE always runs in fp32 (default: the deploy config's dtype, else bf16 "
                        "on CUDA, fp32 on the CPU)")
    g.add_argument("--worker-backend", default=None, choices=WORKER_BACKENDS,
                   help="where the stages run: one process per stage of a two-stage pipeline (process; a single "
                        "stage of one rank runs in this process; a stage of several ranks, one process per rank), "
                        "every stage in this process (inline), or one Ray actor per stage (ray, needs the ray "
                        "extra; stages of one rank only) (default: process)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (auto, ray://host:port); implies --worker-backend ray "
                        "(default: none; ray starts a local cluster)")
    g.add_argument("--tensor-parallel-size", type=int, default=None,
                   help="tensor parallel ranks of every stage (--stage-overrides sets one stage's); must divide the "
                        "model's attention and key/value heads (BAGEL-7B: 1, 2, 4); each stage's devices must name "
                        "one GPU per rank (default: the deploy config's, else 1)")
    g.add_argument("--cfg-parallel-size", type=int, default=None, choices=CFG_PARALLEL_SIZES,
                   help="ranks the CFG branches of the diffusion stage (the DiT, or the single stage) spread over "
                        "(default: the deploy config's, else 1)")
    g.add_argument("--vae-patch-parallel-size", type=int, default=None,
                   help="ranks of the diffusion stage its VAE tiles spread over, at most the stage's ranks; turns "
                        "on --vae-use-tiling (default: the deploy config's, else 1)")
    g.add_argument("--vae-use-tiling", action="store_true", default=None,
                   help="tiled VAE encode/decode in the diffusion stage (default: the deploy config's, else off)")
    g.add_argument("--vae-precision", choices=VAE_PRECISIONS, default=None,
                   help="the VAE's convolutions in every stage: float32 as the reference, or tf32 (faster on a GPU, "
                        "pixels about a level off) (default: the deploy config's, else float32)")
    g.add_argument("--use-hsdp", action="store_true", default=None,
                   help="FSDP2 sharding of the diffusion stage's decoder layers; not with --tensor-parallel-size "
                        "(default: the deploy config's, else off)")
    g.add_argument("--hsdp-shard-size", type=int, default=None,
                   help="with --use-hsdp: ranks a layer is sharded over; -1: the stage's world size / "
                        "--hsdp-replicate-size, only with other parallelism (default: the deploy config's, else -1)")
    g.add_argument("--hsdp-replicate-size", type=int, default=None,
                   help="with --use-hsdp: copies of the sharded layers (default: the deploy config's, else 1)")
    g.add_argument("--quantization", default=None, choices=QUANTIZATIONS,
                   help="fp8: the generation expert's projections (QKV, O, gate-up, down of every layer) in FP8 "
                        "(W8A8 e4m3, per-row activation and per-channel weight scales; needs a GPU of compute "
                        "capability 8.9+, emulated on the CPU); the understanding expert (text, ViT rows) stays "
                        "in bf16 (default: the deploy config's quantization, else none)")
    g.add_argument("--fp8-und", action="store_true", default=None,
                   help="with --quantization fp8: the understanding expert's projections in FP8 too (changes text "
                        "outputs slightly) (default: off)")
    g.add_argument("--fp8-attention", action="store_true", default=None,
                   help="with --quantization fp8: the attention of denoising steps of large images (from 2,048 "
                        "image queries, e.g. 1024x1024) in FP8 through cuDNN (compute capability 9.0+, extra "
                        "bagel-serve[fp8-attention]; emulated on the CPU); changes images more than FP8 "
                        "projections alone; text attention stays bf16 (default: off)")
    g.add_argument("--enforce-eager", action="store_true", default=None,
                   help="no CUDA graphs in any stage (default: the deploy config's enforce_eager, false)")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context limit (prompt + output tokens) of every stage "
                        "(default: the deploy config's, else the model's max_position_embeddings)")
    g.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="share of the GPU each stage may use, in (0, 1] (default: the deploy config's, else an "
                        "equal part of 0.9 for the stages on a GPU)")
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="requests each stage runs at once (default: the deploy config's)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="rows one packed forward of each stage may hold (default: the deploy config's)")
    g.add_argument("--kv-cache-blocks", type=int, default=None,
                   help="KV cache size of each stage in blocks of 16 tokens (default: the deploy config's, else "
                        "sized from --gpu-memory-utilization on CUDA, a fixed size on the CPU)")
    g.add_argument("--init-timeout", type=float, default=None,
                   help="seconds the stage workers (or Ray actors) may take to start (default: 300)")
    g.add_argument("--batch-timeout", type=float, default=None,
                   help="seconds an idle stage worker waits for work before checking for shutdown (default: 5)")
    g.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may wait on a stage worker that shows no sign of life before it fails "
                        "(default: 60)")
    g.add_argument("--init-sleep-seconds", type=int, default=None,
                   help="legacy flag of the seed system, accepted with a note; no effect (default: none)")
    g.add_argument("--shm-threshold-bytes", type=int, default=None,
                   help="legacy flag of the seed system, accepted with a note; no effect (default: none)")
    return g


def add_reporting_arguments(g: argparse._ArgumentGroup) -> None:
    """The engine's reporting flags (they time the phases), shared by `generate` and `serve`."""
    g.add_argument("--log-stats", action="store_true",
                   help="print the topology, per-phase times, throughput, queue wait and KV cache use (per stage too) "
                        "(default: off)")
    g.add_argument("--enable-diffusion-pipeline-profiler", action="store_true",
                   help="print a per-request breakdown: context prefill, think decode, denoise, VAE (default: off)")


ENGINE_FLAGS = ("tensor_parallel_size", "cfg_parallel_size", "vae_patch_parallel_size", "vae_use_tiling", "use_hsdp",
                "hsdp_shard_size", "hsdp_replicate_size", "quantization", "fp8_und", "fp8_attention", "worker_backend",
                "ray_address", "log_stats", "init_timeout", "batch_timeout",
                "request_timeout", "enable_diffusion_pipeline_profiler", "stage_overrides", "enforce_eager",
                "max_model_len", "gpu_memory_utilization", "max_num_seqs", "max_num_batched_tokens", "kv_cache_blocks",
                "vae_precision")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = {k: getattr(args, k) for k in ENGINE_FLAGS}
    return {k: v for k, v in kw.items() if v is not None and v is not False}


def load_omni(args: argparse.Namespace, deploy_path: Path) -> Any:
    """`Omni` for these flags and deploy file; its start-up errors become `error:` lines (usage: 2, run-time: 1)."""
    import torch

    from bagel_serve.config.deploy import DeployConfigError
    from bagel_serve.config.devices import DeviceError
    from bagel_serve.config.engine_options import EngineOptionError
    from bagel_serve.entrypoints.omni import Omni
    from bagel_serve.model.loader import CheckpointError
    from bagel_serve.pipeline.orchestrator import WorkerDiedError

    try:
        return Omni(args.model, device=args.device, dtype=args.dtype, deploy_config=deploy_path,
                    progress=not args.no_progress, **engine_kwargs(args))
    except (EngineOptionError, DeployConfigError, CheckpointError, DeviceError, NotImplementedError) as e:
        raise CLIError(str(e)) from None
    except (WorkerDiedError, TimeoutError) as e:
        raise RunError(f"the engine did not start: {e}") from None
    except torch.OutOfMemoryError as e:
        raise RunError(f"out of memory while loading the model: {str(e).splitlines()[0]}") from None
    except OSError as e:  # the machine: shared memory, file descriptors, a checkpoint file that cannot be read
        raise RunError(f"the engine did not start: {type(e).__name__}: {e}") from None
