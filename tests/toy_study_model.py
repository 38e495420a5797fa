"""A model factory for study tests: ``tanh(noise * CFG scale)`` (unguided: scale 1), no network."""

from __future__ import annotations

from typing import Any


class ToyModel:
    noise_shape = (1, 4, 4)

    def __init__(self, options: Any, device: Any) -> None:
        self.device = device

    @staticmethod
    def check(items: Any, prompts: bool) -> None:
        pass

    def class_labels(self, items: Any) -> list[Any]:
        return [None] * len(items)

    def sample(self, rule: Any, items: Any, noise: Any, steps: int) -> Any:
        import torch

        scale = 1.0 if rule is None else rule.scale
        return torch.tanh(noise * scale)

    def reference_images(self) -> Any:
        return None


factory = ToyModel
