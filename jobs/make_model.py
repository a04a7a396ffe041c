"""Build a DTC checkpoint folder.

    python -m jobs.make_model --preset tiny --out models/dtc-tiny          # tests and demo, seconds on CPU
    python -m jobs.make_model --preset train-tiny --out models/untrained   # the toy's sizes, untrained
    python -m jobs.make_model --preset train-tiny --vae-from models/train-tiny.safetensors \
        --out init                                                          # the same around a fitted VAE
    python -m jobs.make_model --preset sd15 --out models/dtc-sd15          # paper sizes, random init (~12 GB)
    python -m jobs.make_model --preset pbe-tiny --out models/pbe-tiny      # Paint-by-Example, hub layout, tiny
    python -m jobs.make_model --from-parts --sd-inpainting sd-inpaint/ --dinov2 dinov2-giant/ \
        [--vae vae/] --out models/dtc-untrained                             # untrained DTC from public parts
    python -m jobs.make_model --from-parts --pbe paint-by-example/ --dinov2 dinov2-giant/ \
        --out models/dtc-pbe-untrained                                      # the same, PBE's UNet (pbe layout)

Every model written here is untrained (its model_index.json says `trained: false`): renders
with it are noise-like and its identity scores mean nothing; the run's console and QA page say
so. A trained model comes from `jobs.train` (or the committed models/train-tiny.safetensors,
which `--model` takes as it is).

Exit codes: 0 written, 2 bad usage or a missing/malformed part.
"""

from __future__ import annotations

import argparse
import sys

from jobs.cli import Parser
from pipeline.schema import DEFAULT_FILM_MODE, EXIT_OK, EXIT_REFUSED, FUSION_FORMS, PRESETS

# train-tiny: the toy's sizes (64 px, the committed weights' shapes), random VAE included;
# pbe-tiny: a Paint-by-Example folder in the hub's layout (presets.build_pbe_preset)
MAKE_PRESETS = (*PRESETS, "train-tiny", "pbe-tiny")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(prog="python -m jobs.make_model", description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=MAKE_PRESETS, help="random-init model of the preset's sizes")
    source.add_argument(
        "--from-parts", action="store_true", help="assemble from an SD-inpainting (or PBE) and a DINOv2 folder"
    )
    unet_source = parser.add_mutually_exclusive_group()
    unet_source.add_argument("--sd-inpainting", help="diffusers SD-inpainting pipeline folder or s3:// prefix")
    unet_source.add_argument(
        "--pbe", help="diffusers Paint-by-Example pipeline folder or s3:// prefix: its UNet, in the pbe layout"
    )
    parser.add_argument("--dinov2", help="transformers DINOv2 folder or s3:// prefix")
    parser.add_argument("--vae", help="optional VAE folder replacing the SD (or PBE) one")
    parser.add_argument(
        "--vae-from",
        metavar="MODEL",
        help="with --preset: the VAE of this DTC (folder, s3:// prefix or packed file), e.g. the toy's fitted one",
    )
    parser.add_argument("--film-mode", choices=FUSION_FORMS, default=DEFAULT_FILM_MODE)
    parser.add_argument("--seed", type=int, default=0, help="weight init seed for --preset")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    if args.from_parts and not ((args.sd_inpainting or args.pbe) and args.dinov2):
        parser.error("--from-parts needs --sd-inpainting DIR or --pbe DIR, and --dinov2 DIR")
    if args.preset and (args.sd_inpainting or args.pbe or args.dinov2 or args.vae):
        parser.error("--sd-inpainting/--pbe/--dinov2/--vae go with --from-parts, not --preset")
    if args.vae_from and args.preset in (None, "pbe-tiny"):
        parser.error("--vae-from goes with a DTC --preset (its VAE replaces the preset's random one)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.model.assemble import assemble_from_parts
    from pipeline.model.checkpoint import CheckpointError, weights_warning
    from pipeline.model.loading import save_pipeline
    from pipeline.model.presets import PBE_PRESETS, build_pbe_preset, build_preset

    try:
        if args.preset in PBE_PRESETS:
            pipe = build_pbe_preset(args.preset, seed=args.seed)
        elif args.preset:
            pipe = build_preset(args.preset, seed=args.seed, film_mode=args.film_mode)
            if args.vae_from:  # stage 0 done once: every later model of the toy shares its VAE
                from pipeline.model.loading import load_pipeline

                vae, own = load_pipeline(args.vae_from).vae, pipe.vae.config
                shape = lambda c: (len(c.block_out_channels), c.latent_channels)  # noqa: E731  (factor, latents)
                if shape(vae.config) != shape(own):
                    raise ValueError(
                        f"--vae-from {args.vae_from}: its VAE (factor {2 ** (shape(vae.config)[0] - 1)}, "
                        f"{vae.config.latent_channels} latent channels) does not fit the {args.preset} preset's "
                        f"(factor {2 ** (shape(own)[0] - 1)}, {own.latent_channels})"
                    )
                pipe.register_modules(vae=vae)
        else:
            pipe = assemble_from_parts(
                args.pbe or args.sd_inpainting,
                args.dinov2,
                vae=args.vae,
                input_layout="pbe" if args.pbe else "sd",
                film_mode=args.film_mode,
            )
    except (CheckpointError, ValueError, OSError) as e:
        print(f"make_model: {e}", file=sys.stderr)
        return EXIT_REFUSED
    digest = save_pipeline(pipe, args.out)
    counts = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in pipe.components.items()
        if hasattr(module, "parameters")
    }
    hint = f"{pipe.hint_encoder.num_film_sites} FiLM sites" if hasattr(pipe, "hint_encoder") else "no hint branch"
    print(
        f"wrote {args.out}: resolution {pipe.config.resolution}, layout {pipe.config.input_layout}, "
        f"{hint}, {sum(counts.values()) / 1e6:.2f}M parameters"
    )
    print("  " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))
    print(f"  model_digest sha256:{digest}")
    print(f"  {weights_warning(dict(pipe.config)).upper()}")  # every model made here is untrained
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
