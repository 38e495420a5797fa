"""Fork mode for torch models: run the rows a perturbed branch shares with its source once.

How a forked call runs (the row layout comes from
:func:`smoothguide.sampling.forking.plan_fork`):

1. The model is called with every row, as without fork mode, so code around
   it (a k-diffusion wrapper's ``x − σ ε``, a pipeline) sees the usual batch.
   A forward pre-hook on the model keeps only the pre-fork rows (a prefix of
   the batch, so a view) of every tensor argument that has the call's batch
   as its leading axis.
2. A forward pre-hook on each fork point (for example a UNet's ``mid_block``)
   appends copies of the source rows to every batch-sized tensor argument
   (hidden states, time embedding, encoder states, added conditions, also
   inside tuples, lists and dicts). With ``ForkPolicy(copy_at_previous=True)`` a forward
   hook on the previous block of the same ``ModuleList`` copies the rows of
   its output instead, so the pre-fork hidden states are freed before the
   fork point runs (lower peak memory).
3. Every later module call made by the fork point's ancestors (the modules
   they call directly: a UNet's up blocks and output layers) gets its
   arguments expanded to the batch in effect: a tensor whose leading axis is
   the batch of an earlier stage is row-indexed to the current one (skip
   connections, time embeddings, encoder states).

Tensors whose leading axis is no batch size in effect (positional embeddings
such as Flux's rotary tables) pass unchanged. A fork point whose inputs carry
no tensor of the batch in effect (a batch folded with frames or heads) raises
``RuntimeError``: rows are never guessed. The result is exact when the fork
point's ancestors only hand their pre-fork values to module calls after it
(true for the top-level blocks of the families that declare a proven
:class:`ForkPolicy`); model-specific inputs consumed after the fork point
outside a module call (a UNet's ControlNet mid-block residual) are given at
the batch of the stage in effect there by :meth:`ForkPolicy.stages_of`.

4. Values the model computes *before* the first fork point and combines with a
   block output itself, outside a module call (PixArt's ``embedded_timestep``
   in ``scale_shift_table + embedded_timestep``), come from the policy's
   ``early`` modules (PixArt: ``adaln_single``). A forward hook on each early
   module returns its outputs already row-indexed to the *final* stage's rows
   (the pre-fork rows are a prefix of every later stage, copies appended), and
   remembers those tensors by identity: a module call made at an earlier stage
   that receives one of them gets its prefix of the rows in effect there (the
   blocks before the fork see their usual rows). Only those very tensors are
   cut, never a tensor that merely has a later stage's batch, so no row is
   guessed; an early module whose outputs hold no tensor of the batch in
   effect raises ``RuntimeError``. Views of those tensors with the final
   stage's batch as their leading axis (``temb.unflatten(1, (6, -1))``) are
   cut the same way.
5. Call arguments the policy *keeps* (``keep``: Wan's and CogVideoX's
   ``hidden_states``, whose shape gives the ``batch_size`` of the final
   reshape) reach the model's ``forward`` with every row, i.e. already at
   the final stage's rows (a forked row's input is its source row's input),
   and are treated like an early module's outputs: module calls before the
   last fork get their prefix, early modules get them whole.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..sampling.forking import ForkSpec
from ._deps import torch
from .hooks import pre_hook_with_kwargs
from .layouts import Geometry

__all__ = ["ForkPolicy", "Forker", "Unforkable"]

_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)


class ForkPolicy:
    """Where a model's perturbed branches fork (the generic rule; families subclass it).

    The fork point of a layer is the outermost module on the path from the
    model to the layer, below the model itself and past containers
    (``ModuleList``, ``ModuleDict``): for ``blocks.3.attn`` it is
    ``blocks.3``. Fork points run in module-registration order (checked at run
    time). Exact only when the model's ``forward`` passes its values to later
    modules without combining them with a fork point's output itself, so this
    generic policy is not ``proven``: fork mode is then on only with ``fork=True``.

    Parameters
    ----------
    proven
        Whether fork mode is known to be exact for the models it serves (then
        it is on by default).
    refuse
        Keyword arguments of the model call that its ``forward`` combines with
        block inputs or outputs outside a module call (ControlNet residuals of
        SD3 and Flux, Wan's image embeddings): a call that passes one (not
        ``None``) raises ``ValueError``.
    early
        Names of submodules that the model's ``forward`` calls itself before the
        fork points and whose outputs it also uses after them outside a module
        call (PixArt's ``adaln_single``): their batch-sized outputs are expanded
        to the final stage's rows (cut back to the rows in effect for module
        calls before the last fork). They must be called by the model itself,
        before the first fork point, and not inside a block.
    keep
        Names of arguments of the model's ``forward`` that it receives with every
        row (not cut to the pre-fork rows): for a ``forward`` that takes a batch
        size from them and applies it to the forked rows (Wan's and CogVideoX's
        final ``reshape(batch_size, ...)``). Module calls before the last fork
        get the rows in effect of them; only sound where ``forward`` uses them
        outside module calls for their shape alone.
    copy_at_previous
        Copy the rows at the output of the fork point's previous sibling in its
        container (``blocks.2`` for ``blocks.3``) instead of at the fork point's
        input, so the model's ``forward`` does not hold the pre-fork hidden
        states while the fork point runs on their copies (lower peak memory).
        Exact when the ``forward`` hands a block's outputs to the next block
        unchanged (a transformer's block loop). Where that sibling does not run
        or returns no tensor of the batch in effect, the fork point copies them.

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> ForkPolicy().point(net, "0")
    '0'
    """

    def __init__(
        self,
        *,
        proven: bool = False,
        refuse: Sequence[str] = (),
        early: Sequence[str] = (),
        keep: Sequence[str] = (),
        copy_at_previous: bool = False,
    ) -> None:
        if any(isinstance(v, str) for v in (refuse, early, keep)):
            raise TypeError("refuse, early and keep must be sequences of names, not a string")
        self.proven = bool(proven)
        self.refuse = tuple(refuse)
        self.early = tuple(early)
        self.keep = tuple(keep)
        self.copy_at_previous = bool(copy_at_previous)

    def __repr__(self) -> str:
        early = f", early={self.early}" if self.early else ""
        keep = f", keep={self.keep}" if self.keep else ""
        copy = ", copy_at_previous=True" if self.copy_at_previous else ""
        return (
            f"{type(self).__name__}(proven={self.proven}, refuse={self.refuse}{early}{keep}{copy})"
        )

    def point(self, model: torch.nn.Module, layer: str) -> str:
        """The fork point of ``layer``: its outermost non-container ancestor below ``model``."""
        parts = layer.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if not isinstance(model.get_submodule(name), _CONTAINERS):
                return name
        return layer

    def rank(self, model: torch.nn.Module, point: str) -> Any:
        """Execution-order key of a fork point (default: module-registration order)."""
        for i, (name, _) in enumerate(model.named_modules()):
            if name == point:
                return i
        raise ValueError(f"no module named {point!r} in {type(model).__name__}")

    def stages_of(
        self, model: torch.nn.Module, kwargs: Mapping[str, Any], points: Sequence[str]
    ) -> dict[str, int]:
        """Keyword arguments of a model call that its ``forward`` uses after fork points.

        Returns ``{name: k}``: argument ``name`` is given at the batch in effect
        after the ``k``-th fork point (``points`` in execution order) instead of
        the pre-fork batch. Raise ``ValueError`` for a call that cannot be forked.
        """
        given = [k for k in self.refuse if kwargs.get(k) is not None]
        if given:
            raise ValueError(
                f"fork mode cannot fork {type(model).__name__} called with {given} (its forward "
                "combines them with block inputs or outputs outside a module call); pass "
                "fork=False"
            )
        return {}

    def early_of(self, model: torch.nn.Module) -> tuple[str, ...]:
        """The early modules of ``model`` (default: ``early``); see the class parameters."""
        return self.early


class Unforkable(ForkPolicy):
    """A family whose ``forward`` mixes pre-fork values into block outputs: fork mode refused.

    A model whose ``forward`` combines values from before the fork with a
    block output outside any module call, in a way no ``early`` module or
    ``stages_of`` argument captures, cannot add rows at a block.
    ``fork=None`` leaves them unforked; ``fork=True`` raises ``ValueError``
    with ``reason``.

    Parameters
    ----------
    reason
        Why the family cannot fork (shown in the error).

    Examples
    --------
    >>> Unforkable("no").point(torch.nn.Linear(1, 1), "weight")
    Traceback (most recent call last):
    ...
    ValueError: fork mode is not available for Linear: no; pass fork=False
    """

    def __init__(self, reason: str) -> None:
        super().__init__(proven=False)
        self.reason = reason

    def point(self, model: torch.nn.Module, layer: str) -> str:
        raise ValueError(
            f"fork mode is not available for {type(model).__name__}: {self.reason}; pass fork=False"
        )


@dataclass
class _CallState:
    """One forked model call in progress."""

    spec: ForkSpec
    sizes: tuple[int, ...]
    sources: tuple[int, ...]
    stage: int = 0  # forks done so far
    started: bool = False
    index: dict[tuple[int, int, Any], torch.Tensor] = field(default_factory=dict)
    # early-module outputs and kept arguments at the final stage's rows, by id of their
    # storage's base tensor (the dict keeps them alive, so the ids stay unique)
    grown: dict[int, torch.Tensor] = field(default_factory=dict)

    def grow(self, t: torch.Tensor) -> None:
        base = t if t._base is None else t._base
        self.grown[id(base)] = base

    def is_grown(self, t: torch.Tensor) -> bool:
        """``t`` is (a view of) a tensor at the final rows, with the batch leading."""
        base = t if t._base is None else t._base
        return self.grown.get(id(base)) is base and t.ndim >= 1 and t.shape[0] == self.sizes[-1]

    @property
    def batch(self) -> int:
        return self.sizes[self.stage]

    def rows(self, src: int, dst: int, device: Any) -> torch.Tensor:
        """Row ``r`` of stage ``dst`` comes from row ``index[r]`` of stage ``src``."""
        key = (src, dst, device)
        if key not in self.index:
            keep = self.sizes[src]
            rows = [r if r < keep else self.sources[r] for r in range(self.sizes[dst])]
            self.index[key] = torch.tensor(rows, device=device)
        return self.index[key]

    def expand(self, value: Any, dst: int | None = None) -> Any:
        """Row-index every tensor of an earlier stage's batch to stage ``dst`` (default: now)."""
        dst = self.stage if dst is None else dst
        if isinstance(value, torch.Tensor):
            if self.grown and self.is_grown(value):
                # an early module's output, at the final stage's rows: the prefix in effect
                return value if dst == len(self.sizes) - 1 else value[: self.sizes[dst]]
            if value.ndim >= 1:
                n = value.shape[0]
                for src in range(dst):
                    if n == self.sizes[src]:
                        return value.index_select(0, self.rows(src, dst, value.device))
            return value
        if isinstance(value, dict):
            return {k: self.expand(v, dst) for k, v in value.items()}
        if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
            return type(value)(self.expand(v, dst) for v in value)
        return value


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.call: _CallState | None = None


class Forker:
    """Runs calls of one model in fork mode (owned by an :class:`AttentionPatcher`).

    Parameters
    ----------
    model
        The patched model (its forward calls are forked).
    policy
        The :class:`ForkPolicy`.

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    >>> Forker(net, ForkPolicy()).fork_point(["1"])
    ('1', 2)
    """

    def __init__(self, model: torch.nn.Module, policy: ForkPolicy) -> None:
        if not isinstance(policy, ForkPolicy):
            raise TypeError(f"fork must be a ForkPolicy, got {type(policy).__name__}")
        self.model = model
        self.policy = policy
        self._local = _ThreadState()
        self._positional: list[str] | None = None

    # ------------------------------------------------------------------ planning
    def fork_point(self, layers: Sequence[str]) -> tuple[str, Any]:
        """Fork point (and rank) of a branch perturbing ``layers``: the earliest one's."""
        ranked = []
        for layer in layers:
            point = self.policy.point(self.model, layer)
            ranked.append((self.policy.rank(self.model, point), point))
        rank, point = min(ranked, key=lambda item: item[0])
        return point, rank

    # ------------------------------------------------------------------- running
    def batch(self, default: int) -> int:
        """Rows in effect in this thread's forked call now (``default`` outside one)."""
        call = self._local.call
        return call.batch if call is not None and call.started else default

    def effective(self, geometry: Geometry) -> Geometry:
        """``geometry`` with the batch in effect now (attention rows map to these rows)."""
        call = self._local.call
        if call is None or not call.started or call.batch == geometry.batch:
            return geometry
        return Geometry(
            batch=call.batch,
            height=geometry.height,
            width=geometry.width,
            frames=geometry.frames,
            tokens=geometry.tokens,
        )

    def root_hooks(self) -> list[Any]:
        """Install the model-level pre-hook (the patcher keeps it while attached)."""
        return [pre_hook_with_kwargs(self.model, self._root_pre)]

    @contextmanager
    def forking(self, spec: ForkSpec) -> Iterator[None]:
        """Fork the next call of the model as ``spec`` says (needs the root hook installed)."""
        if not isinstance(spec, ForkSpec):
            raise TypeError(f"spec must be a ForkSpec, got {type(spec).__name__}")
        local = self._local
        if local.call is not None:
            raise RuntimeError("a forked call of this model is already in progress in this thread")
        modules = dict(self.model.named_modules())
        points = [name for name, _ in spec.stages]
        missing = [p for p in points if p not in modules or p == ""]
        if missing:
            raise ValueError(f"fork points {missing} are not submodules of the model")
        call = _CallState(spec, spec.sizes, spec.sources)
        handles = []
        early = list(self.policy.early_of(self.model))
        absent = [e for e in early if e not in modules or e == ""]
        if absent:
            raise ValueError(f"early modules {absent} of the fork policy are not submodules")
        for name in self._hooked(modules, points):
            stage = points.index(name) if name in points else None
            hook = self._point_hook(call, stage, name, name in early)
            handles.append(pre_hook_with_kwargs(modules[name], hook))
        for name in early:
            handles.append(modules[name].register_forward_hook(self._early_hook(call, name)))
        if self.policy.copy_at_previous:
            for stage, point in enumerate(points):
                prev = _previous_sibling(modules, point)
                if prev is not None:
                    hook = self._copy_hook(call, stage)
                    handles.append(modules[prev].register_forward_hook(hook))
        local.call = call
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            local.call = None
            for handle in handles:
                handle.remove()
            if not failed and call.started and call.stage != len(points):
                raise RuntimeError(
                    f"fork mode: fork point {points[call.stage]!r} never ran in the forward call "
                    f"of {type(self.model).__name__}, so its branch's rows were never made; use "
                    "fork=False for this model"
                )

    def _hooked(self, modules: dict[str, torch.nn.Module], points: Sequence[str]) -> list[str]:
        """The fork points and every module their ancestors call directly."""
        names: dict[str, None] = dict.fromkeys(points)
        for point in points:
            parts = point.split(".")
            ancestors = [".".join(parts[:i]) for i in range(len(parts))]
            for anc in ancestors:
                if isinstance(modules[anc], _CONTAINERS):
                    continue
                for child in _called_children(modules[anc], anc):
                    if child not in ancestors:
                        names.setdefault(child, None)
        return list(names)

    def _root_pre(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        call = self._local.call
        if call is None:
            return None
        if call.started:
            raise RuntimeError(
                f"fork mode: {type(self.model).__name__} was called again inside its own forked "
                "call; use fork=False"
            )
        spec = call.spec
        call.started = True
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        if not any(t.ndim >= 1 and t.shape[0] == spec.rows for t in tensors):
            raise RuntimeError(
                f"fork mode: no tensor argument of the {type(self.model).__name__} call has the "
                f"batch of {spec.rows} rows the fork plan expects"
            )
        points = [name for name, _ in spec.stages]
        late = self.policy.stages_of(self.model, kwargs, points)

        def cut(value: Any, rows: int) -> Any:
            if isinstance(value, torch.Tensor):
                return value[:rows] if value.ndim >= 1 and value.shape[0] == spec.rows else value
            if isinstance(value, dict):
                return {k: cut(v, rows) for k, v in value.items()}
            if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
                return type(value)(cut(v, rows) for v in value)
            return value

        keep = set(self.policy.keep)
        names = self._arg_names(len(args)) if keep else []
        new_args = []
        for i, a in enumerate(args):
            if i < len(names) and names[i] in keep:
                new_args.append(self._kept(call, a))
            else:
                new_args.append(cut(a, spec.pre))
        new_kwargs = {
            k: self._kept(call, v) if k in keep else cut(v, call.sizes[late.get(k, 0)])
            for k, v in kwargs.items()
        }
        return tuple(new_args), new_kwargs

    def _copy_hook(self, call: _CallState, stage: int) -> Callable[..., Any]:
        """Forward hook of the block before fork point ``stage``: copy the rows of its output."""

        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if self._local.call is not call or not call.started or call.stage != stage:
                return None
            if not any(t.ndim >= 1 and t.shape[0] == call.batch for t in _tensors(output)):
                return None  # nothing to copy here: the fork point's pre-hook does it
            call.stage += 1
            # the pre-fork output is freed now: the forward keeps only the copies
            return call.expand(output)

        return hook

    def _arg_names(self, n: int) -> list[str]:
        """Names of the first ``n`` positional parameters of the model's ``forward``."""
        if self._positional is None:  # read once: the signature is the same on every call
            self._positional = [
                p.name
                for p in inspect.signature(self.model.forward).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
            ]
        return self._positional[:n]

    @staticmethod
    def _kept(call: _CallState, value: Any) -> Any:
        """A kept argument: whole (it has the final stage's rows), remembered to be cut."""
        for t in _tensors(value):
            if t.ndim >= 1 and t.shape[0] == call.sizes[-1]:
                call.grow(t)
        return value

    def _point_hook(
        self, call: _CallState, stage: int | None, name: str, early: bool = False
    ) -> Callable[..., Any]:
        def hook(
            module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            # Hooks are shared by threads: act only on this context's own call.
            if self._local.call is not call or not call.started:
                return None
            if stage is not None and call.stage == stage:
                args, kwargs = call.expand(args), call.expand(kwargs)
                before = call.batch
                leaves = _tensors((args, kwargs))
                if not any(t.ndim >= 1 and t.shape[0] == before for t in leaves):
                    shapes = [tuple(t.shape) for t in leaves]
                    raise RuntimeError(
                        f"fork mode: the inputs of fork point {name!r} have no tensor with the "
                        f"{before} rows in effect (shapes {shapes}; a batch folded with frames "
                        "or heads?), so its rows cannot be copied; use fork=False"
                    )
                call.stage += 1
                return call.expand(args), call.expand(kwargs)
            if stage is not None and call.stage < stage:
                raise RuntimeError(
                    f"fork mode: fork point {name!r} ran before {call.spec.stages[call.stage][0]!r}"
                    ", not in the planned order; use fork=False for this model"
                )
            if call.stage == 0 and (early or not call.grown):
                return None  # early modules see kept arguments whole
            return call.expand(args), call.expand(kwargs)

        return hook

    def _early_hook(self, call: _CallState, name: str) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if self._local.call is not call or not call.started:
                return None
            final = len(call.sizes) - 1
            before = {id(t) for t in _tensors(output)}
            grown = call.expand(output, final)
            new = [t for t in _tensors(grown) if id(t) not in before]
            if not new and not any(
                t.ndim >= 1 and t.shape[0] == call.sizes[final] for t in _tensors(output)
            ):
                shapes = [tuple(t.shape) for t in _tensors(output)]
                raise RuntimeError(
                    f"fork mode: the outputs of early module {name!r} have no tensor with the "
                    f"{call.batch} rows in effect (shapes {shapes}), so they cannot be expanded "
                    "to the forked rows; use fork=False"
                )
            for t in _tensors(grown):
                if t.ndim >= 1 and t.shape[0] == call.sizes[final]:
                    call.grow(t)
            return grown

        return hook


def _previous_sibling(modules: Mapping[str, torch.nn.Module], point: str) -> str | None:
    """``blocks.2`` for ``blocks.3`` when ``blocks`` is a ``ModuleList`` (else ``None``)."""
    parent, _, index = point.rpartition(".")
    if not parent or not index.isdigit() or int(index) == 0:
        return None
    if not isinstance(modules.get(parent), torch.nn.ModuleList):
        return None
    return f"{parent}.{int(index) - 1}"


def _called_children(module: torch.nn.Module, prefix: str) -> Iterator[str]:
    """Names of the modules ``module.forward`` can call directly (through containers)."""
    for name, child in module.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if isinstance(child, _CONTAINERS):
            yield from _called_children(child, full)
        else:
            yield full


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []
