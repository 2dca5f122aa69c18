r"""Image generation on one GPU (issue 10), against the card measured in the same run, all through `Omni` with
the bundled `bagel_single_stage.yaml`:

1. text2img 1024², 50 steps, default CFG (cfg_text 4, cfg_img 1.5, interval (0.4, 1]), bf16: median of 3
   after a warm-up; floor = 90 forwards x 60 TFLOP at the measured bf16 GEMM rate. Its latents and image are
   the text2img reference.
2. Peak GPU memory allocated by that case with a KV cache of 64 blocks (see "KV cache" below).
3. img2img 1024², 50 steps, cfg_img 2.0, interval [0, 1], renorm text_channel, of a fixed random image: one
   run after a warm-up; the img2img reference. Its floor is an approximation: 2 x the text2img floor.
4. text2img 512², 20 steps, default CFG: median of 3 (issue 10's target <= 1.0 s).
5. TaylorSeer (`enable_taylorseer=True`): text2img 1024² (median of 3) and img2img, each with its deviation
   from the reference: relative L2 of the final latents (float32) and PSNR of the decoded images (uint8 RGB).
6. FP8 (`Omni(..., quantization="fp8")`, loaded after the bf16 engine is shut down and its memory freed):
   text2img 1024² (median of 3), peak memory, deviation from the bf16 references (same seeds) for text2img
   and img2img; the same again with `fp8_und=True` (section `fp8_und`) and with `fp8_attention=True` (section
   `fp8_attention`: cuDNN's FP8 attention for the denoising steps). `*_floor_s_if_all_fp8` is the text2img
   floor if every FLOP ran at the FP8 GEMM rate (attention does not: a bound below the real floor).
7. Batches in one `generate` call, 50 steps each: 8 x text2img 1024² and 8 x 512² (different prompts and
   seeds): seconds and images/s.
8. Load time and the capture / compile / warm-up times the engine exposes (`common.engine_warmup_s`).
The card's bf16 and FP8 (e4m3, rowwise scales, `torch._scaled_mm`) GEMM rates at 8192 x 3584 x 18944 and its
HBM bandwidth are measured first. A feature the engine refuses (FP8 attention without the cuDNN frontend)
is reported as "not available: <error>" and the run goes on; any other failing section is reported as
"failed: <error>". The JSON is rewritten after every section, so a run cut short keeps what it measured.

KV cache: each engine is loaded once, with `kv_cache_blocks` = 4096 (64k tokens, 3.5 GiB in bf16), enough for
the img2img contexts and the batches, which 64 blocks cannot hold. The cache is one tensor allocated at
start and nothing else on the device depends on its size, so the 64-block peak is the measured peak less
the cache tensor plus 64 blocks (`t2i_peak_gib`); the measured one is `t2i_peak_gib_measured`.

    PYTHONPATH=. python benchmarks/bench_image.py --ckpt /tmp/bagel-full --write --tokenizer-dir .bench/tok \
        --out $OUT/image.json --images $OUT/images
    PYTHONPATH=. python benchmarks/bench_image.py --smoke --out /tmp/image-smoke.json   # CPU dry run of every section

Estimated H200 time (seconds; the deadline check uses the same numbers): ceilings 11 (6 of them a sustained GEMM), checkpoint write 40,
bf16 load with graph capture 35, warm-up 5, t2i 35, i2i 25, t2i_512 5, taylorseer 30, batch 95, fp8 75,
fp8_und 75, fp8_attention 75: about 500 s (run fewer sections in one 600 s call: `--skip`). A
section that would end past `--deadline-s` (default 560, counted from
after the imports, inside the 600 s call) by these estimates is skipped and says so.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from common import (bench_checkpoint, engine_warmup_s, fp8_gemm_tflops, free_device, generate, header, input_image,
                    machine_ceilings, median_s, parser, psnr_db, rel_l2, report, sustained_gemm_tflops, timed_on)
from PIL import Image

from bagel_serve import Omni

SINGLE = "bagel_single_stage.yaml"
STAGE0 = {"max_num_seqs": 256, "enforce_eager": False}  # the limits this engine runs with (decode graphs on)
KV_BLOCKS = 4096
PEAK_BLOCKS = 64
FORWARD_TFLOP, T2I_FORWARDS = 60, 90  # one 1024² DiT forward, and a 50-step default-CFG text2img's forwards
SECTIONS = ("t2i", "i2i", "t2i_512", "taylorseer", "batch", "fp8", "fp8_und", "fp8_attention")
OPTIONAL = ("taylorseer", "fp8", "fp8_und", "fp8_attention")  # refused here means "not available"
ESTIMATE_S = {"t2i": 35, "i2i": 25, "t2i_512": 5, "taylorseer": 30, "batch": 95,
              "fp8": 75, "fp8_und": 75, "fp8_attention": 75}
PROMPT = "A cute cat sitting on a windowsill at sunset."
EDIT = "Make it look like a watercolor painting and add a red umbrella."
BATCH_PROMPTS = ["A photo of a dog running on the beach.", "A lighthouse on a cliff at dawn.",
                 "A bowl of ramen on a wooden table.", "A red vintage car in the rain at night.",
                 "A snowy mountain village under the northern lights.", "A close-up of a hummingbird at a flower.",
                 "An astronaut reading a book on the moon.", "A field of sunflowers under a stormy sky."]
SAVED = ("t2i_bf16", "t2i_taylorseer", "t2i_fp8", "t2i_fp8_attention")  # the images --images writes (at most 4)


@dataclass(frozen=True)
class Sizes:
    """Image sides and step counts of one run: the issue's on a GPU, tiny ones for the CPU smoke run."""

    big: int
    small: int
    steps: int
    small_steps: int
    warm_steps: int
    """Warm-ups run this many steps: 8 is the fewest whose last evaluated t (shift 3) is unguided, so both the
    guided and the unguided forward shapes are warm."""


