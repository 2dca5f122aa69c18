"""Generate with BAGEL through the Python API: one image and one answer.

    python examples/quickstart.py --model ByteDance-Seed/BAGEL-7B-MoT --prompt "A cute cat"
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bagel_serve import Omni


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint directory or Hugging Face repo id")
    ap.add_argument("--prompt", default="A cute cat sitting on a windowsill at sunset.")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--height", type=int, default=None, help="default: 1024 (or the model's maximum if smaller)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="outputs")
    a = ap.parse_args()

    omni = Omni(a.model)
    image_out, text_out = omni.generate([
        {"modality": "text2img", "prompt": a.prompt, "steps": a.steps, "seed": a.seed,
         "height": a.height, "width": a.width},
        {"modality": "text2text", "prompt": f"Describe this scene in one sentence: {a.prompt}", "max_tokens": 64},
    ])
    out = Path(a.output)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "quickstart.png"
    image_out.images[0].save(path)
    print(f"image: {path} (seed {image_out.seed})")
    print(f"text: {text_out.text}")


if __name__ == "__main__":
    main()
