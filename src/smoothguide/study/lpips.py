"""LPIPS (Zhang et al. 2018) from local weights, built without torchvision.

torchmetrics and the lpips package build the backbone through torchvision, whose
downloader fetches it (and torchvision's PyPI wheel does not load beside every torch
build); :func:`lpips_network` builds the same layers here and loads the same two
files from disk: torchvision's ImageNet checkpoint of the backbone and the LPIPS
v0.1 linear layers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from .definition import MetricWeightsError

__all__ = ["check_lpips_weights", "lpips_network"]

#: torchvision's ImageNet checkpoints of the LPIPS backbones (``torch.hub`` file names).
LPIPS_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
#: Indices in torchvision's ``features`` after which LPIPS taps the activations.
LPIPS_TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


def lpips_defaults(options: Mapping[str, Any]) -> tuple[str, str, str | None]:
    """``(net, backbone path, linear path or None)`` of ``[metric_options.lpips]``."""
    net = str(options.get("net", "alex"))
    backbone = options.get("backbone")
    if not backbone:
        import torch

        # where torchvision's downloader keeps it ($TORCH_HOME/hub/checkpoints)
        backbone = os.path.join(torch.hub.get_dir(), "checkpoints", LPIPS_FILES[net])
    linear = options.get("linear")
    if not linear:
        # the LPIPS v0.1 linear layers ship inside torchmetrics and the lpips package
        import importlib.util

        for pkg, sub in (
            ("torchmetrics", ("functional", "image", "lpips_models")),
            ("lpips", ("weights", "v0.1")),
        ):
            spec = importlib.util.find_spec(pkg)
            if spec is not None and spec.submodule_search_locations:
                cand = os.path.join(next(iter(spec.submodule_search_locations)), *sub, f"{net}.pth")
                if os.path.isfile(cand):
                    linear = cand
                    break
    return net, str(backbone), None if not linear else str(linear)


def check_lpips_weights(options: Mapping[str, Any]) -> None:
    """Raise :class:`MetricWeightsError` when the LPIPS files of ``options`` are absent.

    Parameters
    ----------
    options
        ``[metric_options.lpips]`` (``net``, ``backbone``, ``linear``).

    Returns
    -------
    None

    Examples
    --------
    >>> check_lpips_weights({"backbone": "/nowhere/alexnet.pth"})
    Traceback (most recent call last):
    ...
    smoothguide.study.definition.MetricWeightsError: metrics lpips needs the alex backbone ...
    """
    net, backbone, linear = lpips_defaults(options)
    tv = {"alex": "alexnet", "vgg": "vgg16"}[net]
    if not os.path.isfile(backbone):
        raise MetricWeightsError(
            f"metrics lpips needs the {net} backbone offline (torchvision's ImageNet "
            f"checkpoint {LPIPS_FILES[net]}); none at {backbone!r}. On a machine with "
            f'network run `python -c "import torchvision; torchvision.models.{tv}'
            "(weights='DEFAULT')\"` (it saves the file under torch.hub.get_dir()/"
            "checkpoints), copy it into the same folder here ($TORCH_HOME/hub/checkpoints) "
            f"or set [metric_options.lpips] backbone = '/path/to/{LPIPS_FILES[net]}'"
        )
    if linear is None or not os.path.isfile(linear):
        raise MetricWeightsError(
            f"metrics lpips needs the LPIPS v0.1 linear layers {net}.pth (shipped with "
            f"torchmetrics and the lpips package); none at {linear!r}. pip install "
            f"torchmetrics or set [metric_options.lpips] linear = '/path/to/{net}.pth'"
        )


def lpips_backbone(net: str) -> Any:
    """torchvision's ``alexnet().features`` / ``vgg16().features`` up to the last tap.

    Same layers and indices, so its checkpoint's ``features.*`` keys load unchanged.
    """
    import torch.nn as nn

    layers: list[Any]
    if net == "alex":
        layers = [
            nn.Conv2d(3, 64, 11, stride=4, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1),
            nn.ReLU(),
        ]
    else:
        layers, c = [], 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU()]
                c = int(v)
    return nn.Sequential(*layers[: LPIPS_TAPS[net][-1] + 1])


class _Lpips:
    """LPIPS distance of image pairs; see :func:`lpips_network`."""

    # LPIPS' ScalingLayer: the ImageNet statistics of [-1, 1] inputs
    _SHIFT = (-0.030, -0.088, -0.188)
    _SCALE = (0.458, 0.448, 0.450)

    def __init__(
        self, net: str, backbone: Mapping[str, Any], linear: Mapping[str, Any], resize: Any
    ) -> None:
        import torch

        self.net, self.resize = net, resize
        self.features = lpips_backbone(net).eval()
        sd = {k.removeprefix("features."): v for k, v in backbone.items()}
        want = self.features.state_dict()
        missing = [k for k in want if k not in sd or sd[k].shape != want[k].shape]
        if missing:
            raise MetricWeightsError(
                f"metrics lpips: the {net} backbone checkpoint lacks {missing[:3]} (or their "
                f"shapes differ); expected torchvision's {LPIPS_FILES[net]}"
            )
        self.features.load_state_dict({k: sd[k] for k in want})
        self.lins = []
        for i, c in enumerate(self.features[j].out_channels for j in self._conv_before_taps()):
            w = linear.get(f"lin{i}.model.1.weight", linear.get(f"lin{i}.model.0.weight"))
            if w is None or tuple(w.shape) != (1, c, 1, 1):
                raise MetricWeightsError(
                    f"metrics lpips: the linear layers lack lin{i}.model.1.weight of shape "
                    f"(1, {c}, 1, 1); expected LPIPS v0.1 {net}.pth"
                )
            self.lins.append(w.float())
        self.shift = torch.tensor(self._SHIFT)[None, :, None, None]
        self.scale = torch.tensor(self._SCALE)[None, :, None, None]

    def _conv_before_taps(self) -> list[int]:
        import torch.nn as nn

        out = []
        for t in LPIPS_TAPS[self.net]:
            j = t
            while not isinstance(self.features[j], nn.Conv2d):
                j -= 1
            out.append(j)
        return out

    def to(self, device: Any) -> _Lpips:
        self.features.to(device)
        self.lins = [w.to(device) for w in self.lins]
        self.shift, self.scale = self.shift.to(device), self.scale.to(device)
        return self

    def _taps(self, x: Any) -> list[Any]:
        out, taps = [], set(LPIPS_TAPS[self.net])
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in taps:
                out.append(x)
        return out

    def _prepare(self, x: Any) -> Any:
        import torch.nn.functional as F

        x = x.float().clamp(-1, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x.to(self.shift.device) - self.shift) / self.scale
        h, w = x.shape[-2:]
        size = self.resize if self.resize is not None else (64 if min(h, w) < 64 else None)
        if size is None:
            return x
        if h > size and w > size:  # torch-fidelity's / torchmetrics' resize rule
            return F.interpolate(x, (size, size), mode="area")
        return F.interpolate(x, (size, size), mode="bilinear", align_corners=False)

    def __call__(self, x: Any, y: Any) -> Any:
        """LPIPS of each pair, float64 ``(n,)``."""
        import torch

        with torch.no_grad():
            fx, fy = self._taps(self._prepare(x)), self._taps(self._prepare(y))
            total = torch.zeros(x.shape[0], dtype=torch.float64)
            for a, b, w in zip(fx, fy, self.lins, strict=True):
                na = a / torch.sqrt(1e-8 + (a * a).sum(dim=1, keepdim=True))
                nb = b / torch.sqrt(1e-8 + (b * b).sum(dim=1, keepdim=True))
                d = torch.nn.functional.conv2d((na - nb) ** 2, w)
                total += d.mean(dim=(1, 2, 3)).double().cpu()
        return total


def lpips_network(options: Mapping[str, Any], device: Any) -> Any:
    """The LPIPS distance ``(x, y) -> (n,)`` of ``[metric_options.lpips]`` (local weights).

    ``d(x, y) = Σ_l mean_hw w_l · (x̂_l − ŷ_l)²`` with ``x̂_l`` the activations of
    tap ``l`` of the backbone on the scaled image, unit-normalised over channels
    (``f / sqrt(1e-8 + Σ_c f²)``), and ``w_l`` the non-negative LPIPS v0.1 linear
    layer (Zhang et al. 2018, Eq. 1; the formula and constants of torchmetrics'
    ``LearnedPerceptualImagePatchSimilarity``). Inputs in ``[-1, 1]`` (grey is
    repeated to RGB); images with a side under 64 px are resized to 64 first, as
    torch-fidelity does (``resize`` overrides).

    The network is built here, without torchvision: torchmetrics and the lpips
    package build it through torchvision, whose downloader fetches the backbone;
    this loads the same two files from disk, so nothing is fetched.

    Parameters
    ----------
    options
        ``net`` (``"alex"``, default, or ``"vgg"``), ``backbone`` (torchvision's
        ImageNet checkpoint; default ``torch.hub.get_dir()/checkpoints/<file>``),
        ``linear`` (LPIPS v0.1 ``<net>.pth``; default the copy shipped in torchmetrics
        or the lpips package), ``resize``.
    device
        Torch device.

    Returns
    -------
    callable
        ``(x, y)`` of shape ``(n, c, h, w)`` -> float64 LPIPS per pair.

    Examples
    --------
    Needs the backbone checkpoint offline::

        d = lpips_network({"net": "alex"}, "cpu")
        d(guided, unguided)  # tensor([0.21, ...], dtype=torch.float64)
    """
    import torch

    net, backbone, linear = lpips_defaults(options)
    check_lpips_weights(options)

    def load(path: str) -> Any:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a corrupt or foreign file: say which
            raise MetricWeightsError(
                f"metrics lpips: cannot read {path!r} ({type(exc).__name__}: {exc})"
            ) from None

    return _Lpips(net, load(backbone), load(str(linear)), options.get("resize")).to(device)
