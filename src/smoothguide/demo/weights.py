"""Loading and saving the demo weights: safetensors tensors plus a JSON config, never pickle.

The shipped files live next to this module in ``weights/``:

- ``dit.safetensors``: the EMA weights of :class:`~smoothguide.demo.model.DemoDiT`;
- ``classifier.safetensors``: the feature network
  :class:`~smoothguide.demo.model.DemoClassifier`;
- ``dit_weak.safetensors``: a smaller, shorter-trained DiT of the same task and
  conditioning (null class included), the "bad version" that autoguidance
  (Karras et al., NeurIPS 2024, arXiv:2406.02507) guides away from; its config and
  training provenance are the ``"weak"`` entry of ``config.json``;
- ``config.json``: the model configs, the noise schedule, the training
  provenance (data file and its SHA-256, split seed, steps, commit, date) and the
  SHA-256 of each weight file, checked on every load.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from ._deps import require
from .model import (
    ClassifierConfig,
    DemoClassifier,
    DemoDenoiser,
    DemoDiT,
    DiTConfig,
)

__all__ = [
    "CLASSIFIER_FILE",
    "CONFIG_FILE",
    "DIT_FILE",
    "DIT_WEAK_FILE",
    "WEIGHTS_DIR",
    "WeightsError",
    "file_sha256",
    "load_classifier",
    "load_config",
    "load_denoiser",
    "load_tensors",
    "load_weak_denoiser",
    "save_tensors",
]

#: Directory of the shipped weights.
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DIT_FILE = "dit.safetensors"
#: The weak DiT of autoguidance (config and provenance: ``config.json["weak"]``).
DIT_WEAK_FILE = "dit_weak.safetensors"
CLASSIFIER_FILE = "classifier.safetensors"
CONFIG_FILE = "config.json"


class WeightsError(RuntimeError):
    """A weight file is missing, corrupted, truncated or does not match its config."""


def file_sha256(path: str) -> str:
    """SHA-256 hex digest of a file.

    The file is read in 1 MiB chunks (:func:`hashlib.sha256`).

    Parameters
    ----------
    path
        File to hash.

    Returns
    -------
    str
        The 64-character lowercase hex digest.

    Examples
    --------
    >>> len(file_sha256(__file__))
    64
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(tensors: dict[str, Any], path: str, metadata: dict[str, str] | None = None) -> str:
    """Save a dict of tensors as safetensors and return the file's SHA-256.

    Tensors are detached, made contiguous and moved to the CPU; the file is
    written to ``path + ".tmp"`` first, made world-readable (0644) and then
    atomically renamed to ``path``.

    Parameters
    ----------
    tensors
        Name -> :class:`torch.Tensor` (e.g. a ``state_dict()``).
    path
        Output file.
    metadata
        Optional string metadata stored in the safetensors header.

    Returns
    -------
    str
        SHA-256 hex digest of the written file (:func:`file_sha256`).

    Examples
    --------
    >>> import tempfile
    >>> import torch
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "t.safetensors")
    ...     digest = save_tensors({"w": torch.ones(2, 3)}, path)
    ...     digest == file_sha256(path)
    True
    """
    st = require("safetensors.torch")
    tmp = path + ".tmp"
    st.save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return file_sha256(path)


def load_tensors(path: str, expected_sha256: str | None = None) -> dict[str, Any]:
    """Load a safetensors file, optionally checking its SHA-256 first.

    Parameters
    ----------
    path
        The ``.safetensors`` file.
    expected_sha256
        Hex digest the file must have (as recorded in ``config.json``); ``None``
        skips the check.

    Returns
    -------
    dict
        Name -> :class:`torch.Tensor` on the CPU.

    Raises
    ------
    WeightsError
        If the file is missing, its hash differs from ``expected_sha256``, or it
        cannot be parsed as safetensors (truncated or corrupted).

    Examples
    --------
    >>> import tempfile
    >>> import torch
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "t.safetensors")
    ...     digest = save_tensors({"w": torch.arange(3.0)}, path)
    ...     load_tensors(path, expected_sha256=digest)
    {'w': tensor([0., 1., 2.])}
    >>> load_tensors("missing.safetensors")
    Traceback (most recent call last):
    ...
    smoothguide.demo.weights.WeightsError: weight file not found: missing.safetensors
    """
    if not os.path.exists(path):
        raise WeightsError(f"weight file not found: {path}")
    if expected_sha256 is not None:
        actual = file_sha256(path)
        if actual != expected_sha256:
            raise WeightsError(
                f"{path} is corrupted or was replaced: SHA-256 {actual} does not match "
                f"{expected_sha256} recorded in {CONFIG_FILE}; reinstall smoothguide or "
                "retrain with `python -m smoothguide.demo.train`"
            )
    st = require("safetensors.torch")
    try:
        return dict(st.load_file(path))
    except Exception as exc:
        raise WeightsError(f"{path} is not a valid safetensors file (truncated?): {exc}") from exc


def load_config(weights_dir: str | None = None) -> dict[str, Any]:
    """Read ``config.json`` of a weights directory (default: the shipped weights).

    Parameters
    ----------
    weights_dir
        Folder holding ``config.json``; default the shipped weights.

    Returns
    -------
    dict
        The parsed configuration (model configs, file hashes, provenance).

    Examples
    --------
    >>> cfg = load_config()
    >>> sorted(cfg["files"])
    ['classifier.safetensors', 'dit.safetensors', 'dit_weak.safetensors']
    """
    path = os.path.join(weights_dir or WEIGHTS_DIR, CONFIG_FILE)
    if not os.path.exists(path):
        raise WeightsError(
            f"no demo weights at {path}; train them with `python -m smoothguide.demo.train`"
        )
    try:
        with open(path, encoding="utf-8") as fh:
            cfg: dict[str, Any] = json.load(fh)
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path} is not valid JSON: {exc}") from exc
    for key in ("dit", "classifier", "files"):
        if key not in cfg:
            raise WeightsError(f"{path} lacks the {key!r} entry")
    return cfg


