"""TaylorSeer step caching (`engine.step_cache`, request field `enable_taylorseer`): the refresh schedule, the
factor update and Taylor formula by hand, a tiny-model text2img / img2img run against a reference that follows
the official per-layer algorithm literally, and the switch's plumbing (field, CLI flag, deploy default)."""

from __future__ import annotations

import math
import textwrap
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from bagel_serve import Omni
from bagel_serve.config.deploy import DeployConfigError
from bagel_serve.config.deploy_loader import load_deploy_config
from bagel_serve.config.engine_options import EngineOptions
from bagel_serve.engine.diffusion import combine_cfg, flow_schedule
from bagel_serve.engine.request import RequestError, RequestWarning, make_request, request_defaults
from bagel_serve.engine.sequence import Work
from bagel_serve.engine.stage_engine import release_contexts
from bagel_serve.engine.step_cache import StepCache, TaylorState
from bagel_serve.entrypoints.cli import _parser, build_requests
from bagel_serve.entrypoints.omni import resolve_deploy
from bagel_serve.entrypoints.outputs import generation_parameters
from bagel_serve.model.layout import LatentPiece, flattened_position_ids, latent_grid

EDIT = Path(__file__).resolve().parents[2] / "shared" / "golden" / "config_a" / "inputs" / "edit_rgb_150x100.png"
FULL_OF_50 = [0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 37, 40, 43, 46, 49]
"""The official schedule's full evaluations of a branch evaluated 50 times (first 5, then every third)."""


def run_state(state: TaylorState, hidden) -> list[bool]:
    """Evaluate a branch as the denoising loop does (hidden(i): its rows at evaluation i); which were full."""
    kinds = []
    for i in range(len(hidden)):
        full = state.next_is_full()
        kinds.append(full)
        state.refresh(hidden[i]) if full else state.predict()
    return kinds


# --------------------------------------------------------------------------------------------- the schedule


def test_schedule_of_50_evaluations() -> None:
    kinds = run_state(TaylorState(), [torch.zeros(2)] * 50)
    assert [i for i, full in enumerate(kinds) if full] == FULL_OF_50


def test_each_branch_counts_only_its_own_evaluations() -> None:
    """The conditional branch runs every step, the text-dropped one only on steps 10..29: its schedule starts at
    its own first evaluation, and neither disturbs the other."""
    cache, full = StepCache(), {"cond": [], "text": []}
    for step in range(50):
        for b in ("cond", "text") if 10 <= step < 30 else ("cond",):
            if cache.is_full(b):
                full[b].append(step)
                cache.refresh(b, torch.zeros(2))
            else:
                cache.predict(b)
    assert full["cond"] == FULL_OF_50
    assert full["text"] == [10, 11, 12, 13, 14, 17, 20, 23, 26, 29]
    assert cache.evaluations("cond") == 50 and cache.evaluations("text") == 20
    cache.clear()
    assert cache.evaluations("cond") == 0


def test_wrong_kind_of_evaluation_is_refused() -> None:
    s = TaylorState()
    with pytest.raises(RuntimeError, match="must be full"):
        s.predict()
    run_state(s, [torch.zeros(1)] * 5)
    with pytest.raises(RuntimeError, match="is a predicted one"):
        s.refresh(torch.zeros(1))


# --------------------------------------------------------------------------------------------- the arithmetic


