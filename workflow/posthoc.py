"""Post-hoc EMA: power-function EMA profiles and their least-squares reconstruction.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", sec. 3
and appendix C. A power-function EMA with exponent gamma averages the weights of steps 1..t with
density proportional to tau^gamma; its width relative to t is sigma_rel. Training keeps a few such
EMAs and snapshots them now and then; any other profile (another sigma_rel, ending at any
snapshot's step) is then approximated by a linear combination of the snapshots, whose coefficients
solve a least-squares problem on the profiles (the inner products of power functions have a closed
form, so no per-step vectors are built).
"""

from __future__ import annotations

import numpy as np


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent whose profile has relative standard deviation `sigma_rel` (a root of a cubic)."""
    t = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
    return float(roots.real[abs(roots.imag) < 1e-9].max())


def power_beta(gamma: float, step: int) -> float:
    """Decay of the power-function EMA at optimizer step `step` (1-based): (1 - 1/t)^(gamma + 1)."""
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_dot(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """Inner products of normalised profiles (gamma+1)/t^(gamma+1) tau^gamma on [0, t], broadcast."""
    t_a, g_a, t_b, g_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    ratio_exp = np.where(t_a < t_b, g_b, -g_a)
    return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** ratio_exp / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(steps: list[int], gammas: list[float], target_step: int,
                       target_gamma: float) -> tuple[np.ndarray, float]:
    """Coefficients of the snapshots (step_i, gamma_i) that best match the target profile, and the
    relative L2 error of that match (0 = exact)."""
    t, g = np.asarray(steps, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    a = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_dot(t, g, target_step, target_gamma)
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    self_dot = float(profile_dot(target_step, target_gamma, target_step, target_gamma))
    residual = max(0.0, float(x @ a @ x - 2 * x @ b + self_dot))
    return x, (residual / self_dot) ** 0.5
