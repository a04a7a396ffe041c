"""pipeline.inception against the reference: torch-fidelity 0.4.0's FeatureExtractorInceptionV3.

The oracle is the published code, vendored (no network in tests): the six modules of the
torch-fidelity 0.4.0 wheel that `feature_extractor_inceptionv3` needs, byte for byte, under
tests/data/torch_fidelity-0.4.0/ (provenance and licence in its README.md). Never
installed: with torch_fidelity importable, `import torchmetrics` imports torchvision, which fails
here; the modules are imported through an empty `torch_fidelity` package registered in
`sys.modules` only while they load. Same random weights file, same uint8 images -> same pool3
features.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.metrics.inception import FIDInceptionV3, load_inception, random_init_, resize_bilinear_tf1

ORACLE_VERSION = "0.4.0"
ORACLE_DIR = Path(__file__).resolve().parents[1] / "data" / f"torch_fidelity-{ORACLE_VERSION}" / "torch_fidelity"
# The sha256 of each vendored file, as the RECORD of the published wheel (torch_fidelity-0.4.0-
# py3-none-any.whl, sha256 99f4c610ea16972628eceb26afb0008e528da2d44123db947b408750efbd35d4)
# lists it: the oracle must stay that published code.
ORACLE_FILES = {
    "feature_extractor_inceptionv3.py": "41308fd162a3571d8bf052e2dbf7b25f946daa5a74a591d1b85b76ca7ba0262f",
    "feature_extractor_base.py": "0ac0ac8aa4459941889e70fb0ac6dee6ad2df48da16c8b800255e0c25e6b66cd",
    "helpers.py": "ed8683fbe790b4c48ce3c55e922cf1353f3286d7afcaa5082e09f6b956b80789",
    "interpolate_compat_tensorflow.py": "e90a965f0c4f6e13b9d216308ba34f8162296bf4a440d82988f453a935ccee11",
    "defaults.py": "ceb46eebd2a4d53e4dfaf322a36a8a45e46872cc1236ac3155a786b3c401b312",
    "deprecations.py": "79b720b01578d1951155810a4b7954b27f9806380bf56192ce67637a9f804fb3",
}
STANDARD_NAME = "pt_inception-2015-12-05-6726825d.pth"


def _oracle_package_dir() -> Path:
    """The vendored `torch_fidelity/` folder, each file checked against the wheel's RECORD."""
    assert sorted(p.name for p in ORACLE_DIR.iterdir() if p.suffix == ".py") == sorted(ORACLE_FILES)
    for name, expected in ORACLE_FILES.items():
        digest = hashlib.sha256((ORACLE_DIR / name).read_bytes()).hexdigest()
        assert digest == expected, f"{ORACLE_DIR / name} has sha256 {digest}, not the published wheel's"
    return ORACLE_DIR


@pytest.fixture(scope="module")
def oracle() -> types.ModuleType:
    """torch_fidelity.feature_extractor_inceptionv3, imported without installing torch-fidelity."""
    package_dir = _oracle_package_dir()
    assert not any(m == "torch_fidelity" or m.startswith("torch_fidelity.") for m in sys.modules)
    had_torchvision = "torchvision" in sys.modules
    package = types.ModuleType("torch_fidelity")
    package.__path__ = [str(package_dir)]
    sys.modules["torch_fidelity"] = package
    try:
        module = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    finally:
        # Unregistered at once: torchmetrics probes for torch_fidelity and would take this
        # half-package for an installed one in later tests of this process.
        for name in [m for m in sys.modules if m == "torch_fidelity" or m.startswith("torch_fidelity.")]:
            del sys.modules[name]
    assert had_torchvision or "torchvision" not in sys.modules, "the oracle import pulled in torchvision"
    return module


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """A random-weights file in the standard file's layout (a plain state_dict)."""
    path = tmp_path_factory.mktemp("inception") / STANDARD_NAME
    torch.save(random_init_(FIDInceptionV3(), seed=0).state_dict(), path)
    return path


def test_resize_is_bit_exact_with_torch_fidelity(oracle):
    g = torch.Generator().manual_seed(1)
    for height, width in ((64, 80), (299, 299), (512, 333), (7, 5)):
        x = torch.randint(0, 256, (2, 3, height, width), generator=g).float()
        expected = oracle.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
        assert torch.equal(resize_bilinear_tf1(x, 299), expected), (height, width)


@pytest.mark.slow  # Inception forward twice, ours and torch-fidelity's (seconds): `make test` runs it
def test_features_match_torch_fidelity(oracle, weights_file):
    reference = oracle.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights_file)
    )
    ours = load_inception(str(weights_file), "cpu")
    # Same state_dict keys and shapes as the file torch-fidelity (and pytorch-fid) load.
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }

    g = torch.Generator().manual_seed(2)
    for shape in ((4, 3, 64, 80), (1, 3, 320, 301)):  # upsampling and downsampling to 299
        images = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        with torch.no_grad():
            (expected,) = reference(images)
            got = ours(images)
        assert got.shape == (shape[0], 2048) and got.dtype == torch.float32
        assert expected.std() > 0.05, "degenerate random weights: features collapsed"
        assert shape[0] == 1 or (expected[0] - expected[1]).abs().max() > 1e-2, "features do not depend on the image"
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    # The numpy entry point (N x H x W x 3, batched) gives the same features.
    nhwc = images.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours.features(nhwc), expected.numpy(), rtol=0, atol=1e-5)


def test_bad_inputs_are_refused(weights_file, tmp_path):
    model = load_inception(str(weights_file), "cpu")
    with pytest.raises(ValueError, match=r"uint8 images N x 3 x H x W, got \(1, 3, 8, 8\) torch.float32"):
        model(torch.zeros(1, 3, 8, 8))
    wrong = tmp_path / "not-inception.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="not an FID Inception v3 state_dict"):
        load_inception(str(wrong), "cpu")
