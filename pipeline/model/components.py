"""DTC's trainable parts around the SD-1.5 inpainting UNet (see shared/DTC_MODEL.md).

- `DTCImageProjection`: DINOv2 tokens (all of them) -> UNet cross-attention width, plus the
  learnable null embedding that is the unconditional half of classifier-free guidance.
- `DTCHintAdapter`: the paper's "shallow convolutional network comprising four layers" that
  brings the pasted-product hint from pixels to latent size; last conv zero-initialised.
- `DTCHintEncoder`: a trainable copy of the main UNet's conv_in, time embedding, down blocks
  and mid block (like `ControlNetModel.from_unet`), ending in one fusion head per skip: FiLM
  (spatial or channel), an additive residual (ControlNet) or cross-attention (TryOnDiffusion);
  or no hint branch at all (`film_mode="off"`).
- `DTCUNet2DConditionModel`: the stock diffusers UNet with a forward that applies
  `s * (1 + gamma) + beta` to its 12 down skips and the mid output. Its weights are a stock
  UNet's, unchanged: `UNet2DConditionModel.from_pretrained` loads the same folder.

With zero-initialised FiLM heads a fresh DTC computes exactly what its main UNet computes, for
the same `encoder_hidden_states`. That makes a DTC assembled from SD-inpainting weights a faithful
warm start, not a working model: its context (projected DINOv2 tokens) is new to that UNet and its
hint branch adds nothing until trained (see `assemble`).

Training: every module here is trainable. The main UNet and the hint encoder support diffusers'
gradient checkpointing (`enable_gradient_checkpointing()`): as in `UNet2DConditionModel` and
`ControlNetModel`, the model class only declares support and diffusers' resnet / transformer
blocks recompute their activations in the backward pass, which the FiLM walk below calls
unchanged. The adapter (three strided convs on pixels) and the projection (one Linear) hold a few
tens of MB of activations per 512^2 sample against the UNet's gigabytes: they do not need it and
do not offer it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import get_down_block, get_mid_block
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from pipeline.schema import DEFAULT_FILM_MODE, FUSION_FORMS

# Per skip site: (gamma, beta) of FiLM (gamma None: an additive residual), or a function of the
# main skip (cross-attention: what it reads from the hint depends on the skip).
FilmParams = list[tuple[torch.Tensor | None, torch.Tensor] | Callable[[torch.Tensor], torch.Tensor]]

# UNet2DConditionModel settings that `encode_down`, the hint encoder and the FiLM forward do not
# implement. Each must keep diffusers' default (SD-1.x configs do); otherwise the hint encoder
# would not be a copy and the FiLM walk would silently compute something other than the UNet.
UNMIRRORED_UNET_SETTINGS = (
    "center_input_sample",
    "dropout",
    "dual_cross_attention",
    "class_embed_type",
    "num_class_embeds",
    "addition_embed_type",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "time_embedding_type",
    "time_embedding_dim",
    "time_embedding_act_fn",
    "timestep_post_act",
    "time_cond_proj_dim",
    "conv_in_kernel",
    "attention_type",
    "cross_attention_norm",
    "resnet_skip_time_act",
    "resnet_out_scale_factor",
)


def check_sd_style(unet_config) -> None:
    """Refuse a UNet config that sets any of `UNMIRRORED_UNET_SETTINGS` away from its default."""
    defaults = inspect.signature(UNet2DConditionModel.__init__).parameters
    for key in UNMIRRORED_UNET_SETTINGS:
        value, default = unet_config.get(key, defaults[key].default), defaults[key].default
        if value != default:
            raise ValueError(f"DTC supports SD-style UNets only; this UNet sets {key}={value!r} (SD's: {default!r})")


class DTCImageProjection(ModelMixin, ConfigMixin):
    """`Linear(image_hidden_size -> cross_attention_dim)` over every DINOv2 token, and the
    null context used for the unconditional CFG branch. Trained from scratch: until then its
    output is a context the SD UNet has never seen."""

    @register_to_config
    def __init__(self, image_hidden_size: int = 1536, cross_attention_dim: int = 768, num_tokens: int = 257):
        super().__init__()
        self.proj = nn.Linear(image_hidden_size, cross_attention_dim)
        # Decision (DTC_MODEL.md): one learnable embedding per token, 1 x T x D. PBE initialises
        # its (1 x 1 x D) vector with randn; we do the same so cond and uncond differ from step 0.
        self.null_embedding = nn.Parameter(torch.randn(1, num_tokens, cross_attention_dim))

    def forward(self, image_tokens: torch.Tensor) -> torch.Tensor:
        if image_tokens.shape[1] != self.config.num_tokens:
            raise ValueError(
                f"image encoder gave {image_tokens.shape[1]} tokens, the projection expects "
                f"{self.config.num_tokens} (check the product size and the DINOv2 patch size)"
            )
        return self.proj(image_tokens)

    def null_context(self, batch_size: int) -> torch.Tensor:
        return self.null_embedding.expand(batch_size, -1, -1)


class DTCHintAdapter(ModelMixin, ConfigMixin):
    """Conv(3->32,s2)-SiLU-Conv(32->64,s2)-SiLU-Conv(64->128,s2)-SiLU-Conv(128->4,s1): pixels at
    the working resolution to latents at 1/8 of it. The last conv starts at zero so a fresh
    adapter adds nothing to the masked-image latents."""

    @register_to_config
    def __init__(self, in_channels: int = 3, latent_channels: int = 4, channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for width in channels:
            layers += [nn.Conv2d(prev, width, 3, stride=2, padding=1), nn.SiLU()]
            prev = width
        last = nn.Conv2d(prev, latent_channels, 3, stride=1, padding=1)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, hint: torch.Tensor) -> torch.Tensor:
        return self.net(hint)


def encode_down(module, sample: torch.Tensor, emb: torch.Tensor, encoder_hidden_states: torch.Tensor):
    """conv_in and the down blocks of a UNet (or of its hint-encoder copy): (sample, skips),
    the skips collected exactly as diffusers' UNet2DConditionModel collects them."""
    sample = module.conv_in(sample)
    skips: tuple[torch.Tensor, ...] = (sample,)
    for block in module.down_blocks:
        if getattr(block, "has_cross_attention", False):
            sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            sample, res = block(hidden_states=sample, temb=emb)
        skips += res
    return sample, skips


