"""GET /v1/defaults: what each control of a request is on this server when the request leaves it out, and
the bounds the server holds requests to, under the API's field names.

The values are resolved by the engine's own `make_request` (built-in defaults under the deploy config's
`default_sampling_params`), so a client that shows them (the playground at `/`) never drifts from what a
request without them gets. `temperature` is the API's one knob for the engine's `do_sample` and
`text_temperature`: 0 when the server decodes greedily by default.
"""

from __future__ import annotations

import warnings
from typing import Any

from bagel_serve.config.sampling import MAX_STEPS, MAX_TOKENS_LIMIT, RENORM_TYPES
from bagel_serve.engine.preprocess import default_text2img_size
from bagel_serve.engine.request import RequestWarning
from bagel_serve.serving.protocol import OUTPUT_FORMATS
from bagel_serve.serving.settings import MAX_IMAGES, MAX_N, MAX_PROMPT_CHARS
from bagel_serve.testing.demo import DEMO_MODEL, DEMO_NOTICE

SIZE_MULTIPLE = 16


def server_defaults(state: Any) -> dict[str, Any]:
    """The body of GET /v1/defaults for the app's engine and settings (`state`: the app's `AppState`)."""
    omni, settings = state.omni, state.settings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RequestWarning)  # deploy defaults a modality does not use
        text, image = omni.make_requests([{"modality": "text2text", "prompt": "."},
                                          {"modality": "text2img", "prompt": "."}])
    height, width = default_text2img_size(omni.config)
    decoding = {"temperature": text.text_temperature if text.do_sample else 0.0, "top_p": text.top_p,
                "top_k": text.top_k, "repetition_penalty": text.repetition_penalty}
    image_controls = {
        "size": f"{width}x{height}", "num_inference_steps": image.steps, "seed": image.seed,
        "negative_prompt": image.negative_prompt or "", "cfg_text_scale": image.cfg_text_scale,
        "cfg_img_scale": image.cfg_img_scale, "cfg_interval": list(image.cfg_interval),
        "cfg_renorm_type": image.cfg_renorm_type, "cfg_renorm_min": image.cfg_renorm_min,
        "timestep_shift": image.timestep_shift, "enable_taylorseer": image.enable_taylorseer,
        "think": image.think, "max_think_tokens": image.max_think_tokens,
        "temperature": image.text_temperature if image.do_sample else 0.0, "n": 1, "output_format": "png"}
    return {
        "model": settings.served_model_name,
        "notice": DEMO_NOTICE if state.model == DEMO_MODEL else None,
        "text": {"max_tokens": text.max_tokens, **decoding, "seed": text.seed, "think": text.think, "n": 1},
        "image": image_controls,
        "edit": {**image_controls, "size": "auto"},
        "limits": {"max_pixels": settings.max_pixels, "max_image_side": omni.config.max_image_side,
                   "size_multiple": SIZE_MULTIPLE, "max_steps": MAX_STEPS, "max_n": MAX_N,
                   "max_tokens": MAX_TOKENS_LIMIT, "max_model_len": state.max_model_len,
                   "max_prompt_chars": MAX_PROMPT_CHARS, "max_upload_bytes": settings.max_upload_bytes,
                   "max_images": MAX_IMAGES,
                   "cfg_renorm_types": list(RENORM_TYPES), "output_formats": list(OUTPUT_FORMATS)},
    }
