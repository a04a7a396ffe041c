"""SD-1.x's noise schedule: the one place a sampler is built (`sd_scheduler`, for DTC presets,
assembly and Paint-by-Example folders alike) and a source folder's training schedule is checked
(`check_sd_schedule`).
"""

from __future__ import annotations

import json
import math
import os

from diffusers import DDIMScheduler

from pipeline.model.checkpoint import CheckpointError

__all__ = ["SD_SCHEDULE", "sd_scheduler", "check_sd_schedule"]

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
    return DDIMScheduler(**SD_SCHEDULE)


def check_sd_schedule(folder: str, uri: str) -> None:
    """The source folder's scheduler config may be any class (SD and PBE ship PNDM) and may lack
    sampling settings (`clip_sample`, ...): those are replaced by `sd_scheduler()`. Its *training*
    schedule is what the UNet learnt to denoise, so where the config states one it must be SD's.
    `uri`: the folder as the user named it, for the message."""
    with open(os.path.join(folder, "scheduler", "scheduler_config.json")) as f:
        config = json.load(f)
    if config.get("trained_betas") is not None:
        raise CheckpointError(f"{uri}/scheduler sets trained_betas; SD-1.x's betas are scaled_linear, 0.00085..0.012")
    for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
        value, expected = config.get(key, SD_SCHEDULE[key]), SD_SCHEDULE[key]
        if isinstance(expected, float):
            same = isinstance(value, (int, float)) and math.isclose(value, expected)
        else:
            same = value == expected
        if not same:
            raise CheckpointError(f"{uri}/scheduler has {key}={value!r}; the SD-1.x schedule has {expected!r}")