class HintCrossAttention(nn.Module):
    """One skip site's cross-attention fusion (TryOnDiffusion's, as the DTC paper cites): every
    pixel of the main skip attends to all pixels of the hint features at the same site;
    `skip + out(attention(q=skip, kv=hint))`, heads of 32 channels (one for fewer). `out`
    starts at zero, so a fresh head leaves the skip untouched, as the FiLM heads do."""

    def __init__(self, channels: int, groups: int, eps: float):
        super().__init__()
        self.heads = channels // 32 if channels % 32 == 0 and channels >= 32 else 1
        self.norm_skip = nn.GroupNorm(groups, channels, eps=eps)
        self.norm_hint = nn.GroupNorm(groups, channels, eps=eps)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_kv = nn.Linear(channels, 2 * channels, bias=False)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, hint: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        b, c, h, w = skip.shape
        tokens = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731  B x C x H x W -> B x HW x C
        split = lambda x: x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  -> B x heads x N x d
        q = split(self.to_q(tokens(self.norm_skip(skip))))
        k, v = (split(t) for t in self.to_kv(tokens(self.norm_hint(hint))).chunk(2, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        return skip + self.out(attended).transpose(1, 2).reshape(b, c, h, w)


def _per_block(value, n: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


class DTCHintEncoder(ModelMixin, ConfigMixin):
    """Encoder half of a UNet (conv_in, time embedding, down blocks, mid block) whose skip
    tensors become FiLM parameters for the main UNet: 13 sites for SD-1.5.

    `film_mode` is the fusion form (`schema.FUSION_FORMS`; the name predates the non-FiLM forms
    and stays, so every saved folder keeps loading). `"spatial"` (default,
    `schema.DEFAULT_FILM_MODE`): `[gamma, beta] = Conv1x1(h)` per site, one value per pixel.
    `"channel"`: `[gamma, beta] = Linear(mean_hw(h))`, one value per channel (the default before
    the fusion table). `"add"`: ControlNet's zero convolution, `skip + Conv1x1(h)`. `"xattn"`:
    `HintCrossAttention`, the skip's pixels attending to the hint's. `"off"`: no hint branch:
    nothing is built, `forward` returns None and the UNet runs its stock forward (the ablation
    trained as such; its hint adapter then gets no gradient, so a multi-worker DDP run of it would
    need `find_unused_parameters`). A saved folder records its form, so changing the default
    never changes a model. Every head starts at zero, so a fresh encoder leaves the main UNet
    untouched.

    Gradient checkpointing is diffusers' own: the down and mid blocks carry the
    `gradient_checkpointing` flag that `enable_gradient_checkpointing()` sets.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 9,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int | tuple[int, ...] = 2,
        cross_attention_dim: int | tuple[int, ...] = 768,
        attention_head_dim: int | tuple[int, ...] = 8,
        num_attention_heads: int | tuple[int, ...] | None = None,
        transformer_layers_per_block: int | tuple[int, ...] = 1,
        only_cross_attention: bool | tuple[bool, ...] = False,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        downsample_padding: int = 1,
        mid_block_type: str = "UNetMidBlock2DCrossAttn",
        mid_block_scale_factor: float = 1.0,
        act_fn: str = "silu",
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        resnet_time_scale_shift: str = "default",
        film_mode: str = DEFAULT_FILM_MODE,
    ):
        super().__init__()
        if film_mode not in FUSION_FORMS:
            raise ValueError(f"film_mode must be one of {FUSION_FORMS}, got {film_mode!r}")
        self.film_heads = nn.ModuleList()
        if film_mode == "off":
            # no parameters; one buffer so the folder still holds a hint_encoder weights file,
            # which checkpoint checks require of every component
            self.register_buffer("no_hint_branch", torch.zeros(1))
            return
        n = len(down_block_types)
        # diffusers' SD configs call the head count `attention_head_dim`; mirror the UNet's reading.
        num_attention_heads = _per_block(num_attention_heads or attention_head_dim, n)
        attention_head_dim = _per_block(attention_head_dim, n)
        layers_per_block = _per_block(layers_per_block, n)
        cross_attention_dim = _per_block(cross_attention_dim, n)
        transformer_layers_per_block = _per_block(transformer_layers_per_block, n)
        only_cross_attention = _per_block(only_cross_attention, n)

        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], kernel_size=3, padding=1)
        time_embed_dim = block_out_channels[0] * 4
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, act_fn=act_fn)

        self.down_blocks = nn.ModuleList()
        skip_channels = [block_out_channels[0]]
        output_channel = block_out_channels[0]
        for i, block_type in enumerate(down_block_types):
            input_channel, output_channel = output_channel, block_out_channels[i]
            is_final_block = i == n - 1
            self.down_blocks.append(
                get_down_block(
                    block_type,
                    num_layers=layers_per_block[i],
                    transformer_layers_per_block=transformer_layers_per_block[i],
                    in_channels=input_channel,
                    out_channels=output_channel,
                    temb_channels=time_embed_dim,
                    add_downsample=not is_final_block,
                    resnet_eps=norm_eps,
                    resnet_act_fn=act_fn,
                    resnet_groups=norm_num_groups,
                    cross_attention_dim=cross_attention_dim[i],
                    num_attention_heads=num_attention_heads[i],
                    downsample_padding=downsample_padding,
                    use_linear_projection=use_linear_projection,
                    only_cross_attention=only_cross_attention[i],
                    upcast_attention=upcast_attention,
                    resnet_time_scale_shift=resnet_time_scale_shift,
                    attention_head_dim=attention_head_dim[i] if attention_head_dim[i] is not None else output_channel,
                )
            )
            skip_channels += [output_channel] * layers_per_block[i] + ([] if is_final_block else [output_channel])
        self.mid_block = get_mid_block(
            mid_block_type,
            temb_channels=time_embed_dim,
            in_channels=block_out_channels[-1],
            resnet_eps=norm_eps,
            resnet_act_fn=act_fn,
            resnet_groups=norm_num_groups,
            output_scale_factor=mid_block_scale_factor,
            transformer_layers_per_block=transformer_layers_per_block[-1],
            num_attention_heads=num_attention_heads[-1],
            cross_attention_dim=cross_attention_dim[-1],
            use_linear_projection=use_linear_projection,
            upcast_attention=upcast_attention,
            resnet_time_scale_shift=resnet_time_scale_shift,
            attention_head_dim=attention_head_dim[-1],
        )
        skip_channels.append(block_out_channels[-1])  # the mid block's output is the 13th site

        make_head = {
            "spatial": lambda c: nn.Conv2d(c, 2 * c, 1),
            "channel": lambda c: nn.Linear(c, 2 * c),
            "add": lambda c: nn.Conv2d(c, c, 1),
            "xattn": lambda c: HintCrossAttention(c, norm_num_groups, norm_eps),
        }[film_mode]
        self.film_heads.extend(make_head(c) for c in skip_channels)
        self.silence_()

    @torch.no_grad()
    def silence_(self) -> None:
        """Zero every head's output layer: the hint branch then changes nothing (a fresh
        encoder's state; on a trained one, the ablation "hint branch off" at inference)."""
        for head in self.film_heads:
            last = head.out if isinstance(head, HintCrossAttention) else head
            last.weight.zero_()
            last.bias.zero_()

    @property
    def num_film_sites(self) -> int:
        return len(self.film_heads)

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, **hint_options) -> DTCHintEncoder:
        """A hint encoder whose encoder weights are a copy of `unet`'s (fresh FiLM heads).
        `hint_options` (`film_mode`) override this class's own defaults, declared once in `__init__`."""
        cfg = unet.config
        check_sd_style(cfg)
        encoder = cls(
            in_channels=cfg.in_channels,
            down_block_types=tuple(cfg.down_block_types),
            block_out_channels=tuple(cfg.block_out_channels),
            layers_per_block=cfg.layers_per_block,
            cross_attention_dim=cfg.cross_attention_dim,
            attention_head_dim=cfg.attention_head_dim,
            num_attention_heads=cfg.num_attention_heads,
            transformer_layers_per_block=cfg.transformer_layers_per_block,
            only_cross_attention=cfg.only_cross_attention,
            use_linear_projection=cfg.use_linear_projection,
            upcast_attention=cfg.upcast_attention,
            downsample_padding=cfg.downsample_padding,
            mid_block_type=cfg.mid_block_type,
            mid_block_scale_factor=cfg.mid_block_scale_factor,
            act_fn=cfg.act_fn,
            norm_num_groups=cfg.norm_num_groups,
            norm_eps=cfg.norm_eps,
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
            resnet_time_scale_shift=cfg.resnet_time_scale_shift,
            **hint_options,
        )
        if encoder.config.film_mode == "off":
            return encoder
        if (encoder.device, encoder.dtype) != (unet.device, unet.dtype):
            encoder.to(device=unet.device, dtype=unet.dtype)
        for name in ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block"):
            getattr(encoder, name).load_state_dict(getattr(unet, name).state_dict())
        return encoder

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> FilmParams | None:
        mode = self.config.film_mode
        if mode == "off":
            return None
        timesteps = timestep.expand(sample.shape[0]) if timestep.ndim else timestep[None].expand(sample.shape[0])
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype=sample.dtype))
        sample, down = encode_down(self, sample, emb, encoder_hidden_states)
        skips = [*down, self.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)]

        film: FilmParams = []
        for h, head in zip(skips, self.film_heads):
            if mode == "spatial":
                film.append(tuple(head(h).chunk(2, dim=1)))
            elif mode == "channel":
                film.append(tuple(head(h.mean(dim=(2, 3)))[:, :, None, None].chunk(2, dim=1)))
            elif mode == "add":
                film.append((None, head(h)))
            else:
                film.append(partial(head, h))
        return film


