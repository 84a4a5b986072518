"""Tests for support/perceptual.py: LPIPS (VGG16, v0.1) on seeded random weights written in the published
layouts. Nothing is downloaded; images are tiny (32x32) so the full VGG16 trunk runs in a blink."""

import pytest
import torch
import torch.nn.functional as F

from support.perceptual import LPIPS, LPIPS_FILE, LPIPS_URL, VGG16_FILE, VGG16_URL, load_lpips

# torchvision VGG16 ("D"): the conv indices inside `features` and their (C_out, C_in), written out
# by hand from the architecture (not from support/perceptual.py) so the tests check the layout independently.
VGG_CONVS = [(0, 64, 3), (2, 64, 64), (5, 128, 64), (7, 128, 128), (10, 256, 128), (12, 256, 256),
             (14, 256, 256), (17, 512, 256), (19, 512, 512), (21, 512, 512), (24, 512, 512),
             (26, 512, 512), (28, 512, 512)]
HEAD_CHANNELS = [64, 128, 256, 512, 512]


def published_state_dicts(seed=0):
    """Random state dicts with the published key names and shapes of vgg16-397923af.pth and vgg.pth."""
    g = torch.Generator().manual_seed(seed)
    vgg = {}
    for i, c_out, c_in in VGG_CONVS:
        # He-like scale keeps activations alive through 13 layers
        vgg[f"features.{i}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * (2.0 / (9 * c_in)) ** 0.5
        vgg[f"features.{i}.bias"] = torch.randn(c_out, generator=g) * 0.05
    # The real file also holds the classifier (classifier.0/.3/.6 weight+bias, fc6 alone is
    # 4096 x 25088 = 400 MB). LPIPS must ignore those keys; tiny stand-ins under the same names
    # test that without writing 500 MB.
    for j in (0, 3, 6):
        vgg[f"classifier.{j}.weight"] = torch.zeros(2, 2)
        vgg[f"classifier.{j}.bias"] = torch.zeros(2)
    # LPIPS heads: (1, C, 1, 1), non-negative as in the published file (they were clamped >= 0)
    lin = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate(HEAD_CHANNELS)}
    return vgg, lin


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    vgg, lin = published_state_dicts()
    d = tmp_path_factory.mktemp("weights")
    # the published VGG16 file (2017) predates PyTorch's zip format; write ours the old way too, so the
    # weights_only load is exercised on the same serialisation
    torch.save(vgg, d / VGG16_FILE, _use_new_zipfile_serialization=False)
    torch.save(lin, d / LPIPS_FILE)
    return d, vgg, lin


@pytest.fixture(scope="module")
def model(weights):
    d, _, _ = weights
    return load_lpips(vgg_path=str(d / VGG16_FILE), lpips_path=str(d / LPIPS_FILE))


def images(seed, b=2, h=32, w=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * 2 - 1  # [-1, 1]


def reference_lpips(x, y, vgg, lin):
    """Slow, explicit LPIPS v0.1 straight from the definition, in float64.

    Walks the VGG16 config by hand (conv3x3+ReLU, 2x2 max-pool at 'M'), taps relu1_2, relu2_2,
    relu3_3, relu4_3, relu5_3, normalises every pixel's feature vector by its norm + 1e-10, and forms
    sum_c w_c * diff_c^2 as an explicit dot product, averaged over pixels and summed over layers.
    """
    x, y = x.double(), y.double()
    # the published constants are fp32 buffers; round them the same way before going to float64
    shift = torch.tensor([-0.030, -0.088, -0.188]).double().view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).double().view(1, 3, 1, 1)
    # (conv indices of a block) -- pooling happens between blocks; the tap is the block's last ReLU
    blocks = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]

    def taps(img):
        h, out = (img - shift) / scale, []
        for b, convs in enumerate(blocks):
            if b > 0:
                h = F.max_pool2d(h, 2, 2)
            for i in convs:
                h = F.conv2d(h, vgg[f"features.{i}.weight"].double(), vgg[f"features.{i}.bias"].double(), padding=1).relu()
            out.append(h)
        return out

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for k, (f0, f1) in enumerate(zip(taps(x), taps(y))):
        w = lin[f"lin{k}.model.1.weight"].double().flatten()  # (C,)
        B, C, H, W = f0.shape
        n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        per_pixel = torch.einsum("c,bchw->bhw", w, (n0 - n1) ** 2)  # (B, H, W)
        total += per_pixel.sum(dim=(1, 2)) / (H * W)
    return total


def test_zero_for_identical_images(model):
    x = images(1)
    assert torch.equal(model(x, x.clone()), torch.zeros(2))


def test_symmetric(model):
    x, y = images(1), images(2)
    torch.testing.assert_close(model(x, y), model(y, x), rtol=1e-6, atol=0)


def test_positive_and_per_image(model):
    x, y = images(1), images(2)
    d = model(x, y)
    assert d.shape == (2,) and d.dtype == torch.float32
    assert (d > 0).all()
    # each entry is the distance of its own pair: batch entries do not mix
    torch.testing.assert_close(d[1:], model(x[1:], y[1:]), rtol=1e-5, atol=0)
    # a smaller perturbation gives a smaller distance
    assert (model(x, x + 0.01 * (y - x)) < d).all()


