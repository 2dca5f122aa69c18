r"""The many-GPU paths (issue 13) on whatever GPUs this machine has, each against the one-GPU baseline measured
in the same run, all through `Omni` with deploy YAMLs this script writes to a temporary directory (their
stage keys are recorded as `<section>_deploy`):

- machine: bf16 GEMM rate (burst and held for 6 s) and HBM copy bandwidth on GPU 0; NCCL all-reduce of
  256 MiB bf16 over GPUs 0..k-1 for every k from 2 to the GPU count (algorithm and bus bandwidth, in spawned
  processes); `nvidia-smi topo -m` as printed.
- baseline: one GPU, single stage: text2img 1024², 50 steps, default CFG (median of 2 after a warm-up: the
  latency and latent reference), img2img 1024² (cfg_img 2.0, interval [0, 1], text_channel; one run after a
  warm-up), decode batch 1 (256 tokens) and 64 concurrent text requests (512 prompt / 256 output tokens).
- cfg2, cfg3: `cfg_parallel_size` 2 / 3 (devices "0,1" / "0,1,2"): text2img; cfg3 also img2img (all three
  branches every step).
- tp2, tp4: `tensor_parallel_size` 2 / 4: text2img, decode batch 1 and 64 concurrent.
- hsdp2, hsdp4: `use_hsdp: true`, `hsdp_shard_size` 2 / 4: memory in use per GPU after load and text2img.
- vae: VAE decode of a 2048² image (256² latent, float32, random FLUX-VAE weights: speed does not depend on
  them): untiled, tiled (`bagel_serve.model.vae_tiling.tiled_decode`) and patch parallel over 2 GPUs (the
  same function with a 2-rank NCCL group, in spawned processes); time and per-process peak allocated memory.
- two_stage: `bagel.yaml`'s Thinker -> DiT with stage 0 on GPU 0 and stage 1 on GPU 1: text2img.

Every parallel text2img / img2img output is compared with the baseline's (same seed): relative L2 of the
final latents (float32). Latency ratios are parallel / one GPU (lower is better); decode ratios are tok/s
parallel / one GPU (higher is better). A section needing more GPUs than visible is skipped and says so. HSDP
and VAE tiling / patch parallelism are being built: an HSDP section's failure, and a missing `vae_tiling`
module (under `vae_tiled` / `vae_pp2`, the VAE section's parts), read "not available: <error>"; any other
failure "failed: <error>"; the run goes on either way. The JSON is rewritten after every section.

Memory per GPU. The engine does not report the memory of its rank processes, so every GPU's `memory.used` is
sampled by one `nvidia-smi -lms 50` process in a thread: `<s>_loaded_gib` is each GPU's use right after the
engine started (weights, KV cache, decode graphs, CUDA and NCCL contexts; before any request) and
`<s>_peak_gib` its largest use during the timed runs, both less the GPU's use before the engine started.
This is memory *reserved* by every process on the GPU (allocator caches included), not `max_memory_allocated`;
the baseline, which runs in this process, also has its allocated peak (`baseline_t2i_peak_alloc_gib`). Each
engine has a fixed KV cache (`<s>_kv_gib_per_gpu`, sharded by KV head under TP), so the sizes compare.
`<s>_weights_frac_upper` = (loaded − KV cache) / the baseline's weights: an upper bound on the share of the
weights a GPU holds (it includes the CUDA/NCCL context and the decode graphs); `baseline_loaded_over_weights`
is the same ratio for one GPU, the overhead to read it against.

    # 2 GPUs (nvidia-h200-x2), checkpoint written first (~40 s):
    PYTHONPATH=. python benchmarks/bench_parallel.py --ckpt /tmp/bagel-full --write --tokenizer-dir .bench/tok \
        --out $OUT/parallel2.json
    # 4 GPUs (nvidia-h200-x4): the same command, --out $OUT/parallel4.json
    PYTHONPATH=. python benchmarks/bench_parallel.py --smoke --out /tmp/parallel-smoke.json  # CPU dry run

Estimated H200 time (seconds; the deadline check uses these numbers): checkpoint write 40, machine 25,
baseline 75 (load 15, text2img 25, img2img 22, decode 13 with building the 64 prompts), cfg2 50, cfg3 60,
tp2 56, hsdp4 60, tp4 51, hsdp2 60, vae 25, two_stage 53 (about 35 s of each multi-rank section is starting
its ranks). On 4 GPUs about 555 s with everything built (about 455 s while HSDP fails at start); on 2 GPUs
(no cfg3, tp4, hsdp4) about 385 s. Sections run in that order (the issue's targets first), and one that would
end past `--deadline-s` (default 560, counted from after the imports, inside the 600 s call) by these
estimates is skipped and says so; `--only` / `--skip` select sections, `--gpus N` uses GPUs 0..N-1 only.

`--smoke` runs every section on the CPU: a tiny random checkpoint (4 heads / 2 KV heads, the golden layout),
two CPU rank processes standing in for two GPUs (`--gpus 4` for the 3- and 4-rank sections), 128² images,
3 steps, short text, a 128² VAE decode of the tiny VAE in 8-latent tiles; about 1.5 min on 2 cores.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from bench_serving import prompt_of
from common import (bench_checkpoint, free_device, generate, header, input_image, machine_ceilings, median_s,
                    rel_l2, sustained_gemm_tflops, timed_on)
from PIL import Image

from bagel_serve import Omni
from bagel_serve.config.model_config import AutoEncoderParams
from bagel_serve.engine.kv_cache import BLOCK_SIZE, KVCache
from bagel_serve.model.autoencoder import AutoEncoder, decoded_to_uint8
from bagel_serve.model.loader import read_config
from bagel_serve.testing.checkpoint import preset_config

PROMPT = "A cute cat sitting on a windowsill at sunset."
EDIT = "Make it look like a watercolor painting and add a red umbrella."
STORY = "Tell me a long story about a red apple."

# name: (GPUs needed, estimated H200 seconds). Run in this order: the targets first.
SECTIONS: dict[str, tuple[int, int]] = {
    "machine": (1, 25), "baseline": (1, 75), "cfg2": (2, 50), "cfg3": (3, 60), "tp2": (2, 56),
    "hsdp4": (4, 60), "tp4": (4, 51), "hsdp2": (2, 60), "vae": (1, 25), "two_stage": (2, 53),
}
OPTIONAL = ("hsdp2", "hsdp4")  # being built: a refusal reads "not available" (VAE tiling: `vae`'s parts)
TARGETS = {"cfg2_t2i": ("<=", 0.6), "cfg3_i2i": ("<=", 0.45), "tp2_b1": (">=", 1.5), "hsdp4_weights": ("<=", 0.30)}


@dataclass(frozen=True)
class Sizes:
    """The issue's sizes on GPUs; tiny ones for the CPU smoke run (tiny checkpoint, CPU rank processes)."""

    side: int
    steps: int
    warm_steps: int
    """Text2img warm-ups run this many steps (8: the fewest whose last step, shift 3, is unguided, so both the
    guided and the unguided forward shapes are warm)."""
    b1_tokens: int
    prompt_tokens: int
    output_tokens: int
    concurrent: int
    vae_side: int
    tile: dict[str, int] = field(default_factory=dict)
    """Keyword arguments of `tiled_decode` (none: its defaults, 64-latent tiles at stride 56)."""
    allreduce_mib: int = 256
    reps: int = 2
    kv_blocks: dict[str, int] = field(default_factory=lambda: {"t2i": 256, "i2i": 2048, "decode": 4096})
    """KV cache blocks of an engine that runs only text2img / also img2img / also the 64 text requests
    (64 x 768 tokens need 3,072 blocks; an img2img's contexts about 1,700)."""


