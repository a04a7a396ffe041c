"""Train/serve parity: the training forward builds what `DTCPipeline.__call__` builds and calls the
same `predict_noise`, on the same prepared pair (the render job's preprocessing).

`predict_noise` is observed during a real pipeline call (a wrapper that records its arguments and
result, then calls it); the training side starts from the same prepared sample and the same
generator draws.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from pipeline.fetch import InputPolicy
from pipeline.manifest import plan_manifest
from pipeline.model.presets import build_preset
from pipeline.stages.prepare_stage import PrepareConfig
from pipeline.toy.catalog import make_training_catalog
from pipeline.train.dataset import prepare_training_batch, read_training_files
from pipeline.train.loss import TrainableDTC
from pipeline.train.samples import SampleSet, build_validation_batch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pipe = build_preset("tiny", seed=3)
    for name in ("hint_adapter", "hint_encoder", "image_projection"):  # a trained-looking model: no zero heads
        with torch.no_grad():
            for p in getattr(pipe, name).parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.02)
    path = make_training_catalog(str(tmp_path_factory.mktemp("parity")), n_pairs=4, val_fraction=0)
    plan = plan_manifest(path)
    config = PrepareConfig(InputPolicy(plan.base_dir), resolution=pipe.config.resolution, product_size=224)
    batches = read_training_files({"file_index": [0]}, plan=plan, conflicts_ref=[])
    rows = pa.concat_tables([prepare_training_batch(b, config=config) for b in batches]).to_pylist()
    samples = SampleSet.from_rows(rows, pipe.config.resolution, 224)
    return pipe, samples


def _observed_call(pipe, samples: SampleSet, seeds: list[int], guidance_scale: float) -> tuple:
    """Run the pipeline for one step on the prepared samples; the first predict_noise call's arguments and output."""
    calls = []
    original = pipe.predict_noise

    def observe(*args):
        out = original(*args)
        calls.append((args, out))
        return out

    pipe.predict_noise = observe
    try:
        n = len(seeds)
        pipe(
            image=samples.context[:n],
            mask_image=samples.hole[:n],
            product_image=samples.product[:n],
            hint_image=samples.hint[:n],
            hint_mask=samples.hint_mask[:n],
            num_inference_steps=1,
            guidance_scale=guidance_scale,
            generator=[torch.Generator().manual_seed(s) for s in seeds],
            output_type="latent",
        )
    finally:
        del pipe.predict_noise
    return calls[0]


def _training_batch(samples: SampleSet, seeds: list[int]):
    batch = build_validation_batch(samples, [(i, 0) for i in range(len(seeds))], 0, [500], (4, 16, 16))
    # the pipeline's VAE draw for the masked image is the first draw of each pair's generator
    batch.masked_latent_noise = torch.cat(
        [torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(s)) for s in seeds]
    )
    return batch


def test_training_conditioning_and_forward_equal_inference(setup):
    pipe, samples = setup
    seeds = [11, 12]
    (latents, timestep, masked, hole_latent, hint_latents, context), eps = _observed_call(pipe, samples, seeds, 1.0)
    model = TrainableDTC(pipe)
    batch = _training_batch(samples, seeds)
    with torch.no_grad():
        cond = model.condition(batch)
        for name, expected in (
            ("masked_image_latents", masked),
            ("hole_latent", hole_latent),
            ("hint_latents", hint_latents),
            ("context", context),
        ):
            assert torch.equal(getattr(cond, name), expected), name
        assert not torch.equal(hint_latents, masked)  # the adapter is live (not zero-init here)
        # the training forward's noise prediction is predict_noise's, for the same latents and timestep
        trained_eps = model.pipe.predict_noise(
            latents,
            timestep.expand(len(seeds)),
            cond.masked_image_latents,
            cond.hole_latent,
            cond.hint_latents,
            cond.context,
        )
    assert torch.equal(trained_eps, eps)


def test_the_cfg_drop_is_the_pipelines_unconditional_branch(setup):
    pipe, samples = setup
    seeds = [5]
    (_, _, _, _, _, context), _ = _observed_call(pipe, samples, seeds, 5.0)  # CFG: [uncond | cond]
    model = TrainableDTC(pipe)
    batch = _training_batch(samples, seeds)
    batch.drop = torch.tensor([True])
    with torch.no_grad():
        dropped = model.condition(batch).context
    assert torch.equal(dropped, context[:1]) and not torch.equal(context[:1], context[1:])


def test_the_training_loss_is_the_ddpm_objective(setup):
    pipe, samples = setup
    model = TrainableDTC(pipe)
    batch = _training_batch(samples, [1, 2])
    with torch.no_grad():
        losses = model(batch)
        cond = model.condition(batch)
        abar = model.noise_scheduler.alphas_cumprod[batch.timesteps].view(-1, 1, 1, 1)
        noisy = abar.sqrt() * cond.latents + (1 - abar).sqrt() * batch.noise
        eps = pipe.predict_noise(
            noisy, batch.timesteps, cond.masked_image_latents, cond.hole_latent, cond.hint_latents, cond.context
        )
    torch.testing.assert_close(losses["mse"], torch.mean((eps - batch.noise) ** 2), rtol=1e-6, atol=0)
    assert set(losses) == {"mse", "loss"}


def test_the_training_forward_feeds_a_pbe_warm_start_its_layout(setup, pbe_warm):
    """`make_model --from-parts --pbe`'s model: the UNet the trainer calls gets PBE's channel order,
    `[latents, masked latents, mask = 1 keep]`, as it does at render time."""
    from pipeline.model.loading import load_pipeline

    _, samples = setup
    pipe = load_pipeline(pbe_warm["model"])
    model = TrainableDTC(pipe)
    batch = _training_batch(samples, [1, 2])
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(batch)
        cond = model.condition(batch)
    handle.remove()
    (unet_input,) = seen
    assert pipe.config.input_layout == "pbe"
    assert torch.equal(unet_input[:, 4:8], cond.masked_image_latents)
    assert torch.equal(unet_input[:, 8:9], 1 - cond.hole_latent)