FULL = Sizes(big=1024, small=512, steps=50, small_steps=20, warm_steps=8)
SMOKE = Sizes(big=128, small=64, steps=3, small_steps=2, warm_steps=8)  # the tiny preset's largest image: 128²


def t2i(side: int, steps: int, prompt: str = PROMPT, seed: int = 0, **extra: Any) -> dict[str, Any]:
    return {"modality": "text2img", "prompt": prompt, "height": side, "width": side, "steps": steps, "seed": seed,
            "return_latents": True, **extra}


def i2i(image: Image.Image, steps: int, **extra: Any) -> dict[str, Any]:
    return {"modality": "img2img", "prompt": EDIT, "image": image, "steps": steps, "seed": 0, "cfg_img_scale": 2.0,
            "cfg_interval": (0.0, 1.0), "cfg_renorm_type": "text_channel", "return_latents": True, **extra}


class Bench:
    """The run's results, its deadline and the helpers every section uses."""

    def __init__(self, args: Any, device: str, sz: Sizes) -> None:
        self.a, self.device, self.sz = args, device, sz
        self.res: dict[str, Any] = {}
        self.refs: dict[str, Any] = {}  # "t2i" / "i2i" -> (latents, image) of the bf16 engine
        self.t0 = time.perf_counter()
        self.images = Path(args.images) if args.images else None

    def save(self) -> None:
        Path(self.a.out).write_text(json.dumps(self.res, indent=2))

    def section(self, name: str, fn: Callable[[], None]) -> None:
        """Run one section unless skipped or past the deadline; a failure is recorded under its name."""
        elapsed = time.perf_counter() - self.t0
        if name in self.a.skip:
            self.res[name] = "skipped (--skip)"
        elif self.a.deadline_s and elapsed + ESTIMATE_S[name] > self.a.deadline_s:
            self.res[name] = (f"skipped: at {elapsed:.0f} s its ~{ESTIMATE_S[name]} s would pass the "
                              f"{self.a.deadline_s:.0f} s deadline")
        else:
            before = set(self.res)
            try:
                fn()
            except Exception as e:  # a failed section must not take the sections after it down
                kind = "not available" if name in OPTIONAL else "failed"
                self.res[name] = f"{kind}: {type(e).__name__}: {str(e)[:400]}"
            free_device()
            if name not in self.res:
                new = "; ".join(f"{k} {_short(self.res[k])}" for k in self.res if k not in before)
                self.res[name] = "ok"
                print(f"[{time.perf_counter() - self.t0:6.1f} s] {name}: {new}", flush=True)
        if self.res[name] != "ok":
            print(f"[{time.perf_counter() - self.t0:6.1f} s] {name}: {self.res[name]}", flush=True)
        self.save()

    def timed(self, fn):
        return timed_on(self.device, fn)

    def runs(self, omni: Omni, req: dict[str, Any], n: int = 3):
        """n timed runs of one request: (first output, median s, every run's s, max peak GiB, last output)."""
        got = [self.timed(lambda: generate(omni, [req])) for _ in range(n)]
        times = [t for _, t, _ in got]
        return got[0][0][0], statistics.median(times), times, max(p for _, _, p in got), got[-1][0][0]

    def warm(self, omni: Omni, *reqs: dict[str, Any]) -> None:
        """Run each request once, untimed, at the shapes a timed run will use."""
        for r in reqs:
            generate(omni, [r])

    def keep_image(self, name: str, image: Image.Image) -> None:
        if self.images is not None and name in SAVED:
            self.images.mkdir(parents=True, exist_ok=True)
            image.save(self.images / f"{name}.png")

    def deviation(self, prefix: str, kind: str, out) -> None:
        """Relative L2 of the final latents and PSNR of the image, against the bf16 reference of `kind`."""
        if kind not in self.refs:
            self.res[f"{prefix}_vs_bf16"] = f"no reference ({kind} did not run)"
            return
        lat, img = self.refs[kind]
        self.res[f"{prefix}_latent_rel_l2"] = rel_l2(out.latents, lat)
        self.res[f"{prefix}_psnr_db"] = psnr_db(out.images[0], img)

    def peak(self, prefix: str, omni: Omni, measured_gib: float) -> None:
        """The measured peak, and the same with the cache shrunk to 64 blocks (module docstring)."""
        cache = omni.stage.cache
        cache_bytes = cache.tensor.numel() * cache.tensor.element_size()
        self.res[f"{prefix}_peak_gib_measured"] = measured_gib
        self.res[f"{prefix}_peak_gib"] = measured_gib - (cache_bytes - PEAK_BLOCKS * cache.bytes_per_block) / 2**30

    def load(self, prefix: str, **kwargs: Any) -> Omni:
        omni, t, _ = self.timed(lambda: Omni(
            self.a.ckpt, device=self.device, deploy_config=SINGLE,
            stage_overrides={"0": {**STAGE0, "kv_cache_blocks": KV_BLOCKS}}, **kwargs))
        self.res[f"{prefix}_load_s"] = t
        sz = self.sz
        _, self.res[f"{prefix}_first_requests_s"], _ = self.timed(lambda: generate(omni, [
            t2i(sz.small // 2, 3, "warm up", seed=1, return_latents=None),
            {"modality": "text2text", "prompt": "warm up", "max_tokens": 4}]))
        self.res.update({f"{prefix}_{k}": v for k, v in engine_warmup_s(omni).items()})
        self.res[f"{prefix}_weights_gib"] = sum(p.numel() * p.element_size() for m in (omni.model, omni.stage.vae)
                                                for p in m.parameters()) / 2**30
        return omni


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return "[" + ", ".join(_short(x) for x in v) + "]"
    return str(v)


def ceilings(b: Bench) -> None:
    if b.device == "cuda":
        b.res.update(machine_ceilings())
        b.res.update(fp8_gemm_tflops("cuda"))
        b.res["sustained_bf16_gemm_tflops"] = sustained_gemm_tflops()
    else:  # smoke: the same measurements at toy shapes, so the code runs
        x = torch.randn(256, 256, dtype=torch.bfloat16)
        b.res["bf16_gemm_tflops"] = 2 * 256**3 / median_s(lambda: x @ x, 3, "cpu") / 1e12
        b.res.update(fp8_gemm_tflops("cpu", 256, 256, 256, reps=3))
    print("ceilings", {k: v for k, v in b.res.items() if "tflops" in k or "tb_s" in k}, flush=True)


def bf16_sections(b: Bench, omni: Omni) -> None:
    sz, res = b.sz, b.res
    floor = T2I_FORWARDS * FORWARD_TFLOP / res["bf16_gemm_tflops"]

    def case_t2i() -> None:
        req = t2i(sz.big, sz.steps)
        b.warm(omni, t2i(sz.big, sz.warm_steps))
        out, med, times, peak, last = b.runs(omni, req)
        res.update(t2i_1024_s=med, t2i_1024_runs_s=times, t2i_floor_s=floor, t2i_achieved=floor / med,
                   t2i_run_to_run_max_abs=(out.latents - last.latents).abs().max().item())
        b.peak("t2i", omni, peak)
        b.refs["t2i"] = (out.latents, out.images[0])
        b.keep_image("t2i_bf16", out.images[0])

    def case_i2i() -> None:
        img = input_image(sz.big)
        b.warm(omni, i2i(img, 3))
        (out,), t, _ = b.timed(lambda: generate(omni, [i2i(img, sz.steps)]))
        res.update(i2i_1024_s=t, i2i_floor_s_approx=2 * floor, i2i_floor_how="2 x the t2i floor (approximation)",
                   i2i_achieved_approx=2 * floor / t)
        b.refs["i2i"] = (out.latents, out.images[0])

    def case_512() -> None:
        b.warm(omni, t2i(sz.small, sz.warm_steps))
        _, med, times, _, _ = b.runs(omni, t2i(sz.small, sz.small_steps))
        res.update(t2i_512_20_s=med, t2i_512_20_runs_s=times)

    def case_taylorseer() -> None:
        seer = {"enable_taylorseer": True}
        b.warm(omni, t2i(sz.big, sz.warm_steps, **seer))
        out, med, times, _, _ = b.runs(omni, t2i(sz.big, sz.steps, **seer))
        res.update(taylorseer_t2i_1024_s=med, taylorseer_t2i_1024_runs_s=times)
        if "t2i_1024_s" in res:
            res["taylorseer_t2i_speedup"] = res["t2i_1024_s"] / med
        b.deviation("taylorseer_t2i", "t2i", out)
        b.keep_image("t2i_taylorseer", out.images[0])
        (out,), t, _ = b.timed(lambda: generate(omni, [i2i(input_image(sz.big), sz.steps, **seer)]))
        res["taylorseer_i2i_1024_s"] = t
        b.deviation("taylorseer_i2i", "i2i", out)

    def case_batch() -> None:
        def batch(sides: list[int], key: str) -> None:
            reqs = [t2i(s, sz.steps, BATCH_PROMPTS[i], seed=100 + i, return_latents=None)
                    for i, s in enumerate(sides)]
            outs, t, _ = b.timed(lambda: generate(omni, reqs))
            if [o.images[0].size for o in outs] != [(s, s) for s in sides]:
                raise RuntimeError(f"{key}: image sizes {[o.images[0].size for o in outs]}, asked for {sides}")
            res.update({f"{key}_s": t, f"{key}_images_s": len(reqs) / t})
            print(f"  {key}: {t:.2f} s, {len(reqs) / t:.3f} images/s", flush=True)

        res["batch_steps"] = sz.steps
        batch([sz.big] * 8, "batch8_t2i_1024")
        batch([sz.small] * 8, "batch8_t2i_512")

    for name, fn in (("t2i", case_t2i), ("i2i", case_i2i), ("t2i_512", case_512), ("taylorseer", case_taylorseer),
                     ("batch", case_batch)):
        b.section(name, fn)


def fp8_section(b: Bench, prefix: str, **kwargs: Any) -> None:
    """Load the FP8 engine, time text2img 1024², measure its peak and its deviation from the bf16 references."""
    sz, res = b.sz, b.res
    omni = b.load(prefix, quantization="fp8", **kwargs)
    try:
        b.warm(omni, t2i(sz.big, sz.warm_steps))
        out, med, times, peak, _ = b.runs(omni, t2i(sz.big, sz.steps))
        res.update({f"{prefix}_t2i_1024_s": med, f"{prefix}_t2i_1024_runs_s": times})
        if "t2i_1024_s" in res:
            res[f"{prefix}_t2i_speedup"] = res["t2i_1024_s"] / med
        if "fp8_gemm_tflops" in res:  # a bound below the real floor: attention and the rest stay in bf16
            res[f"{prefix}_t2i_floor_s_if_all_fp8"] = T2I_FORWARDS * FORWARD_TFLOP / res["fp8_gemm_tflops"]
        b.peak(f"{prefix}_t2i", omni, peak)
        b.deviation(f"{prefix}_t2i", "t2i", out)
        b.keep_image(f"t2i_{prefix}", out.images[0])
        (out,), t, _ = b.timed(lambda: generate(omni, [i2i(input_image(sz.big), sz.steps)]))
        res[f"{prefix}_i2i_1024_s"] = t
        b.deviation(f"{prefix}_i2i", "i2i", out)
    finally:
        omni.shutdown()
        del omni


def main() -> None:
    ap = parser("bench_image.json")
    ap.add_argument("--write", action="store_true", help="write the full-size random checkpoint first")
    ap.add_argument("--tokenizer-dir", default=None, help="Qwen tokenizer files for the written checkpoint")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, metavar="SECTION",
                    help=f"sections to skip: {' '.join(SECTIONS)}")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU dry run of every section: a tiny random checkpoint in a temporary directory (--ckpt "
                         "and --write are ignored), tiny images, 2-3 steps")
    ap.add_argument("--images", default=None, help="save the reference, TaylorSeer and FP8 text2img images here")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help="skip a section whose estimated H200 time would end it past this many seconds of the "
                         "run (default 560; with --smoke none, as the estimates are the GPU's; 0: none)")
    a = ap.parse_args()
    device = "cpu" if a.smoke else "cuda"
    sz = SMOKE if a.smoke else FULL
    if a.deadline_s is None:
        a.deadline_s = 0.0 if a.smoke else 560.0
    b = Bench(a, device, sz)
    b.res.update(header() if device == "cuda" else {"device": "cpu (smoke)", "torch": torch.__version__,
                                                     "date": time.strftime("%Y-%m-%d")})
    b.res.update(smoke=a.smoke, sizes=[sz.big, sz.small], steps=[sz.steps, sz.small_steps], kv_cache_blocks=KV_BLOCKS)
    ceilings(b)
    scratch = tempfile.TemporaryDirectory(prefix="bench-image-")  # removed when the run ends
    write_s = bench_checkpoint(a, Path(scratch.name))
    if write_s is not None:
        b.res["write_s"] = write_s
        print(f"[{time.perf_counter() - b.t0:6.1f} s] checkpoint written in {write_s:.1f} s", flush=True)
    b.save()

    omni = b.load("bf16")
    b.res["dtype"] = str(omni.model.dtype).replace("torch.", "")
    print(f"[{time.perf_counter() - b.t0:6.1f} s] loaded in {b.res['bf16_load_s']:.1f} s", flush=True)
    try:
        bf16_sections(b, omni)
    finally:
        omni.shutdown()
        del omni
        free_device()
    if device == "cuda":  # what the FP8 engine's peak would wrongly include if the bf16 one were not freed
        b.res["allocated_after_bf16_shutdown_gib"] = torch.cuda.memory_allocated() / 2**30
    b.section("fp8", lambda: fp8_section(b, "fp8"))
    b.section("fp8_und", lambda: fp8_section(b, "fp8_und", fp8_und=True))
    b.section("fp8_attention", lambda: fp8_section(b, "fp8_attention", fp8_attention=True))
    b.res["total_s"] = time.perf_counter() - b.t0
    report(b.res, a.out)


if __name__ == "__main__":
    main()
