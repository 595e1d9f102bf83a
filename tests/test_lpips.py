"""LPIPS: weight-file layouts, distance invariants, gradients, and 'no weights' behaviour."""

from __future__ import annotations

import pytest
import torch

from qlip.losses.lpips import LPIPS, clip_normalized_to_lpips_input, load_lpips_network
from qlip.nn.vgg import VGG16Features
from qlip.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from qlip.weights import WeightsMismatchError

torch.set_num_threads(1)

# Layout of the standard ImageNet VGG16 file vgg16-397923af.pth (torchvision): the conv trunk ...
EXPECTED_VGG_FEATURES = {
    "features.0.weight": (64, 3, 3, 3),
    "features.0.bias": (64,),
    "features.2.weight": (64, 64, 3, 3),
    "features.2.bias": (64,),
    "features.5.weight": (128, 64, 3, 3),
    "features.5.bias": (128,),
    "features.7.weight": (128, 128, 3, 3),
    "features.7.bias": (128,),
    "features.10.weight": (256, 128, 3, 3),
    "features.10.bias": (256,),
    "features.12.weight": (256, 256, 3, 3),
    "features.12.bias": (256,),
    "features.14.weight": (256, 256, 3, 3),
    "features.14.bias": (256,),
    "features.17.weight": (512, 256, 3, 3),
    "features.17.bias": (512,),
    "features.19.weight": (512, 512, 3, 3),
    "features.19.bias": (512,),
    "features.21.weight": (512, 512, 3, 3),
    "features.21.bias": (512,),
    "features.24.weight": (512, 512, 3, 3),
    "features.24.bias": (512,),
    "features.26.weight": (512, 512, 3, 3),
    "features.26.bias": (512,),
    "features.28.weight": (512, 512, 3, 3),
    "features.28.bias": (512,),
}
# ... and the classifier, which LPIPS ignores (too large to materialize in a test: stand-ins are saved instead).
EXPECTED_VGG_CLASSIFIER = {
    "classifier.0.weight": (4096, 25088),
    "classifier.0.bias": (4096,),
    "classifier.3.weight": (4096, 4096),
    "classifier.3.bias": (4096,),
    "classifier.6.weight": (1000, 4096),
    "classifier.6.bias": (1000,),
}
# Layout of the LPIPS v0.1 heads file vgg.pth.
EXPECTED_LPIPS_HEADS = {
    "lin0.model.1.weight": (1, 64, 1, 1),
    "lin1.model.1.weight": (1, 128, 1, 1),
    "lin2.model.1.weight": (1, 256, 1, 1),
    "lin3.model.1.weight": (1, 512, 1, 1),
    "lin4.model.1.weight": (1, 512, 1, 1),
}


def _fake_vgg_file(path, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=g) * 0.05 for k, shape in EXPECTED_VGG_FEATURES.items()}
    stand_ins = {k: torch.zeros(2) for k in EXPECTED_VGG_CLASSIFIER}
    torch.save({**state, **stand_ins}, path)
    return state


def _fake_heads_file(path, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.rand(shape, generator=g) for k, shape in EXPECTED_LPIPS_HEADS.items()}
    torch.save(state, path)
    return state


@pytest.fixture(scope="module")
def random_lpips() -> LPIPS:
    torch.manual_seed(0)
    return LPIPS(allow_random_weights=True)


def _images(seed: int, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_vgg_trunk_matches_standard_feature_keys_and_taps():
    trunk = VGG16Features()
    assert {k: tuple(v.shape) for k, v in trunk.state_dict().items()} == EXPECTED_VGG_FEATURES
    taps = trunk(torch.rand(1, 3, 32, 32))
    assert [tuple(t.shape[1:]) for t in taps] == [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 2, 2)]
    assert all((t >= 0).all() for t in taps)  # taps are taken after the ReLUs


def test_lpips_state_dict_is_exactly_the_two_files(random_lpips):
    ours = {k: tuple(v.shape) for k, v in random_lpips.state_dict().items()}
    expected = {f"net.{k}": v for k, v in EXPECTED_VGG_FEATURES.items()}
    expected.update({f"heads.{k[3]}.weight": v for k, v in EXPECTED_LPIPS_HEADS.items()})
    assert ours == expected


