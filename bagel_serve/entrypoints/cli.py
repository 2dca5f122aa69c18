"""Command line: `bagel-serve generate|serve|download` and the seed system's `end2end.py`.

`end2end.py` users keep every flag and default they know; `bagel-serve generate` takes the same flags.
Everything that can be checked without the model (prompts, images, flag values, the output directory and
files, the device, Ray, the checkpoint's config and tokenizer, the deploy config) is checked before the
weights load, so a typo never costs a 30 GB load.

Generation flags default to "not given" (None): a request then takes stage 0's `default_sampling_params`
of the deploy config, else the built-in default (request > CLI flag > deploy default > built-in; the flags
a user gives are the request's fields). A flag that does not apply to the modality is warned about.

Exit status: 0 when every request succeeded; 1 when the run failed (a request failed: the others are
still saved; a worker died or timed out; an output file could not be written); 2 for a usage error found
before the run (flags, inputs, output directory, device, checkpoint, deploy config); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from bagel_serve import __version__
from bagel_serve.config.sampling import RENORM_TYPES
from bagel_serve.entrypoints.cli_args import (DEFAULT_MODEL, CLIError, RunError, add_engine_arguments,
                                              add_reporting_arguments, engine_kwargs, load_omni)

DEFAULT_PROMPT = "A cute cat"
MODALITIES = ("text2img", "img2img", "img2text", "text2text")
# Request fields whose errors and warnings the CLI reports under another flag name.
FIELD_FLAGS = {"image": "--image-path", "inputs": "--input-text/--input-image"}


class _InputItem(argparse.Action):
    """`--input-text` / `--input-image`: append (kind, value) to one shared list, so that the command line's
    order of the two flags is the order of the request's `inputs`."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        items = list(getattr(namespace, self.dest) or [])
        items.append((self.const, values))
        setattr(namespace, self.dest, items)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    g = p.add_argument_group("inputs")
    g.add_argument("--modality", default="text2img", choices=MODALITIES, help="what to generate (default: text2img)")
    g.add_argument("--prompts", nargs="+", default=None, help=f"one or more prompts (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--txt-prompts", default=None,
                   help="UTF-8 file with one prompt per line (blank lines skipped; wins over --prompts) (default: none)")
    g.add_argument("--prompt-type", default="text", choices=["text"], help="the only prompt type (default: text)")
    g.add_argument("--image-path", nargs="+", default=None,
                   help="input image(s) for img2img / img2text: one for all prompts, or one per prompt (default: none)")
    g.add_argument("--input-text", dest="inputs", action=_InputItem, const="text", default=None, metavar="TEXT",
                   help="a text segment of one interleaved request; repeat it and --input-image in the order the "
                        "context takes them (instead of --prompts / --image-path) (default: none)")
    g.add_argument("--input-image", dest="inputs", action=_InputItem, const="image", default=None, metavar="PATH",
                   help="an image of one interleaved request, in command-line order with --input-text; img2img "
                        "outputs take the last image's size (default: none)")

    g = p.add_argument_group("generation")
    g.add_argument("--steps", type=int, default=None, help="denoising timesteps, 2..1000 (steps - 1 model evaluations) (default: 50)")
    g.add_argument("--seed", type=int, default=None,
                   help="reproduces the official noise, 0..2**63-1 (default: the deploy config's seed, else random and reported)")
    g.add_argument("--height", type=int, default=None,
                   help="output height, a multiple of 16 (default: 1024 for text2img, capped at the model's maximum; "
                        "the resized input for img2img)")
    g.add_argument("--width", type=int, default=None, help="output width, a multiple of 16 (default: as --height)")
    g.add_argument("--timestep-shift", type=float, default=None, help="schedule shift (default: 3.0)")
    g.add_argument("--cfg-text-scale", type=float, default=None, help="text guidance scale; <= 1 turns it off (default: 4.0)")
    g.add_argument("--cfg-img-scale", type=float, default=None, help="image guidance scale; <= 1 turns it off (default: 1.5)")
    g.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="guidance only where LOW < t <= HIGH, on the shifted t (default: 0.4 1.0)")
    g.add_argument("--cfg-renorm-type", default=None, choices=RENORM_TYPES,
                   help="CFG renormalisation (default: global)")
    g.add_argument("--cfg-renorm-min", type=float, default=None, help="renorm clamp minimum, in [0, 1] (default: 0.0)")
    g.add_argument("--negative-prompt", default=None, help="text of the text-dropped CFG context (default: none)")
    g.add_argument("--enable-taylorseer", action="store_true", default=None,
                   help="TaylorSeer step caching: after 5 full steps, run the transformer on one step in 3 per CFG "
                        "branch and predict the others (order-6 Taylor expansion); faster, trades fidelity for "
                        "speed (default: the deploy config's enable_taylorseer, else off)")
    g.add_argument("--think", action="store_true", default=None,
                   help="plan (image modalities) / reason (text modalities) first (default: off)")
    g.add_argument("--max-think-tokens", type=int, default=None,
                   help="most generated tokens of the think plan; also the text budget when --max-tokens is not "
                        "given, as in the seed (default: 1000)")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="most generated tokens of a text answer, think included (default: the deploy config's "
                        "max_tokens, else --max-think-tokens)")
    g.add_argument("--do-sample", action="store_true", default=None,
                   help="sample text instead of greedy decoding (default: the deploy config's temperature > 0, else off)")
    g.add_argument("--text-temperature", type=float, default=None,
                   help="sampling temperature, >= 0; 0 means greedy (default: the deploy config's temperature, else 0.3)")
    g.add_argument("--top-k", type=int, default=None,
                   help="keep the k most likely tokens when sampling; 0 = off (default: the deploy config's, else 0)")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling mass, in (0, 1] (default: the deploy config's, else 1.0)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="penalty (> 0) on tokens already in the context; 1 = off (default: the deploy config's, else 1.0)")

    g = p.add_argument_group("outputs and reporting")
    g.add_argument("--output", default=".", help="output directory, created if missing (default: current directory)")
    g.add_argument("--overwrite", action="store_true", help="replace existing output files (default: off)")
    add_reporting_arguments(g)
    g.add_argument("--no-progress", action="store_true", help="hide progress bars (default: shown)")


