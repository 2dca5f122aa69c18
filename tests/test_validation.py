"""The one validator (config/validate.py) and the requests and engine options built on it: types, bounds,
defaults and their precedence, warnings. No model is needed: these run in milliseconds."""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_serve.config.engine_options import EngineOptionError, EngineOptions
from bagel_serve.config.sampling import SamplingParams
from bagel_serve.config.validate import ValidationError, check, expected
from bagel_serve.engine.request import (
    IMAGE_ONLY_FIELDS,
    Request,
    RequestError,
    RequestWarning,
    make_request,
    request_defaults,
)

T2I = {"modality": "text2img", "prompt": "a cat"}
T2T = {"modality": "text2text", "prompt": "hi"}


def quiet(obj, index: int = 0, defaults=None) -> Request:
    """make_request that fails the test on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return make_request(obj, index, defaults)


def warned(obj, defaults=None) -> list[RequestWarning]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_request(obj, 0, defaults)
    return [w.message for w in caught if isinstance(w.message, RequestWarning)]


# --------------------------------------------------------------------------------------------- the validator


@pytest.mark.parametrize("value, tp, out", [
    (np.int64(7), int, 7), (np.uint8(3), int, 3), (np.float32(0.5), float, 0.5), (2, float, 2.0),
    (np.int32(2), float, 2.0), (np.bool_(True), bool, True), (False, bool, False), ("x", str, "x"),
    ([1, 2], tuple[float, float], (1.0, 2.0)), (np.array([0.1, 0.9]), tuple[float, float], (0.1, 0.9)),
    (None, int | None, None),
])
def test_accepted_values(value, tp, out) -> None:
    got = check(value, tp, "f")
    assert got == out and type(got) is type(out)


@pytest.mark.parametrize("value, tp, reason", [
    ("no", bool, "must be true or false, got 'no'"),
    (1, bool, "must be true or false, got 1"),
    (True, int, "must be an integer, got True"),
    (np.bool_(True), int, "must be an integer, got np.True_"),
    (2.0, int, "must be an integer, got 2.0"),
    ("3", int, "must be an integer, got '3'"),
    (True, float, "must be a finite number, got True"),
    (float("nan"), float, "must be a finite number, got nan"),
    (float("-inf"), float, "must be a finite number, got -inf"),
    (np.float64("inf"), float, "must be a finite number, got "),
    (10**400, float, "must be a finite number, got "),
    (3, str, "must be a string, got 3"),
    ([1], tuple[float, float], "must be 2 values, got [1]"),
    ("ab", tuple[float, float], "must be 2 values, got 'ab'"),
])
def test_refused_values(value, tp, reason) -> None:
    with pytest.raises(ValidationError) as info:
        check(value, tp, "f")
    assert info.value.path == "f" and info.value.reason.startswith(reason), info.value.reason


def test_bounds_and_words() -> None:
    assert expected(int, {"ge": 2, "le": 1000}) == "an integer in [2, 1000]"
    assert expected(float | None, {"gt": 0.0, "le": 1.0}) == "a finite number in (0, 1] or null"
    assert expected(float | None, {"gt": 0.0}, style="python") == "a finite number > 0 or None"
    assert expected(int, {"ge": 16, "multiple_of": 16}) == "a multiple of 16, >= 16"
    assert expected(str, {"choices": ("a", "b")}) == "one of a, b"
    with pytest.raises(ValidationError, match=r"must be an integer in \[2, 1000\], got 1001"):
        check(1001, int, "steps", {"ge": 2, "le": 1000})
    with pytest.raises(ValidationError, match=r"must be a finite number in \(0, 1\], got 0"):
        check(0, float, "top_p", {"gt": 0.0, "le": 1.0})
    with pytest.raises(ValidationError, match="must be a multiple of 16, >= 16, got 24"):
        check(24, int, "height", {"ge": 16, "multiple_of": 16})


def test_nested_paths() -> None:
    with pytest.raises(ValidationError) as info:
        check({"a": [1, "x"]}, dict[str, list[int]], "m")
    assert info.value.path == "m.a[1]" and info.value.reason == "must be an integer, got 'x'"


# --------------------------------------------------------------------------------------------- request types


FLOAT_FIELDS = [f.name for f in dataclasses.fields(Request)
                if typing.get_type_hints(Request)[f.name] == (float | None)]


def test_every_float_field_is_covered() -> None:
    assert set(FLOAT_FIELDS) == {"text_temperature", "top_p", "repetition_penalty", "cfg_text_scale", "cfg_img_scale",
                                 "cfg_renorm_min", "timestep_shift"}


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -math.inf])
def test_nan_and_inf_refused_for_every_float(name: str, value: float) -> None:
    with pytest.raises(RequestError) as info:
        make_request({**T2I, name: value}, 3)
    assert str(info.value).startswith(f"request 3: {name} must be a finite number")
    assert info.value.field == name and "got" in info.value.reason


@pytest.mark.parametrize("name, value, reason", [
    ("think", "no", "must be True or False, got 'no'"),
    ("do_sample", 1, "must be True or False, got 1"),
    ("return_latents", "yes", "must be True or False, got 'yes'"),
    ("steps", 1, "must be an integer in [2, 1000], got 1"),
    ("steps", 1_000_000_000, "must be an integer in [2, 1000], got 1000000000"),
    ("steps", 3.0, "must be an integer in [2, 1000], got 3.0"),
    ("seed", 2**64, "must be an integer in [0, 9223372036854775807], got 18446744073709551616"),
    ("seed", -1, "must be an integer in [0, 9223372036854775807], got -1"),
    ("max_tokens", 10**12, "must be an integer in [1, 1048576], got 1000000000000"),
    ("max_think_tokens", 0, "must be an integer in [1, 1048576], got 0"),
    ("height", 8, "must be a multiple of 16, >= 16, got 8"),
    ("width", 0, "must be a multiple of 16, >= 16, got 0"),
    ("top_k", -1, "must be an integer >= 0, got -1"),
    ("top_p", 1.5, "must be a finite number in (0, 1], got 1.5"),
    ("repetition_penalty", 0, "must be a finite number > 0, got 0"),
    ("cfg_text_scale", 0, "must be a finite number > 0, got 0"),
    ("cfg_renorm_type", "local", "must be one of global, channel, text_channel, got 'local'"),
    ("prompt", 5, "must be a string, got 5"),
    ("negative_prompt", 5, "must be a string, got 5"),
    ("noise", [[0.0]], "must be a torch.Tensor of shape (tokens, latent dim), got [[0.0]]"),
    ("image", 3, "must be a PIL image or a path, got 3"),
])
def test_request_fields_refused_by_name(name: str, value, reason: str) -> None:
    with pytest.raises(RequestError) as info:
        make_request({**T2I, name: value})
    assert str(info.value) == f"request 0: {name} {reason}"
    assert (info.value.field, info.value.reason) == (name, reason)


def test_numpy_integers_and_floats_are_accepted() -> None:
    r = quiet({**T2I, "steps": np.int64(4), "seed": np.uint32(7), "height": np.int16(32), "cfg_text_scale": np.float32(2.5),
               "cfg_interval": np.array([0.0, 1.0]), "think": np.bool_(False)})
    assert (r.steps, r.seed, r.height, r.cfg_text_scale, r.cfg_interval, r.think) == (4, 7, 32, 2.5, (0.0, 1.0), False)
    assert type(r.steps) is int and type(r.seed) is int and type(r.cfg_text_scale) is float


@pytest.mark.parametrize("noise, reason", [
    (torch.full((4, 16), float("nan")), "must be finite (it holds NaN or inf values)"),
    (torch.tensor([[0.0, float("inf")]]), "must be finite (it holds NaN or inf values)"),
    (torch.zeros(4, 16, 2), "must be a 2-D floating-point tensor (tokens, latent dim), got 3-D float32"),
    (torch.zeros(4, 16, dtype=torch.int64), "must be a 2-D floating-point tensor (tokens, latent dim), got 2-D int64"),
])
def test_bad_noise(noise: torch.Tensor, reason: str) -> None:
    with pytest.raises(RequestError) as info:
        make_request({**T2I, "noise": noise})
    assert info.value.reason == reason


def test_image_rules() -> None:
    with pytest.raises(RequestError, match="request 0: image is required for img2text"):
        make_request({"modality": "img2text", "prompt": "x"})
    r = quiet({"modality": "img2img", "prompt": "x", "image": Image.new("RGB", (32, 32))})
    assert isinstance(r.image, Image.Image)


# --------------------------------------------------------------------------------------------- defaults


def test_builtin_defaults_resolved() -> None:
    r = quiet(T2I)
    assert (r.think, r.steps, r.cfg_text_scale, r.cfg_img_scale, r.cfg_interval, r.cfg_renorm_type, r.timestep_shift,
            r.do_sample, r.text_temperature, r.top_k, r.top_p, r.repetition_penalty, r.max_think_tokens, r.seed) == \
        (False, 50, 4.0, 1.5, (0.4, 1.0), "global", 3.0, False, 0.3, 0, 1.0, 1.0, 1000, None)
    assert quiet(T2T).max_tokens == 1000  # not given anywhere: max_think_tokens
    assert quiet({**T2T, "max_think_tokens": 7}).max_tokens == 7  # one rule: the seed's --max-think-tokens budget
    assert quiet({**T2T, "max_tokens": 3}).max_tokens == 3


def test_request_object_fields_at_their_default_count_as_not_given() -> None:
    defaults = {"seed": 52, "text_temperature": 0.7, "do_sample": True}
    r = quiet(Request("text2img", "a cat", think=True), 0, defaults)
    assert (r.seed, r.text_temperature, r.do_sample) == (52, 0.7, True)
    r = quiet(Request("text2img", "a cat", seed=1, think=True), 0, defaults)
    assert r.seed == 1


def test_precedence_request_over_defaults_over_builtin() -> None:
    defaults = request_defaults(SamplingParams(temperature=0.4, top_p=0.9, top_k=1, max_tokens=2048, seed=52,
                                               repetition_penalty=1.05))
    assert defaults == {"text_temperature": 0.4, "do_sample": True, "top_p": 0.9, "top_k": 1, "max_tokens": 2048,
                        "seed": 52, "repetition_penalty": 1.05}
    r = quiet({**T2T, "seed": 5}, 0, defaults)
    assert (r.seed, r.text_temperature, r.do_sample, r.top_p, r.top_k, r.max_tokens, r.repetition_penalty) == \
        (5, 0.4, True, 0.9, 1, 2048, 1.05)
    r = quiet({**T2T, "do_sample": False, "max_tokens": 9}, 0, defaults)  # the request's own values win
    assert (r.do_sample, r.max_tokens, r.seed) == (False, 9, 52)
    assert quiet({**T2T, "max_think_tokens": 3}, 0, defaults).max_tokens == 2048  # deploy default > built-in rule
    greedy = request_defaults({"temperature": 0})
    assert greedy == {"text_temperature": 0.0, "do_sample": False}
    with pytest.raises(RequestError, match=r"request 0: seed \(default\) must be an integer"):
        make_request(T2T, 0, {"seed": -3})


def test_temperature_zero_is_greedy() -> None:
    r = quiet({**T2T, "do_sample": True, "text_temperature": 0})
    assert (r.do_sample, r.text_temperature) == (False, 0.0)


def test_a_resolved_request_is_checked_again_not_redefaulted() -> None:
    r = quiet(T2T, 0, {"seed": 52})
    again = quiet(r, 4, {"seed": 99})
    assert again.seed == 52 and again == r
    r.steps = 10**9  # changed after validation
    with pytest.raises(RequestError, match=r"request 4: steps must be an integer in \[2, 1000\]"):
        make_request(r, 4)


# --------------------------------------------------------------------------------------------- warnings


@pytest.mark.parametrize("modality", ["text2text", "img2text"])
@pytest.mark.parametrize("name", IMAGE_ONLY_FIELDS)
def test_image_fields_on_text_outputs_are_warned(modality: str, name: str) -> None:
    values = {"negative_prompt": "x", "steps": 4, "height": 32, "width": 32, "cfg_text_scale": 2.0, "cfg_img_scale": 2.0,
              "cfg_interval": (0.0, 1.0), "cfg_renorm_type": "channel", "cfg_renorm_min": 0.5, "timestep_shift": 2.0,
              "return_latents": True, "noise": torch.zeros(4, 16), "enable_taylorseer": True}
    req = {"modality": modality, "prompt": "x", name: values[name]}
    if modality == "img2text":
        req["image"] = Image.new("RGB", (32, 32))
    (w,) = warned(req)
    assert w.field == name and str(w) == f"request 0: {name} is not used by {modality} (a text output); ignored"


@pytest.mark.parametrize("req, field, reason", [
    ({**T2I, "max_tokens": 10}, "max_tokens", "is not used by text2img (an image output; max_think_tokens bounds its think plan)"),
    ({**T2I, "max_think_tokens": 10}, "max_think_tokens", "is only used by text2img with think=True"),
    ({**T2I, "do_sample": True}, "do_sample", "is only used by text2img with think=True"),
    ({**T2I, "text_temperature": 0.5}, "text_temperature", "is only used by text2img with think=True"),
    ({**T2T, "text_temperature": 0.5}, "text_temperature", "has no effect with greedy decoding (do_sample=False)"),
    ({**T2T, "top_p": 0.5}, "top_p", "has no effect with greedy decoding"),
    ({**T2I, "think": True, "top_k": 5}, "top_k", "has no effect with greedy decoding"),
    ({**T2T, "seed": 3}, "seed", "has no effect: text2text decodes greedily (do_sample=False)"),
    ({**T2T, "max_tokens": 5, "max_think_tokens": 5}, "max_think_tokens", "is not used by text2text when max_tokens is given"),
])
def test_unused_fields_are_warned(req: dict, field: str, reason: str) -> None:
    (w,) = warned(req)
    assert w.field == field and w.reason.startswith(reason)


@pytest.mark.parametrize("req", [
    T2I, T2T, {**T2T, "do_sample": True, "text_temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 1},
    {**T2T, "text_temperature": 0}, {**T2I, "think": True, "max_think_tokens": 10, "seed": 3, "steps": 4},
    {**T2T, "max_think_tokens": 10},
])
def test_applicable_fields_are_not_warned(req: dict) -> None:
    quiet(req)


def test_deploy_defaults_are_never_warned() -> None:
    quiet(T2I, 0, request_defaults({"temperature": 0.4, "max_tokens": 10, "seed": 1}))


# --------------------------------------------------------------------------------------------- engine options


def test_engine_options_types() -> None:
    opts = EngineOptions.from_kwargs({"max_num_seqs": np.int64(4), "init_timeout": 2, "enforce_eager": True,
                                      "kv_cache_blocks": 64, "request_timeout": 1.5})
    assert (opts.max_num_seqs, opts.init_timeout, opts.request_timeout) == (4, 2.0, 1.5)
    assert opts.deploy_overrides(())["kv_cache_blocks"] == 64 and opts.deploy_overrides(())["enforce_eager"] is True
    assert EngineOptions().request_timeout == 60.0
    for kwargs, message in [
        ({"log_stats": "yes"}, "log_stats (--log-stats) must be True or False, got 'yes'"),
        ({"max_num_seqs": True}, "max_num_seqs (--max-num-seqs) must be an integer >= 1, got True"),
        ({"batch_timeout": float("inf")}, "batch_timeout (--batch-timeout) must be a finite number > 0, got inf"),
        ({"worker_backend": "threads"}, "worker_backend (--worker-backend) must be one of process, multi_process, "
                                        "inline, ray, got 'threads'"),
        ({"hsdp_shard_size": 0}, "hsdp_shard_size (--hsdp-shard-size) must be -1 (auto) or an integer >= 1, got 0"),
    ]:
        with pytest.raises(EngineOptionError) as info:
            EngineOptions.from_kwargs(kwargs)
        assert str(info.value) == message


def test_ray_backend_without_ray_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    opts = EngineOptions.from_kwargs({"worker_backend": "ray"})
    with pytest.raises(EngineOptionError, match=r"worker_backend \(--worker-backend\)=ray needs Ray, which is not "
                                                r"installed: pip install 'bagel-serve\[ray\]'"):
        opts.require_runnable(2)
