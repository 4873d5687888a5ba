"""The denoising objective shared by the training step and the loss probe."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep (float32, on timesteps' device)."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    return alphas / (1 - alphas)


def diffusion_loss(unet, scheduler, prediction_type: str, latents: torch.Tensor, noise: torch.Tensor,
                   timesteps: torch.Tensor, text: torch.Tensor, snr_gamma: float | None = None,
                   mask: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                   num_instance: int | None = None, reduce: bool = True,
                   added_cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """MSE between the UNet's prediction and its target (epsilon or v), optionally min-SNR weighted.

    latents, noise: (B, C, h, w); timesteps: (B,) long; text: (B, L, D); mask: optional (B, 1, h, w) in {0, 1}
    restricting the loss to valid latent pixels; weights: optional (B,) per-example weights (e.g. the prior
    loss weight on class examples), in which case the loss is sum(w * l) / num_instance, i.e. the instance
    mean plus the weighted prior mean as DreamBooth defines it. Returns a scalar (or (B,) with
    reduce=False), float32. added_cond: SDXL's {"text_embeds": (B, P), "time_ids": (B, 6)} (sdxl.py), passed
    to the UNet as added_cond_kwargs in its dtype; None for SD 1.x / 2.x.
    """
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction type {prediction_type!r}")
    dtype = next(unet.parameters()).dtype
    if added_cond is None:
        pred = unet(noisy.to(dtype), timesteps, text.to(dtype)).sample.float()
    else:
        added = {k: v.to(dtype) for k, v in added_cond.items()}
        pred = unet(noisy.to(dtype), timesteps, text.to(dtype), added_cond_kwargs=added).sample.float()
    err = F.mse_loss(pred, target.float(), reduction="none")
    if mask is not None:
        err = err * mask
        per_sample = err.flatten(1).sum(1) / (mask.expand_as(err).flatten(1).sum(1).clamp(min=1))
    else:
        per_sample = err.flatten(1).mean(1)
    if snr_gamma is not None:
        s = snr(scheduler, timesteps)
        weight = torch.clamp(s, max=snr_gamma) / (s + 1 if prediction_type == "v_prediction" else s)
        per_sample = per_sample * weight
    if weights is not None:
        per_sample = per_sample * weights
        if reduce:
            return per_sample.sum() / (num_instance or len(per_sample))
    return per_sample.mean() if reduce else per_sample
