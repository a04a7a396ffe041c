"""pipeline.train.vgg against the reference: torchvision 0.28.0's own `torchvision/models/vgg.py`.

The oracle is torchvision's source, vendored byte for byte from its published wheel (no network
in tests; provenance and licence in tests/data/torchvision-0.28.0/README.md), never installed or
imported: torchvision does not work here. Its `cfgs`, `make_layers` and `VGG` are compiled from the file's
text alone (the module's other imports are torchvision internals), so `VGG(make_layers(cfgs["E"]))`
is torchvision's vgg19 without weights: same state_dict keys and shapes as `vgg19-dcbb9e9d.pth`.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path
from typing import Any, Optional, Union, cast

import pytest
import torch

from jobs.train import main as train_main
from pipeline.train.vgg import TAPS, VGG19Features, VGGWeightsError, load_vgg19, perceptual_loss, save_random_vgg19

ORACLE_VERSION = "0.28.0"
DATA = Path(__file__).resolve().parents[1] / "data"
ORACLE_FILE = DATA / f"torchvision-{ORACLE_VERSION}" / "torchvision" / "models" / "vgg.py"
# The file's sha256 as the RECORD of the published wheel (torchvision-0.28.0-cp311-cp311-
# manylinux_2_28_x86_64.whl, sha256 7e80f543b22503d9415e126db5f0ff3917036925e38560ee6b9ae38c571a4002)
# lists it: the oracle must stay that published code.
ORACLE_SHA256 = "214a5a421d7e5693315bb91c5087b47431660f39c905c97a806cc54840dfb04f"


def _oracle_source() -> str:
    data = ORACLE_FILE.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    assert digest == ORACLE_SHA256, f"{ORACLE_FILE} has sha256 {digest}, not the published wheel's"
    return data.decode()


@pytest.fixture(scope="module")
def torchvision_vgg19() -> torch.nn.Module:
    """torchvision's `VGG(make_layers(cfgs["E"]))`, from the vendored source text."""
    source = _oracle_source()
    tree = ast.parse(source)
    wanted = [
        node
        for node in tree.body
        if (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in ("make_layers", "VGG"))
        or (isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "cfgs")
    ]
    assert len(wanted) == 3, "torchvision's vgg.py no longer defines cfgs, make_layers and VGG"
    namespace = {
        "torch": torch,
        "nn": torch.nn,
        "cast": cast,
        "Union": Union,
        "Optional": Optional,
        "Any": Any,
        "_log_api_usage_once": lambda obj: None,
    }
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "torchvision/models/vgg.py", "exec"), namespace)
    torch.manual_seed(0)
    return namespace["VGG"](namespace["make_layers"](namespace["cfgs"]["E"])).eval()


def _assert_taps_equal(vgg: VGG19Features, torchvision_vgg19: torch.nn.Module) -> None:
    """Our five taps equal torchvision's `features[: tap + 1]` on the same normalised images."""
    image = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    normalised = (image - vgg.mean) / vgg.std
    with torch.no_grad():
        taps = vgg(image)
        for tap, index in zip(taps, TAPS):
            expected = torchvision_vgg19.features[: index + 1](normalised)
            torch.testing.assert_close(tap, expected, rtol=0, atol=1e-5)
    assert [t.shape[1] for t in taps] == [64, 128, 256, 512, 512]


def test_layout_and_taps_equal_torchvisions(torchvision_vgg19, tmp_path):
    reference = torchvision_vgg19.state_dict()
    ours = VGG19Features().state_dict()
    # our keys are torchvision's features.N keys up to relu5_2, with the same shapes
    assert set(ours) <= set(reference)
    assert {k: v.shape for k, v in ours.items()} == {k: reference[k].shape for k in ours}
    assert max(int(k.split(".")[1]) for k in ours) == 30 and TAPS[-1] == 31
    # torchvision's own features.N tensors in a file load as they are (the whole file, classifier
    # included, is the slow test below: 548 MB to write and read)
    path = tmp_path / "vgg19-features.pth"
    torch.save({k: reference[k] for k in ours}, path)
    vgg, sha256 = load_vgg19(str(path))
    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    _assert_taps_equal(vgg, torchvision_vgg19)


@pytest.mark.slow  # writes and reads a 548 MB file: `make test` runs it, `make test-unit` does not
def test_a_file_in_torchvisions_whole_layout_loads_as_it_is(torchvision_vgg19, tmp_path):
    """A file in torchvision's layout (features + classifier, as vgg19-dcbb9e9d.pth)."""
    path = tmp_path / "vgg19-random.pth"
    torch.save(torchvision_vgg19.state_dict(), path)
    vgg, sha256 = load_vgg19(str(path))
    assert sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    _assert_taps_equal(vgg, torchvision_vgg19)


def test_missing_or_wrong_weights_are_refused(tmp_path):
    with pytest.raises(VGGWeightsError, match="does not exist"):
        load_vgg19(str(tmp_path / "vgg19-dcbb9e9d.pth"))
    wrong = tmp_path / "not-vgg.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(VGGWeightsError, match="is not a VGG19 state dict: it lacks"):
        load_vgg19(str(wrong))


def test_the_job_refuses_a_perceptual_term_without_weights(tmp_path, capsys):
    base = ["--manifest", str(tmp_path / "m.parquet"), "--init-model", str(tmp_path), "--output", str(tmp_path / "o")]
    assert train_main(base) == 2
    message = capsys.readouterr().err
    assert "needs VGG19 weights: pass --vgg-weights" in message and "--perceptual-weight 0" in message
    assert not (tmp_path / "o").exists()


def test_random_weights_give_a_finite_differentiable_loss(tmp_path):
    vgg, sha256 = load_vgg19(save_random_vgg19(str(tmp_path / "random.pth")))
    assert not sha256.startswith("dcbb9e9d")  # the run record calls these "plumbing only"
    generated = torch.rand(1, 3, 32, 32, requires_grad=True)
    loss = perceptual_loss(vgg, generated, torch.rand(1, 3, 32, 32))
    loss.backward()
    assert torch.isfinite(loss) and generated.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in vgg.parameters())