def _load_module(module: Any, tensors: dict[str, Any], path: str) -> Any:
    tensors = {k: v.float() for k, v in tensors.items()}
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"{path} does not match the model in {CONFIG_FILE}: {exc}") from exc
    return module.eval().requires_grad_(False)


def _expected_sha256(cfg: dict[str, Any], name: str, d: str) -> str:
    try:
        digest = cfg["files"][name]["sha256"]
    except (KeyError, TypeError):
        raise WeightsError(
            f"{os.path.join(d, CONFIG_FILE)} lacks files[{name!r}]['sha256']"
        ) from None
    if not isinstance(digest, str):
        raise WeightsError(
            f"{os.path.join(d, CONFIG_FILE)}: files[{name!r}]['sha256'] is not a string"
        )
    return digest


def _build(factory: Any, fields: Any, key: str, d: str) -> Any:
    """``factory(**fields)``, with a WeightsError naming config.json for bad fields."""
    if not isinstance(fields, dict):
        raise WeightsError(f"{os.path.join(d, CONFIG_FILE)}: {key!r} must be an object")
    try:
        return factory(**fields)
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{os.path.join(d, CONFIG_FILE)}: bad {key!r} entry: {exc}") from exc


def _load_dit(d: str, cfg: Any, file: str, fields: Any, key: str, device: Any) -> DemoDenoiser:
    """The DiT of ``file`` in ``d`` (its SHA-256 from ``cfg``, its config ``fields``), eval mode."""
    path = os.path.join(d, file)
    tensors = load_tensors(path, _expected_sha256(cfg, file, d))
    model = _load_module(DemoDiT(_build(DiTConfig, fields, key, d)), tensors, path)
    return DemoDenoiser(model).to(device).eval()


def load_denoiser(weights_dir: str | None = None, *, device: Any = "cpu") -> DemoDenoiser:
    """Load the shipped (or a given directory's) DiT as a :class:`DemoDenoiser` in eval mode.

    Parameters
    ----------
    weights_dir
        Folder with ``config.json`` and ``dit.safetensors``; default the shipped weights.
    device
        Torch device to put the model on.

    Returns
    -------
    DemoDenoiser
        In eval mode, gradients off.

    Raises
    ------
    WeightsError
        Missing, damaged (hash mismatch, truncated) or inconsistent files.

    Examples
    --------
    >>> den = load_denoiser()
    >>> den.null_class
    10
    """
    d = weights_dir or WEIGHTS_DIR
    cfg = load_config(d)
    return _load_dit(d, cfg, DIT_FILE, cfg["dit"], "dit", device)


def load_weak_denoiser(weights_dir: str | None = None, *, device: Any = "cpu") -> DemoDenoiser:
    """Load the shipped weak DiT of autoguidance as a :class:`DemoDenoiser` in eval mode.

    The weak model has the main model's schedule, data split, label dropout to the
    null class and seed, but is smaller and trained for fewer steps, as EDM2's
    autoguidance models are (Karras et al., NeurIPS 2024, arXiv:2406.02507, Sec. 5).
    Its config is ``config.json["weak"]["dit"]`` and its SHA-256
    ``config.json["files"]["dit_weak.safetensors"]``, checked on every load.

    Parameters
    ----------
    weights_dir
        Folder with ``config.json`` and ``dit_weak.safetensors``; default the shipped weights.
    device
        Torch device to put the model on.

    Returns
    -------
    DemoDenoiser
        In eval mode, gradients off.

    Raises
    ------
    WeightsError
        No ``"weak"`` entry in ``config.json``, or missing, damaged or inconsistent files.

    Examples
    --------
    >>> weak, main = load_weak_denoiser(), load_denoiser()
    >>> weak.null_class == main.null_class
    True
    >>> weak.model.config.hidden < main.model.config.hidden
    True
    """
    d = weights_dir or WEIGHTS_DIR
    cfg = load_config(d)
    weak = cfg.get("weak")
    if not isinstance(weak, dict) or "dit" not in weak:
        raise WeightsError(
            f"{os.path.join(d, CONFIG_FILE)} has no 'weak' entry with the weak DiT's config; "
            "this weights folder ships no weak model"
        )
    return _load_dit(d, cfg, DIT_WEAK_FILE, weak["dit"], "weak.dit", device)


def load_classifier(weights_dir: str | None = None, *, device: Any = "cpu") -> DemoClassifier:
    """Load the shipped (or a given directory's) feature network in eval mode.

    Parameters
    ----------
    weights_dir
        Folder with ``config.json`` and ``classifier.safetensors``; default the shipped weights.
    device
        Torch device to put the network on.

    Returns
    -------
    DemoClassifier
        In eval mode, gradients off.

    Examples
    --------
    >>> load_classifier().config.num_classes
    10
    """
    d = weights_dir or WEIGHTS_DIR
    cfg = load_config(d)
    path = os.path.join(d, CLASSIFIER_FILE)
    tensors = load_tensors(path, _expected_sha256(cfg, CLASSIFIER_FILE, d))
    config = _build(ClassifierConfig, cfg["classifier"], "classifier", d)
    net = _load_module(DemoClassifier(config), tensors, path)
    return net.to(device)