def test_from_files_loads_both_files_unchanged(tmp_path):
    vgg = _fake_vgg_file(tmp_path / "vgg16-397923af.pth")
    heads = _fake_heads_file(tmp_path / "vgg.pth")
    net = LPIPS.from_files(tmp_path / "vgg16-397923af.pth", tmp_path / "vgg.pth")
    for key, value in vgg.items():
        torch.testing.assert_close(net.net.state_dict()[key], value, rtol=0, atol=0)
    for k in range(5):
        torch.testing.assert_close(net.heads[k].weight, heads[f"lin{k}.model.1.weight"], rtol=0, atol=0)
    x, y = _images(0), _images(1)
    assert (net(x, y) > 0).all()


def test_bad_files_are_reported_by_key(tmp_path):
    _fake_vgg_file(tmp_path / "vgg16.pth")
    heads = {k: torch.rand(shape) for k, shape in EXPECTED_LPIPS_HEADS.items()}
    del heads["lin3.model.1.weight"]
    heads["lin5.model.1.weight"] = torch.rand(1, 512, 1, 1)
    torch.save(heads, tmp_path / "bad_heads.pth")
    with pytest.raises(WeightsMismatchError) as err:
        LPIPS.from_files(tmp_path / "vgg16.pth", tmp_path / "bad_heads.pth")
    assert "lin3.model.1.weight" in str(err.value) and "lin5.model.1.weight" in str(err.value)

    vgg = {k: torch.zeros(shape) for k, shape in EXPECTED_VGG_FEATURES.items()}
    vgg["features.28.weight"] = torch.zeros(512, 512, 1, 1)
    torch.save(vgg, tmp_path / "bad_vgg.pth")
    with pytest.raises(WeightsMismatchError, match=r"features\.28\.weight"):
        LPIPS().load_vgg(tmp_path / "bad_vgg.pth")


def test_identity_symmetry_positivity(random_lpips):
    x, y = _images(2), _images(3)
    assert torch.equal(random_lpips(x, x), torch.zeros(2))
    d_xy, d_yx = random_lpips(x, y), random_lpips(y, x)
    assert d_xy.shape == (2,)
    torch.testing.assert_close(d_xy, d_yx)
    assert (d_xy > 0).all()
    # Per image: a batch's distances equal the distances of its images taken one at a time.
    torch.testing.assert_close(random_lpips(x[1:], y[1:]), d_xy[1:])


def test_distance_matches_the_formula_written_out(random_lpips):
    x, y = _images(4, n=1), _images(5, n=1)
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    fx, fy = random_lpips.net((x - shift) / scale), random_lpips.net((y - shift) / scale)
    total = torch.zeros(())
    for k, (a, b) in enumerate(zip(fx, fy)):
        a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
        b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
        w = random_lpips.heads[k].weight.view(-1)
        total = total + torch.einsum("c,chw->hw", w, (a - b)[0] ** 2).mean()
    torch.testing.assert_close(random_lpips(x, y)[0], total, rtol=1e-5, atol=1e-7)


def test_gradient_reaches_input_not_network(random_lpips):
    x = _images(6).requires_grad_(True)
    y = _images(7)
    random_lpips(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in random_lpips.parameters())
    random_lpips.train()
    assert not random_lpips.training  # stays frozen inside a training model


def test_no_weights_is_an_error_for_the_loss_and_unavailable_for_the_metric(tmp_path):
    with pytest.raises(RuntimeError, match="from_files"):
        LPIPS()(_images(0), _images(1))
    net, reason = load_lpips_network(None, None)
    assert net is None and "vgg16-397923af.pth" in reason and "vgg.pth" in reason
    net, reason = load_lpips_network(tmp_path / "missing.pth", tmp_path / "vgg.pth")
    assert net is None and "does not exist" in reason


def test_clip_normalized_helper_maps_pixels_to_minus_one_one():
    pixels = torch.rand(2, 3, 4, 4)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(clip_normalized_to_lpips_input((pixels - mean) / std), pixels * 2 - 1)
