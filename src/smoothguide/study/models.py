"""Model factories of studies: ``model = "demo"``, ``"sdxl"`` or ``"package.module:function"``.

A factory is called as ``factory(options, device)`` and returns an object with

- ``noise_shape``: the shape of one sample's noise (without the batch axis);
- ``sample(rule, items, noise, steps) -> images``: samples in ``[-1, 1]`` of shape
  ``(n, c, h, w)`` for the labels / prompts ``items`` from standard normal ``noise``
  (``rule=None``: no guidance);
- ``class_labels(items)``: the integer class of each item for ``accuracy`` (or ``None``);
- ``reference_images()``: the real images ``fd`` / ``kid`` compare with, ``(n, c, h, w)``
  in ``[-1, 1]``, or ``None``.

A custom factory may define ``check(items, prompts)`` (a classmethod / attribute of
the callable) that validates the study's labels without loading anything.

``rule = "Autoguidance"`` needs the model's weaker version: the model then has
``weak_model(name) -> denoiser`` (the name is the rule's ``weak`` option, default
``"shipped"``) and the factory may define ``check_weak(key, name)`` to validate the
name before anything is loaded.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .definition import StudyError

__all__ = [
    "MODELS",
    "DemoStudyModel",
    "SDXLStudyModel",
    "check_model",
    "check_weak_models",
    "resolve_model",
]


class DemoStudyModel:
    """The embedded MNIST DiT (:mod:`smoothguide.demo`); labels ``0..9`` or ``"null"``.

    Options: ``weights_dir`` (default: the shipped weights), ``layers`` (the
    default SEG / PAG layers, a preset of
    :func:`~smoothguide.demo.guide.layer_presets`, default ``"all"``).

    Autoguidance's ``weak``: ``"shipped"`` (default) is the weak DiT shipped with the
    package (:func:`~smoothguide.demo.weights.load_weak_denoiser`); any other value is
    the folder of a DiT written by ``smoothguide train-demo`` (``config.json`` and
    ``dit.safetensors``; a relative path resolves against the working directory).

    Parameters
    ----------
    options
        ``model_options`` of the study.
    device
        Torch device.

    Examples
    --------
    >>> import torch
    >>> m = DemoStudyModel({}, "cpu")
    >>> m.sample(None, ["null", 3], torch.zeros(2, 1, 16, 16), steps=2).shape
    torch.Size([2, 1, 16, 16])
    """

    noise_shape = (1, 16, 16)

    def __init__(self, options: Mapping[str, Any], device: Any) -> None:
        from ..demo.guide import demo_patcher
        from ..demo.weights import load_config, load_denoiser

        self.options = dict(options)
        self.den = load_denoiser(self.options.get("weights_dir"), device=device)
        self.cfg = load_config(self.options.get("weights_dir"))
        self.patcher = demo_patcher(self.den, default=self.options.get("layers", "all"))
        self.device = device
        self._weak: dict[str, Any] = {}

    @staticmethod
    def check_weak(key: str, name: str) -> None:
        """``name``: ``"shipped"``, or a folder with ``config.json`` and ``dit.safetensors``."""
        from ..demo.weights import CONFIG_FILE, DIT_FILE

        if name == "shipped" or all(
            os.path.isfile(os.path.join(name, f)) for f in (CONFIG_FILE, DIT_FILE)
        ):
            return
        raise StudyError(
            f"{key}: model 'demo' accepts 'shipped' (the weak DiT shipped with the package) or "
            f"a folder written by `smoothguide train-demo` ({CONFIG_FILE} + {DIT_FILE}), "
            f"got {name!r}"
        )

    def weak_model(self, name: str) -> Any:
        """The weak denoiser ``name`` (see :meth:`check_weak`), loaded once."""
        from ..demo.weights import load_denoiser, load_weak_denoiser

        if name not in self._weak:
            self.check_weak("weak", name)
            self._weak[name] = (
                load_weak_denoiser(device=self.device)
                if name == "shipped"
                else load_denoiser(name, device=self.device)
            )
        return self._weak[name]

    @staticmethod
    def check(items: Sequence[Any], prompts: bool) -> None:
        """Labels must be ints ``0..9`` or ``"null"``; no prompts."""
        if prompts:
            raise StudyError("prompts: model 'demo' is class-conditional; use labels = [0, ...]")
        for v in items:
            if not (
                v == "null" or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 9)
            ):
                raise StudyError(f"labels: model 'demo' accepts 0..9 and 'null', got {v!r}")

    @staticmethod
    def _label(v: Any) -> int:
        from ..demo.model import NULL_CLASS

        return NULL_CLASS if v == "null" else int(v)

    def class_labels(self, items: Sequence[Any]) -> list[int | None]:
        """Digit of each label, ``None`` for ``"null"``."""
        return [None if v == "null" else int(v) for v in items]

    def sample(self, rule: Any, items: Sequence[Any], noise: Any, steps: int) -> Any:
        """:func:`~smoothguide.demo.guide.guided_sample` of the items' labels."""
        from ..demo.guide import guided_sample

        labels = [self._label(v) for v in items]
        return guided_sample(
            self.den,
            rule,
            labels=labels,
            noise=noise.to(self.device),
            steps=steps,
            patcher=self.patcher,
        ).cpu()

    def reference_images(self) -> Any:
        """The 500 held-out real digits of the demo's split."""
        import torch

        from ..demo.data import load_demo_data

        data = load_demo_data(seed=self.cfg["data"]["split_seed"])
        return torch.as_tensor(data.test_images, dtype=torch.float32)


