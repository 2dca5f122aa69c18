"""The CLI at the edges: no lost work, errors instead of tracebacks, warnings instead of silence, the
default topology, deploy defaults reaching requests, and a parser whose docs hold.

Failures that are hard to cause for real (a full disk, a worker that dies while starting, an engine that
was shut down) are injected with monkeypatch, so these tests are quick and deterministic."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from bagel_serve.entrypoints.cli import _parser, main
from bagel_serve.entrypoints.outputs import read_parameters

ROOT = Path(__file__).resolve().parents[1]
INPUTS = Path(__file__).resolve().parents[2] / "shared" / "golden" / "config_a" / "inputs"
EDIT = INPUTS / "edit_rgb_150x100.png"
SMALL = ["--steps", "2", "--height", "32", "--width", "32"]
SINGLE = ["--deploy-config", "bagel_single_stage.yaml"]


def run(capsys: pytest.CaptureFixture, tiny: Path, out: Path, *flags: str, status: int = 0) -> tuple[str, str]:
    argv = ["generate", "--model", str(tiny), "--output", str(out), "--no-progress", *flags]
    if status == 0:
        assert main(argv) == 0
    else:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == status
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return cap.out, cap.err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_weight_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    import bagel_serve.model.loader as loader

    def no_load(*args, **kwargs):
        raise AssertionError("weights were read before the failure was reported")

    monkeypatch.setattr(loader, "_load_into", no_load)


# --------------------------------------------------------------------------------------------- no lost work


def test_unusable_output_directory_refused_before_loading(tiny_checkpoint: Path, tmp_path: Path, no_weight_reads,
                                                          capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import bagel_serve.entrypoints.outputs as outputs

    a_file = tmp_path / "file"
    a_file.write_text("x")
    _, err = run(capsys, tiny_checkpoint, a_file / "sub", *SINGLE, status=2)
    assert error_line(err) == f"error: --output: output directory {a_file / 'sub'} cannot be created: {a_file} is not a directory"
    _, err = run(capsys, tiny_checkpoint, a_file, *SINGLE, status=2)
    assert error_line(err) == f"error: --output: output directory {a_file} exists and is not a directory"

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    (tmp_path / "ro").mkdir()
    with monkeypatch.context() as mp:
        mp.setattr(outputs.tempfile, "mkstemp", read_only)
        _, err = run(capsys, tiny_checkpoint, tmp_path / "ro", *SINGLE, status=2)
    assert error_line(err) == f"error: --output: output directory {tmp_path / 'ro'} is not writable: Permission denied"
    with monkeypatch.context() as mp:
        mp.setattr(outputs.os, "access", lambda path, mode: False)
        _, err = run(capsys, tiny_checkpoint, tmp_path / "new" / "deeper", *SINGLE, status=2)
    assert error_line(err) == (f"error: --output: output directory {tmp_path / 'new' / 'deeper'} cannot be created: "
                               f"{tmp_path} is not writable")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ro"] and not any((tmp_path / "ro").iterdir())


def fail_second_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process orchestrator's outputs, with request 1 failed at run time."""
    from bagel_serve.engine.request import RequestOutput
    from bagel_serve.pipeline.orchestrator import Orchestrator

    real = Orchestrator.generate

    def generate(self, requests, **kwargs):
        outs = real(self, requests, **kwargs)
        outs[1] = RequestOutput(request_index=1, modality=requests[1].modality, seed=requests[1].seed,
                                error=RuntimeError("boom"))
        return outs

    monkeypatch.setattr(Orchestrator, "generate", generate)


