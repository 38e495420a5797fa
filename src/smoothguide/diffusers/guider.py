"""Any smoothguide rule as a diffusers modular-pipeline guider (``BaseGuidance``).

diffusers' modular pipelines (SDXL, SD3, Flux, Wan, QwenImage, ...) take a
``guider`` component. Their denoise loop calls, at every step::

    guider.set_state(step, num_inference_steps, timestep)
    batches = guider.prepare_inputs(inputs)         # one batch per model call
    for batch in batches:
        guider.prepare_models(denoiser)             # we enter the branch's perturbation
        batch.noise_pred = denoiser(...)
        guider.cleanup_models(denoiser)             # ... and leave it
    noise_pred = guider(batches)[0]                 # rule.combine on the outputs

:class:`SmoothguideGuidance` turns a rule into those calls: one batch per branch the
rule needs at the step (so neutral terms skip their forward passes), in
:func:`~smoothguide.sampling.batch_order`; SEG and PAG branches run inside
``patcher.perturb(...)`` of an :class:`~smoothguide.torch.AttentionPatcher`
(:func:`~smoothguide.diffusers.patcher_for` of the denoiser by default). The loop
calls the denoiser once per batch, so branches run sequentially (the loop, not the
guider, owns the latents, so they cannot be stacked into one call); the result is
what :class:`~smoothguide.sampling.GuidedDenoiser` computes from the same branch
outputs. The rule combines the model's raw outputs (ε or velocity, as every
diffusers guider does). Rule state (APG momentum) lives in the guider and starts
afresh at step 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch

from ..branches import Branch
from ..rules import (
    APG,
    CFG,
    COND,
    FDG,
    MAMBOG,
    PAG,
    SEG,
    TCFG,
    UNCOND,
    CFGPlusPlus,
    CFGZeroStar,
    Compose,
    Constant,
    CosineRamp,
    Interval,
    LinearRamp,
    Prediction,
    Rescale,
    StepContext,
)
from ..sampling import batch_order
from ._deps import diffusers
from .family import patcher_for
from .pipeline import scheduler_sigma

__all__ = ["SmoothguideGuidance", "rule_from_config", "rule_to_config"]

BaseGuidance = diffusers.guiders.guider_utils.BaseGuidance
GuiderOutput = diffusers.guiders.guider_utils.GuiderOutput

#: Classes a rule config may name: the rules, their schedules and ``Compose``.
_TYPES: dict[str, type] = {
    c.__name__: c
    for c in (
        APG,
        CFG,
        CFGPlusPlus,
        CFGZeroStar,
        FDG,
        MAMBOG,
        PAG,
        Rescale,
        SEG,
        TCFG,
        Constant,
        CosineRamp,
        Interval,
        LinearRamp,
    )
}


def rule_to_config(rule: Any) -> dict[str, Any]:
    """A JSON-ready dict of a built-in rule (and its schedules), for guider configs.

    Parameters
    ----------
    rule
        A rule built from smoothguide's rule and schedule classes and ``Compose``.

    Returns
    -------
    dict
        ``{"type": class name, field: value, ...}``, nested for schedules and terms.

    Examples
    --------
    >>> from smoothguide.rules import CFG, SEG, Compose, Interval
    >>> cfg = rule_to_config(Compose(CFG(5.0, schedule=Interval(1.0, 8.0)), SEG(3.0)))
    >>> cfg["type"], cfg["terms"][0]["schedule"]["type"]
    ('Compose', 'Interval')
    >>> rule_from_config(cfg) == Compose(CFG(5.0, schedule=Interval(1.0, 8.0)), SEG(3.0))
    True
    """
    if isinstance(rule, Compose):
        return {"type": "Compose", "terms": [rule_to_config(t) for t in rule.terms]}
    name = type(rule).__name__
    if _TYPES.get(name) is not type(rule) or not dataclasses.is_dataclass(rule):
        raise TypeError(
            f"rule must be built from {sorted(_TYPES)} and Compose to be saved in a guider "
            f"config (a custom class or a lambda schedule has no config), got {name}"
        )
    out: dict[str, Any] = {"type": name}
    for f in dataclasses.fields(rule):
        out[f.name] = _value_to_config(getattr(rule, f.name))
    return out


def _value_to_config(v: Any) -> Any:
    if isinstance(v, Compose) or dataclasses.is_dataclass(v):
        return rule_to_config(v)
    if isinstance(v, tuple | list):
        return [_value_to_config(u) for u in v]
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if callable(v):
        raise TypeError(
            f"a custom or lambda schedule has no config ({v!r}); use Constant, Interval, "
            "LinearRamp or CosineRamp in a rule saved as a guider config"
        )
    raise TypeError(f"cannot store {v!r} ({type(v).__name__}) in a guider config")


def rule_from_config(config: Mapping[str, Any]) -> Any:
    """Rebuild a rule from :func:`rule_to_config`'s dict (lists come back as tuples).

    Parameters
    ----------
    config
        A dict from :func:`rule_to_config` (or the ``rule`` entry of a guider config).

    Returns
    -------
    rule
        The rule, equal to the one that was saved.

    Examples
    --------
    >>> from smoothguide.rules import SEG
    >>> rule_from_config({"type": "SEG", "scale": 2.0, "sigma": [1.0, 2.0]}).sigma
    (1.0, 2.0)
    """
    if not isinstance(config, Mapping) or "type" not in config:
        raise TypeError(f"a rule config must be a dict with a 'type' key, got {config!r:.80}")
    kind = config["type"]
    if kind == "Compose":
        return Compose(*(rule_from_config(t) for t in config["terms"]))
    if kind not in _TYPES:
        raise ValueError(f"unknown rule type {kind!r} in config; known: {sorted(_TYPES)}")
    kwargs = {k: _value_from_config(v) for k, v in config.items() if k != "type"}
    return _TYPES[kind](**kwargs)


def _value_from_config(v: Any) -> Any:
    if isinstance(v, Mapping) and "type" in v:
        return rule_from_config(v)
    if isinstance(v, list):
        return tuple(_value_from_config(u) for u in v)
    return v


def _branch_key(b: Branch, i: int) -> str:
    """The guider's name of a branch: ``pred_cond``, ``pred_uncond``, ``pred_cond_<i>``..."""
    return f"pred_{b.conditioning}" if b.perturbation is None else f"pred_{b.conditioning}_{i}"


