"""DPM++ 2M (and its Karras-sigma variant) without importing diffusers, for the start-up worker.

Importing any diffusers scheduler costs about 3 s on the 2-core machine of issue 14 (its utilities
pull in scipy and sympy), more than a start-up worker that serves the first images may spend
(histolab.startup_worker). This module computes exactly what diffusers' ``DPMSolverMultistepScheduler``
computes for the configurations ``supports`` accepts: the same schedule (numpy in float64, then
float32), the same step arithmetic on float32 scalars in the same order, and diffusers' quirks kept
(a repeated first timestep starts the step counter at its second occurrence; the last step is first
order). tests/test_dpm_solver.py checks timesteps, sigmas and every step's output bit for bit against
diffusers itself for step counts 1-60 and each timestep spacing. Anything else (other samplers,
v-prediction, thresholding, custom sigmas) is left to diffusers, in the app's own process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NAMES = ("dpmpp_2m", "dpmpp_2m_karras")  # histolab.schedulers names this module computes

# Config values this replica assumes: the diffusers defaults for these names (histolab.schedulers).
_FIXED = {
    "trained_betas": None,
    "prediction_type": "epsilon",
    "thresholding": False,
    "variance_type": None,
    "rescale_betas_zero_snr": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "final_sigmas_type": "zero",
    "euler_at_final": False,
    "lower_order_final": True,
    "solver_type": "midpoint",
    "sigma_min": None,
    "sigma_max": None,
}
_SPACINGS = ("linspace", "leading", "trailing")
_BETAS = ("linear", "scaled_linear")


def unsupported(name: str, base_config: dict[str, Any]) -> str:
    """Why this module cannot stand in for diffusers here ('' when it can)."""
    if name not in NAMES:
        return f"scheduler {name!r} (the start-up worker computes {', '.join(NAMES)})"
    for key, want in _FIXED.items():
        if base_config.get(key, want) != want:
            return f"scheduler config {key}={base_config[key]!r}"
    if base_config.get("beta_schedule", "linear") not in _BETAS:
        return f"beta_schedule {base_config['beta_schedule']!r}"
    if base_config.get("timestep_spacing", "linspace") not in _SPACINGS:
        return f"timestep_spacing {base_config['timestep_spacing']!r}"
    if float(base_config.get("lambda_min_clipped", float("-inf"))) != float("-inf"):
        return "scheduler config lambda_min_clipped"
    return ""


@dataclass
class _Output:
    prev_sample: Any


class DPMSolverPP2M:
    """``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`` for one run."""

    order = 1
    init_noise_sigma = 1.0

    def __init__(self, base_config: dict[str, Any], karras: bool):
        import torch

        c = base_config
        self.num_train_timesteps = int(c.get("num_train_timesteps", 1000))
        self.spacing = c.get("timestep_spacing", "linspace")
        self.steps_offset = int(c.get("steps_offset", 0))
        self.karras = karras
        beta_start, beta_end = float(c.get("beta_start", 0.0001)), float(c.get("beta_end", 0.02))
        n = self.num_train_timesteps
        if c.get("beta_schedule", "linear") == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
        else:
            betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.timesteps = None
        self.sigmas = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        import numpy as np
        import torch

        n = self.num_train_timesteps
        last = n  # lambda_min_clipped is -inf: nothing clipped
        if self.spacing == "linspace":
            ts = np.linspace(0, last - 1, num_inference_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif self.spacing == "leading":
            ratio = last // (num_inference_steps + 1)
            ts = (np.arange(0, num_inference_steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            ts += self.steps_offset
        else:  # trailing
            ratio = n / num_inference_steps
            ts = np.arange(last, 0, -ratio).round().copy().astype(np.int64)
            ts -= 1
        sigmas = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)
        log_sigmas = np.log(sigmas)
        if self.karras:
            flipped = np.flip(sigmas).copy()
            rho = 7.0
            ramp = np.linspace(0, 1, num_inference_steps)
            lo, hi = flipped[-1].item() ** (1 / rho), flipped[0].item() ** (1 / rho)
            sigmas = (hi + ramp * (lo - hi)) ** rho
            ts = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas]).round()
        else:
            sigmas = np.interp(ts, np.arange(0, len(sigmas)), sigmas)
        sigmas = np.concatenate([sigmas, [0]]).astype(np.float32)
        self.sigmas = torch.from_numpy(sigmas)
        self.timesteps = torch.from_numpy(ts).to(device=device, dtype=torch.int64)
        self.num_inference_steps = len(ts)
        self._outputs: list[Any] = [None, None]
        self._lower_order_nums = 0
        self._index: int | None = None

    def scale_model_input(self, sample, *args, **kwargs):
        return sample

    def _start_index(self, timestep) -> int:
        import torch

        if isinstance(timestep, torch.Tensor):
            timestep = timestep.to(self.timesteps.device)
        found = (self.timesteps == timestep).nonzero()
        if len(found) == 0:
            return len(self.timesteps) - 1
        return found[1 if len(found) > 1 else 0].item()

    @staticmethod
    def _alpha_sigma(sigma):
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha, sigma * alpha

    def step(self, model_output, timestep, sample, generator=None, return_dict: bool = True):
        import torch

        if self.timesteps is None:
            raise ValueError("call set_timesteps before step")
        if self._index is None:
            self._index = self._start_index(timestep)
        i = self._index
        # final_sigmas_type "zero": the last step is first order. (diffusers' "lower order second" rule
        # only matters for third-order solvers.)
        last = i == len(self.timesteps) - 1
        alpha_s, sigma_s = self._alpha_sigma(self.sigmas[i])
        x0 = (sample - sigma_s * model_output) / alpha_s
        self._outputs = [self._outputs[1], x0]
        sample = sample.to(torch.float32)
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s0 = torch.log(alpha_s) - torch.log(sigma_s)
        h = lambda_t - lambda_s0
        if self._lower_order_nums < 1 or last:
            prev = (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
            lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
            m0, m1 = self._outputs[-1], self._outputs[-2]
            h_0 = lambda_s0 - lambda_s1
            r0 = h_0 / h
            d0, d1 = m0, (1.0 / r0) * (m0 - m1)
            prev = (
                (sigma_t / sigma_s) * sample
                - (alpha_t * (torch.exp(-h) - 1.0)) * d0
                - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
            )
        if self._lower_order_nums < 2:
            self._lower_order_nums += 1
        prev = prev.to(model_output.dtype)
        self._index += 1
        return _Output(prev) if return_dict else (prev,)


def _sigma_to_t(sigma, log_sigmas):
    import numpy as np

    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high = low + 1
    lo, hi = log_sigmas[low], log_sigmas[high]
    w = np.clip((lo - log_sigma) / (lo - hi), 0, 1)
    return ((1 - w) * low + w * high).reshape(sigma.shape)


def build(name: str, base_config: dict[str, Any]) -> DPMSolverPP2M:
    why = unsupported(name, base_config)
    if why:
        raise ValueError(f"histolab.dpm_solver cannot compute {why}")
    return DPMSolverPP2M(base_config, karras=name == "dpmpp_2m_karras")
