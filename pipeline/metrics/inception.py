"""The FID Inception v3 ("pt_inception-2015-12-05") in plain torch.nn: pool3 features, 2048-d.

    model = load_inception("s3://bucket/weights/pt_inception-2015-12-05-6726825d.pth", "cuda")
    features = model.features(images)          # images: N x H x W x 3 uint8 -> N x 2048 float32
    model.weights_sha256                       # recorded in every metrics file

Every FID library imports torchvision, which cannot run beside the CPU torch wheel, so the
network lives here. It is the TF 2015-12-05 graph as pytorch-fid ports it (`FIDInceptionA/C/E`:
average pools that ignore padding, a max pool in the last block) with the same state_dict keys
as the standard weights file, `pt_inception-2015-12-05-6726825d.pth` (published by
torch-fidelity as `weights-inception-2015-12-05-6726825d.pth`). `tests/unit/test_inception.py`
proves it equal to torch-fidelity's `FeatureExtractorInceptionV3` on the same weights file.

Protocol (METRICS.md): uint8 input, TF1-compatible bilinear resize to 299, `(x - 128) / 128`,
fp32 with TF32 off.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import storage

__all__ = ["FIDInceptionV3", "resize_bilinear_tf1", "load_inception", "weights_sha256", "random_init_"]

INPUT_SIZE = 299
FEATURE_DIM = 2048


def resize_bilinear_tf1(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize exactly as TF1 `tf.image.resize_bilinear(align_corners=False)`.

    TF1 samples output pixel i at source coordinate `i * in / out` (no half-pixel offset) and
    does not antialias; `F.interpolate` samples at `(i + 0.5) * in / out - 0.5`. The gap moves
    FID by whole points, so the arithmetic below follows torch-fidelity's
    `interpolate_bilinear_2d_like_tensorflow1x` (method "slow") operation for operation,
    float32 coordinates included, to be bit-exact with it.
    """
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"expected a float N x C x H x W tensor, got {tuple(images.shape)} {images.dtype}")
    height, width = images.shape[2], images.shape[3]
    device = images.device

    def grid(in_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = torch.tensor(in_size / size, dtype=torch.float32, device=device)
        coords = torch.arange(0, size, 1, dtype=images.dtype, device=device) * scale
        low = coords.long()
        high = (low + 1).clamp_max(in_size - 1)
        return low, high, coords - low.float()

    x_low, x_high, x_frac = grid(width)
    y_low, y_high, y_frac = grid(height)
    rows_low, rows_high = images[:, :, y_low, :], images[:, :, y_high, :]
    in_00, in_01 = rows_low[:, :, :, x_low], rows_low[:, :, :, x_high]
    in_10, in_11 = rows_high[:, :, :, x_low], rows_high[:, :, :, x_high]
    x_frac = x_frac.view(1, 1, 1, size)
    top = in_00 + (in_01 - in_00) * x_frac
    bottom = in_10 + (in_11 - in_10) * x_frac
    return top + (bottom - top) * y_frac.view(1, 1, size, 1)


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, as TF) + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **conv_kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool does not count the zero padding (torchvision's does).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35 x 35 block (pytorch-fid's FIDInceptionA)."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction block (unchanged from torchvision)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), branch3x3dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17 x 17 block with factorised 7x7 convolutions (pytorch-fid's FIDInceptionC)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            branch7x7dbl = conv(branch7x7dbl)
        branch_pool = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction block (unchanged from torchvision)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            branch7x7x3 = conv(branch7x7x3)
        return torch.cat([branch3x3, branch7x7x3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8 x 8 block (pytorch-fid's FIDInceptionE_1 with `max_pool=False`, FIDInceptionE_2 with
    `max_pool=True`: the TF graph's last block max-pools where the paper average-pools)."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_tf(x)
        return torch.cat([self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], 1)


@contextlib.contextmanager
def _tf32_off() -> Iterator[None]:
    # TF32 convolutions move FID by tenths. Set per call and restored, since the DTC model
    # may share the process. The new fp32_precision API only: mixing it with the legacy
    # `allow_tf32` flags makes torch raise.
    saved = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


class FIDInceptionV3(nn.Module):
    """Inception v3 as in the TF FID graph; `forward(uint8 N x 3 x H x W) -> N x 2048 float32`.

    Attribute names are the standard weights file's keys. `fc` (1008 classes) is never run:
    it is kept so that the standard file loads strictly.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.weights_sha256: str | None = None  # set by load_inception

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images N x 3 x H x W, got {tuple(images.shape)} {images.dtype}")
        with _tf32_off():
            x = resize_bilinear_tf1(images.float(), INPUT_SIZE)
            x = (x - 128) / 128
            x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
            x = F.max_pool2d(x, kernel_size=3, stride=2)
            for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c):
                x = block(x)
            for block in (self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
                x = block(x)
            return F.adaptive_avg_pool2d(x, output_size=(1, 1)).flatten(1)

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """N x H x W x 3 uint8 (one size) -> N x 2048 float32 pool3 features, in batches."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"expected uint8 images N x H x W x 3, got {images.shape} {images.dtype}")
        device = next(self.parameters()).device
        out = np.empty((images.shape[0], FEATURE_DIM), dtype=np.float32)
        for start in range(0, images.shape[0], batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device).permute(0, 3, 1, 2)
            out[start : start + batch_size] = self(batch).cpu().numpy()
        return out


def weights_sha256(data: bytes) -> str:
    """sha256 hex digest of a weights file's bytes (the extractor's identity in metrics files)."""
    return hashlib.sha256(data).hexdigest()


def load_inception(uri: str, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception from a weights file (local path or `s3://`), fp32, eval, no grad."""
    data = storage.read_bytes(uri)
    state_dict = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{uri} is not an FID Inception v3 state_dict (pt_inception-2015-12-05 keys): {e}") from e
    model.weights_sha256 = weights_sha256(data)
    return model.to(device=device, dtype=torch.float32).eval().requires_grad_(False)


def random_init_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights that keep activations O(1) through all 40+ layers, for tests and the demo
    (default init and identity BatchNorm statistics shrink them towards 0: every image would
    get the same features, and any comparison would pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, torch.nn.BatchNorm2d):
                c = module.num_features
                module.weight.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
                module.bias.copy_(0.1 * torch.randn(c, generator=g))
                module.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                module.running_var.copy_(0.8 + 0.4 * torch.rand(c, generator=g))
            elif isinstance(module, torch.nn.Linear):
                module.weight.copy_(0.02 * torch.randn(module.weight.shape, generator=g))
                module.bias.zero_()
    return model