def test_a_failed_request_keeps_the_others(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fail_second_request(monkeypatch)
    out_dir = tmp_path / "o"
    out, err = run(capsys, tiny_checkpoint, out_dir, *SINGLE, *SMALL, "--prompts", "A", "B", "C", "--seed", "3", status=1)
    assert sorted(p.name for p in out_dir.iterdir()) == ["manifest.json", "output_0_0.png", "output_2_0.png"]
    assert "[1] text2img FAILED: 'B': RuntimeError: boom" in out and "[2] text2img seed=3: 'C'" in out
    assert "error: 1 of 3 request(s) failed (the others were saved):\n  [1] 'B': RuntimeError: boom" in err
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["failed"] == [1]
    assert manifest["outputs"][1]["error"] == "RuntimeError: boom" and manifest["outputs"][1]["files"] == []
    assert manifest["outputs"][1]["parameters"]["prompt"] == "B"
    assert [e["files"] for e in manifest["outputs"][::2]] == [["output_0_0.png"], ["output_2_0.png"]]


def test_full_disk_names_the_file_and_keeps_the_rest(tiny_checkpoint: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import bagel_serve.entrypoints.outputs as outputs

    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == "output_1_0.png":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    out_dir = tmp_path / "o"
    _, err = run(capsys, tiny_checkpoint, out_dir, *SINGLE, *SMALL, "--prompts", "A", "B", "C", status=1)
    assert error_line(err) == f"error: cannot write {out_dir / 'output_1_0.png'}: No space left on device"
    assert sorted(p.name for p in out_dir.iterdir()) == ["manifest.json", "output_0_0.png", "output_2_0.png"]  # no temp files
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["outputs"][1]["write_errors"] == [f"cannot write {out_dir / 'output_1_0.png'}: No space left on device"]


def test_outputs_are_complete_files_with_normal_permissions(tiny_checkpoint: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    old = os.umask(0o022)
    try:
        run(capsys, tiny_checkpoint, tmp_path, *SINGLE, "--modality", "text2text", "--prompts", "Hi", "--max-tokens", "2")
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "output_0.txt"]
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p


# --------------------------------------------------------------------------------------------- errors, not tracebacks


@pytest.mark.parametrize("exc", ["WorkerDiedError", "TimeoutError"])
def test_worker_start_failure_is_an_error_line(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch, exc: str) -> None:
    import bagel_serve.pipeline.orchestrator as workers
    from bagel_serve.pipeline.backends.process import ProcessTransport

    message = {"WorkerDiedError": "stage 1 worker (pid 123) failed to start: RuntimeError: CUDA error: out of memory",
               "TimeoutError": "stage 1 worker (pid 123) did not become ready within init_timeout=1 s"}[exc]
    error = getattr(workers, exc, None) or TimeoutError

    def start(self, *args, **kwargs):
        raise error(message)

    monkeypatch.setattr(ProcessTransport, "__init__", start)
    _, err = run(capsys, tiny_checkpoint, tmp_path, *SMALL, status=1)  # the default: two stages, one process each
    assert error_line(err) == f"error: the engine did not start: {message}"


@pytest.mark.parametrize("exc", ["EngineShutDownError", "WorkerDiedError", "KeyboardInterrupt"])
def test_run_time_failures_are_error_lines(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch, exc: str) -> None:
    import bagel_serve.pipeline.orchestrator as workers
    from bagel_serve.pipeline.orchestrator import Orchestrator

    error = getattr(workers, exc, None) or KeyboardInterrupt

    def generate(self, *args, **kwargs):
        raise error("engine is shut down (stage 1 worker (pid 7) exited with code -9)")

    monkeypatch.setattr(Orchestrator, "generate", generate)
    status = 130 if exc == "KeyboardInterrupt" else 1
    _, err = run(capsys, tiny_checkpoint, tmp_path, *SINGLE, *SMALL, status=status)
    if status == 130:
        assert err.strip() == "interrupted"
    else:
        assert error_line(err) == f"error: {exc}: engine is shut down (stage 1 worker (pid 7) exited with code -9)"
    assert not (tmp_path / "manifest.json").exists()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bagel_serve.testing.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("sharded") / "ckpt", "tiny", seed=0, shard_bytes=8 * 2**20)


@pytest.mark.parametrize("name, content, message", [
    ("tokenizer.json", b"\x00\xffnot json", "tokenizer.json is not a readable tokenizer file"),
    ("tokenizer.json", b'{"version": "1.0"}', "tokenizer.json is not a readable tokenizer file"),
    ("config.json", b"\x00\xff{garbage", "config.json is not valid JSON"),
    ("config.json", b"[1, 2]", "config.json must hold a JSON object, got list"),
    ("config.json", b'{"llm_config": {}, "vit_config": {}, "latent_patch_size": "two"}', "config.json: latent_patch_size"),
    ("llm_config.json", b'{"hidden_size": "wide"}', "llm_config.json: malformed model config"),
    ("model.safetensors.index.json", b"{not json", "model.safetensors.index.json is not valid JSON"),
    ("model.safetensors.index.json", b'{"weight_map": [1]}', "model.safetensors.index.json has no weight_map"),
])
def test_garbage_checkpoint_files_are_error_lines(tiny_checkpoint: Path, sharded: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture, no_weight_reads,
                                                  name: str, content: bytes, message: str) -> None:
    ckpt = Path(shutil.copytree(sharded if "index" in name else tiny_checkpoint, tmp_path / "ckpt"))
    (ckpt / name).write_bytes(content)
    _, err = run(capsys, ckpt, tmp_path / "o", *SINGLE, status=2)
    line = error_line(err)
    assert str(ckpt) in line and message in line, line


def test_garbage_deploy_yaml_is_an_error_line(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                              no_weight_reads) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\xff\x00")
    _, err = run(capsys, tiny_checkpoint, tmp_path / "o", "--deploy-config", str(bad), status=2)
    assert error_line(err) == f"error: {bad}: not a text file (invalid UTF-8 at byte 0)"


def test_missing_gpus_refused_before_loading(tiny_checkpoint: Path, tmp_path: Path, no_weight_reads,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from bagel_serve import Omni
    from bagel_serve.config.devices import DeviceError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"device \(--device\) 'cuda': no CUDA GPU is available here"):
        Omni(tiny_checkpoint, device="cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError, match=r"device \(--device\) 'cuda:1': this machine has 1 CUDA GPU\(s\)"):
        Omni(tiny_checkpoint, device="cuda:1")
    yaml = tmp_path / "gpu1.yaml"
    yaml.write_text("base_config: bagel.yaml\nstages:\n  - stage_id: 1\n    devices: '1'\n")
    with pytest.raises(DeviceError, match=r"stages\[1\]\.devices: '1' names GPU 1, but this machine has 1 CUDA GPU"):
        Omni(tiny_checkpoint, device="cuda", deploy_config=yaml)


def test_ray_backend_without_ray(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch, no_weight_reads) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    _, err = run(capsys, tiny_checkpoint, tmp_path, "--worker-backend", "ray", status=2)
    assert error_line(err) == ("error: worker_backend (--worker-backend)=ray needs Ray, which is not installed: "
                               "pip install 'bagel-serve[ray]'")


# --------------------------------------------------------------------------------------------- warnings, defaults


def test_flags_a_modality_does_not_use_are_warned(tiny_checkpoint: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    _, err = run(capsys, tiny_checkpoint, tmp_path, *SINGLE, "--modality", "text2text", "--prompts", "a", "b",
                 "--max-tokens", "2", "--steps", "4", "--negative-prompt", "ugly", "--text-temperature", "0.7")
    warnings_ = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert warnings_ == ["warning: --negative-prompt is not used by text2text (a text output); ignored",
                         "warning: --steps is not used by text2text (a text output); ignored",
                         "warning: --text-temperature has no effect with greedy decoding (do_sample=False); ignored"]


def test_warnings_see_the_deploy_defaults(tiny_checkpoint: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    """A deploy config that samples (temperature 0.7) makes --top-p count: no "greedy" warning, and the run
    samples with it; the same flag on a greedy deploy config is warned about, once."""
    yaml = tmp_path / "d.yaml"
    yaml.write_text("pipeline: bagel_single_stage\nstages:\n  - stage_id: 0\n"
                    "    default_sampling_params: {temperature: 0.7}\n")
    flags = ("--modality", "text2text", "--prompts", "hi", "--max-tokens", "2", "--top-p", "0.9")
    _, err = run(capsys, tiny_checkpoint, tmp_path / "s", "--deploy-config", str(yaml), *flags)
    assert "warning:" not in err
    p = json.loads((tmp_path / "s" / "manifest.json").read_text())["outputs"][0]["parameters"]
    assert (p["do_sample"], p["text_temperature"], p["top_p"]) == (True, 0.7, 0.9)
    _, err = run(capsys, tiny_checkpoint, tmp_path / "g", *SINGLE, *flags)
    assert [ln for ln in err.splitlines() if ln.startswith("warning: ")] == [
        "warning: --top-p has no effect with greedy decoding (do_sample=False); ignored"]


def test_think_on_the_demo_model(tmp_path: Path, capsys: pytest.CaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """--think without --deploy-config picks the think pipeline for the demo model too (it is no directory or
    repo id: the default deploy file is chosen without resolving the model)."""
    monkeypatch.setenv("BAGEL_SERVE_CACHE", str(tmp_path / "cache"))
    argv = ["generate", "--model", "bagel-serve-demo", "--output", str(tmp_path / "o"), "--no-progress", "--think",
            "--max-think-tokens", "2", "--worker-backend", "inline", *SMALL]
    assert main(argv) == 0
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert (manifest["pipeline"], manifest["outputs"][0]["parameters"]["think"]) == ("bagel_think", True)


def test_default_topology_is_two_stage(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, _ = run(capsys, tiny_checkpoint, tmp_path / "two", *SMALL, "--log-stats")
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert (manifest["pipeline"], manifest["num_stages"], manifest["worker_backend"]) == ("bagel", 2, "process")
    assert manifest["deploy_config"].endswith("bagel_serve/deploy/bagel.yaml")
    assert "topology: bagel (2 stage(s): thinker -> dit), worker backend process" in out
    run(capsys, tiny_checkpoint, tmp_path / "think", *SMALL, "--think", "--max-think-tokens", "2",
        "--worker-backend", "inline")
    manifest = json.loads((tmp_path / "think" / "manifest.json").read_text())
    assert (manifest["pipeline"], manifest["worker_backend"]) == ("bagel_think", "inline")
    run(capsys, tiny_checkpoint, tmp_path / "one", *SINGLE, *SMALL)
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert (manifest["pipeline"], manifest["num_stages"], manifest["worker_backend"]) == ("bagel_single_stage", 1, "inline")


def test_deploy_sampling_defaults_reach_requests(tiny_checkpoint: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """request (CLI flag) > deploy default > built-in."""
    yaml = tmp_path / "d.yaml"
    yaml.write_text(textwrap.dedent("""\
        pipeline: bagel_single_stage
        stages:
          - stage_id: 0
            default_sampling_params: {seed: 11, max_tokens: 3, temperature: 0.5, top_k: 4}
    """))

    def params(name: str, *flags: str) -> dict:
        run(capsys, tiny_checkpoint, tmp_path / name, "--deploy-config", str(yaml), *flags)
        return json.loads((tmp_path / name / "manifest.json").read_text())["outputs"][0]["parameters"]

    assert params("a", *SMALL)["seed"] == 11
    assert params("b", *SMALL, "--seed", "5")["seed"] == 5
    p = params("c", "--modality", "text2text", "--prompts", "hi")
    assert (p["max_tokens"], p["do_sample"], p["text_temperature"], p["top_k"], p["seed"]) == (3, True, 0.5, 4, 11)
    p = params("d", "--modality", "text2text", "--prompts", "hi", "--max-tokens", "2", "--text-temperature", "0")
    assert (p["max_tokens"], p["do_sample"], p["text_temperature"]) == (2, False, 0.0)
    assert params("e", "--modality", "text2text", "--prompts", "hi", "--max-think-tokens", "5")["max_tokens"] == 3


def test_txt_prompts_bom_is_stripped(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_bytes("\ufeffA cat\r\nA dog\n".encode("utf-8"))
    run(capsys, tiny_checkpoint, tmp_path / "o", *SINGLE, "--modality", "text2text", "--max-tokens", "2",
        "--txt-prompts", str(prompts))
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert [e["parameters"]["prompt"] for e in manifest["outputs"]] == ["A cat", "A dog"]


def test_an_input_image_is_decoded_once(tiny_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    run(capsys, tiny_checkpoint, tmp_path, *SINGLE, "--modality", "img2img", "--image-path", str(EDIT), "--prompts",
        "a", "b", "--steps", "2")
    assert opened.count(str(EDIT)) == 1
    monkeypatch.setattr(Image, "open", real_open)
    assert read_parameters(tmp_path / "output_1_0.png")["image"] == str(EDIT)


# --------------------------------------------------------------------------------------------- the parser and its docs


def _actions(parser, everything: bool = False):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _actions(sub, everything)
        elif everything or not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield action


def test_every_flag_has_help_with_its_default() -> None:
    for prog, sub in (("bagel-serve", True), ("end2end.py", False)):
        for action in _actions(_parser(prog, sub)):
            assert action.help and "default" in action.help.lower(), (prog, action.dest, action.help)


def test_docs_cli_lists_every_flag() -> None:
    doc = (ROOT / "docs" / "cli.md").read_text()
    documented = set(re.findall(r"`(--[a-z0-9-]+)", doc))
    flags = {s for a in _actions(_parser("bagel-serve", True), everything=True) for s in a.option_strings if s.startswith("--")}
    assert flags - documented == set(), "flags missing from docs/cli.md"
    assert documented - flags == set(), "docs/cli.md names flags the parser does not have"


def test_abbreviations_are_off(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--ste", "3"])
    assert exc.value.code == 2 and "unrecognized arguments: --ste" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser("end2end.py", False).parse_args(["--mod", "text2text"])


# --------------------------------------------------------------------------------------------- Omni honours the deploy file


def test_deploy_dtype_and_env(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from bagel_serve import Omni
    from bagel_serve.config.deploy import DeployConfigError

    monkeypatch.delenv("BAGEL_SERVE_TEST_ENV", raising=False)
    yaml = tmp_path / "d.yaml"
    yaml.write_text("pipeline: bagel_single_stage\ndtype: bf16\nstages:\n  - stage_id: 0\n    env: {BAGEL_SERVE_TEST_ENV: 7}\n")
    omni = Omni(tiny_checkpoint, device="cpu", deploy_config=yaml)
    assert omni.model.dtype == torch.bfloat16 and os.environ["BAGEL_SERVE_TEST_ENV"] == "7"
    assert Omni(tiny_checkpoint, device="cpu", dtype="fp32", deploy_config=yaml).model.dtype == torch.float32
    monkeypatch.delenv("BAGEL_SERVE_TEST_ENV")
    clash = tmp_path / "clash.yaml"
    clash.write_text("base_config: bagel.yaml\nstages:\n  - {stage_id: 0, env: {BAGEL_SERVE_TEST_ENV: a}}\n"
                     "  - {stage_id: 1, env: {BAGEL_SERVE_TEST_ENV: b}}\n")
    with pytest.raises(DeployConfigError, match=r"stages\[1\]\.env\.BAGEL_SERVE_TEST_ENV: 'b' conflicts with stage 0's 'a'"):
        Omni(tiny_checkpoint, device="cpu", deploy_config=clash, worker_backend="inline")
    assert "BAGEL_SERVE_TEST_ENV" not in os.environ
