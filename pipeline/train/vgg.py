"""The perceptual network: VGG19's convolutional trunk in pure torch, torchvision's state-dict layout.

    vgg, sha256 = load_vgg19("s3://models/vgg/vgg19-dcbb9e9d.pth")
    loss = perceptual_loss(vgg, generated_01, target_01)

No package ships VGG weights without torchvision (lpips, piq and DISTS all call
`torchvision.models.vgg*(pretrained=True)`), and torchvision does not work here, so the network
is written out: `features` is torchvision's `make_layers(cfgs["E"])` (VGG19, no batch norm) up to
index 31 (relu5_2), so `features.N.weight` / `features.N.bias` load straight from torchvision's
published `vgg19-dcbb9e9d.pth` (its deeper `features.32+` and `classifier.*` keys are not used).
tests/unit/test_train_vgg.py proves the layout against torchvision's own source, read from its
wheel. Taps (DCI-VTON, DTC_MODEL.md): relu1_2, relu2_2, relu3_2, relu4_2, relu5_2 = indices 3, 8,
13, 22, 31, weights 1/32, 1/16, 1/8, 1/4, 1; inputs RGB in [0, 1], ImageNet-normalised (the
torchvision weights' convention; DCI-VTON's Caffe VGG wanted BGR x255 instead).

torchvision names its weight files `<arch>-<first 8 hex of the file's sha256>.pth`: `load_vgg19`
returns the file's sha256, and the run record and summary say whether it is the published file
(`config.PUBLISHED_VGG19_SHA256_PREFIX`). Random weights (`save_random_vgg19`, for tests and
benchmarks) make the perceptual term plumbing only: the record and the summary say so.
"""

from __future__ import annotations

import hashlib
import io

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import storage

__all__ = [
    "VGG19_CFG",
    "TAPS",
    "TAP_WEIGHTS",
    "VGG19Features",
    "VGGWeightsError",
    "load_vgg19",
    "save_random_vgg19",
    "perceptual_loss",
]

# torchvision's cfgs["E"] up to relu5_2: conv widths, "M" = 2x2 max pool.
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512)
TAPS = (3, 8, 13, 22, 31)  # relu1_2, relu2_2, relu3_2, relu4_2, relu5_2
TAP_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGWeightsError(ValueError):
    """The VGG weights are missing or are not a VGG19 state dict; the message says which."""


class VGG19Features(nn.Module):
    """`features[:32]` of torchvision's VGG19; `forward` returns the five tap activations."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in VGG19_CFG:
            if width == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN)[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD)[None, :, None, None], persistent=False)

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        """B x 3 x H x W RGB in [0, 1] -> activations at TAPS."""
        x = (image - self.mean) / self.std
        taps = []
        for index, layer in enumerate(self.features):
            # a tap's ReLU must not run in place: its output is kept for the loss
            x = F.relu(x) if isinstance(layer, nn.ReLU) else layer(x)
            if index in TAPS:
                taps.append(x)
        return taps


def load_vgg19(uri: str, device: str | torch.device = "cpu") -> tuple[VGG19Features, str]:
    """The frozen network from a torchvision-layout state dict (path or s3://) and the file's sha256."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError as e:
        raise VGGWeightsError(f"--vgg-weights {uri} does not exist (torchvision's vgg19-dcbb9e9d.pth expected)") from e
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is the file's
        raise VGGWeightsError(f"--vgg-weights {uri} is not a torch state dict: {type(e).__name__}: {e}") from e
    module = VGG19Features()
    wanted = list(module.state_dict())  # features.N.weight / .bias of the convolutions
    missing = [k for k in wanted if k not in state]
    if missing:
        raise VGGWeightsError(f"--vgg-weights {uri} is not a VGG19 state dict: it lacks {missing[:4]}")
    bad = [k for k in wanted if tuple(state[k].shape) != tuple(module.state_dict()[k].shape)]
    if bad:
        raise VGGWeightsError(
            f"--vgg-weights {uri}: {bad[0]} is {tuple(state[bad[0]].shape)}, VGG19's is "
            f"{tuple(module.state_dict()[bad[0]].shape)}"
        )
    module.load_state_dict({k: state[k] for k in wanted})
    module.requires_grad_(False).eval().to(device)
    return module, hashlib.sha256(data).hexdigest()


def save_random_vgg19(path: str, seed: int = 0) -> str:
    """A random VGG19 trunk in torchvision's layout and init (kaiming normal, fan_out). Plumbing
    only: a perceptual loss through it measures nothing; runs using it say so."""
    torch.manual_seed(seed)
    module = VGG19Features()
    for layer in module.features:
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    storage.write_bytes(path, buffer.getvalue())
    return path


def perceptual_loss(vgg: VGG19Features, generated: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """sum_k w_k * L1(VGG_k(generated), VGG_k(target)); images in [0, 1], the target's features without gradient."""
    with torch.no_grad():
        target_taps = vgg(target)
    generated_taps = vgg(generated)
    terms = [w * F.l1_loss(g.float(), t.float()) for w, g, t in zip(TAP_WEIGHTS, generated_taps, target_taps)]
    return torch.stack(terms).sum()