# Flags that become request fields when given (dest -> field).
REQUEST_FLAGS = ("think", "seed", "do_sample", "text_temperature", "top_k", "top_p", "repetition_penalty",
                 "max_think_tokens", "max_tokens", "steps", "height", "width", "timestep_shift", "cfg_text_scale",
                 "cfg_img_scale", "cfg_interval", "cfg_renorm_type", "cfg_renorm_min", "negative_prompt",
                 "enable_taylorseer")
# Flags that become engine options when given.
def flag_of(field: str) -> str:
    return FIELD_FLAGS.get(field, "--" + field.replace("_", "-"))


def read_prompts(args: argparse.Namespace) -> list[str]:
    if args.txt_prompts:
        try:
            # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first prompt.
            text = Path(args.txt_prompts).read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise CLIError(f"--txt-prompts: file not found: {args.txt_prompts}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"--txt-prompts: cannot read {args.txt_prompts}: {e}") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise CLIError(f"--txt-prompts: {args.txt_prompts} has no prompts (blank lines are skipped)")
        return prompts
    return list(args.prompts) if args.prompts else [DEFAULT_PROMPT]


def image_paths(args: argparse.Namespace, n: int) -> list[str | None]:
    """The input image path of each of n requests (None for modalities without one)."""
    needs_image = args.modality in ("img2img", "img2text")
    if args.image_path:
        if not needs_image:
            raise CLIError(f"--image-path is only used by img2img and img2text, not {args.modality}")
        if len(args.image_path) not in (1, n):
            raise CLIError(f"--image-path: give one image for all prompts or one per prompt ({n}), got {len(args.image_path)}")
        return list(args.image_path) * (n if len(args.image_path) == 1 else 1)
    if needs_image:
        raise CLIError(f"--image-path is required for {args.modality}")
    return [None] * n


def check_inputs_flags(args: argparse.Namespace) -> None:
    """`--input-text` / `--input-image` make one request of their own items: not with the per-prompt flags."""
    clash = [flag for flag, given in (("--prompts", args.prompts), ("--txt-prompts", args.txt_prompts),
                                      ("--image-path", args.image_path)) if given]
    if clash:
        raise CLIError(f"--input-text/--input-image build one interleaved request from their own items; "
                       f"do not combine them with {', '.join(clash)}")


def _given_flags(args: argparse.Namespace) -> dict[str, Any]:
    given = {name: getattr(args, name) for name in REQUEST_FLAGS if getattr(args, name, None) is not None}
    if "cfg_interval" in given:
        given["cfg_interval"] = tuple(given["cfg_interval"])
    return given


def build_inputs_request(args: argparse.Namespace, items: list[Any]) -> dict[str, Any]:
    """The one request of `--input-text` / `--input-image`: `inputs` in command-line order, plus the flags
    that were given. `items` are its texts and (decoded) images."""
    return {"modality": args.modality, "inputs": items, **_given_flags(args)}


def build_requests(args: argparse.Namespace, prompts: list[str], images: list[Any] | None = None) -> list[dict[str, Any]]:
    """One request dict per prompt, holding the flags that were given (the rest stay "not given")."""
    images = images if images is not None else image_paths(args, len(prompts))
    given = _given_flags(args)
    reqs = []
    for prompt, image in zip(prompts, images):
        r: dict[str, Any] = {"modality": args.modality, "prompt": prompt, **given}
        if image is not None:
            r["image"] = image
        reqs.append(r)
    return reqs


def _field_message(e: Exception) -> str:
    field = getattr(e, "field", None)
    reason = getattr(e, "reason", None)
    if field and reason:
        return f"{flag_of(field)} {reason}"
    return str(e)


def _print_warnings(caught: list[warnings.WarningMessage]) -> None:
    """Each distinct warning once, as `warning: ...` (request warnings under their flag's name)."""
    seen = set()
    for w in caught:
        text = _field_message(w.message)
        if text not in seen:
            seen.add(text)
            print(f"warning: {text}; ignored" if getattr(w.message, "field", None) else f"warning: {text}",
                  file=sys.stderr)


def _load_images(paths: list[str | None], flag: str = "--image-path") -> list[Any]:
    """Decode each distinct input image once; requests share the decoded image."""
    from bagel_serve.imaging import ImageInputError, load_image

    decoded: dict[str, Any] = {}
    for path in paths:
        if path is not None and path not in decoded:
            try:
                decoded[path] = load_image(path, what=flag)
            except ImageInputError as e:
                raise CLIError(str(e)) from None
    return [decoded[p] if p is not None else None for p in paths]


def _load_input_items(pairs: list[tuple[str, str]]) -> tuple[list[Any], list[str | None]]:
    """`--input-text` / `--input-image` pairs as request items (each distinct image decoded once), and the
    source of each item (an image's path, None for a text) for the outputs' parameters."""
    paths = [value for kind, value in pairs if kind == "image"]
    decoded = iter(_load_images(paths, flag="--input-image"))
    items = [next(decoded) if kind == "image" else value for kind, value in pairs]
    return items, [value if kind == "image" else None for kind, value in pairs]


def _describe(req: Any) -> str:
    """A request's prompt for the report lines: the prompt, or its input list with images as <image>."""
    if req.inputs is None:
        return repr(req.prompt)
    return "[" + ", ".join(repr(x) if isinstance(x, str) else "<image>" for x in req.inputs) + "]"


def _resolve_deploy(args: argparse.Namespace) -> Any:
    """The deploy config these flags run (`--deploy-config`, else the default, the think pipeline's with
    --think), with the engine flags' overrides: from config files only, before the weights load, so that the
    requests are resolved once with their deploy defaults."""
    from bagel_serve.config.deploy import DeployConfigError
    from bagel_serve.config.engine_options import EngineOptionError, EngineOptions
    from bagel_serve.entrypoints.omni import resolve_deploy

    try:
        return resolve_deploy(args.deploy_config, EngineOptions.from_kwargs(engine_kwargs(args)),
                              think=bool(args.think))
    except (EngineOptionError, DeployConfigError) as e:
        raise CLIError(str(e)) from None


def run_generate(args: argparse.Namespace) -> int:
    from bagel_serve.engine.request import RequestError, RequestWarning, make_request
    from bagel_serve.entrypoints.outputs import OutputDirError, OutputExistsError, OutputPlan
    from bagel_serve.testing.demo import DEMO_MODEL, DEMO_NOTICE

    # Everything checkable without the model, before it loads.
    if args.inputs is not None:
        check_inputs_flags(args)
    else:
        prompts = read_prompts(args)
        paths = image_paths(args, len(prompts))
    deploy = _resolve_deploy(args)
    # Each input image is decoded once, here; the requests carry the decoded image (the path is kept for
    # the outputs' parameters).
    if args.inputs is not None:
        items, sources = _load_input_items(args.inputs)
        dicts, paths, input_sources = [build_inputs_request(args, items)], [None], [sources]
    else:
        dicts, input_sources = build_requests(args, prompts, _load_images(paths)), []
    # Each request is resolved once, with stage 0's defaults, as it will run: its warnings are the run's.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RequestWarning)
        try:
            reqs = [make_request(d, i, deploy.request_defaults) for i, d in enumerate(dicts)]
        except RequestError as e:
            raise CLIError(_field_message(e)) from None
    _print_warnings(caught)
    plan = OutputPlan(Path(args.output), reqs, image_sources=paths, input_sources=input_sources)
    try:
        plan.check(args.overwrite)
    except (OutputExistsError, OutputDirError) as e:
        raise CLIError(f"--output: {e}") from None
    if args.init_sleep_seconds is not None or args.shm_threshold_bytes is not None:
        print("note: --init-sleep-seconds and --shm-threshold-bytes are legacy flags of the seed system and have "
              "no effect here", file=sys.stderr)
    if args.model == DEMO_MODEL:
        print(f"WARNING: {DEMO_NOTICE}", file=sys.stderr)

    t0 = time.perf_counter()
    omni = load_omni(args, deploy.path)
    load_s = time.perf_counter() - t0
    try:
        return _generate(args, omni, reqs, plan, load_s)
    finally:
        omni.shutdown()


def _generate(args: argparse.Namespace, omni: Any, reqs: list[Any], plan: Any, load_s: float) -> int:
    from bagel_serve.engine.request import RequestError
    from bagel_serve.entrypoints.outputs import OutputWriteError, save_outputs
    from bagel_serve.pipeline.orchestrator import WorkerDiedError

    try:
        outputs = omni.generate(reqs)
    except RequestError as e:
        raise CLIError(_field_message(e)) from None
    except (WorkerDiedError, TimeoutError) as e:  # EngineShutDownError is a WorkerDiedError
        raise RunError(f"{type(e).__name__}: {e}") from None
    topology = omni.topology
    run_info = {"model": args.model, "model_dir": str(omni.model_dir), "engine": f"bagel-serve {__version__}",
                "device": str(omni.device), "dtype": str(omni.model.dtype).replace("torch.", ""),
                "pipeline": topology["pipeline"], "num_stages": topology["num_stages"],
                "worker_backend": topology["worker_backend"], "deploy_config": topology["deploy_config"],
                "command": sys.argv, "load_s": round(load_s, 3)}
    write_error = None
    try:
        entries = save_outputs(plan, outputs, args.model, __version__, run_info)
    except OutputWriteError as e:
        entries, write_error = e.entries, e

    failed = []
    for i, (req, out, entry) in enumerate(zip(reqs, outputs, entries)):
        if not out.ok:
            failed.append((i, req, out))
            print(f"[{i}] {req.modality} FAILED: {_describe(req)}: {type(out.error).__name__}: {out.error}")
            continue
        print(f"[{i}] {req.modality} seed={out.seed}: {_describe(req)}")
        if out.think_text is not None:
            print(f"    think: {out.think_text}")
        if not req.outputs_image:
            print(f"    text: {out.text}")
        print(f"    files: {', '.join(str(plan.directory / f) for f in entry['files'])}")
    if write_error is None:
        print(f"manifest: {plan.directory / 'manifest.json'}")
    stats = omni.last_stats
    if args.log_stats and stats is not None:
        stage_names = " -> ".join(topology["stages"])
        print(f"topology: {topology['pipeline']} ({topology['num_stages']} stage(s): {stage_names}), "
              f"worker backend {topology['worker_backend']}, deploy config {topology['deploy_config']}")
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
    if write_error is not None:
        raise RunError(str(write_error))
    if failed:
        lines = [f"{len(failed)} of {len(reqs)} request(s) failed (the others were saved):"]
        lines += [f"  [{i}] {_describe(req)}: {type(out.error).__name__}: {out.error}" for i, req, out in failed]
        raise RunError("\n".join(lines))
    return 0


def run_download(args: argparse.Namespace) -> int:
    from huggingface_hub import snapshot_download

    from bagel_serve.model.loader import HUB_FILES

    try:
        path = snapshot_download(args.model, revision=args.revision, local_dir=args.local_dir, allow_patterns=HUB_FILES)
    except Exception as e:  # hub errors come in many types; all mean the same to the user here
        raise RunError(f"could not download {args.model}: {type(e).__name__}: {e}") from None
    print(path)
    return 0


def _parser(prog: str, subcommands: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="BAGEL inference: text2text, img2text, text2img, img2img.",
                                allow_abbrev=False)
    p.add_argument("--version", action="version", version=f"bagel-serve {__version__}",
                   help="print the version and exit")
    if not subcommands:
        add_generate_arguments(p)
        return p
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text or images from prompts (the seed's end2end.py flags)",
                         allow_abbrev=False)
    add_generate_arguments(gen)
    srv = sub.add_parser("serve", help="serve the model over HTTP: an OpenAI-compatible API (needs the serve extra)",
                         allow_abbrev=False)
    from bagel_serve.entrypoints.server import add_serve_arguments

    add_serve_arguments(srv)
    dl = sub.add_parser("download", help="download a model's weights into the Hugging Face cache", allow_abbrev=False)
    dl.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"Hugging Face repo id (default: {DEFAULT_MODEL})")
    dl.add_argument("--revision", default=None, help="branch, tag or commit (default: the main branch)")
    dl.add_argument("--local-dir", default=None,
                    help="download into this directory instead of the cache (default: the Hugging Face cache)")
    return p


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        if getattr(args, "command", "generate") == "download":
            return run_download(args)
        if getattr(args, "command", "generate") == "serve":
            from bagel_serve.entrypoints.server import run_serve

            return run_serve(args)
        return run_generate(args)
    except CLIError as e:
        parser.exit(e.status, f"error: {e}\n")
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