def test_matches_slow_reference(weights, model):
    _, vgg, lin = weights
    x, y = images(3), images(4)
    ref = reference_lpips(x, y, vgg, lin)
    # fp32 model vs float64 reference: fp32 rounding only
    torch.testing.assert_close(model(x, y).double(), ref, rtol=1e-4, atol=1e-7)
    # the same model in float64 agrees to float64 precision (any mislaid layer or head would not)
    m64 = LPIPS().double()
    m64.load_state_dict(model.state_dict())
    torch.testing.assert_close(m64(x.double(), y.double()), ref, rtol=1e-10, atol=1e-12)


def test_gradient_reaches_input_but_not_parameters(model):
    x, y = images(5).requires_grad_(True), images(6)
    model(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_stays_in_eval_mode(model):
    parent = torch.nn.ModuleDict({"lpips": model})
    parent.train()
    assert not model.training and not any(m.training for m in model.modules())
    x, y = images(1), images(2)
    torch.testing.assert_close(model(x, y), model(x, y), rtol=0, atol=0)


def test_bf16_autocast_computes_in_fp32(model):
    x, y = images(7), images(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = model(x, y)
        d_same = model(x, x)
    assert d.dtype == torch.float32 and d.shape == (2,)
    assert torch.equal(d_same, torch.zeros(2))
    # the bf16 trunk changes the features a little, not the metric much
    torch.testing.assert_close(d, model(x, y), rtol=0.1, atol=0)


def test_state_dict_is_exactly_the_published_layout():
    vgg, lin = published_state_dicts()
    vgg_features = {k for k in vgg if k.startswith("features.")}
    assert set(LPIPS().state_dict()) == vgg_features | set(lin)


def test_wrong_or_missing_keys_rejected():
    vgg, lin = published_state_dicts()
    LPIPS().load_published(vgg, lin)  # the correct layout loads

    bad = dict(lin)
    bad["lin0.model.0.weight"] = bad.pop("lin0.model.1.weight")  # wrong key name
    with pytest.raises(ValueError, match="lin0.model"):
        LPIPS().load_published(vgg, bad)

    bad = dict(vgg)
    del bad["features.28.bias"]  # missing key
    with pytest.raises(ValueError, match="features.28.bias"):
        LPIPS().load_published(bad, lin)

    bad = dict(vgg)
    bad["features.30.weight"] = torch.zeros(1)  # unexpected key (not a classifier key)
    with pytest.raises(ValueError, match="features.30.weight"):
        LPIPS().load_published(bad, lin)

    bad = dict(lin)
    bad["lin3.model.1.weight"], bad["lin1.model.1.weight"] = bad["lin1.model.1.weight"], bad["lin3.model.1.weight"]
    with pytest.raises(ValueError, match="wrong shape"):
        LPIPS().load_published(vgg, bad)


def test_load_lpips_rejects_bad_file(tmp_path, weights):
    d, vgg, lin = weights
    bad = dict(lin)
    del bad["lin4.model.1.weight"]
    torch.save(bad, tmp_path / LPIPS_FILE)
    with pytest.raises(ValueError, match="lin4.model.1.weight"):
        load_lpips(vgg_path=str(d / VGG16_FILE), lpips_path=str(tmp_path / LPIPS_FILE))


def test_load_lpips_finds_files_by_env_var(monkeypatch, weights):
    d, _, _ = weights
    monkeypatch.setenv("DGAE_VGG16", str(d / VGG16_FILE))
    monkeypatch.setenv("DGAE_LPIPS", str(d / LPIPS_FILE))
    m = load_lpips()
    assert isinstance(m, LPIPS)


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    monkeypatch.delenv("DGAE_VGG16", raising=False)
    monkeypatch.delenv("DGAE_LPIPS", raising=False)
    monkeypatch.setenv("DGAE_WEIGHTS", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)  # so ./weights does not exist either
    return tmp_path


def test_missing_file_error_names_file_url_and_flag(no_weights, weights):
    with pytest.raises(FileNotFoundError) as e:
        load_lpips()
    msg = str(e.value)
    assert VGG16_FILE in msg and VGG16_URL in msg and "--vgg-path" in msg

    d, _, _ = weights
    with pytest.raises(FileNotFoundError) as e:
        load_lpips(vgg_path=str(d / VGG16_FILE))
    msg = str(e.value)
    assert LPIPS_FILE in msg and LPIPS_URL in msg and "--lpips-path" in msg


def test_not_required_returns_none_when_missing(no_weights, weights):
    assert load_lpips(required=False) is None
    d, _, _ = weights
    assert load_lpips(vgg_path=str(d / VGG16_FILE), required=False) is None


def test_rejects_tiny_or_mismatched_images(model):
    with pytest.raises(ValueError):
        model(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 16))


def test_weight_files_that_are_pickles_truncated_or_another_network_are_one_line(tmp_path):
    """The class 'a pretrained weight file that is wrong': each is a ValueError naming the flag and the file,
    never torch's traceback nor its advice to load with weights_only=False."""
    import pickle

    from support import checkpoints
    from support.inception import load_inception

    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(3)}, good)
    pickled = tmp_path / "pickled.pth"
    pickled.write_bytes(pickle.dumps(object))  # a pickle that would run code: refused by weights_only
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:50])
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], listed)
    for bad in (pickled, truncated, listed):
        with pytest.raises(ValueError, match=f"--inception-path {bad}: ") as e:
            load_inception(str(bad))
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=f"--inception-path {good}: not the published weights of this network"):
        load_inception(str(good))  # another network's (here: any) tensors
    assert checkpoints.load_weight_file(str(good), "--x", "url")["w"].shape == (3,)
