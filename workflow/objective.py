"""What the denoiser learns to predict, in one place: the train stage's loss and the sample stage's
validation loss both come from here, so the two cannot drift apart.

`DDPMObjective`: a DDPM noise schedule (SD 1.x, 2.x, SDXL): the noised input is
sqrt(a_t) x0 + sqrt(1 - a_t) noise at an integer timestep t, the target the noise (epsilon) or the
velocity (v-prediction), optionally weighted by min-SNR-gamma (Hang et al. 2023). The flow-matching
objective (FLUX) is `FlowMatchObjective` in workflow/flux.py, with the same methods; a family's
`objective()` gives its own.
"""

from __future__ import annotations

import torch


class DDPMObjective:
    def __init__(self, scheduler, prediction_type: str):
        self.scheduler = scheduler
        self.prediction_type = prediction_type
        self.steps = int(scheduler.config.num_train_timesteps)
        self.guidance = None  # no DDPM family has a guidance input

    def to(self, device: torch.device) -> "DDPMObjective":
        """Keep the schedule where the timesteps are (add_noise indexes it by them)."""
        self.scheduler.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        return self

    def random_timesteps(self, n: int, gen: torch.Generator, device: torch.device,
                         latent_shape: tuple[int, ...] = ()) -> torch.Tensor:
        return torch.randint(0, self.steps, (n,), generator=gen, device=device)

    def fixed_timesteps(self, count: int, latent_shape: tuple[int, ...] = ()) -> torch.Tensor:
        """`count` timesteps spread evenly over the schedule (the middle of each of `count` bins)."""
        return ((torch.arange(count) + 0.5) * self.steps / count).long()

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alphas = self.scheduler.alphas_cumprod
        out = self.scheduler.add_noise(latents, noise, timesteps)
        self.scheduler.alphas_cumprod = alphas  # add_noise may move it to the latents' device
        return out

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "v_prediction":
            alphas = self.scheduler.alphas_cumprod
            velocity = self.scheduler.get_velocity(latents, noise, timesteps)
            self.scheduler.alphas_cumprod = alphas
            return velocity
        return noise

    def snr_weights(self, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
        return min_snr_weights(self.scheduler.alphas_cumprod[timesteps], gamma, self.prediction_type)


def min_snr_weights(alphas_cumprod: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023), expressed for the predicted quantity."""
    snr = alphas_cumprod / (1 - alphas_cumprod)
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))  # -> 1 as snr -> 0