FULL = Sizes(side=1024, steps=50, warm_steps=8, b1_tokens=256, prompt_tokens=512, output_tokens=256, concurrent=64,
             vae_side=2048)
SMOKE = Sizes(side=128, steps=3, warm_steps=2, b1_tokens=16, prompt_tokens=32, output_tokens=8, concurrent=8,
              vae_side=128, tile={"tile_latent": 8, "stride_latent": 6}, allreduce_mib=4, reps=1)


def t2i(sz: Sizes, steps: int, prompt: str = PROMPT, seed: int = 0, **extra: Any) -> dict[str, Any]:
    return {"modality": "text2img", "prompt": prompt, "height": sz.side, "width": sz.side, "steps": steps,
            "seed": seed, "return_latents": True, **extra}


def i2i(image: Image.Image, steps: int) -> dict[str, Any]:
    return {"modality": "img2img", "prompt": EDIT, "image": image, "steps": steps, "seed": 0, "cfg_img_scale": 2.0,
            "cfg_interval": (0.0, 1.0), "cfg_renorm_type": "text_channel", "return_latents": True}


class GpuMemory:
    """Every GPU's `memory.used`, sampled every 50 ms by one `nvidia-smi -lms` process read in a thread:
    the engine's rank processes report no memory, so this is the one view of all of them (what every
    process on a GPU holds, allocator caches included). GPUs are matched to CUDA's indices by UUID (nvidia-smi
    numbers them by PCI bus and ignores CUDA_VISIBLE_DEVICES), by position when torch gives no UUID. Without
    nvidia-smi (the CPU) every reading is None."""

    def __init__(self, enabled: bool) -> None:
        self.now: dict[str, float] = {}
        self.peak: dict[str, float] = {}
        self.stamp: dict[str, float] = {}
        self.order: list[str] = []  # nvidia-smi's UUIDs in its own order (the fallback mapping)
        self.error: str | None = None
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        if not enabled:
            self.error = "no GPU"
            return
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=uuid,memory.used", "--format=csv,noheader,nounits", "-lms", "50"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError as e:
            self.error = f"nvidia-smi: {e}"
            return
        threading.Thread(target=self._read, name="nvidia-smi", daemon=True).start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                uuid, used = (x.strip() for x in line.split(","))
                gib = int(used) / 1024
            except ValueError:
                continue
            uuid = _uuid(uuid)
            with self.lock:
                if uuid not in self.now:
                    self.order.append(uuid)
                self.now[uuid] = gib
                self.peak[uuid] = max(self.peak.get(uuid, 0.0), gib)
                self.stamp[uuid] = time.monotonic()

    def _ids(self, n: int) -> list[str] | None:
        """nvidia-smi's UUIDs of CUDA devices 0..n-1."""
        try:
            ids = [_uuid(str(torch.cuda.get_device_properties(i).uuid)) for i in range(n)]
        except Exception:  # no UUID in this torch, or no CUDA: fall back to nvidia-smi's order
            ids = []
        if ids and all(i in self.now for i in ids):
            return ids
        return self.order[:n] if len(self.order) >= n else None

    def _alive(self) -> bool:
        """False (and `error` says why) once nvidia-smi has exited: every reading is None from then on."""
        if self.error is None and self.proc is not None and self.proc.poll() is not None:
            self.error = f"nvidia-smi exited with status {self.proc.returncode}"
        return self.error is None

    def fresh(self, n: int) -> list[float] | None:
        """Use of GPUs 0..n-1 in GiB, from samples taken after this call (None: not measured)."""
        if not self._alive():
            return None
        start = time.monotonic()
        while time.monotonic() < start + 3.0:
            with self.lock:
                ids = self._ids(n)
                if ids is not None and all(self.stamp[i] > start + 0.06 for i in ids):
                    return [self.now[i] for i in ids]
            time.sleep(0.02)
        return None

    def reset_peak(self) -> None:
        with self.lock:
            self.peak = dict(self.now)

    def peaks(self, n: int) -> list[float] | None:
        """The largest use of GPUs 0..n-1 since `reset_peak`, in GiB."""
        if not self._alive():
            return None
        time.sleep(0.15)  # the window's last samples
        with self.lock:
            ids = self._ids(n)
            return None if ids is None else [self.peak[i] for i in ids]

    def close(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5)