def test_factors_and_predictions_by_hand() -> None:
    """h(i) = [i^2, 1]. Full at 0..4: derivatives only from evaluation 4 (= first full steps - 1) on; then the
    distance between full evaluations is 3."""
    h = [torch.tensor([float(i * i), 1.0]) for i in range(12)]
    s = TaylorState()
    for i in range(4):
        s.refresh(h[i])
        assert len(s.factors) == 1 and torch.equal(s.factors[0], h[i])
    s.refresh(h[4])
    assert [f.tolist() for f in s.factors] == [[16.0, 1.0], [7.0, 0.0]]
    assert s.predict().tolist() == [23.0, 1.0]  # x = 1: 16 + 7
    assert s.predict().tolist() == [30.0, 1.0]  # x = 2: 16 + 7 * 2
    s.refresh(h[7])  # f1 = (49 - 16) / 3 = 11, f2 = (11 - 7) / 3
    assert torch.allclose(torch.stack(s.factors), torch.tensor([[49.0, 1.0], [11.0, 0.0], [4 / 3, 0.0]]))
    assert torch.allclose(s.predict(), torch.tensor([49 + 11 + (4 / 3) / 2, 1.0]))  # x = 1
    assert torch.allclose(s.predict(), torch.tensor([49 + 22 + (4 / 3) * 4 / 2, 1.0]))  # x = 2
    s.refresh(h[10])  # f1 = 17, f2 = 2, f3 = (2 - 4/3) / 3
    assert torch.allclose(torch.stack(s.factors), torch.tensor([[100.0, 1], [17, 0], [2, 0], [2 / 9, 0]]))
    assert torch.allclose(s.predict(), torch.tensor([100 + 17 + 2 / 2 + (2 / 9) / 6, 1.0]))


def test_order_stops_at_six() -> None:
    s = TaylorState()
    run_state(s, [torch.full((3,), float(i) ** 8) for i in range(40)])
    assert len(s.factors) == 7


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_arithmetic_is_the_official_expression_in_the_hidden_dtype(dtype: torch.dtype) -> None:
    """Bit for bit the official operations: (new - old) / d and sum (1 / i!) * f_i * x**i, in the rows' dtype."""
    g = torch.Generator().manual_seed(0)
    hidden = [torch.randn(4, 8, generator=g).to(dtype) for _ in range(20)]
    s, old = TaylorState(), None
    for i in range(20):
        if s.next_is_full():
            prev, last = old, s.last_full
            s.refresh(hidden[i])
            want = [hidden[i]]
            for k in range(6):
                if prev is None or k >= len(prev) or i <= 3:
                    break
                want.append((want[k] - prev[k]) / (i - last))
            assert all(a.dtype == dtype and torch.equal(a, b) for a, b in zip(s.factors, want, strict=True))
            old = list(s.factors)
        else:
            x, expected = i - s.last_full, 0
            for k in range(len(old)):
                expected += (1 / math.factorial(k)) * old[k] * (x**k)
            got = s.predict()
            assert got.dtype == dtype and torch.equal(got, expected)


# --------------------------------------------------------------------------------------------- a tiny model


@pytest.fixture(scope="module")
def omni(tiny_checkpoint: Path) -> Omni:
    return Omni(tiny_checkpoint, device="cpu", deploy_config="bagel_single_stage.yaml")


class OfficialBranch:
    """The official per-layer cache of one CFG branch, literally: `cal_type` per forward, every decoder layer's
    output cached and differenced on full steps, every layer predicted on Taylor steps (its input ignored)."""

    def __init__(self, layers: int) -> None:
        self.step, self.counter, self.activated, self.type = 0, 0, [0], None
        self.cache: dict[int, dict[int, torch.Tensor]] = {i: {} for i in range(layers)}

    def cal_type(self) -> None:
        if self.step < 5 or self.counter == 3 - 1:
            self.type, self.counter = "full", 0
            self.activated.append(self.step)
        else:
            self.type = "Taylor"
            self.counter += 1

    def derivative_approximation(self, layer: int, feature: torch.Tensor) -> None:
        d = self.activated[-1] - self.activated[-2]
        new = {0: feature}
        for i in range(6):
            if self.cache[layer].get(i) is not None and self.step > 5 - 2:
                new[i + 1] = (new[i] - self.cache[layer][i]) / d
            else:
                break
        self.cache[layer] = new

    def taylor_formula(self, layer: int) -> torch.Tensor:
        x = self.step - self.activated[-1]
        out = 0
        for i in range(len(self.cache[layer])):
            out += (1 / math.factorial(i)) * self.cache[layer][i] * (x**i)
        return out


