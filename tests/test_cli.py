"""End-to-end CLI tests: `bagel-serve generate` and the seed's end2end.py on a tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bagel_serve.entrypoints.cli import end2end_main, main
from bagel_serve.entrypoints.outputs import read_parameters

ROOT = Path(__file__).resolve().parents[1]
INPUTS = Path(__file__).resolve().parents[2] / "shared" / "golden" / "config_a" / "inputs"
EDIT = INPUTS / "edit_rgb_150x100.png"


def gen(tiny: Path, out: Path, *flags: str) -> None:
    """A successful run; single stage unless the flags name a deploy config (the topology is not the subject)."""
    if "--deploy-config" not in flags:
        flags = ("--deploy-config", "bagel_single_stage.yaml", *flags)
    assert main(["generate", "--model", str(tiny), "--output", str(out), "--no-progress", *flags]) == 0


def fails(capsys: pytest.CaptureFixture, argv: list[str], pattern: str, status: int = 2) -> str:
    """`main(argv)` exits with `status` and one `error: ...` line containing `pattern` (single stage
    unless argv names a deploy config)."""
    if argv[0] == "generate" and "--deploy-config" not in argv:
        argv = [*argv, "--deploy-config", "bagel_single_stage.yaml"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == status
    err = capsys.readouterr().err
    assert pattern in err, err
    assert "Traceback" not in err
    return err


def test_text2img_files_parameters_manifest(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    gen(tiny_checkpoint, out, "--prompts", "A cat", "A dog", "--steps", "4", "--seed", "7", "--height", "64",
        "--width", "96", "--negative-prompt", "blurry", "--cfg-interval", "0.2", "1.0")
    for i, prompt in enumerate(["A cat", "A dog"]):
        img = Image.open(out / f"output_{i}_0.png")
        assert img.size == (96, 64)
        params = read_parameters(out / f"output_{i}_0.png")
        assert params["prompt"] == prompt and params["seed"] == 7 and params["steps"] == 4
        assert params["negative_prompt"] == "blurry" and params["cfg_interval"] == [0.2, 1.0]
        assert (params["height"], params["width"]) == (64, 96) and params["engine"].startswith("bagel-serve ")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["files"] for e in manifest["outputs"]] == [["output_0_0.png"], ["output_1_0.png"]]
    assert manifest["pipeline"] == "bagel_single_stage" and manifest["dtype"] == "float32"


def test_seed_gives_identical_pixels_and_no_silent_overwrite(tiny_checkpoint: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    flags = ["--prompts", "A red fox", "--steps", "3", "--seed", "123", "--height", "32", "--width", "32"]
    gen(tiny_checkpoint, tmp_path / "a", *flags)
    gen(tiny_checkpoint, tmp_path / "b", *flags)
    a = np.asarray(Image.open(tmp_path / "a" / "output_0_0.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "output_0_0.png"))
    assert np.array_equal(a, b)
    fails(capsys, ["generate", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "a"), *flags],
          "already exist")
    gen(tiny_checkpoint, tmp_path / "a", *flags, "--overwrite")


def test_all_modalities_think_and_prompt_file(tiny_checkpoint: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is this?\n\n  Describe the colours.  \n")
    gen(tiny_checkpoint, tmp_path / "i2t", "--modality", "img2text", "--image-path", str(EDIT), "--txt-prompts",
        str(prompts), "--max-think-tokens", "6", "--think")
    out = capsys.readouterr().out
    assert "[0] img2text" in out and "[1] img2text" in out and "'Describe the colours.'" in out
    for i in range(2):
        assert (tmp_path / "i2t" / f"output_{i}.txt").exists()
    gen(tiny_checkpoint, tmp_path / "t2t", "--modality", "text2text", "--prompts", "Hi", "--max-tokens", "5")
    text = (tmp_path / "t2t" / "output_0.txt").read_text()
    assert "text: " + text in capsys.readouterr().out
    gen(tiny_checkpoint, tmp_path / "i2i", "--modality", "img2img", "--image-path", str(EDIT), "--prompts",
        "Make it blue", "--steps", "3", "--cfg-renorm-type", "text_channel", "--think", "--max-think-tokens", "4")
    assert Image.open(tmp_path / "i2i" / "output_0_0.png").size == (128, 80)
    think = (tmp_path / "i2i" / "output_0_think.txt").read_text()
    assert read_parameters(tmp_path / "i2i" / "output_0_0.png")["think_text"] == think


def test_log_stats_and_profiler(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gen(tiny_checkpoint, tmp_path, "--prompts", "x", "--steps", "3", "--height", "32", "--width", "32",
        "--log-stats", "--enable-diffusion-pipeline-profiler")
    out = capsys.readouterr().out
    assert "denoising steps 2" in out and "context_prefill" in out and "vae_decode" in out
    assert "queue wait" in out and "KV cache peak" in out
    assert "request 0" in out


def test_log_stats_per_stage(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gen(tiny_checkpoint, tmp_path, "--prompts", "x", "--steps", "3", "--height", "32", "--width", "32",
        "--deploy-config", "bagel.yaml", "--worker-backend", "inline", "--log-stats")
    out = capsys.readouterr().out
    thinker, dit = out.split("stage 0 (thinker):")[1].split("stage 1 (dit):")
    assert "1 request(s) admitted" in thinker and "context_prefill" in thinker and "queue wait" in thinker
    assert "denoise" not in thinker and "KV cache peak" in thinker
    assert "1 request(s) admitted" in dit and "denoising steps 2" in dit and "vae_decode" in dit
    assert "images 1" in dit and "queue wait" in dit


@pytest.mark.parametrize("flags, message", [
    (["--steps", "1"], "--steps must be an integer in [2, 1000], got 1"),
    (["--steps", "1000000000"], "--steps must be an integer in [2, 1000], got 1000000000"),
    (["--height", "100"], "--height must be a multiple of 16, >= 16, got 100"),
    (["--height", "256"], "--height 256 is above this model's maximum of 128 px"),
    (["--seed", str(2**64)], "--seed must be an integer in [0, 9223372036854775807], got 18446744073709551616"),
    (["--seed", "-1"], "--seed must be an integer in [0, 9223372036854775807], got -1"),
    (["--cfg-text-scale", "inf"], "--cfg-text-scale must be a finite number > 0, got inf"),
    (["--timestep-shift", "nan"], "--timestep-shift must be a finite number > 0, got nan"),
    (["--cfg-interval", "0.9", "0.1"], "--cfg-interval must satisfy 0 <= low <= high <= 1"),
    (["--cfg-renorm-min", "2"], "--cfg-renorm-min must be a finite number in [0, 1], got 2.0"),
    (["--text-temperature", "-1"], "--text-temperature must be a finite number >= 0, got -1.0"),
    (["--top-p", "0"], "--top-p must be a finite number in (0, 1], got 0.0"),
    (["--top-k", "-1"], "--top-k must be an integer >= 0, got -1"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be a finite number > 0, got 0.0"),
    (["--max-think-tokens", "0"], "--max-think-tokens must be an integer in [1, 1048576], got 0"),
    (["--max-tokens", str(10**12)], "--max-tokens must be an integer in [1, 1048576], got 1000000000000"),
    (["--modality", "img2img"], "--image-path is required for img2img"),
    (["--image-path", str(EDIT)], "--image-path is only used by img2img and img2text"),
    (["--modality", "img2img", "--image-path", "/nonexistent.png"], "/nonexistent.png"),
    (["--txt-prompts", "/nonexistent.txt"], "--txt-prompts: file not found: /nonexistent.txt"),
    (["--tensor-parallel-size", "2"], "stages[0].devices: '0' names 1 device but tensor_parallel_size 2 = 2 ranks"),
    (["--tensor-parallel-size", "3", "--stage-overrides", '{"0": {"devices": "0,1,2"}}'],
     "stages[0].parallel_config.tensor_parallel_size: 3 must divide the model's 4 attention heads and 2 key/value heads"),
    (["--cfg-parallel-size", "2"], "stages[0].devices: '0' names 1 device but cfg_parallel_size 2 = 2 ranks"),
    (["--vae-patch-parallel-size", "2"],
     "stages[0].parallel_config.vae_patch_parallel_size: 2 is more than the stage's 1 rank"),
    (["--use-hsdp"], "stages[0].parallel_config.hsdp_shard_size: standalone HSDP (no other parallelism) needs an "
                     "explicit hsdp_shard_size"),
    (["--use-hsdp", "--hsdp-shard-size", "2"],
     "stages[0].devices: '0' names 1 device but hsdp_shard_size 2 x hsdp_replicate_size 1 = 2 ranks"),
    (["--hsdp-replicate-size", "2"], "stages[0].parallel_config.hsdp_replicate_size: 2 needs use_hsdp: true"),
    (["--use-hsdp", "--tensor-parallel-size", "2"], "HSDP cannot be combined with tensor or data parallelism"),
    (["--fp8-und"], "fp8_und: true needs quantization: fp8"),
    (["--fp8-attention"], "fp8_attention: true needs quantization: fp8"),
    (["--worker-backend", "inline", "--ray-address", "auto"], "--ray-address) places the stages with Ray"),
    (["--tensor-parallel-size", "0"], "tensor_parallel_size (--tensor-parallel-size) must be an integer >= 1, got 0"),
    (["--init-timeout", "nan"], "init_timeout (--init-timeout) must be a finite number > 0, got nan"),
    (["--request-timeout", "0"], "request_timeout (--request-timeout) must be a finite number > 0, got 0.0"),
    (["--gpu-memory-utilization", "1.5"], "gpu_memory_utilization (--gpu-memory-utilization) must be a finite number in (0, 1], got 1.5"),
    (["--kv-cache-blocks", "0"], "kv_cache_blocks (--kv-cache-blocks) must be an integer >= 1, got 0"),
    (["--max-num-seqs", "0"], "max_num_seqs (--max-num-seqs) must be an integer >= 1, got 0"),
    (["--stage-overrides", "{\"0\": {\"max_num_seq\": 2}}"], "overrides: stage 0: max_num_seq: unknown key"),
    (["--stage-overrides", "not json"], "stage_overrides (--stage-overrides): not valid JSON"),
    (["--stage-overrides", "{\"0\": 3}"], "overrides: stage 0: must be a mapping of settings, got 3"),
    (["--device", "cuda"] if not __import__("torch").cuda.is_available() else ["--device", "cuda:99"],
     "device (--device) 'cuda"),
    (["--device", "tpu"], "device (--device) 'tpu' is not a torch device"),
])
def test_bad_flags(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, flags: list[str],
                   message: str) -> None:
    fails(capsys, ["generate", "--model", str(tiny_checkpoint), "--output", str(tmp_path), *flags], message)
    assert not any(tmp_path.iterdir())  # nothing written


def test_bad_images_and_prompt_files(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(EDIT.read_bytes()[:300])
    base = ["generate", "--model", str(tiny_checkpoint), "--output", str(tmp_path / "o"), "--modality", "img2img"]
    fails(capsys, [*base, "--image-path", str(corrupt)], str(corrupt))
    notimage = tmp_path / "x.png"
    notimage.write_text("hello")
    fails(capsys, [*base, "--image-path", str(notimage)], str(notimage))
    binary = tmp_path / "p.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    fails(capsys, ["generate", "--model", str(tiny_checkpoint), "--txt-prompts", str(binary)], "--txt-prompts: cannot read")
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    fails(capsys, ["generate", "--model", str(tiny_checkpoint), "--txt-prompts", str(empty)], "has no prompts")


def test_deploy_config_errors(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    malformed = tmp_path / "bad.yaml"
    malformed.write_text("stages: [\n  - stage_id: 0\n")
    fails(capsys, ["generate", "--model", str(tiny_checkpoint), "--deploy-config", str(malformed)], "bad.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("pipeline: bagel_single_stage\nstages:\n  - stage_id: 0\n    max_num_seqz: 1\n")
    fails(capsys, ["generate", "--model", str(tiny_checkpoint), "--deploy-config", str(unknown)],
          "stages[0].max_num_seqz")
    gen(tiny_checkpoint, tmp_path / "two", "--deploy-config", "bagel.yaml",
        "--worker-backend", "inline", "--prompts", "x", "--steps", "2", "--height", "32", "--width", "32")
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["pipeline"] == "bagel"
    gen(tiny_checkpoint, tmp_path / "ok", "--deploy-config", "bagel_single_stage.yaml",
        "--prompts", "x", "--steps", "2", "--height", "32", "--width", "32")


def test_end2end_script_and_demo_model(tmp_path: Path) -> None:
    """The seed's command line, as a real subprocess, on the built-in demo model."""
    env = {"BAGEL_SERVE_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    script = ROOT / "examples" / "offline_inference" / "bagel" / "end2end.py"
    proc = subprocess.run([sys.executable, str(script), "--model", "bagel-serve-demo", "--modality", "text2img",
                           "--prompts", "A cute cat", "--steps", "3", "--output", str(tmp_path / "out"), "--seed", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM weights" in proc.stderr
    assert Image.open(tmp_path / "out" / "output_0_0.png").size == (128, 128)
    assert read_parameters(tmp_path / "out" / "output_0_0.png")["model"] == "bagel-serve-demo"


def test_end2end_help_lists_seed_flags(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        end2end_main(["--help"])
    help_text = capsys.readouterr().out
    for flag in ("--model", "--modality", "--prompts", "--txt-prompts", "--image-path", "--output", "--steps", "--seed",
                 "--think", "--max-think-tokens", "--do-sample", "--text-temperature", "--cfg-text-scale",
                 "--cfg-img-scale", "--negative-prompt", "--cfg-interval", "--cfg-renorm-type", "--cfg-renorm-min",
                 "--cfg-parallel-size", "--deploy-config", "--worker-backend", "--ray-address", "--quantization",
                 "--log-stats", "--init-timeout", "--batch-timeout", "--enable-diffusion-pipeline-profiler",
                 "--height", "--width", "--timestep-shift"):
        assert flag in help_text, flag


@pytest.mark.parametrize("kwargs, flags", [
    ({"cfg_parallel_size": 2}, ["--cfg-parallel-size", "2"]),
    ({"tensor_parallel_size": 3, "stage_overrides": {"0": {"devices": "0,1,2"}}},
     ["--tensor-parallel-size", "3", "--stage-overrides", '{"0": {"devices": "0,1,2"}}']),
    ({"use_hsdp": True, "hsdp_shard_size": 2}, ["--use-hsdp", "--hsdp-shard-size", "2"]),
    ({"worker_backend": "multi_process", "ray_address": "auto"}, ["--worker-backend", "multi_process", "--ray-address", "auto"]),
    ({"tensor_parallel_size": 0}, ["--tensor-parallel-size", "0"]),
    ({"fp8_und": True}, ["--fp8-und"]),
    ({"fp8_attention": True}, ["--fp8-attention"]),
])
def test_omni_kwargs_say_what_the_cli_says(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                           kwargs: dict, flags: list[str]) -> None:
    from bagel_serve import Omni

    with pytest.raises((ValueError, NotImplementedError)) as exc:
        Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_single_stage.yaml", **kwargs)
    fails(capsys, ["generate", "--model", str(tiny_checkpoint), "--output", str(tmp_path), *flags], str(exc.value))


def test_omni_rejects_unknown_kwargs(tiny_checkpoint: Path) -> None:
    from bagel_serve import Omni

    with pytest.raises(TypeError, match="unknown engine option.*tensor_paralel_size"):
        Omni(tiny_checkpoint, tensor_paralel_size=2)


def test_download_offline_says_why(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hc

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    fails(capsys, ["download", "someone/missing-model", "--local-dir", str(tmp_path / "dl")],
          "could not download someone/missing-model", status=1)
