"""histolab.dpm_solver against diffusers' DPMSolverMultistepScheduler itself (the oracle): the same
timesteps, sigmas and step outputs, bit for bit."""

import pytest
import torch

from histolab import dpm_solver
from histolab.schedulers import build_scheduler

SD15 = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
}


def same_bits(x, y) -> bool:
    """Equal to the bit, NaNs included (a degenerate schedule gives NaNs in both)."""
    return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(torch.int32), y.view(torch.int32))


def run(scheduler, steps: int, seed: int = 0):
    """Every step's output for a fixed pseudo-random trajectory (model outputs drawn per step)."""
    scheduler.set_timesteps(steps, device="cpu")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    outs = []
    for t in scheduler.timesteps:
        eps = torch.randn(2, 4, 8, 8, generator=g)
        x = scheduler.step(eps, t, x).prev_sample
        outs.append(x)
    return outs


@pytest.mark.parametrize("name", dpm_solver.NAMES)
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_same_schedule_and_steps_as_diffusers(name, spacing, beta_schedule):
    config = {**SD15, "timestep_spacing": spacing, "beta_schedule": beta_schedule}
    for steps in [*range(1, 31), 40, 50, 60]:
        ours, theirs = dpm_solver.build(name, config), build_scheduler(name, config)
        ours.set_timesteps(steps, device="cpu")
        theirs.set_timesteps(steps, device="cpu")
        assert torch.equal(ours.timesteps, theirs.timesteps), (steps, ours.timesteps, theirs.timesteps)
        assert torch.equal(ours.sigmas, theirs.sigmas), steps
        assert ours.init_noise_sigma == theirs.init_noise_sigma
        a, b = run(ours, steps, seed=steps), run(theirs, steps, seed=steps)
        assert len(a) == len(b) == len(ours.timesteps)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert same_bits(x, y), (steps, i, (x - y).abs().max())


def test_a_repeated_first_timestep_fails_as_in_diffusers():
    """More steps than the training schedule has timesteps repeat the first one ("leading" spacing);
    diffusers then starts its step counter at the second occurrence and runs past its sigmas on the
    last step. The replica keeps that quirk, so it fails the same way rather than making other images."""
    config = {**SD15, "num_train_timesteps": 40, "timestep_spacing": "leading"}
    repeated = 0
    for steps in range(36, 48):
        s = dpm_solver.build("dpmpp_2m", config)
        s.set_timesteps(steps)
        ts = s.timesteps.tolist()
        if ts.count(ts[0]) > 1:
            repeated += 1
            for sched in (s, build_scheduler("dpmpp_2m", config)):
                with pytest.raises(IndexError):
                    run(sched, steps)
        else:
            a, b = run(s, steps), run(build_scheduler("dpmpp_2m", config), steps)
            assert all(same_bits(x, y) for x, y in zip(a, b, strict=True)), steps
    assert 0 < repeated < 12, "the range should hold schedules with and without a repeated first timestep"


def test_it_names_what_it_cannot_compute():
    assert dpm_solver.unsupported("dpmpp_2m_karras", SD15) == ""
    assert "euler" in dpm_solver.unsupported("euler", SD15)
    assert "prediction_type" in dpm_solver.unsupported("dpmpp_2m", {**SD15, "prediction_type": "v_prediction"})
    assert "beta_schedule" in dpm_solver.unsupported("dpmpp_2m", {**SD15, "beta_schedule": "squaredcos_cap_v2"})
    with pytest.raises(ValueError, match="thresholding"):
        dpm_solver.build("dpmpp_2m", {**SD15, "thresholding": True})
