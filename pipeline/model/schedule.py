"""SD-1.x's noise schedule (`SD_SCHEDULE`) and the one place a sampler is built (`sd_scheduler`,
for DTC presets, assembly and Paint-by-Example folders alike). A source folder's training
schedule is checked against it by `checkpoint.check_sd_schedule`, on the driver: this module
imports diffusers only inside `sd_scheduler`, so the driver can read the values without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import DDIMScheduler

__all__ = ["SD_SCHEDULE", "sd_scheduler"]

# Stable Diffusion 1.x noise schedule as DDIM samples it. The training half (betas, 1000 steps,
# epsilon) is what SD-1.5 inpainting was trained on; the sampling half is what SD's DDIM uses:
# no x0 clipping (latents are not bounded by 1), the last step lands on alphas_cumprod[0] (not
# 1), and the timesteps end at 1, not 0 (steps_offset), as in the original LDM DDIM sampler.
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def sd_scheduler() -> DDIMScheduler:
    """DDIM over `SD_SCHEDULE`, built from these values alone and never from a source folder's
    scheduler config: SD folders ship a PNDM config without `clip_sample`, and DDIM's default for
    a missing `clip_sample` is True, which clamps the predicted x0 to [-1, 1] at every step."""
    from diffusers import DDIMScheduler  # here, not at the top: the driver imports SD_SCHEDULE

    return DDIMScheduler(**SD_SCHEDULE)
