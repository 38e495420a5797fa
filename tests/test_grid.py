"""TokenGrid: layout arithmetic and exact grid inference."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smoothguide import TokenGrid


def test_counts_and_slice() -> None:
    g = TokenGrid(3, 5, frames=2, prefix=4, suffix=1)
    assert g.shape == (2, 3, 5)
    assert g.spatial_tokens == 30
    assert g.num_tokens == 35
    assert list(range(40))[g.spatial_slice] == list(range(4, 34))


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    scale=st.integers(1, 4),
    frames=st.integers(1, 3),
    prefix=st.integers(0, 5),
    suffix=st.integers(0, 5),
)
def test_infer_recovers_grid_of_exact_aspect(
    h: int, w: int, scale: int, frames: int, prefix: int, suffix: int
) -> None:
    # A latent of shape (scale*h, scale*w) patchified/downsampled by `scale`.
    n = prefix + frames * h * w + suffix
    g = TokenGrid.infer(
        n, aspect=(scale * h, scale * w), frames=frames, prefix=prefix, suffix=suffix
    )
    # Any grid with h/w ratio equal to the reduced aspect and h*w tokens is (h, w) itself.
    assert (g.height, g.width) == (h, w)
    assert g.num_tokens == n


@pytest.mark.parametrize(
    ("latent", "factor"), [((100, 60), 8), ((75, 33), 4), ((17, 9), 2), ((64, 129), 4)]
)
def test_infer_unet_ceil_downsampling(latent: tuple[int, int], factor: int) -> None:
    # Strided convs with padding 1 produce ceil(n / 2) per halving.
    h, w = latent
    for _ in range(int(math.log2(factor))):
        h, w = -(-h // 2), -(-w // 2)
    g = TokenGrid.infer(h * w, aspect=latent)
    assert (g.height, g.width) == (h, w)


def test_infer_never_guesses_a_square() -> None:
    # 64 tokens from a 2:1 latent is not 8x8; no 2:1 grid has 64 tokens -> error.
    with pytest.raises(ValueError, match="fit no grid"):
        TokenGrid.infer(64, aspect=(32, 16 * 3))
    assert TokenGrid.infer(128, aspect=(32, 64)).shape == (1, 8, 16)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"height": 0, "width": 3}, ValueError, "height"),
        ({"height": 2, "width": 2.5}, TypeError, "width"),
        ({"height": 2, "width": 2, "prefix": -1}, ValueError, "prefix"),
        ({"height": True, "width": 2}, TypeError, "height"),
    ],
)
def test_bad_grid(kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        TokenGrid(**kwargs)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((10,), {"aspect": (2, 0)}, "aspect"),
        ((10,), {"aspect": 4}, "aspect"),
        ((10,), {"aspect": (2, 5), "prefix": 10}, "spatial tokens"),
        ((9,), {"aspect": (3, 3), "frames": 2}, "multiple of frames"),
        ((0,), {"aspect": (3, 3)}, "num_tokens"),
    ],
)
def test_bad_infer(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TokenGrid.infer(*args, **kwargs)