@contextmanager
def per_layer_taylor(model, branch: OfficialBranch):
    """The model's decoder layers running the official TaylorSeer for `branch` during one forward."""
    branch.cal_type()
    layers = model.language_model.model.layers

    def wrap(layer):
        orig = layer.forward

        def forward(x, residual, inv_freq):
            i = layer.index
            if branch.type == "full":
                if branch.step == 0:
                    branch.cache[i] = {}
                x, residual = orig(x, residual, inv_freq)
                branch.derivative_approximation(i, residual + x)  # the layer's output: the residual stream
                return x, residual
            out = branch.taylor_formula(i)
            return torch.zeros_like(out), out  # the next layer's stream (and the model's output) is `out`

        return forward

    for layer in layers:
        layer.forward = wrap(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
        branch.step += 1


def reference_latents(omni: Omni, req) -> torch.Tensor:
    """The official `generate_image(enable_taylorseer=True)` loop: each branch its own forward and its own
    per-layer cache; the image-dropped branch always computed when used (over the full context for text2img)."""
    stage = omni.stage
    cfg, runner, model = stage.cfg, stage.runner, stage.model
    h = stage.run_alone(stage.context_program(0, req, stage.prepare(0, req)))
    try:
        rng = torch.Generator()
        rng.set_state(h.rng_state)
        gh, gw = latent_grid(h.height, h.width, cfg.latent_downsample)
        x = torch.randn(gh * gw, cfg.patch_latent_dim, generator=rng)
        pos = flattened_position_ids(gh, gw, cfg.max_latent_size)
        n_layers = cfg.llm.num_hidden_layers
        branches = {b: OfficialBranch(n_layers) for b in ("cond", "text", "img")}
        contexts = {"cond": h.full, "text": h.cfg_text, "img": h.cfg_img or h.full}
        times, dts = flow_schedule(req.steps, req.timestep_shift)
        for t, dt in zip(times.tolist(), dts):
            lo, hi = req.cfg_interval
            text_scale = req.cfg_text_scale if lo < t <= hi else 1.0
            img_scale = req.cfg_img_scale if lo < t <= hi else 1.0
            run = ["cond"] + (["text"] if text_scale > 1 else []) + (["img"] if img_scale > 1 else [])
            vs = {}
            for b in run:
                with per_layer_taylor(model, branches[b]):
                    (vs[b],) = runner.execute([Work(contexts[b], LatentPiece(x, t, pos), commit=False,
                                                    want_output=True)])
            if text_scale > 1:
                v = combine_cfg(vs["cond"], vs["text"], vs.get("img"), text_scale, img_scale, req.cfg_renorm_type,
                                req.cfg_renorm_min)
            else:
                v = vs["cond"]
            x = x - v * dt
        return x
    finally:
        release_contexts(h)


def spy_forwards(omni: Omni, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the works per denoising forward, and check every full branch of a cached run against the uncached
    forward at the same input: the same velocity, and hidden rows the velocity head turns into it."""
    counts: list[int] = []
    runner, model = omni.stage.runner, omni.stage.model
    orig = runner.execute

    def spy(works):
        results = orig(works)
        if works and isinstance(works[0].piece, LatentPiece) and works[0].want_output:
            counts.append(len(works))
            if works[0].want_hidden:
                plain = orig([Work(w.context, w.piece, commit=False, want_output=True) for w in works])
                for (v, hidden), v0 in zip(results, plain, strict=True):
                    assert torch.equal(v, v0)
                    # (the head over one branch's rows, not all of them: GEMM blocking may move the last bit)
                    assert torch.allclose(model.velocity(hidden).float(), v, rtol=1e-6, atol=1e-6)
        return results

    monkeypatch.setattr(runner, "execute", spy)
    return counts


CASES = {
    # interval (0.4, 1]: steps 0..18 of 23 guided; the image-dropped branch is the conditional one throughout.
    "text2img": {"modality": "text2img", "prompt": "a red cat", "cfg_img_scale": 2.0},
    # steps 0..7 unguided: the image-dropped branch (the full context) starts its own schedule at step 8.
    "text2img_late_guidance": {"modality": "text2img", "prompt": "a red cat", "cfg_img_scale": 2.0,
                               "cfg_interval": (0.0, 0.85)},
    "img2img": {"modality": "img2img", "prompt": "make it blue", "image": str(EDIT), "cfg_interval": (0.0, 1.0),
                "cfg_renorm_type": "text_channel"},
}


@pytest.mark.parametrize("case", CASES)
def test_tiny_model_matches_the_official_per_layer_algorithm(omni: Omni, monkeypatch: pytest.MonkeyPatch,
                                                              case: str) -> None:
    base = {**CASES[case], "steps": 24, "height": 32, "width": 48, "seed": 7, "return_latents": True}
    (ref_req,) = omni.make_requests([{**base, "enable_taylorseer": True}])
    want = reference_latents(omni, ref_req)
    counts = spy_forwards(omni, monkeypatch)
    (cached,) = omni.generate([{**base, "enable_taylorseer": True}])
    assert cached.ok, cached.error
    assert torch.allclose(cached.latents, want, rtol=1e-5, atol=1e-5), (cached.latents - want).abs().max()
    if case == "text2img":
        # cond full at 0..4, 7, 10, ..., 22 (order 6 from step 19 on); text-dropped (steps 0..18) at 0..4, 7, 10,
        # 13, 16; no forward on the other steps.
        assert counts == [2] * 9 + [1] * 2
    counts.clear()
    (plain,) = omni.generate([base])
    assert len(counts) == 23
    assert not torch.allclose(cached.latents, plain.latents, rtol=1e-3, atol=1e-3)


def test_factors_are_freed_when_denoising_ends(omni: Omni, monkeypatch: pytest.MonkeyPatch) -> None:
    cleared = []
    orig = StepCache.clear
    monkeypatch.setattr(StepCache, "clear", lambda self: (cleared.append(len(self._states)), orig(self))[1])
    omni.generate([{"modality": "text2img", "prompt": "x", "steps": 8, "height": 32, "width": 32, "seed": 1,
                    "enable_taylorseer": True}])
    assert cleared == [3]  # the three branches' states (image-dropped: following cond's), dropped at the end


# --------------------------------------------------------------------------------------------- the switch


T2I = {"modality": "text2img", "prompt": "a cat"}


def test_field_is_off_by_default_and_validated() -> None:
    assert make_request(T2I).enable_taylorseer is False
    assert make_request({**T2I, "enable_taylorseer": True}).enable_taylorseer is True
    with pytest.raises(RequestError, match=r"request 0: enable_taylorseer must be True or False, got 1"):
        make_request({**T2I, "enable_taylorseer": 1})


def test_field_is_warned_about_for_text_outputs() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_request({"modality": "text2text", "prompt": "hi", "enable_taylorseer": True})
    (w,) = [w.message for w in caught if isinstance(w.message, RequestWarning)]
    assert w.field == "enable_taylorseer" and "is not used by text2text" in str(w)


def test_precedence_request_over_cli_over_deploy_over_builtin(tmp_path: Path) -> None:
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(textwrap.dedent("""\
        stages:
          - stage_id: 0
            default_sampling_params: {enable_taylorseer: true}
    """))
    defaults = resolve_deploy(deploy, EngineOptions.from_kwargs({})).request_defaults
    assert defaults == {"enable_taylorseer": True}
    assert make_request(T2I, 0, defaults).enable_taylorseer is True
    assert make_request({**T2I, "enable_taylorseer": False}, 0, defaults).enable_taylorseer is False
    assert make_request(T2I, 0, request_defaults({})).enable_taylorseer is False
    args = _parser("bagel-serve", True).parse_args(["generate", "--enable-taylorseer"])
    (flagged,) = build_requests(args, ["a cat"])
    assert flagged["enable_taylorseer"] is True
    (plain,) = build_requests(_parser("bagel-serve", True).parse_args(["generate"]), ["a cat"])
    assert "enable_taylorseer" not in plain
    with pytest.raises(DeployConfigError, match=r"default_sampling_params.enable_taylorseer: must be true or false"):
        deploy.write_text("stages:\n  - stage_id: 0\n    default_sampling_params: {enable_taylorseer: 2}\n")
        load_deploy_config(deploy)


def test_saved_parameters_say_whether_it_was_on(omni: Omni) -> None:
    """An image made with step caching is not the uncached one: its parameters (PNG, manifest) say so."""
    req = make_request({**T2I, "enable_taylorseer": True, "steps": 2, "height": 32, "width": 32, "seed": 1})
    (out,) = omni.generate([req])
    assert generation_parameters(req, out, "m", "0")["enable_taylorseer"] is True