def _uuid(text: str) -> str:
    """A GPU UUID as nvidia-smi and torch both spell it: lower case, without the "GPU-" prefix."""
    text = text.strip().lower()
    return text[4:] if text.startswith("gpu-") else text


def _minus(a: list[float] | None, b: list[float] | None) -> list[float] | str:
    if a is None or b is None:
        return "not measured"
    return [round(x - y, 3) for x, y in zip(a, b)]


class Bench:
    """The run's results, deadline, references and the helpers every section uses."""

    def __init__(self, args: Any, sz: Sizes, gpus: int) -> None:
        self.a, self.sz, self.gpus = args, sz, gpus
        self.device = "cpu" if args.smoke else "cuda"
        self.res: dict[str, Any] = {}
        self.refs: dict[str, Any] = {}  # "t2i" / "i2i" -> latents (CPU float32), "b1" / "text64" -> token ids
        self.t0 = time.perf_counter()
        self.scratch = tempfile.TemporaryDirectory(prefix="bench-parallel-")  # removed when the run ends
        self.tmp = Path(self.scratch.name)
        self.mem = GpuMemory(self.device == "cuda")
        self.prompts: list[str] | None = None

    def save(self) -> None:
        Path(self.a.out).write_text(json.dumps(self.res, indent=2))

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", flush=True)

    def wanted(self, name: str) -> bool:
        """Selected by --only / --skip; the baseline also whenever --only names a section compared with it."""
        if name in self.a.skip:
            return False
        if name == "baseline" and set(self.a.only) - {"machine", "vae"}:
            return True
        return not self.a.only or name in self.a.only

    def section(self, name: str, fn: Callable[[], None]) -> None:
        """Run one section unless not selected, needing more GPUs than visible or past the deadline; a failure
        is recorded under its name and the run goes on."""
        need, estimate = SECTIONS[name]
        elapsed = time.perf_counter() - self.t0
        if not self.wanted(name):
            self.res[name] = "skipped (--only / --skip)"
        elif need > self.gpus:
            self.res[name] = f"skipped: needs {need} GPUs, this run has {self.gpus}"
        elif self.a.deadline_s and elapsed + estimate > self.a.deadline_s:
            self.res[name] = (f"skipped: at {elapsed:.0f} s its ~{estimate} s would pass the "
                              f"{self.a.deadline_s:.0f} s deadline")
        else:
            self.log(f"{name} ...")
            try:
                fn()
                self.res[name] = "ok"
            except Exception as e:  # a failed section must not take the sections after it down
                kind = "not available" if name in OPTIONAL else "failed"
                self.res[name] = f"{kind}: {_error(e)}"
            free_device()
            self.res[f"{name}_wall_s"] = round(time.perf_counter() - self.t0 - elapsed, 1)
        self.log(f"{name}: {self.res[name]}")
        self.save()

    def timed(self, fn: Callable[[], Any]) -> tuple[Any, float, float]:
        return timed_on(self.device, fn)

    def kv_gib(self, blocks: int, tp: int) -> float:
        """One GPU's KV cache of `blocks` blocks under tensor parallelism `tp` (sharded by KV head)."""
        llm = read_config(Path(self.a.ckpt)).llm
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        per_block = KVCache.bytes_per_block_of((llm.num_hidden_layers, 2, 0, llm.num_key_value_heads // tp,
                                                llm.head_dim), dtype, BLOCK_SIZE)
        return blocks * per_block / 2**30

    def write_yaml(self, name: str, stages: list[dict[str, Any]], single: bool) -> Path:
        """A deploy YAML of `stages` (their keys in order) for the single-stage or the two-stage pipeline."""
        lines = ["pipeline: bagel_single_stage"] if single else []
        lines += ["async_chunk: false", "stages:"]
        for i, keys in enumerate(stages):
            lines.append(f"  - stage_id: {i}")
            lines += [f"    {k}: {_yaml_value(v)}" for k, v in keys.items()]
        if not single:
            lines += ["connectors:", "  shared_memory_connector:", "    name: SharedMemoryConnector"]
        path = self.tmp / f"{name}.yaml"
        path.write_text("\n".join(lines) + "\n")
        self.res[f"{name}_deploy"] = [dict(keys) for keys in stages]
        return path

    def text_prompts(self, omni: Omni) -> list[str]:
        """The concurrent requests' prompts, each exactly `prompt_tokens` long (built once)."""
        if self.prompts is None:
            self.prompts = [prompt_of(omni, self.sz.prompt_tokens, i) for i in range(self.sz.concurrent)]
        return self.prompts


