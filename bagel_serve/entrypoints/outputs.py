"""Files a run leaves behind: images people can trace back to their settings, texts, and a manifest.

PNG names follow the seed system (`output_{prompt_index}_{image_index}.png`), so scripts written for it keep
working; every PNG carries its generation parameters as JSON in a `parameters` text chunk, and
`manifest.json` records the whole run. Existing files are never overwritten unless asked, and the check
runs before any generation so no work is lost to it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from bagel_serve.engine.request import Request, RequestOutput

PARAMETERS_KEY = "parameters"
MANIFEST = "manifest.json"


class OutputExistsError(FileExistsError):
    """An output file is already there and overwriting was not allowed."""


@dataclass
class OutputPlan:
    """The file names one run will write, decided before it starts."""

    directory: Path
    requests: list[Request]

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
        if overwrite:
            return
        existing = [p for p in self.planned() if p.exists()]
        if existing:
            shown = ", ".join(str(p) for p in existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
            raise OutputExistsError(f"output file(s) already exist: {shown} (pass --overwrite, or choose another --output)")


def generation_parameters(req: Request, out: RequestOutput, model: str, version: str) -> dict[str, Any]:
    """What is needed to make the same output again."""
    params: dict[str, Any] = {
        "modality": req.modality,
        "prompt": req.prompt,
        "seed": out.seed,
        "think": req.think,
        "model": model,
        "engine": f"bagel-serve {version}",
    }
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
        )
    else:
        params.update(max_tokens=req.max_tokens)
    if req.think:
        params.update(max_think_tokens=req.max_think_tokens, think_text=out.think_text)
    if req.do_sample or req.think or not req.outputs_image:
        params.update(do_sample=req.do_sample, text_temperature=req.text_temperature)
    if isinstance(req.image, (str, Path)):
        params["image"] = str(req.image)
    return params


def save_outputs(plan: OutputPlan, outputs: list[RequestOutput], model: str, version: str,
                 run_info: dict[str, Any]) -> list[dict[str, Any]]:
    """Write images, texts and the manifest; returns the manifest's per-request entries."""
    plan.directory.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (req, out) in enumerate(zip(plan.requests, outputs)):
        params = generation_parameters(req, out, model, version)
        entry: dict[str, Any] = {"index": i, "parameters": params, "files": []}
        for j, img in enumerate(out.images):
            path = plan.image_path(i, j)
            info = PngInfo()
            info.add_text(PARAMETERS_KEY, json.dumps(params, ensure_ascii=False))
            img.save(path, pnginfo=info)
            entry["files"].append(path.name)
        if not req.outputs_image:
            plan.text_path(i).write_text(out.text, encoding="utf-8")
            entry["files"].append(plan.text_path(i).name)
            entry["text"] = out.text
        if req.think and out.think_text is not None:
            plan.think_path(i).write_text(out.think_text, encoding="utf-8")
            entry["files"].append(plan.think_path(i).name)
        if out.timings:
            entry["timings_s"] = out.timings
        entries.append(entry)
    manifest = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **run_info, "outputs": entries}
    (plan.directory / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    return entries


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The generation parameters stored in one of our PNGs."""
    with Image.open(path) as img:
        return json.loads(img.text[PARAMETERS_KEY])