class SDXLStudyModel:  # pragma: no cover - needs SDXL weights and a GPU
    """SDXL base through :class:`smoothguide.diffusers.GuidedPipeline` (local weights only).

    Options: ``path`` (a local ``StableDiffusionXLPipeline`` folder), ``height`` /
    ``width`` (default 1024), ``dtype`` (``"float16"``), ``scheduler`` (``"euler"``),
    ``reference`` (a folder of real images for fd / kid, e.g. MS-COCO 2014 val),
    ``reference_limit``. Labels ``["null"]`` is unconditional (the empty prompt).

    Parameters
    ----------
    options
        ``model_options`` of the study.
    device
        Torch device (one GPU per rank).

    Examples
    --------
    Validation needs no weights:

    >>> SDXLStudyModel.check(["null", 3], prompts=False)
    Traceback (most recent call last):
    ...
    smoothguide.study.definition.StudyError: labels: model 'sdxl' takes prompts, or ...
    """

    def __init__(self, options: Mapping[str, Any], device: Any) -> None:
        import torch
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        path = options.get("path")
        if not path or not os.path.isdir(str(path)):
            raise StudyError(f"model_options.path: no local SDXL pipeline folder at {path!r}")
        dtype = getattr(torch, str(options.get("dtype", "float16")))
        self.pipe = StableDiffusionXLPipeline.from_pretrained(
            path, torch_dtype=dtype, local_files_only=True
        ).to(device)
        if options.get("scheduler", "euler") == "euler":
            self.pipe.scheduler = EulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)
        self.h = int(options.get("height", 1024))
        self.w = int(options.get("width", 1024))
        self.noise_shape = (4, self.h // 8, self.w // 8)
        self.options = dict(options)
        self.device = device

    @staticmethod
    def check(items: Sequence[Any], prompts: bool) -> None:
        """Prompts, or ``labels = ["null"]`` for unconditional sampling."""
        if not prompts and list(items) != ["null"]:
            raise StudyError("labels: model 'sdxl' takes prompts, or labels = ['null']")

    def class_labels(self, items: Sequence[Any]) -> list[int | None]:
        return [None] * len(items)

    def sample(self, rule: Any, items: Sequence[Any], noise: Any, steps: int) -> Any:
        from ..diffusers import GuidedPipeline

        prompts = ["" if v == "null" else str(v) for v in items]
        kw = dict(
            prompt=prompts,
            latents=noise.to(self.device, self.pipe.unet.dtype),
            num_inference_steps=steps,
            height=self.h,
            width=self.w,
            output_type="pt",
        )
        out = (
            self.pipe(guidance_scale=1.0, **kw)
            if rule is None
            else GuidedPipeline(self.pipe, rule)(**kw)
        )
        return (out.images.float().cpu() * 2 - 1).clamp(-1, 1)

    def reference_images(self) -> Any:
        import numpy as np
        import torch
        from PIL import Image

        folder = self.options.get("reference")
        if not folder:
            return None
        names = sorted(os.listdir(folder))[: int(self.options.get("reference_limit", 30000))]
        size = int(self.options.get("reference_size", 512))
        imgs = []
        for n in names:
            im = Image.open(os.path.join(folder, n)).convert("RGB").resize((size, size))
            imgs.append(torch.as_tensor(np.asarray(im)).permute(2, 0, 1).float() / 127.5 - 1)
        return torch.stack(imgs)


#: Registered factories.
MODELS: dict[str, Callable[..., Any]] = {"demo": DemoStudyModel, "sdxl": SDXLStudyModel}


def resolve_model(name: str) -> Callable[..., Any]:
    """The factory of ``model = name``: a registered name or ``"package.module:function"``.

    Parameters
    ----------
    name
        ``"demo"``, ``"sdxl"`` or an import path.

    Returns
    -------
    callable
        ``factory(options, device) -> model``.

    Examples
    --------
    >>> resolve_model("demo") is DemoStudyModel
    True
    """
    if name in MODELS:
        return MODELS[name]
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as exc:
            raise StudyError(f"model: cannot import {name!r} ({exc})") from None
        if not callable(obj):
            raise StudyError(f"model: {name!r} is not callable")
        return obj
    raise StudyError(
        f"model: unknown model {name!r}; accepted: {', '.join(MODELS)} or 'package.module:function'"
    )


def check_model(name: str, items: Sequence[Any], prompts: bool) -> None:
    """Resolve the factory and run its ``check(items, prompts)`` if it has one.

    Parameters
    ----------
    name
        The study's ``model``.
    items
        Its labels or prompts.
    prompts
        Whether ``items`` are prompts.

    Returns
    -------
    None

    Examples
    --------
    >>> check_model("demo", ["null", 11], prompts=False)
    Traceback (most recent call last):
    ...
    smoothguide.study.definition.StudyError: labels: model 'demo' accepts 0..9 and 'null', got 11
    """
    factory = resolve_model(name)
    check = getattr(factory, "check", None)
    if callable(check):
        check(items, prompts)


def check_weak_models(name: str, weak: Sequence[tuple[str, str]]) -> None:
    """Check the ``weak`` names of a study's Autoguidance settings against model ``name``.

    Parameters
    ----------
    name
        The study's ``model``.
    weak
        ``(key, weak name)`` pairs, e.g. ``[("rules[2].weak", "shipped")]``.

    Returns
    -------
    None

    Raises
    ------
    StudyError
        The factory has no ``weak_model`` (it cannot run Autoguidance), or its
        ``check_weak`` rejects a name.

    Examples
    --------
    >>> check_weak_models("demo", [("rules[0].weak", "shipped")])
    >>> check_weak_models("sdxl", [("rules[0].weak", "shipped")])
    Traceback (most recent call last):
    ...
    smoothguide.study.definition.StudyError: rules[0].rule: Autoguidance needs a weak model, ...
    """
    if not weak:
        return
    factory = resolve_model(name)
    if not callable(getattr(factory, "weak_model", None)):
        key = weak[0][0].rsplit(".", 1)[0]
        raise StudyError(
            f"{key}.rule: Autoguidance needs a weak model, and model {name!r} has none "
            "(its factory defines no weak_model(name)); accepted models: demo, or a factory "
            "with weak_model"
        )
    check = getattr(factory, "check_weak", None)
    if callable(check):
        for key, value in weak:
            check(key, value)
