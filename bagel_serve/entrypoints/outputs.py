"""Files a run leaves behind: images people can trace back to their settings, texts, and a manifest.

PNG names follow the seed system (`output_{prompt_index}_{image_index}.png`), so scripts written for it keep
working; every PNG carries its generation parameters as JSON in a `parameters` text chunk, and
`manifest.json` records the whole run, failed requests included (with their error).

No work is lost to the file system: the output directory is checked (exists or can be created, writable)
and existing files are refused unless asked, both before any generation; every file is written to a
temporary file in the same directory and renamed into place (`os.replace`), so a file is either complete or
absent; a write that fails (a full disk, say) is an `OutputWriteError` naming the file, raised after every
other file and the manifest were attempted.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Callable

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from bagel_serve.engine.request import Request, RequestOutput

PARAMETERS_KEY = "parameters"
MANIFEST = "manifest.json"


class OutputExistsError(FileExistsError):
    """An output file is already there and overwriting was not allowed."""


class OutputDirError(OSError):
    """The output directory cannot be used (not a directory, cannot be created, not writable)."""


class OutputWriteError(OSError):
    """An output file could not be written; the message names it. `failures` lists every file that failed
    (path, reason); `entries` are the manifest entries of what was saved (from `save_outputs`)."""

    def __init__(self, message: str, failures: list[tuple[Path, str]] | None = None,
                 entries: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or []
        self.entries = entries or []

    def __str__(self) -> str:
        return self.args[0]


@dataclass
class OutputPlan:
    """The file names one run will write, decided before it starts. `image_sources[i]` is the path request
    i's input image was read from (recorded in its parameters; the request itself holds the decoded image);
    `input_sources[i]`, for a request with `inputs`, the path of each of its items that is an image read from a
    file (None for the others)."""

    directory: Path
    requests: list[Request]
    image_sources: list[str | None] = field(default_factory=list)
    input_sources: list[list[str | None]] = field(default_factory=list)

    def image_path(self, index: int, image_index: int = 0) -> Path:
        return self.directory / f"output_{index}_{image_index}.png"

    def text_path(self, index: int) -> Path:
        return self.directory / f"output_{index}.txt"

    def think_path(self, index: int) -> Path:
        return self.directory / f"output_{index}_think.txt"

    def planned(self) -> list[Path]:
        paths = [self.directory / MANIFEST]
        for i, r in enumerate(self.requests):
            paths.append(self.image_path(i) if r.outputs_image else self.text_path(i))
            if r.think:
                paths.append(self.think_path(i))
        return paths

    def check(self, overwrite: bool) -> None:
        """Refuse existing output files (unless `overwrite`), and a directory that cannot be written."""
        check_output_dir(self.directory)
        if overwrite:
            return
        existing = [p for p in self.planned() if p.exists()]
        if existing:
            shown = ", ".join(str(p) for p in existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
            raise OutputExistsError(f"output file(s) already exist: {shown} (pass --overwrite, or choose another --output)")

    def source(self, index: int) -> str | None:
        return self.image_sources[index] if index < len(self.image_sources) else None

    def input_source(self, index: int) -> list[str | None] | None:
        return self.input_sources[index] if index < len(self.input_sources) else None


def check_output_dir(directory: Path) -> None:
    """The directory exists and takes a new file, or can be created; else OutputDirError saying why.
    Nothing is left behind (the directory itself is created only when the outputs are saved)."""
    d = Path(directory)
    if d.exists():
        if not d.is_dir():
            raise OutputDirError(f"output directory {d} exists and is not a directory")
        try:
            fd, probe = tempfile.mkstemp(dir=d, prefix=".bagel-serve-probe-")
        except OSError as e:
            raise OutputDirError(f"output directory {d} is not writable: {e.strerror or e}") from None
        os.close(fd)
        os.unlink(probe)
        return
    parent = d.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputDirError(f"output directory {d} cannot be created: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"output directory {d} cannot be created: {parent} is not writable")


def recorded_inputs(req: Request, sources: list[str | None] | None = None) -> list[dict[str, str | None]]:
    """A request's `inputs` as the parameters record them, in order (the golden cases' own form): `{"text": t}`
    per text, `{"image": path}` per image — its source path (`sources`, else the item itself when it is a
    path), None for an image given in memory."""
    out: list[dict[str, str | None]] = []
    for k, item in enumerate(req.inputs or []):
        if isinstance(item, str):
            out.append({"text": item})
            continue
        source = sources[k] if sources is not None and k < len(sources) else None
        if source is None and isinstance(item, os.PathLike):
            source = os.fspath(item)
        out.append({"image": source})
    return out


def generation_parameters(req: Request, out: RequestOutput, model: str, version: str,
                          image_source: str | None = None,
                          input_sources: list[str | None] | None = None) -> dict[str, Any]:
    """What is needed to make the same output again."""
    params: dict[str, Any] = {"modality": req.modality}
    if req.inputs is not None:
        params["inputs"] = recorded_inputs(req, input_sources)
    else:
        params["prompt"] = req.prompt
    params.update(seed=out.seed, think=req.think, model=model, engine=f"bagel-serve {version}")
    if req.outputs_image:
        width, height = out.images[0].size if out.images else (req.width, req.height)
        params.update(
            negative_prompt=req.negative_prompt,
            steps=req.steps,
            height=height,
            width=width,
            cfg_text_scale=req.cfg_text_scale,
            cfg_img_scale=req.cfg_img_scale,
            cfg_interval=list(req.cfg_interval),
            cfg_renorm_type=req.cfg_renorm_type,
            cfg_renorm_min=req.cfg_renorm_min,
            timestep_shift=req.timestep_shift,
            enable_taylorseer=req.enable_taylorseer,
        )
    else:
        params.update(max_tokens=req.max_tokens)
    if req.think:
        params.update(max_think_tokens=req.max_think_tokens, think_text=out.think_text)
    if req.do_sample or req.think or not req.outputs_image:
        params.update(do_sample=req.do_sample, text_temperature=req.text_temperature, top_k=req.top_k,
                      top_p=req.top_p, repetition_penalty=req.repetition_penalty)
    if image_source is not None:
        params["image"] = image_source
    elif isinstance(req.image, (str, os.PathLike)):
        params["image"] = str(req.image)
    return params


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file through a temporary file in its directory, renamed into place: `path` is either
    complete or untouched. Any failure is an OutputWriteError naming `path`."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputWriteError(f"cannot write {path}: {e.strerror or e}", [(path, str(e.strerror or e))]) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _error_text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def save_outputs(plan: OutputPlan, outputs: list[RequestOutput], model: str, version: str,
                 run_info: dict[str, Any]) -> list[dict[str, Any]]:
    """Write every good result's images and texts, then the manifest (failed requests recorded with their
    error); returns the manifest's per-request entries. Raises OutputWriteError, after trying every other
    file, if any file could not be written."""
    try:
        plan.directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(f"cannot create output directory {plan.directory}: {e.strerror or e}",
                               [(plan.directory, str(e.strerror or e))]) from None
    failures: list[tuple[Path, str]] = []

    def attempt(path: Path, write: Callable[[IO[bytes]], None], entry: dict[str, Any]) -> None:
        try:
            write_atomic(path, write)
        except OutputWriteError as e:
            failures.extend(e.failures)
            entry.setdefault("write_errors", []).append(str(e))
        else:
            entry["files"].append(path.name)

    entries = []
    for i, (req, out) in enumerate(zip(plan.requests, outputs)):
        params = generation_parameters(req, out, model, version, plan.source(i), plan.input_source(i))
        entry: dict[str, Any] = {"index": i, "parameters": params, "files": []}
        entries.append(entry)
        if not out.ok:
            entry["error"] = _error_text(out.error)
            continue
        for j, img in enumerate(out.images):
            info = PngInfo()
            info.add_text(PARAMETERS_KEY, json.dumps(params, ensure_ascii=False))
            attempt(plan.image_path(i, j), lambda f, img=img, info=info: img.save(f, format="PNG", pnginfo=info), entry)
        if not req.outputs_image:
            attempt(plan.text_path(i), lambda f, t=out.text: f.write(t.encode("utf-8")), entry)
            entry["text"] = out.text
        if req.think and out.think_text is not None:
            attempt(plan.think_path(i), lambda f, t=out.think_text: f.write(t.encode("utf-8")), entry)
        if out.timings:
            entry["timings_s"] = out.timings
    failed = [e["index"] for e in entries if "error" in e]
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **run_info, "outputs": entries, "failed": failed}
    text = json.dumps(manifest, indent=2, ensure_ascii=False).encode("utf-8")
    try:
        write_atomic(plan.directory / MANIFEST, lambda f: f.write(text))
    except OutputWriteError as e:
        failures.extend(e.failures)
    if failures:
        path, reason = failures[0]
        more = f" (and {len(failures) - 1} more file(s))" if len(failures) > 1 else ""
        raise OutputWriteError(f"cannot write {path}: {reason}{more}", failures, entries)
    return entries


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The generation parameters stored in one of our PNGs."""
    with Image.open(path) as img:
        return json.loads(img.text[PARAMETERS_KEY])