def _rows_of(batch: Any) -> range:
    """``range(batch size)`` from the first tensor of a prepared batch."""
    for v in vars(batch).values() if hasattr(batch, "__dict__") else ():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return range(int(v.shape[0]))
    values = getattr(batch, "values", None)
    if isinstance(values, Mapping):
        for v in values.values():
            if isinstance(v, torch.Tensor) and v.ndim > 0:
                return range(int(v.shape[0]))
    raise ValueError("cannot find the batch size of a perturbed branch: its inputs hold no tensor")


class SmoothguideGuidance(BaseGuidance):
    """A diffusers guider that runs a smoothguide rule (SEG, PAG, compositions, ...).

    Parameters
    ----------
    rule
        A rule built from smoothguide's rules and schedules, or its config dict
        (:func:`rule_to_config`); the config is what ``save_pretrained`` writes.
    start, stop
        diffusers' guidance window on the step index: outside
        ``int(start·n) <= step < int(stop·n)`` only the conditional branch runs.
    enabled
        ``False``: the conditional prediction only.
    perturber
        The :class:`~smoothguide.branches.Perturber` for SEG / PAG branches;
        default :func:`~smoothguide.diffusers.patcher_for` of the denoiser the
        loop passes to ``prepare_models`` (not saved in the config).
    scheduler
        The pipeline's scheduler, to give rules σ (:func:`scheduler_sigma`);
        without it ``ctx.sigma`` is the timestep value (fine for schedules on
        progress). Not saved in the config.

    Examples
    --------
    >>> from smoothguide.rules import CFG, SEG, Compose
    >>> g = SmoothguideGuidance(Compose(CFG(5.0), SEG(3.0, sigma=10.0)))
    >>> g.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999))
    >>> g.num_conditions  # uncond, cond, cond + blurred queries
    3
    >>> SmoothguideGuidance.from_config(g.config).rule == g.rule
    True
    """

    # the names of plain branches; perturbed ones are named per step (pred_cond_2, ...)
    _input_predictions = ["pred_cond", "pred_uncond"]  # type: ignore[assignment]  # noqa: RUF012
    ignore_for_config = ["perturber", "scheduler"]  # noqa: RUF012

    def __init__(
        self,
        rule: Any = None,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        perturber: Any = None,
        scheduler: Any = None,
    ) -> None:
        if rule is None:
            rule = CFG()
        if isinstance(rule, Mapping):
            rule = rule_from_config(rule)
        config = rule_to_config(rule)  # also checks that the rule can be saved
        super().__init__(start, stop, enabled)
        self.register_to_config(rule=config, start=start, stop=stop, enabled=enabled)
        self.rule = rule
        self.perturber = perturber
        self.scheduler = scheduler
        self._patchers: dict[int, Any] = {}
        self._rule_state: Any = rule.init_state()
        self._batches: list[Any] = []
        self._keys: list[str] = []
        self._branch_of: dict[str, Branch] = {}
        self._active: Any = None

    # -- the step ------------------------------------------------------------------------------

    def set_state(self, step: int, num_inference_steps: int, timestep: Any) -> None:
        """diffusers' per-step state; the rule's state restarts at step 0."""
        if step == 0 or self._step is None or step < self._step:
            self._rule_state = self.rule.init_state()
        super().set_state(step, num_inference_steps, timestep)

    def context(self) -> StepContext:
        """The :class:`~smoothguide.rules.StepContext` of the current step."""
        t = self._timestep
        if t is None:
            sigma = 0.0
        elif self.scheduler is not None:
            sigma = scheduler_sigma(SimpleNamespace(scheduler=self.scheduler), t)
        else:
            sigma = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else float(t)
        if self._step is None or self._num_inference_steps is None:
            return StepContext(max(sigma, 0.0))
        return StepContext(max(sigma, 0.0), step=self._step, num_steps=self._num_inference_steps)

    def _in_window(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is None or self._step is None:
            return True
        n = self._num_inference_steps
        return int(self._start * n) <= self._step < int(self._stop * n)

    def branches(self) -> list[Branch]:
        """The branches to evaluate at the current step, in the order the batches come."""
        if not self._in_window():
            return [COND]
        return batch_order(self.rule.branches(self.context()))

    @property
    def num_conditions(self) -> int:
        """Number of model calls at this step (one per needed branch)."""
        return len(self.branches())

    @property
    def is_conditional(self) -> bool:
        """Whether the batch being prepared uses the conditional inputs."""
        i = max(self._count_prepared - 1, 0)
        keys = self._keys or [_branch_key(b, j) for j, b in enumerate(self.branches())]
        if i >= len(keys):
            return True
        return self._branch_of.get(keys[i], COND).conditioning == "cond"

    # -- the modular loop's protocol ------------------------------------------------------------

    def _plan(self) -> list[tuple[int, str]]:
        order = self.branches()
        self._keys = [_branch_key(b, i) for i, b in enumerate(order)]
        self._branch_of = dict(zip(self._keys, order, strict=True))
        return [
            (0 if b.conditioning == "cond" else 1, k)
            for b, k in zip(order, self._keys, strict=True)
        ]

    def prepare_inputs(self, data: Any) -> list[Any]:
        """One batch per branch: ``(cond, uncond)`` inputs picked by the branch's conditioning."""
        self._batches = [self._prepare_batch(data, i, key) for i, key in self._plan()]
        return self._batches

    def prepare_inputs_from_block_state(
        self, data: Any, input_fields: dict[str, str | tuple[str, str]]
    ) -> list[Any]:
        """As :meth:`prepare_inputs`, reading the inputs from a ``BlockState``."""
        self._batches = [
            self._prepare_batch_from_block_state(input_fields, data, i, key)
            for i, key in self._plan()
        ]
        return self._batches

    def _patcher(self, denoiser: torch.nn.Module) -> Any:
        if self.perturber is not None:
            return self.perturber
        key = id(denoiser)
        if key not in self._patchers:
            self._patchers[key] = patcher_for(denoiser)
        return self._patchers[key]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        """Count the batch; for a SEG / PAG branch, enter its perturbation on ``denoiser``."""
        super().prepare_models(denoiser)
        i = self._count_prepared - 1
        if i >= len(self._keys):
            return
        b = self._branch_of[self._keys[i]]
        if b.perturbation is not None:
            rows = _rows_of(self._batches[i]) if i < len(self._batches) else range(1)
            ctx = self._patcher(denoiser).perturb(b.perturbation, rows)
            ctx.__enter__()
            self._active = ctx

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        """Leave the perturbation entered by :meth:`prepare_models`, if any."""
        ctx, self._active = self._active, None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    def forward(self, **outputs: torch.Tensor) -> Any:
        """``rule.combine`` of the branch outputs (keyword names from :meth:`prepare_inputs`)."""
        by_branch = {
            self._branch_of.get(k, COND if k == "pred_cond" else UNCOND): v
            for k, v in outputs.items()
        }
        pred_cond = by_branch[COND]
        if set(by_branch) == {COND} and not self._in_window():
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=None)
        pred, self._rule_state = self.rule.combine(by_branch, self.context(), self._rule_state)
        if isinstance(pred, Prediction):
            raise TypeError(
                f"{type(self.rule).__name__} asks the sampler to re-noise from another prediction "
                "(CFG++); a diffusers scheduler cannot: use smoothguide.sampling's samplers"
            )
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=by_branch.get(UNCOND))