def apply_film(skip: torch.Tensor, params) -> torch.Tensor:
    """One site's fusion: `skip * (1 + gamma) + beta` (FiLM), `skip + beta` (gamma None: an
    additive residual), or `params(skip)` (cross-attention)."""
    if callable(params):
        return params(skip)
    gamma, beta = params
    return skip + beta if gamma is None else skip * (1 + gamma) + beta


class DTCUNet2DConditionModel(UNet2DConditionModel):
    """SD UNet whose forward modulates its skips with FiLM parameters from the hint encoder.

    diffusers' UNet accepts only *additive* residuals (ControlNet's), and FiLM multiplies the
    skip by `1 + gamma`, so the down/mid/up walk is written out here for the SD-style configs
    DTC uses (`check_sd_style`: positional time embedding, no class or added embeddings). Weights
    and config are the stock UNet's; without `skip_film` this is the stock forward. Gradient
    checkpointing is inherited: the walk calls the stock blocks, which checkpoint themselves.
    """

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        skip_film: FilmParams | None = None,
        return_dict: bool = True,
        **stock_kwargs,
    ) -> UNet2DConditionOutput | tuple:
        if skip_film is None:
            return super().forward(sample, timestep, encoder_hidden_states, return_dict=return_dict, **stock_kwargs)
        if stock_kwargs:
            raise ValueError(f"skip_film cannot be combined with {sorted(stock_kwargs)}")

        # 1. time
        upsample_factor = 2**self.num_upsamplers
        forward_upsample_size = any(dim % upsample_factor for dim in sample.shape[-2:])
        emb = self.time_embedding(self.get_time_embed(sample=sample, timestep=timestep))

        # 2. down: collect skips exactly as the stock UNet does
        sample, skips = encode_down(self, sample, emb, encoder_hidden_states)
        if len(skip_film) != len(skips) + 1:
            raise ValueError(f"skip_film has {len(skip_film)} sites, this UNet has {len(skips) + 1}")

        # 3. mid
        sample = self.mid_block(sample, emb, encoder_hidden_states=encoder_hidden_states)

        # 4. FiLM: only the skip copies and the mid output are modulated (ControlNet's sites)
        skips = tuple(apply_film(s, p) for s, p in zip(skips, skip_film[:-1]))
        sample = apply_film(sample, skip_film[-1])

        # 5. up
        upsample_size = None
        for i, block in enumerate(self.up_blocks):
            is_final_block = i == len(self.up_blocks) - 1
            res_samples, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            if not is_final_block and forward_upsample_size:
                upsample_size = skips[-1].shape[2:]
            if getattr(block, "has_cross_attention", False):
                sample = block(
                    hidden_states=sample,
                    temb=emb,
                    res_hidden_states_tuple=res_samples,
                    encoder_hidden_states=encoder_hidden_states,
                    upsample_size=upsample_size,
                )
            else:
                sample = block(
                    hidden_states=sample, temb=emb, res_hidden_states_tuple=res_samples, upsample_size=upsample_size
                )

        # 6. out
        if self.conv_norm_out is not None:
            sample = self.conv_act(self.conv_norm_out(sample))
        sample = self.conv_out(sample)
        return UNet2DConditionOutput(sample=sample) if return_dict else (sample,)
