"""The schedule table (sdlens.engine.schedules): each row's x0 formula and its coefficients
agree, the flow row matches flow matching's own step, and analysis reads the same table."""

from __future__ import annotations

import math

import diffusers
import pytest
import torch

from fakes import fake_trace
from sdlens.analysis import guidance as G
from sdlens.engine import schedules as S
from sdlens.trace import replace


@pytest.mark.parametrize("form", S.FORMS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_row_formula_equals_its_coefficients(form, prediction_type):
    g = torch.Generator().manual_seed(0)
    x, m = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    row = S.TABLE[form]
    level = 0.3 if row.level == "alpha_bar" else 2.5
    sched = diffusers.DPMSolverMultistepScheduler()  # the alpha/sigma split of DPM-Solver
    x0 = row.x0(x, m, prediction_type == "epsilon", torch.tensor(level), sched)
    a, b = S.x0_coefficients(form, prediction_type, level)
    torch.testing.assert_close(x0, a * x + b * m, rtol=1e-5, atol=1e-5)


def test_coefficients_known_values_and_errors():
    s = 2.0
    assert S.x0_coefficients("sigma", "epsilon", s) == (1.0, -s)
    assert S.x0_coefficients("flow", "epsilon", s) == (1.0, -s)
    assert S.x0_coefficients("alpha", "v_prediction", 0.25) == pytest.approx((0.5, -math.sqrt(0.75)))
    assert S.x0_coefficients(None, "sample", None) == (0.0, 1.0)
    with pytest.raises(ValueError, match="allowed: epsilon, v_prediction, sample"):
        S.x0_coefficients("alpha", "flow_prediction", 0.5)
    with pytest.raises(ValueError, match="unknown schedule form"):
        S.x0_coefficients("cosine", "epsilon", 0.5)
    assert S.input_scale("sigma", 3.0) == pytest.approx(1 / math.sqrt(10))
    assert S.input_scale("alpha_sigma", 3.0) == 1.0 and S.input_scale("unknown", 3.0) == 1.0


def test_forms_of_schedulers():
    cfg = diffusers.DDIMScheduler().config
    for name, form in [("DDIMScheduler", "alpha"), ("PNDMScheduler", "alpha"),
                       ("EulerDiscreteScheduler", "sigma"), ("HeunDiscreteScheduler", "sigma"),
                       ("DPMSolverMultistepScheduler", "alpha_sigma"),
                       ("UniPCMultistepScheduler", "alpha_sigma"),
                       ("FlowMatchEulerDiscreteScheduler", "flow")]:
        sched = S.rebuild_scheduler(name, dict(cfg))
        sched.set_timesteps(4)
        assert S.schedule_form(sched) == form, name
        assert S.form_of_class(name) == (None if form == "alpha" else form), name
    assert S.rebuild_scheduler("NoSuchScheduler", {}) is None
    assert S.alpha_bars(diffusers.FlowMatchEulerDiscreteScheduler()) is None


def test_flow_row_is_flow_matchings_own_step():
    """FlowMatch Euler steps ``x + (sigma_next - sigma) v``: x0 = x - sigma v is what the step
    reaches at sigma_next = 0, i.e. ``prev - sigma_next * v``."""
    sched = diffusers.FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(4)
    seen = []
    wrapper = S.install(sched, lambda *a: seen.append(a))
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=g)
        for i, t in enumerate(sched.timesteps):
            v = torch.randn(1, 4, 8, 8, generator=g)
            x = sched.step(v, t, x).prev_sample
            sample, _, _, sigma, x0, prev, _ = seen[-1]
            assert float(sigma) == pytest.approx(float(sched.sigmas[i]))
            torch.testing.assert_close(x0, prev - sched.sigmas[i + 1] * v, rtol=1e-5, atol=1e-5)
    finally:
        S.uninstall(sched, wrapper)
    assert "step" not in vars(sched)


def test_guidance_reads_the_table_for_flow_traces():
    tr = fake_trace(scheduler="euler")
    flow = replace(tr, meta={**tr.meta, "scheduler_class": "FlowMatchEulerDiscreteScheduler"})
    assert G.schedule_form(flow) == "flow"
    assert G.x0_coefficients(flow, 2) == (1.0, -float(tr.sigmas[2]))
