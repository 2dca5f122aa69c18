"""Command line: `bagel-serve generate|download` and the seed system's `end2end.py`.

`end2end.py` users keep every flag and default they know; `bagel-serve generate` takes the same flags.
Everything that can be checked without the model (prompts, images, flag ranges, output files, deploy
config) is checked before the model loads, so a typo never costs a 30 GB load.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from bagel_serve import __version__

DEFAULT_MODEL = "ByteDance-Seed/BAGEL-7B-MoT"
DEFAULT_PROMPT = "A cute cat"
MODALITIES = ("text2img", "img2img", "img2text", "text2text")
# Request fields whose errors the CLI reports under another flag name.
FIELD_FLAGS = {"max_tokens": "--max-tokens / --max-think-tokens", "image": "--image-path"}


class CLIError(Exception):
    """A usage error: printed as `error: ...` with exit status 2."""


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and topology")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory, Hugging Face repo id, or 'bagel-serve-demo' (tiny, random weights) "
                        f"(default: {DEFAULT_MODEL})")
    g.add_argument("--deploy-config", default=None, help="deploy YAML (default: bundled config for the model)")
    g.add_argument("--stage-overrides", default=None, help="JSON of per-stage settings, e.g. '{\"0\": {\"max_num_seqs\": 2}}'")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=["bf16", "bfloat16", "fp16", "float16", "fp32", "float32"],
                   help="weight dtype (default: bf16 on CUDA, fp32 on CPU)")
    g.add_argument("--worker-backend", default="process", choices=["process", "multi_process", "inline", "ray"],
                   help="where the stages run: one process per stage of a two-stage pipeline (default; a single "
                        "stage runs here), every stage in this process (inline), or one Ray actor per stage "
                        "(ray, needs the ray extra)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (auto, ray://host:port); implies --worker-backend ray")
    g.add_argument("--tensor-parallel-size", type=int, default=None)
    g.add_argument("--cfg-parallel-size", type=int, default=1, choices=[1, 2, 3])
    g.add_argument("--vae-patch-parallel-size", type=int, default=None)
    g.add_argument("--vae-use-tiling", action="store_true", default=None)
    g.add_argument("--use-hsdp", action="store_true", default=None)
    g.add_argument("--quantization", default=None, help="e.g. fp8")
    g.add_argument("--init-timeout", type=float, default=300, help="engine start-up limit in seconds (multi-process workers)")
    g.add_argument("--batch-timeout", type=float, default=5, help="cross-stage batching wait in seconds (multi-process workers)")
    g.add_argument("--init-sleep-seconds", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--shm-threshold-bytes", type=int, default=None, help=argparse.SUPPRESS)

    g = p.add_argument_group("inputs")
    g.add_argument("--modality", default="text2img", choices=MODALITIES)
    g.add_argument("--prompts", nargs="+", default=None, help=f"one or more prompts (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--txt-prompts", default=None, help="file with one prompt per line (blank lines skipped)")
    g.add_argument("--prompt-type", default="text", choices=["text"])
    g.add_argument("--image-path", nargs="+", default=None,
                   help="input image(s) for img2img / img2text: one for all prompts, or one per prompt")

    g = p.add_argument_group("generation")
    g.add_argument("--steps", type=int, default=50)
    g.add_argument("--seed", type=int, default=None, help="reproduces the official noise (default: random, reported)")
    g.add_argument("--height", type=int, default=None, help="default: 1024 (text2img), the resized input (img2img)")
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--timestep-shift", type=float, default=3.0)
    g.add_argument("--cfg-text-scale", type=float, default=4.0)
    g.add_argument("--cfg-img-scale", type=float, default=1.5)
    g.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"), help="default: 0.4 1.0")
    g.add_argument("--cfg-renorm-type", default=None, choices=["global", "channel", "text_channel"], help="default: global")
    g.add_argument("--cfg-renorm-min", type=float, default=None, help="default: 0.0")
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--think", action="store_true")
    g.add_argument("--max-think-tokens", type=int, default=1000, help="plan length; also the answer budget of text modalities")
    g.add_argument("--max-tokens", type=int, default=None, help="answer budget of text modalities (default: --max-think-tokens)")
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--text-temperature", type=float, default=0.3)

    g = p.add_argument_group("outputs and reporting")
    g.add_argument("--output", default=".", help="output directory (default: current directory)")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")
    g.add_argument("--log-stats", action="store_true", help="print per-phase times, throughput, queue wait and KV cache use (per stage too)")
    g.add_argument("--enable-diffusion-pipeline-profiler", action="store_true",
                   help="print a per-request breakdown: context prefill, think decode, denoise, VAE")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.txt_prompts:
        try:
            text = Path(args.txt_prompts).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CLIError(f"--txt-prompts: file not found: {args.txt_prompts}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"--txt-prompts: cannot read {args.txt_prompts}: {e}") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise CLIError(f"--txt-prompts: {args.txt_prompts} has no prompts (blank lines are skipped)")
        return prompts
    return list(args.prompts) if args.prompts else [DEFAULT_PROMPT]


def build_requests(args: argparse.Namespace, prompts: list[str]) -> list[dict[str, Any]]:
    needs_image = args.modality in ("img2img", "img2text")
    images: list[str | None] = [None] * len(prompts)
    if args.image_path:
        if not needs_image:
            raise CLIError(f"--image-path is only used by img2img and img2text, not {args.modality}")
        if len(args.image_path) not in (1, len(prompts)):
            raise CLIError(f"--image-path: give one image for all prompts or one per prompt "
                           f"({len(prompts)}), got {len(args.image_path)}")
        images = list(args.image_path) * (len(prompts) if len(args.image_path) == 1 else 1)
    elif needs_image:
        raise CLIError(f"--image-path is required for {args.modality}")
    reqs = []
    for prompt, image in zip(prompts, images):
        r: dict[str, Any] = {"modality": args.modality, "prompt": prompt, "think": args.think, "seed": args.seed,
                             "do_sample": args.do_sample, "text_temperature": args.text_temperature,
                             "max_think_tokens": args.max_think_tokens,
                             "max_tokens": args.max_tokens if args.max_tokens is not None else args.max_think_tokens}
        if args.modality in ("text2img", "img2img"):
            r.update(steps=args.steps, height=args.height, width=args.width, timestep_shift=args.timestep_shift,
                     cfg_text_scale=args.cfg_text_scale, cfg_img_scale=args.cfg_img_scale,
                     negative_prompt=args.negative_prompt)
            if args.cfg_interval is not None:
                r["cfg_interval"] = tuple(args.cfg_interval)
            if args.cfg_renorm_type is not None:
                r["cfg_renorm_type"] = args.cfg_renorm_type
            if args.cfg_renorm_min is not None:
                r["cfg_renorm_min"] = args.cfg_renorm_min
        if image is not None:
            r["image"] = image
        reqs.append(r)
    return reqs


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw = {k: getattr(args, k) for k in (
        "tensor_parallel_size", "cfg_parallel_size", "vae_patch_parallel_size", "vae_use_tiling", "use_hsdp",
        "quantization", "worker_backend", "ray_address", "log_stats", "init_timeout", "batch_timeout",
        "enable_diffusion_pipeline_profiler", "stage_overrides")}
    return {k: v for k, v in kw.items() if v is not None}


def _request_error_message(e: Exception) -> str:
    field = getattr(e, "field", None)
    reason = getattr(e, "reason", None)
    if field and reason:
        return f"{FIELD_FLAGS.get(field, '--' + field.replace('_', '-'))} {reason}"
    return str(e)


def run_generate(args: argparse.Namespace) -> int:
    from bagel_serve.engine.request import RequestError, make_request
    from bagel_serve.entrypoints.outputs import OutputExistsError, OutputPlan, save_outputs
    from bagel_serve.imaging import ImageInputError, load_image
    from bagel_serve.testing.demo import DEMO_MODEL, DEMO_NOTICE

    # Everything checkable without the model, before it loads.
    prompts = read_prompts(args)
    dicts = build_requests(args, prompts)
    try:
        reqs = [make_request(d, i) for i, d in enumerate(dicts)]
    except RequestError as e:
        raise CLIError(_request_error_message(e)) from None
    for path in sorted({str(d["image"]) for d in dicts if "image" in d}):
        try:
            load_image(path, what="--image-path")
        except ImageInputError as e:
            raise CLIError(str(e)) from None
    plan = OutputPlan(Path(args.output), reqs)
    try:
        plan.check(args.overwrite)
    except OutputExistsError as e:
        raise CLIError(str(e)) from None
    if args.init_sleep_seconds is not None or args.shm_threshold_bytes is not None:
        print("note: --init-sleep-seconds and --shm-threshold-bytes are legacy flags of the seed system and have "
              "no effect here", file=sys.stderr)
    if args.model == DEMO_MODEL:
        print(f"WARNING: {DEMO_NOTICE}", file=sys.stderr)

    from bagel_serve.config.deploy import DeployConfigError
    from bagel_serve.config.engine_options import EngineOptionError
    from bagel_serve.entrypoints.omni import Omni
    from bagel_serve.model.loader import CheckpointError

    t0 = time.perf_counter()
    try:
        omni = Omni(args.model, device=args.device, dtype=args.dtype, deploy_config=args.deploy_config,
                    progress=not args.no_progress, **engine_kwargs(args))
    except (EngineOptionError, DeployConfigError, CheckpointError, NotImplementedError) as e:
        raise CLIError(str(e)) from None
    load_s = time.perf_counter() - t0
    try:
        outputs = omni.generate(reqs)
    except RequestError as e:
        raise CLIError(_request_error_message(e)) from None
    run_info = {"model": args.model, "model_dir": str(omni.model_dir), "engine": f"bagel-serve {__version__}",
                "device": str(omni.device), "dtype": str(omni.model.dtype).replace("torch.", ""),
                "pipeline": omni.pipeline.name, "command": sys.argv, "load_s": round(load_s, 3)}
    entries = save_outputs(plan, outputs, args.model, __version__, run_info)

    for i, (req, out, entry) in enumerate(zip(reqs, outputs, entries)):
        head = f"[{i}] {req.modality} seed={out.seed}: {req.prompt!r}"
        print(head)
        if out.think_text is not None:
            print(f"    think: {out.think_text}")
        if not req.outputs_image:
            print(f"    text: {out.text}")
        print(f"    files: {', '.join(str(plan.directory / f) for f in entry['files'])}")
    print(f"manifest: {plan.directory / 'manifest.json'}")
    stats = omni.last_stats
    if args.log_stats and stats is not None:
        print(f"load: {load_s:.2f} s")
        print(stats.summary())
        if len(omni.stage_stats) > 1:
            for spec, st in zip(omni.pipeline.stages, omni.stage_stats):
                print(f"stage {spec.stage_id} ({spec.name}):")
                print("\n".join("  " + line for line in st.summary().splitlines()))
    if args.enable_diffusion_pipeline_profiler:
        phases = ("context_prefill", "think_decode", "decode", "vae_encode", "denoise", "vae_decode")
        print("profile (seconds):  " + "  ".join(f"{p:>15}" for p in phases))
        for i, out in enumerate(outputs):
            print(f"  request {i:<9}  " + "  ".join(f"{out.timings.get(p, 0.0):15.3f}" for p in phases))
    return 0


def run_download(args: argparse.Namespace) -> int:
    from huggingface_hub import snapshot_download

    from bagel_serve.model.loader import HUB_FILES

    try:
        path = snapshot_download(args.model, revision=args.revision, local_dir=args.local_dir, allow_patterns=HUB_FILES)
    except Exception as e:  # hub errors come in many types; all mean the same to the user here
        raise CLIError(f"could not download {args.model}: {type(e).__name__}: {e}") from None
    print(path)
    return 0


def _parser(prog: str, subcommands: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="BAGEL inference: text2text, img2text, text2img, img2img.")
    p.add_argument("--version", action="version", version=f"bagel-serve {__version__}")
    if not subcommands:
        add_generate_arguments(p)
        return p
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text or images from prompts (the seed's end2end.py flags)")
    add_generate_arguments(gen)
    dl = sub.add_parser("download", help="download a model's weights into the Hugging Face cache")
    dl.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    dl.add_argument("--revision", default=None)
    dl.add_argument("--local-dir", default=None, help="download into this directory instead of the cache")
    return p


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        if getattr(args, "command", "generate") == "download":
            return run_download(args)
        return run_generate(args)
    except CLIError as e:
        parser.exit(2, f"error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")


def main(argv: Sequence[str] | None = None) -> int:
    """`bagel-serve` console script."""
    parser = _parser("bagel-serve", subcommands=True)
    return _run(parser.parse_args(argv), parser)


def end2end_main(argv: Sequence[str] | None = None) -> int:
    """The seed system's `end2end.py`: the generate flags without a subcommand."""
    parser = _parser("end2end.py", subcommands=False)
    return _run(parser.parse_args(argv), parser)


if __name__ == "__main__":
    sys.exit(main())