def _yaml_value(v: Any) -> str:
    """A YAML value: JSON is YAML's flow style (strings quoted, so devices "0,1" stay a string)."""
    return json.dumps(v)


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip()[-400:]}"


# ------------------------------------------------------------------------------------------------ spawned ranks
def spawn(fn: Callable[..., None], world: int, args: tuple, timeout_s: float) -> list[dict[str, Any]]:
    """Run fn(rank, world, out_dir, *args) in `world` spawned processes; each writes `rank<r>.json` to out_dir.
    Returns every rank's dict; raises the first rank's error, or TimeoutError (after killing them all)."""
    with tempfile.TemporaryDirectory(prefix="ranks-") as out:
        ctx = mp.start_processes(_rank_main, args=(fn, world, out, args), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{world} spawned ranks did not finish within {timeout_s:.0f} s")
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def _rank_main(rank: int, fn: Callable[..., None], world: int, out: str, args: tuple) -> None:
    try:
        res = fn(rank, world, *args)
    except Exception:
        raise RuntimeError(traceback.format_exc()[-1500:]) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))


def _join(rank: int, world: int, port: int, device: str) -> torch.device:
    """Join a `world`-rank group on this host: NCCL on cuda:<rank>, gloo on the CPU."""
    if device == "cuda":
        dev = torch.device("cuda", rank)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                device_id=dev)
        return dev
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    return torch.device("cpu")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def allreduce_rank(rank: int, world: int, port: int, device: str, mib: int) -> dict[str, Any]:
    """All-reduce bandwidth over ranks 0..k-1 for every k in 2..world (bf16 on GPUs, float32 with gloo)."""
    dev = _join(rank, world, port, device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    x = torch.ones(mib * 2**20 // torch.empty((), dtype=dtype).element_size(), dtype=dtype, device=dev)
    out: dict[str, Any] = {}
    for k in range(2, world + 1):
        group = dist.new_group(list(range(k)))  # collective over the whole world: every rank builds it
        if rank < k:
            reps = 20 if dev.type == "cuda" else 3
            for _ in range(3):
                dist.all_reduce(x, group=group)
            _sync(dev)
            dist.barrier(group=group)
            t0 = time.perf_counter()
            for _ in range(reps):
                dist.all_reduce(x, group=group)
            _sync(dev)
            s = (time.perf_counter() - t0) / reps
            nbytes = x.numel() * x.element_size()
            out[f"allreduce_{k}gpu_ms"] = s * 1e3
            out[f"allreduce_{k}gpu_algbw_gb_s"] = nbytes / s / 1e9
            out[f"allreduce_{k}gpu_busbw_gb_s"] = nbytes / s / 1e9 * 2 * (k - 1) / k
        dist.barrier()
    return out


def vae_pp_rank(rank: int, world: int, port: int, device: str, params: dict[str, Any], latent: int,
                tile: dict[str, int], reps: int) -> dict[str, Any]:
    """Patch-parallel VAE decode on this rank: time, this process's peak allocated memory, and the largest
    pixel difference from the same decode tiled on one rank (computed here, before the parallel runs)."""
    from bagel_serve.model.vae_tiling import tiled_decode

    dev = _join(rank, world, port, device)
    vae, z = _vae_and_latent(params, latent, dev)
    with torch.inference_mode():
        one_rank = decoded_to_uint8(tiled_decode(vae, z, **tile).float()).int()
        fn = lambda: tiled_decode(vae, z, group=dist.group.WORLD, **tile)  # noqa: E731
        fn()
        _sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            img = fn()
            _sync(dev)
            times.append(time.perf_counter() - t0)
        diff = (decoded_to_uint8(img.float()).int() - one_rank).abs().max().item()
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return {"s": statistics.median(times), "runs_s": times, "peak_alloc_gib": peak, "vs_one_rank_max_levels": diff}


def _vae_and_latent(params: dict[str, Any], latent: int, dev: torch.device) -> tuple[AutoEncoder, torch.Tensor]:
    """The float32 VAE (seeded random weights) and a seeded random latent of side `latent`, on `dev`."""
    p = AutoEncoderParams(**params)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stays as it was
        torch.manual_seed(0)
        vae = AutoEncoder(p).to(dev).eval().requires_grad_(False)
    z = torch.randn(1, p.z_channels, latent, latent, generator=torch.Generator().manual_seed(1)).to(dev)
    return vae, z


# ------------------------------------------------------------------------------------------------ sections
def machine(b: Bench) -> None:
    res = b.res
    if b.device == "cuda":
        res.update(machine_ceilings())
        res["sustained_bf16_gemm_tflops"] = sustained_gemm_tflops()
    else:  # smoke: the same measurement at a toy shape, so the code runs
        x = torch.randn(256, 256, dtype=torch.bfloat16)
        res["bf16_gemm_tflops"] = 2 * 256**3 / median_s(lambda: x @ x, 3, "cpu") / 1e12
    try:
        topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20)
        res["topology"] = topo.stdout.rstrip().splitlines() if topo.returncode == 0 else f"rc {topo.returncode}"
    except (OSError, subprocess.TimeoutExpired) as e:
        res["topology"] = f"not available: {_error(e)}"
    if isinstance(res["topology"], list):
        print("\n".join(res["topology"]), flush=True)
    if b.gpus < 2:
        res["allreduce"] = "skipped: one GPU"
        return
    got = spawn(allreduce_rank, b.gpus, (_free_port(), b.device, b.sz.allreduce_mib), timeout_s=120)
    res["allreduce_mib"] = b.sz.allreduce_mib
    res.update(got[0])


def _commit() -> str:
    """The checkout's commit (what the numbers are of), or why it is not known."""
    try:
        got = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return got.stdout.strip() if got.returncode == 0 else "unknown (not a git checkout)"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({_error(e)})"


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine(b: Bench, name: str, stages: list[dict[str, Any]], *, single: bool = True, t2i_runs: bool = True,
           i2i_run: bool = False, decode: bool = False) -> None:
    """Start one engine from `stages`, record its load time and memory, and run the asked cases against the
    baseline's references (the baseline itself sets them)."""
    sz, res = b.sz, b.res
    n = 1 + max(int(d) for s in stages for d in str(s["devices"]).split(","))
    tp = int(stages[0].get("tensor_parallel_size", 1))
    path = b.write_yaml(name, stages, single)
    res[f"{name}_kv_gib_per_gpu"] = b.kv_gib(int(stages[0]["kv_cache_blocks"]), tp)
    idle = b.mem.fresh(n)
    omni, res[f"{name}_load_s"], _ = b.timed(lambda: Omni(b.a.ckpt, device=b.device, deploy_config=str(path)))
    try:
        loaded = b.mem.fresh(n)
        res[f"{name}_loaded_gib"] = _minus(loaded, idle)
        res[f"{name}_worker_backend"] = omni.topology["worker_backend"]
        if name == "baseline":
            res["weights_gib"] = sum(p.numel() * p.element_size() for m in (omni.model, omni.stage.vae)
                                     for p in m.parameters()) / 2**30
        if isinstance(res[f"{name}_loaded_gib"], list) and "weights_gib" in res:
            frac = (max(res[f"{name}_loaded_gib"]) - res[f"{name}_kv_gib_per_gpu"]) / res["weights_gib"]
            res["baseline_loaded_over_weights" if name == "baseline" else f"{name}_weights_frac_upper"] = frac
        _, res[f"{name}_first_requests_s"], _ = b.timed(lambda: generate(omni, [
            t2i(sz, 3, "warm up", seed=1, return_latents=None, height=sz.side // 2, width=sz.side // 2),
            {"modality": "text2text", "prompt": "warm up", "max_tokens": 4}]))
        b.mem.reset_peak()
        if t2i_runs:
            run_t2i(b, name, omni, idle, n)
        if i2i_run:
            run_i2i(b, name, omni)
        if decode:
            run_decode(b, name, omni)
        res[f"{name}_peak_gib"] = _minus(b.mem.peaks(n), idle)
    finally:
        omni.shutdown()
        del omni


def run_t2i(b: Bench, name: str, omni: Omni, idle: list[float] | None, n: int) -> None:
    sz, res = b.sz, b.res
    generate(omni, [t2i(sz, sz.warm_steps)])
    b.mem.reset_peak()
    got = [b.timed(lambda: generate(omni, [t2i(sz, sz.steps)])) for _ in range(sz.reps)]
    times = [t for _, t, _ in got]
    out = got[0][0][0]
    res[f"{name}_t2i_s"] = statistics.median(times)
    res[f"{name}_t2i_runs_s"] = times
    res[f"{name}_t2i_peak_gib"] = _minus(b.mem.peaks(n), idle)
    lat = out.latents.detach().float().cpu()
    if name == "baseline":
        b.refs["t2i"] = lat
        res["baseline_t2i_peak_alloc_gib"] = max(p for _, _, p in got)  # this process: the engine runs inline
        res["baseline_t2i_run_to_run_max_abs"] = (got[-1][0][0].latents.float().cpu() - lat).abs().max().item()
        return
    _compare(b, name, "t2i", lat)


def run_i2i(b: Bench, name: str, omni: Omni) -> None:
    sz, res = b.sz, b.res
    img = input_image(sz.side)
    generate(omni, [i2i(img, 3)])
    (out,), res[f"{name}_i2i_s"], _ = b.timed(lambda: generate(omni, [i2i(img, sz.steps)]))
    lat = out.latents.detach().float().cpu()
    if name == "baseline":
        b.refs["i2i"] = lat
        return
    _compare(b, name, "i2i", lat)


def _compare(b: Bench, name: str, kind: str, lat: torch.Tensor) -> None:
    res = b.res
    if kind not in b.refs:
        res[f"{name}_{kind}_vs_1gpu"] = "no baseline"
        return
    res[f"{name}_{kind}_latent_rel_l2"] = rel_l2(lat, b.refs[kind])
    res[f"{name}_{kind}_vs_1gpu"] = res[f"{name}_{kind}_s"] / res[f"baseline_{kind}_s"]


def run_decode(b: Bench, name: str, omni: Omni) -> None:
    sz, res = b.sz, b.res
    one = {"modality": "text2text", "prompt": STORY, "max_tokens": sz.b1_tokens}  # greedy: no seed
    generate(omni, [dict(one, max_tokens=8)])
    (out,), t, _ = b.timed(lambda: generate(omni, [one]))
    res[f"{name}_b1_tokens"] = len(out.token_ids)
    res[f"{name}_b1_tok_s"] = len(out.token_ids) / t
    reqs = [{"modality": "text2text", "prompt": p, "max_tokens": sz.output_tokens} for p in b.text_prompts(omni)]
    generate(omni, [dict(r, max_tokens=2) for r in reqs])  # the prefill shapes, warm
    outs, t, _ = b.timed(lambda: generate(omni, reqs))
    toks = sum(len(o.token_ids) for o in outs)
    res[f"{name}_text{sz.concurrent}_tokens"] = toks
    res[f"{name}_text{sz.concurrent}_tok_s"] = toks / t
    ids = [o.token_ids for o in outs]
    if name == "baseline":
        b.refs["b1"], b.refs["text"] = out.token_ids, ids
        return
    if "b1" in b.refs:
        res[f"{name}_b1_vs_1gpu"] = res[f"{name}_b1_tok_s"] / res["baseline_b1_tok_s"]
        res[f"{name}_text{sz.concurrent}_vs_1gpu"] = (res[f"{name}_text{sz.concurrent}_tok_s"]
                                                       / res[f"baseline_text{sz.concurrent}_tok_s"])
        res[f"{name}_b1_same_tokens"] = out.token_ids == b.refs["b1"]
        res[f"{name}_text_same_answers"] = f"{sum(x == y for x, y in zip(ids, b.refs['text']))}/{len(ids)}"


def stage(devices: str, blocks: int, **keys: Any) -> dict[str, Any]:
    """One stage's keys as bagel_single_stage.yaml has them, with a fixed KV cache and CUDA graphs on."""
    return {"devices": devices, "max_num_seqs": 256, "max_num_batched_tokens": 32768, "enforce_eager": False,
            "kv_cache_blocks": blocks, **keys}


def devices(n: int) -> str:
    return ",".join(str(i) for i in range(n))


def vae(b: Bench) -> None:
    """VAE decode at vae_side²: untiled and tiled in this process, patch parallel over 2 spawned ranks."""
    sz, res = b.sz, b.res
    params = {} if b.device == "cuda" else dict(vars(preset_config("tiny").vae))
    latent = sz.vae_side // AutoEncoderParams(**params).downsample
    dev = torch.device("cuda", 0) if b.device == "cuda" else torch.device("cpu")
    res["vae_side"] = sz.vae_side
    model, z = _vae_and_latent(params, latent, dev)

    def case(key: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        with torch.inference_mode():
            base = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
            fn()
            got = [b.timed(fn) for _ in range(sz.reps)]
        times = [t for _, t, _ in got]
        res[f"vae_{key}_s"] = statistics.median(times)
        res[f"vae_{key}_runs_s"] = times
        if dev.type == "cuda":  # `timed` resets the peak: each run's own, less what was there before it
            res[f"vae_{key}_peak_alloc_gib"] = max(p for _, _, p in got)
            res[f"vae_{key}_peak_over_weights_gib"] = max(p for _, _, p in got) - base / 2**30
        return decoded_to_uint8(got[0][0].float()).int()

    untiled = case("untiled", lambda: model.decode(z))
    try:
        from bagel_serve.model.vae_tiling import tiled_decode
    except ImportError as e:  # being built
        res["vae_tiled"] = res["vae_pp2"] = f"not available: {_error(e)}"
        return

    def tiled() -> None:
        img = case("tiled", lambda: tiled_decode(model, z, **sz.tile))
        res["vae_tiled_vs_untiled"] = res["vae_tiled_s"] / res["vae_untiled_s"]
        res["vae_tiled_vs_untiled_max_levels"] = (img - untiled).abs().max().item()

    def patch_parallel() -> None:
        got = spawn(vae_pp_rank, 2, (_free_port(), b.device, params, latent, sz.tile, sz.reps), timeout_s=240)
        res["vae_pp2_s"] = max(r["s"] for r in got)
        res["vae_pp2_runs_s"] = [r["runs_s"] for r in got]
        res["vae_pp2_peak_alloc_gib"] = [r["peak_alloc_gib"] for r in got]
        res["vae_pp2_vs_one_rank_tiled_max_levels"] = max(r["vs_one_rank_max_levels"] for r in got)
        res["vae_pp2_vs_untiled"] = res["vae_pp2_s"] / res["vae_untiled_s"]

    _part(res, "vae_tiled", tiled)
    del model, z, untiled
    free_device()
    if b.gpus < 2:
        res["vae_pp2"] = "skipped: needs 2 GPUs"
    else:
        _part(res, "vae_pp2", patch_parallel)


def _part(res: dict[str, Any], key: str, fn: Callable[[], None]) -> None:
    """One part of a section: `res[key]` says "ok" or why it failed, and the section goes on."""
    try:
        fn()
        res[key] = "ok"
    except Exception as e:
        res[key] = f"failed: {_error(e)}"


# ------------------------------------------------------------------------------------------------ summary
def _fmt(v: Any, unit: str = "") -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "-"
    return f"{v:.3g}{unit}"


def _brief(status: str, width: int = 90) -> str:
    """A section's status for the table: its kind ("failed", "not available", "skipped") and its innermost
    error (the last `SomethingError: ...` of a chained message), cut to `width`."""
    kind, _, rest = status.partition(": ")
    causes = list(re.finditer(r"\b[A-Z]\w*(Error|Exception): ", rest))
    if len(status) <= width or not rest:
        return status[:width]
    inner = rest[causes[-1].start():] if causes else rest
    return f"{kind}: {inner}"[:width]


def summary(res: dict[str, Any], concurrent: int) -> str:
    """The short table: every parallel case against one GPU, with the issue's targets where it sets one."""
    rows: list[tuple[str, ...]] = []

    def row(label: str, section: str, base: str, key: str, ratio: str | None, unit: str = "",
            target: str | None = None, l2: str | None = None, peak: str | None = None) -> None:
        if key not in res:
            why = res.get(section, "not run")
            rows.append((label, _fmt(res.get(base), unit), "not measured" if why == "ok" else _brief(str(why)),
                         "", "", "", ""))
            return
        r = res.get(ratio) if ratio else None
        tgt = ""
        if target is not None:
            op, bound = TARGETS[target]
            tgt = f"{op} {bound}"
            if isinstance(r, float):
                tgt += " met" if (r <= bound if op == "<=" else r >= bound) else " MISSED"
        pk = res.get(peak) if peak else None
        rows.append((label, _fmt(res.get(base), unit), _fmt(res.get(key), unit), _fmt(r, "x"), tgt,
                     _fmt(res.get(l2)) if l2 else "",
                     ", ".join(_fmt(x) for x in pk) if isinstance(pk, list) and any(_fmt(x) != "-" for x in pk)
                     else ""))

    for sec, label in (("cfg2", "t2i CFG-parallel 2"), ("cfg3", "t2i CFG-parallel 3"), ("tp2", "t2i TP 2"),
                       ("tp4", "t2i TP 4"), ("hsdp2", "t2i HSDP 2"), ("hsdp4", "t2i HSDP 4"),
                       ("two_stage", "t2i two stages, GPUs 0 / 1")):
        row(label, sec, "baseline_t2i_s", f"{sec}_t2i_s", f"{sec}_t2i_vs_1gpu", " s",
            "cfg2_t2i" if sec == "cfg2" else None, f"{sec}_t2i_latent_rel_l2", f"{sec}_t2i_peak_gib")
    row("i2i CFG-parallel 3", "cfg3", "baseline_i2i_s", "cfg3_i2i_s", "cfg3_i2i_vs_1gpu", " s", "cfg3_i2i",
        "cfg3_i2i_latent_rel_l2", "cfg3_peak_gib")
    for sec in ("tp2", "tp4"):
        row(f"decode b1 TP {sec[-1]}, tok/s", sec, "baseline_b1_tok_s", f"{sec}_b1_tok_s", f"{sec}_b1_vs_1gpu",
            target="tp2_b1" if sec == "tp2" else None, peak=f"{sec}_peak_gib")
        row(f"decode {concurrent} concurrent TP {sec[-1]}, tok/s", sec, f"baseline_text{concurrent}_tok_s",
            f"{sec}_text{concurrent}_tok_s", f"{sec}_text{concurrent}_vs_1gpu")
    for sec in ("hsdp2", "hsdp4"):
        row(f"{sec.upper()} weights per GPU, share (upper bound)", sec, "baseline_loaded_over_weights",
            f"{sec}_weights_frac_upper", f"{sec}_weights_frac_upper",
            target="hsdp4_weights" if sec == "hsdp4" else None,
            peak=f"{sec}_loaded_gib")
    row("VAE decode tiled", "vae_tiled", "vae_untiled_s", "vae_tiled_s", "vae_tiled_vs_untiled", " s")
    row("VAE decode patch parallel 2", "vae_pp2", "vae_untiled_s", "vae_pp2_s", "vae_pp2_vs_untiled", " s",
        peak="vae_pp2_peak_alloc_gib")
    head = ("case", "1 GPU", "parallel", "ratio", "target", "latent rel L2", "GiB per GPU")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])


def main() -> None:
    from common import parser

    ap = parser("bench_parallel.json")
    ap.add_argument("--write", action="store_true", help="write the full-size random checkpoint first (~40 s)")
    ap.add_argument("--tokenizer-dir", default=None, help="Qwen tokenizer files for the written checkpoint")
    ap.add_argument("--only", nargs="*", default=[], choices=list(SECTIONS), metavar="SECTION",
                    help=f"run only these sections (and the baseline when one is compared with it): "
                         f"{' '.join(SECTIONS)}")
    ap.add_argument("--skip", nargs="*", default=[], choices=list(SECTIONS), metavar="SECTION",
                    help="sections to skip (the baseline is what every ratio is taken against)")
    ap.add_argument("--gpus", type=int, default=None,
                    help="use GPUs 0..N-1 (default: every visible GPU; with --smoke the number of CPU rank "
                         "processes standing in for GPUs, default 2)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU dry run of every section: a tiny random checkpoint in a temporary directory (--ckpt "
                         "and --write are ignored), CPU rank processes, tiny images, 3 steps")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="skip a section whose estimated H200 time would end it past this many seconds of the "
                         "run (default 560; with --smoke none, as the estimates are the GPU's; 0: none)")
    a = ap.parse_args()
    sz = SMOKE if a.smoke else FULL
    if a.deadline_s is None:
        a.deadline_s = 0.0 if a.smoke else 560.0
    visible = (a.gpus or 2) if a.smoke else torch.cuda.device_count()
    gpus = min(a.gpus, visible) if a.gpus else visible
    b = Bench(a, sz, gpus)
    b.res.update(header() if not a.smoke else {"device": "cpu (smoke)", "torch": torch.__version__,
                                               "date": time.strftime("%Y-%m-%d")})
    b.res.update(command=" ".join(sys.argv), commit=_commit(), smoke=a.smoke, gpus=gpus, visible_gpus=visible,
                 side=sz.side, steps=sz.steps, reps=sz.reps,
                 memory_sampling=b.mem.error or "nvidia-smi memory.used every 50 ms, every process on the GPU")
    write_s = bench_checkpoint(a, b.tmp)
    if write_s is not None:
        b.res["write_s"] = write_s
        b.log(f"checkpoint written in {write_s:.1f} s")
    b.save()
    blocks = sz.kv_blocks
    try:
        b.section("machine", lambda: machine(b))
        wants = {s for s in SECTIONS if b.wanted(s) and SECTIONS[s][0] <= gpus}
        b.section("baseline", lambda: engine(b, "baseline", [stage("0", blocks["decode"])], i2i_run="cfg3" in wants,
                                             decode=bool(wants & {"tp2", "tp4"})))
        b.section("cfg2", lambda: engine(b, "cfg2", [stage(devices(2), blocks["t2i"], cfg_parallel_size=2)]))
        b.section("cfg3", lambda: engine(b, "cfg3", [stage(devices(3), blocks["i2i"], cfg_parallel_size=3)],
                                         i2i_run=True))
        b.section("tp2", lambda: engine(b, "tp2", [stage(devices(2), blocks["decode"], tensor_parallel_size=2)],
                                        decode=True))
        b.section("hsdp4", lambda: engine(b, "hsdp4", [stage(devices(4), blocks["t2i"], use_hsdp=True,
                                                             hsdp_shard_size=4)]))
        b.section("tp4", lambda: engine(b, "tp4", [stage(devices(4), blocks["decode"], tensor_parallel_size=4)],
                                        decode=True))
        b.section("hsdp2", lambda: engine(b, "hsdp2", [stage(devices(2), blocks["t2i"], use_hsdp=True,
                                                             hsdp_shard_size=2)]))
        b.section("vae", lambda: vae(b))
        b.section("two_stage", lambda: engine(b, "two_stage", [
            stage("0", blocks["t2i"], gpu_memory_utilization=0.45),
            {**stage("1", blocks["t2i"], gpu_memory_utilization=0.45), "max_num_seqs": 16,
             "input_connectors": {"from_stage_0": "shared_memory_connector"}}], single=False))
    finally:
        if b.mem.error:
            b.res["memory_sampling"] = b.mem.error
        b.mem.close()
        b.scratch.cleanup()
    b.res["total_s"] = time.perf_counter() - b.t0
    b.save()
    table = summary(b.res, sz.concurrent)
    note = "\n(smoke: CPU rank processes on a few cores; the times and targets mean nothing)" if a.smoke else ""
    print("\n" + table + note + f"\n\nresults: {a.out} (total {b.res['total_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
