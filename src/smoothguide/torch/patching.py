"""Perturb chosen attention layers of any ``torch.nn.Module`` for chosen batch rows.

:class:`AttentionPatcher` implements :class:`smoothguide.branches.Perturber`.
It never replaces a module, a method or an attention processor. While a
perturbation is active it adds hooks to the chosen layers; while such a layer
runs, a :class:`torch.overrides.TorchFunctionMode` intercepts
``torch.nn.functional.scaled_dot_product_attention``, so the perturbation acts
on the very tensors that enter ``softmax(Q Kᵀ / √d) V``: queries after any
QK-norm and rotary embedding, for whichever processor (IP-Adapter, LoRA,
custom) computes them. Hooks are removed on exit, also after an exception.
Attention computed by a diffusers ``dispatch_attention_fn`` backend (flash, sage,
flex, ...) is perturbed the same way (:mod:`smoothguide.torch.dispatch`);
models compiled with ``torch.compile`` need :func:`smoothguide.torch.compilable`
(:mod:`smoothguide.torch.compile`).
"""

from __future__ import annotations

import numbers
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.overrides import TorchFunctionMode

from ..grid import TokenGrid
from ..perturbations import IdentityAttention, LayerSelection, Perturbation, QuerySmoothing
from ..sampling.forking import ForkSpec
from . import compile as _compile
from . import dispatch as _dispatch
from ._deps import torch
from .fork import Forker, ForkPolicy
from .heads import blur_query_rows, identity_rows
from .hooks import pre_hook_with_kwargs
from .layouts import Geometry, GeometryFn, LayerSpec, image_geometry

__all__ = ["AttentionPatcher", "LayerSource", "register_perturbation"]

_SDPA = torch._C._nn.scaled_dot_product_attention

_COMPILE_ERROR = (
    "attention layer {name!r} is being compiled by torch.compile inside perturb(); the "
    "per-context hooks cannot be traced. Enter smoothguide.torch.compilable(patcher) before "
    "compiling the model (or its blocks), and keep it entered while the compiled model runs"
)

#: What ``AttentionPatcher(layers=...)`` accepts: exact module names, a module
#: class (or tuple of classes), a predicate ``(name, module) -> bool``, or a
#: mapping from module name to :class:`LayerSpec`.
LayerSource = (
    Sequence[str]
    | type
    | tuple[type, ...]
    | Callable[[str, torch.nn.Module], bool]
    | Mapping[str, LayerSpec]
)


@dataclass(eq=False)
class _Entry:
    """One active ``perturb`` context and what happened inside it."""

    perturbation: Perturbation
    rows: tuple[int, ...]
    layers: frozenset[str]
    model_calls: int = 0  # forward calls of the model seen by the context
    ran: set[str] = field(default_factory=set)  # selected layers that ran
    patcher: AttentionPatcher | None = None
    modules: frozenset[int] = frozenset()  # ids of the selected modules and their submodules


@dataclass
class _Call:
    """One forward call of the patched model: its inputs and, once needed, its geometry."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    geometry_fn: GeometryFn
    _geometry: Geometry | None = None
    grids: dict[tuple[str, int], TokenGrid] = field(default_factory=dict)

    @property
    def geometry(self) -> Geometry:
        if self._geometry is None:
            self._geometry = self.geometry_fn(self.args, self.kwargs)
            if not isinstance(self._geometry, Geometry):
                raise TypeError(
                    f"geometry function must return a Geometry, got {type(self._geometry).__name__}"
                )
        return self._geometry


class _ThreadState(threading.local):
    """Per-thread state: the perturbations entered, model calls running and modes pushed."""

    def __init__(self) -> None:
        self.active: list[_Entry] = []
        self.calls: list[_Call] = []
        self.modes: dict[str, list[_SDPAMode | None]] = {}
        self.pushed: list[_SDPAMode] = []
        # attached() contexts of this thread: only then are its calls recorded, so another
        # thread's detaching (removing hooks mid-call) cannot leave stale records here.
        self.attached = 0


class _Perturbed(threading.local):
    """Every active perturbation of this thread, of any patcher (to refuse double perturbing)."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []


_PERTURBED = _Perturbed()


def _remove_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off this thread's torch-function-mode stack, keeping the modes above it."""
    above = []
    while torch._C._len_torch_function_stack() > 0:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for other in reversed(above):
        torch._C._push_on_torch_function_stack(other)


class _SDPAMode(TorchFunctionMode):
    """Routes ``scaled_dot_product_attention`` calls made inside one layer to the patcher."""

    def __init__(self, patcher: AttentionPatcher, name: str, entries: list[_Entry]) -> None:
        super().__init__()
        self.patcher, self.name, self.entries = patcher, name, entries
        self.calls = 0
        self.batch_rows = 0  # model rows covered so far by calls on chunks of the batch
        self.folded_calls = 0  # calls whose axis 0 folds heads (or frames) into the batch
        self.batch = 0  # the model call's batch, once a call was seen
        self.bypass = 0  # > 0 while a diffusers backend call is handled (see dispatch.py)

    def dispatch(self, backend: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Any:
        """A diffusers ``dispatch_attention_fn`` backend call made inside this layer."""
        return _dispatch.perturbed_call(self, backend, fn, kwargs)

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is _SDPA and not self.bypass:
            q, k, *_ = _split_sdpa_args(args, kwargs)
            # Only self (or joint) attention: keys are the queries' own tokens. A second
            # SDPA call of the same module against other tokens (an IP-Adapter's image
            # keys in SD3/Flux joint attention) is cross-attention and stays untouched.
            if k.shape[-2] == q.shape[-2]:
                self.calls += 1
                return self.patcher._attend(self.name, self.entries, args, kwargs, rows=self)
        return func(*args, **kwargs)


def _split_sdpa_args(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[Any, ...], dict[str, Any]]:
    names = ("query", "key", "value")
    values = list(args[:3])
    rest_kwargs = dict(kwargs)
    for name in names[len(values) :]:
        values.append(rest_kwargs.pop(name))
    q, k, v = values
    return q, k, v, tuple(args[3:]), rest_kwargs


class _SingleUse(AbstractContextManager[None]):
    """A context manager that may be entered once (a generator-based one breaks obscurely)."""

    def __init__(self, inner: AbstractContextManager[None]) -> None:
        self._inner = inner
        self._entered = False

    def __enter__(self) -> None:
        if self._entered:
            raise RuntimeError(
                "this perturb() context was already entered; call patcher.perturb(...) again "
                "for a new one"
            )
        self._entered = True
        return self._inner.__enter__()

    def __exit__(self, *exc: Any) -> bool | None:
        return self._inner.__exit__(*exc)


#: Perturbations executed outside the attention call (skip layers, token
#: permutation, ...): type -> ``handler(patcher, perturbation, rows)`` returning a
#: context manager. Registered by the modules that implement them
#: (:func:`register_perturbation`); :meth:`AttentionPatcher.perturb` dispatches here.
_HANDLERS: dict[type, Callable[..., AbstractContextManager[None]]] = {}


def register_perturbation(kind: type, handler: Callable[..., AbstractContextManager[None]]) -> None:
    """Let :class:`AttentionPatcher` run perturbations of type ``kind`` through ``handler``.

    ``handler(patcher, perturbation, rows)`` is called with checked rows (a tuple
    of distinct ints) and returns the context manager ``perturb`` enters, with the
    patcher's model-level hooks attached around it.

    Parameters
    ----------
    kind
        A :class:`~smoothguide.perturbations.Perturbation` subclass; instances
        of its subclasses match too (the first registered matching type wins).
    handler
        ``handler(patcher, perturbation, rows) -> context manager``.

    Returns
    -------
    None
        ``kind``'s handler is replaced if it had one.

    Raises
    ------
    TypeError
        ``kind`` is not a Perturbation subclass or ``handler`` is not callable.

    Examples
    --------
    >>> register_perturbation(int, lambda patcher, p, rows: None)
    Traceback (most recent call last):
    ...
    TypeError: kind must be a Perturbation subclass, got <class 'int'>
    """
    if not isinstance(kind, type) or not issubclass(kind, Perturbation):
        raise TypeError(f"kind must be a Perturbation subclass, got {kind!r}")
    if not callable(handler):
        raise TypeError(f"handler must be callable, got {handler!r}")
    _HANDLERS[kind] = handler


class AttentionPatcher:
    """Apply SEG or PAG perturbations to chosen attention layers of a torch model.

    Implements :class:`smoothguide.branches.Perturber`: ``perturb(p, rows)``
    returns a context manager inside which forward calls of ``model`` apply
    ``p`` to the batch rows ``rows`` in the layers ``p.layers`` selects; every
    other row is computed exactly as without the patcher.

    - :class:`~smoothguide.perturbations.QuerySmoothing` (SEG) replaces those
      rows' queries by :func:`smoothguide.torch.smooth_queries` of them on the
      layer's token grid (prefix/suffix text tokens untouched).
    - :class:`~smoothguide.perturbations.IdentityAttention` (PAG) replaces
      those rows' attention output on the grid tokens by the values ``V``.

    The grid of each layer comes from the model call's input
    (``geometry(args, kwargs)``, default :func:`image_geometry`) and the
    layer's :class:`LayerSpec` layout. Only self (or joint) attention calls are
    perturbed, i.e. SDPA calls whose keys have as many tokens as the queries; a
    second call of the same module against other tokens (IP-Adapter image keys)
    is left alone. Attention rows are mapped to model rows
    by the integer ratio of their batch sizes (heads or frames folded into the
    batch, model row major); SDPA calls on groups of heads or on consecutive
    chunks of the batch (4-D queries) are mapped per call, and calls on chunks of
    a folded ``(batch·heads)`` axis, which cannot be told apart from separate
    attentions, raise ``RuntimeError``. A selection naming a module and one
    inside it, or another patcher already perturbing the same rows of the same
    modules, raises ``ValueError``. A perturbed layer that runs without calling
    ``scaled_dot_product_attention`` raises ``RuntimeError``, and so does a
    context in which the model ran but none of its selected layers did: the
    perturbation never silently does nothing.

    A context entered in one thread perturbs only the calls made by that
    thread (hooks are shared, their state is per thread).

    Parameters
    ----------
    model
        The top-level module that is called (its inputs give the geometry).
    layers
        The perturbable attention modules: exact names (``model.named_modules()``
        names), a module class or tuple of classes, a predicate
        ``(name, module) -> bool``, or a mapping ``name -> LayerSpec``.
    presets
        Named groups of layer names, e.g. ``{"mid": (...)}``.
    default
        The selection used when a perturbation's ``layers`` is ``None``: a preset,
        a layer name or a sequence of them; ``None`` means every layer.
    geometry
        ``(args, kwargs) -> Geometry`` for a call of ``model``.
    fork
        The :class:`~smoothguide.torch.fork.ForkPolicy` of fork mode (where
        perturbed branches join the batch); default the generic, not proven one.

    Examples
    --------
    >>> import torch.nn.functional as F
    >>> class Attn(torch.nn.Module):
    ...     def forward(self, x):                       # x: (B, N, d)
    ...         return F.scaled_dot_product_attention(x, x, x)
    >>> class Net(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.attn = Attn()
    ...     def forward(self, img):                     # img: (B, d, H, W)
    ...         return self.attn(img.flatten(2).transpose(1, 2))
    >>> net, img = Net(), torch.randn(2, 4, 3, 5)
    >>> patcher = AttentionPatcher(net, layers=Attn)
    >>> patcher.layers
    ('attn',)
    >>> with patcher.perturb(QuerySmoothing(float("inf")), rows=[1]):
    ...     out = net(img)
    >>> bool(torch.equal(out[0], net(img)[0])), bool(torch.allclose(out[1], out[1, :1]))
    (True, True)
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layers: LayerSource,
        *,
        presets: Mapping[str, Sequence[str]] | None = None,
        default: LayerSelection = None,
        geometry: GeometryFn = image_geometry,
        fork: ForkPolicy | None = None,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(geometry):
            raise TypeError(
                f"geometry must be callable (args, kwargs) -> Geometry, got {geometry!r}"
            )
        self.model = model
        self._geometry_fn = geometry
        modules = dict(model.named_modules())
        self._specs = self._collect(modules, layers)
        if not self._specs:
            raise ValueError(f"layers={layers!r} matches no module of {type(model).__name__}")
        self._modules = {name: modules[name] for name in self._specs}
        self._presets: dict[str, tuple[str, ...]] = {}
        for key, names in (presets or {}).items():
            if key in self._specs:
                raise ValueError(f"preset name {key!r} is also a layer name; rename the preset")
            names = (names,) if isinstance(names, str) else tuple(names)
            unknown = [n for n in names if n not in self._specs]
            if unknown:
                raise ValueError(f"preset {key!r} names unknown layers {unknown}")
            self._presets[key] = self._ordered(names)
        self._default = self.resolve(default) if default is not None else self.layers
        # What a thread entered affects only that thread's calls; the hooks are shared.
        self._local = _ThreadState()
        self._lock = threading.RLock()
        self._attached = 0
        self._root_handles: list[Any] = []
        self._layer_refs: dict[str, int] = {}
        self._layer_handles: dict[str, list[Any]] = {}
        self.forker = Forker(model, ForkPolicy() if fork is None else fork)

    # ----------------------------------------------------------------- layers
    @staticmethod
    def _collect(modules: dict[str, torch.nn.Module], layers: LayerSource) -> dict[str, LayerSpec]:
        if isinstance(layers, Mapping):
            specs: dict[str, LayerSpec] = {}
            for name, spec in layers.items():
                if not isinstance(spec, LayerSpec):
                    raise TypeError(
                        f"layers[{name!r}] must be a LayerSpec, got {type(spec).__name__}"
                    )
                specs[name] = spec
            names: Sequence[str] = list(specs)
        elif isinstance(layers, type) or (
            isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)
        ):
            classes = layers if isinstance(layers, tuple) else (layers,)
            names = [n for n, m in modules.items() if isinstance(m, classes)]
        elif isinstance(layers, str):
            names = [layers]
        elif isinstance(layers, Sequence):
            names = [str(n) for n in layers]
            if not all(isinstance(n, str) for n in layers):
                raise TypeError(f"layers must be module names (str), got {layers!r}")
        elif callable(layers):
            names = [n for n, m in modules.items() if layers(n, m)]
        else:
            raise TypeError(
                "layers must be a sequence of module names, a module class, a predicate "
                "(name, module) -> bool, or a mapping name -> LayerSpec; "
                f"got {type(layers).__name__}"
            )
        missing = [n for n in names if n not in modules or n == ""]
        if missing:
            raise ValueError(
                f"no module named {missing} in the model; module names look like "
                f"{[n for n in modules if n][:8]}"
            )
        order = {n: i for i, n in enumerate(modules)}
        given = specs if isinstance(layers, Mapping) else {}
        return {n: given.get(n, LayerSpec()) for n in sorted(set(names), key=order.__getitem__)}

    def _ordered(self, names: Sequence[str]) -> tuple[str, ...]:
        wanted = set(names)
        return tuple(n for n in self._specs if n in wanted)

    @property
    def layers(self) -> tuple[str, ...]:
        """Names of every perturbable layer, in the model's module order."""
        return tuple(self._specs)

    @property
    def presets(self) -> dict[str, tuple[str, ...]]:
        """Preset name -> layer names."""
        return dict(self._presets)

    @property
    def default(self) -> tuple[str, ...]:
        """Layers used when a perturbation's ``layers`` is ``None``."""
        return self._default

    def spec(self, name: str) -> LayerSpec:
        """The :class:`LayerSpec` of layer ``name``."""
        return self._specs[name]

    def resolve(self, selection: LayerSelection) -> tuple[str, ...]:
        """Layer names of a selection (presets and exact names), in module order.

        Parameters
        ----------
        selection
            ``None`` (the default), a preset or layer name, or a sequence of them.

        Raises
        ------
        ValueError
            For an unknown name, or a selection that matches no layer; the
            message lists the presets and the available layers.
        """
        if selection is None:
            return self._default
        items = (selection,) if isinstance(selection, str) else tuple(selection)
        if not items or not all(isinstance(s, str) for s in items):
            raise TypeError(
                f"layers must be a name or a non-empty sequence of names, got {selection!r}"
            )
        names: list[str] = []
        unknown = []
        for item in items:
            if item in self._presets:
                names.extend(self._presets[item])
            elif item in self._specs:
                names.append(item)
            else:
                unknown.append(item)
        if unknown or not names:
            what = (
                f"unknown layer or preset names {unknown}"
                if unknown
                else (f"selection {list(items)} matches no layer")
            )
            nonempty = sorted(k for k, v in self._presets.items() if v)
            raise ValueError(f"{what}; presets: {nonempty}; available layers: {list(self._specs)}")
        return self._ordered(names)

    # -------------------------------------------------------------- fork mode
    @property
    def fork_proven(self) -> bool:
        """Whether fork mode is known exact for this model (then it is on by default)."""
        return self.forker.policy.proven

    def fork_point(self, perturbation: Perturbation) -> tuple[str, Any]:
        """Module where a branch perturbed by ``perturbation`` forks, and its execution rank."""
        return self.forker.fork_point(self.resolve(perturbation.layers))

    def forking(self, spec: ForkSpec) -> AbstractContextManager[None]:
        """Run the next model call in fork mode (:mod:`smoothguide.torch.fork`)."""
        return _SingleUse(self._forking(spec))

    @contextmanager
    def _forking(self, spec: ForkSpec) -> Iterator[None]:
        with self.attached(), self.forker.forking(spec):
            yield

    # ---------------------------------------------------------------- perturb
    def perturb(
        self, perturbation: Perturbation, rows: Sequence[int]
    ) -> AbstractContextManager[None]:
        """Apply ``perturbation`` to batch rows ``rows`` of the model calls inside the context.

        Each call returns a fresh single-use context manager; entering the same one
        twice raises ``RuntimeError``.

        Parameters
        ----------
        perturbation
            :class:`~smoothguide.perturbations.QuerySmoothing` or
            :class:`~smoothguide.perturbations.IdentityAttention`; its ``layers``
            picks the layers (``None``: :attr:`default`).
        rows
            Indices into the batch the model is called with; disjoint from the
            rows of other active perturbations.

        Raises
        ------
        TypeError, ValueError
            For an unsupported perturbation, bad rows, unknown layers or rows
            that overlap another active perturbation.
        """
        self._check(perturbation, rows)  # bad arguments fail here, not at the first step
        return _SingleUse(self._perturb(perturbation, rows))

    def _check(
        self, perturbation: Perturbation, rows: Sequence[int]
    ) -> tuple[tuple[int, ...], frozenset[str], frozenset[int]]:
        """Checked ``(rows, layer names, ids of the modules they cover)`` of a perturbation."""
        handler = next((h for t, h in _HANDLERS.items() if isinstance(perturbation, t)), None)
        if handler is None and not isinstance(perturbation, QuerySmoothing | IdentityAttention):
            raise TypeError(
                "perturbation must be QuerySmoothing or IdentityAttention (or a registered kind: "
                f"{sorted(t.__name__ for t in _HANDLERS)}), got {type(perturbation).__name__}"
            )
        if isinstance(rows, str | bytes) or not isinstance(rows, Sequence):
            raise TypeError(f"rows must be a sequence of ints, got {type(rows).__name__}")
        # NumPy integers are accepted (stored as int); bools and floats are not rows.
        if not all(
            isinstance(r, numbers.Integral) and not isinstance(r, bool | np.bool_) for r in rows
        ) or any(int(r) < 0 for r in rows):
            raise ValueError(f"rows must be ints >= 0, got {list(rows)}")
        checked = tuple(int(r) for r in rows)
        if len(set(checked)) != len(checked):
            raise ValueError(f"rows must not repeat, got {list(rows)}")
        layers = frozenset(self.resolve(perturbation.layers))
        return checked, layers, self._check_nesting(layers)

    @contextmanager
    def _perturb(self, perturbation: Perturbation, rows: Sequence[int]) -> Iterator[None]:
        checked, layers, modules = self._check(perturbation, rows)
        for other in _PERTURBED.entries:
            shared = set(checked) & set(other.rows)
            if not other.modules & modules:
                continue
            if other.patcher is self and shared:
                raise ValueError(
                    f"rows {sorted(shared)} are already perturbed by {other.perturbation} in the "
                    "same layers; active perturbations must use disjoint rows"
                )
            if (
                other.patcher is not self
                and other.patcher is not None
                and (shared or other.patcher.model is not self.model)
            ):
                raise ValueError(
                    f"another AttentionPatcher already perturbs the same attention modules "
                    f"({sorted(other.layers)}) with {other.perturbation} for rows "
                    f"{list(other.rows)}: the rows would be perturbed twice; use one patcher "
                    "per model, with disjoint rows"
                )
        if not checked or getattr(perturbation, "is_identity", False):
            yield  # nothing to do: sigma = 0 / weight = 0 is the plain model, bit for bit
            return
        handler = next((h for t, h in _HANDLERS.items() if isinstance(perturbation, t)), None)
        if handler is not None:  # a perturbation outside the attention call
            with self.attached(), handler(self, perturbation, checked):
                yield
            return
        entry = _Entry(perturbation, checked, layers, patcher=self, modules=modules)
        local = self._local
        # Entered inside a model call (e.g. from a forward pre-hook): that call counts.
        entry.model_calls = 1 if local.calls else 0
        marks = (len(local.pushed), len(local.calls))
        failed = False
        # Under compilable() the traced wrappers of compile.py stand in for the eager ones.
        static = _compile.is_static(self) is not None
        with self.attached(), nullcontext() if static else _dispatch.intercepting():
            local.active.append(entry)
            _PERTURBED.entries.append(entry)
            try:
                with self._lock:
                    for name in layers:
                        self._hook_layer(name)
                yield
            except BaseException:
                failed = True
                raise
            finally:
                local.active.remove(entry)
                _PERTURBED.entries.remove(entry)
                with self._lock:
                    for name in layers:
                        self._unhook_layer(name)
                self._drop_leftovers(*marks)
                if not failed and entry.model_calls and not entry.ran:
                    raise RuntimeError(
                        f"none of the selected layers {sorted(layers)} ran in the "
                        f"{entry.model_calls} forward call(s) of {type(self.model).__name__} made "
                        f"inside perturb(), so {perturbation} had no effect; select layers on the "
                        "path the model takes (a torch.compile'd model or block never runs hooks "
                        "added after it was compiled: enter smoothguide.torch.compilable(patcher) "
                        "before compiling)"
                    )

    def _check_nesting(self, layers: frozenset[str]) -> frozenset[int]:
        """Ids of the selected modules and their submodules; raise if one holds another."""
        inner = {name: {id(m) for m in self._modules[name].modules()} for name in layers}
        for outer in sorted(layers):
            for other in sorted(layers):
                if other != outer and id(self._modules[other]) in inner[outer]:
                    raise ValueError(
                        f"the selection names both {outer!r} and {other!r}, which lies inside "
                        "it: its attention would be perturbed twice; select one of them"
                    )
        return frozenset().union(*inner.values())

    def _drop_leftovers(self, pushed: int = 0, calls: int = 0) -> None:
        """Pop modes and call records that a ``BaseException`` left behind in this thread.

        ``always_call`` forward hooks run only for ``Exception``; after a
        ``KeyboardInterrupt`` inside a perturbed layer its mode would stay on the
        thread's torch-function-mode stack and catch every later SDPA call. Whatever
        was pushed after a context was entered belongs to model calls that have
        ended when it exits, so it goes.
        """
        local = self._local
        dropped = []
        while len(local.pushed) > pushed:
            mode = local.pushed.pop()
            _remove_mode(mode)
            dropped.append(mode)
        for name, stack in list(local.modes.items()):
            stack[:] = [m for m in stack if not any(m is d for d in dropped)]
            if not stack or not local.active:
                del local.modes[name]
        del local.calls[calls:]

    @contextmanager
    def attached(self) -> Iterator[None]:
        """Keep the model-level geometry hook installed for the whole context.

        ``perturb`` attaches by itself; attach explicitly when perturbations are
        entered from inside a model call (for instance from another forward
        pre-hook of the model, as the diffusers pipeline wrapper does), since a
        hook added during a call runs only from the next call on.
        """
        local = self._local
        with self._lock:
            if self._attached == 0:
                self._root_handles = [
                    pre_hook_with_kwargs(self.model, self._root_pre),
                    self.model.register_forward_hook(self._root_post, always_call=True),
                    *self.forker.root_hooks(),
                ]
            self._attached += 1
            local.attached += 1
        try:
            yield
        finally:
            with self._lock:
                self._attached -= 1
                local.attached -= 1
                if self._attached == 0:
                    for handle in self._root_handles:
                        handle.remove()
                    self._root_handles = []
            if not local.active:
                # Calls of this thread still running keep their records while it stays
                # attached; once it is not, none of its records can be completed.
                self._drop_leftovers(0, len(local.calls) if local.attached else 0)

    def _root_pre(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        local = self._local
        if not local.attached:  # hooks installed by another thread: not this thread's business
            return
        local.calls.append(_Call(args, kwargs, self._geometry_fn))
        for entry in local.active:
            entry.model_calls += 1

    def _root_post(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        local = self._local
        if local.attached and local.calls:
            local.calls.pop()

    def _hook_layer(self, name: str) -> None:
        static = _compile.is_static(self)
        if static is not None:  # compilable(): the traced hooks and ops do the work
            if name not in static:
                raise ValueError(
                    f"layer {name!r} is not among the layers made compile-friendly by "
                    f"compilable(patcher, layers=...): {sorted(static)}"
                )
            return
        self._layer_refs[name] = self._layer_refs.get(name, 0) + 1
        if self._layer_refs[name] > 1:
            return
        module = self._modules[name]

        def pre(mod: torch.nn.Module, args: tuple[Any, ...]) -> None:
            if torch.compiler.is_compiling():
                raise RuntimeError(_COMPILE_ERROR.format(name=name))
            local = self._local
            if not local.attached:
                return
            entries = [e for e in local.active if name in e.layers]
            mode = _SDPAMode(self, name, entries) if entries else None
            if mode is not None:
                _dispatch.refresh()  # wrap diffusers backends registered since entering
            for entry in entries:
                entry.ran.add(name)
            local.modes.setdefault(name, []).append(mode)
            if mode is not None:
                mode.__enter__()
                local.pushed.append(mode)

        def post(mod: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            local = self._local
            stack = local.modes.get(name) if local.attached else None
            if not stack:
                return
            mode = stack.pop()
            if mode is None:
                return
            if local.pushed and local.pushed[-1] is mode:
                local.pushed.pop()
            elif mode in local.pushed:
                local.pushed.remove(mode)
            _remove_mode(mode)
            if sys.exc_info()[0] is None and mode.batch_rows not in (0, mode.batch):
                raise RuntimeError(
                    f"attention layer {name!r}: its scaled_dot_product_attention calls had "
                    f"{mode.batch_rows} rows in all, not a multiple of the model batch "
                    f"{mode.batch} (chunks of the batch that do not cover it, or a geometry "
                    "whose batch is not the model call's), so the perturbed rows cannot be "
                    "mapped; run the attention unchunked"
                )
            if mode.calls == 0 and sys.exc_info()[0] is None:  # no self-attention SDPA call
                if any(getattr(m, "_compiled_call_impl", None) for m in self.model.modules()):
                    # model.compile() / block.compile() in place: the attention ran compiled
                    raise RuntimeError(_COMPILE_ERROR.format(name=name))
                processor = getattr(getattr(mod, "processor", None), "__class__", None)
                raise RuntimeError(
                    f"attention layer {name!r} ({type(mod).__name__}"
                    + (f", processor {processor.__name__}" if processor else "")
                    + ") ran without a self-attention call of "
                    "torch.nn.functional.scaled_dot_product_attention (keys as many as queries) "
                    "or of a diffusers dispatch_attention_fn backend, so the perturbation could "
                    "not be applied; "
                    "use a processor that calls one of them (e.g. diffusers' AttnProcessor2_0, "
                    "or any set_attention_backend backend), not one that calls a kernel "
                    "directly (XFormersAttnProcessor, AttnProcessor)"
                )

        self._layer_handles[name] = [
            module.register_forward_pre_hook(pre, prepend=True),
            module.register_forward_hook(post, always_call=True),
        ]

    def _unhook_layer(self, name: str) -> None:
        if name not in self._layer_refs:  # never hooked (compilable(), or a failed entry)
            return
        self._layer_refs[name] -= 1
        if self._layer_refs[name] == 0:
            del self._layer_refs[name]
            for handle in self._layer_handles.pop(name):
                handle.remove()

    def capture_attention(
        self, layers: LayerSelection, rows: Sequence[int]
    ) -> AbstractContextManager[Any]:
        """Record one layer's attention probabilities on ``rows`` (SAG's map); see ``.sag``."""
        from .sag import capture_attention  # SAG support lives in its own module

        return capture_attention(self, layers, rows)

    # ------------------------------------------------------------- attention
    def _grid(self, name: str, num_tokens: int) -> tuple[TokenGrid, Geometry]:
        calls = self._local.calls
        if not calls:
            raise RuntimeError(
                f"attention layer {name!r} ran outside a forward call of the patched "
                f"{type(self.model).__name__}; call the model itself inside perturb()"
            )
        call = calls[-1]
        geometry = call.geometry
        key = (name, num_tokens)
        if key not in call.grids:
            try:
                call.grids[key] = self._specs[name].layout.grid(num_tokens, geometry)
            except ValueError as exc:
                raise ValueError(f"attention layer {name!r}: {exc}") from exc
        return call.grids[key], geometry

    # Eager only: under torch.compile it runs as is (a graph break), never traced frame by frame.
    @torch.compiler.disable
    def _attend(
        self,
        name: str,
        entries: list[_Entry],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        attend: Callable[..., torch.Tensor] = _SDPA,
        rows: _SDPAMode | _RowState | None = None,
    ) -> torch.Tensor:
        """Perturbed ``attend(q, k, v, *rest)`` (default torch SDPA; q: ``(A, ..., N, d)``).

        ``rows`` carries the row mapping across the calls of one layer forward (chunked
        attention); ``None``: this call alone (the traced ops of ``compilable``).
        """
        q, k, v, rest, rest_kwargs = _split_sdpa_args(args, kwargs)
        if q.ndim < 3:
            raise RuntimeError(
                f"attention layer {name!r}: query of shape {tuple(q.shape)} has no batch axis"
            )
        grid, geometry = self._grid(name, q.shape[-2])
        geometry = self.forker.effective(geometry)  # fork mode: the rows in effect here
        offset, ratio = _row_map(rows if rows is not None else _RowState(name), q, geometry)

        def index(rows: tuple[int, ...]) -> torch.Tensor | None:
            if max(rows) >= geometry.batch:
                raise ValueError(
                    f"rows {list(rows)} out of range for a model call with batch {geometry.batch}"
                )
            local = [i - offset for i in rows if 0 <= i - offset < q.shape[0] // ratio]
            if not local:
                return None  # none of the rows is in this chunk of the batch
            return torch.tensor(
                [i * ratio + j for i in local for j in range(ratio)], device=q.device
            )

        # Per-row (and per-head) arithmetic of SEG / PAG lives in .heads.
        for entry in entries:
            p = entry.perturbation
            if isinstance(p, QuerySmoothing):
                ix = index(entry.rows)
                if ix is not None:
                    q = blur_query_rows(name, q, ix, grid, p)
        out = attend(q, k, v, *rest, **rest_kwargs)
        for entry in entries:
            p = entry.perturbation
            if isinstance(p, IdentityAttention):
                ix = index(entry.rows)
                if ix is not None:
                    out = identity_rows(name, out, q, v, ix, grid, p)
        return out


class _RowState:
    """Row-mapping state of one attention call made outside an ``_SDPAMode``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.batch_rows = 0
        self.folded_calls = 0
        self.batch = 0


def _row_map(mode: _SDPAMode | _RowState, q: torch.Tensor, geometry: Geometry) -> tuple[int, int]:
    """``(offset, ratio)``: row ``j`` of the call's axis 0 is model row ``offset + j // ratio``.

    Provable cases only, else ``RuntimeError``:

    - the whole batch, axis 0 of size ``ratio * batch`` with heads (or frames) folded
      in model-row-major order; a second such call of one layer's forward cannot be told
      apart from chunks of that folded axis, so it raises;
    - a 4-D ``(rows, heads, tokens, dim)`` query of an image model (``frames = 1``)
      whose axis 0 is the batch: several calls of whole heads or consecutive chunks
      of the batch (checked to cover it exactly when the layer returns).
    """
    batch, n = geometry.batch, q.shape[0]
    mode.batch = batch
    name = mode.name
    if q.ndim == 4 and geometry.frames == 1 and (n < batch or (n == batch and mode.batch_rows)):
        offset = mode.batch_rows
        mode.batch_rows += n
        if mode.batch_rows > batch or mode.folded_calls:
            raise RuntimeError(
                f"attention layer {name!r}: its scaled_dot_product_attention calls on chunks "
                f"of the batch cover more than its {batch} rows, so the perturbed rows cannot "
                "be mapped; run the attention unchunked"
            )
        return offset, 1
    if n % batch or mode.batch_rows:
        raise RuntimeError(
            f"attention layer {name!r}: attention batch {n} (query shape {tuple(q.shape)}) is "
            f"not a multiple of the model batch {batch}: the layer calls "
            "scaled_dot_product_attention on chunks of its batch (or batch x heads) axis, so "
            "its rows cannot be mapped to the perturbed rows; run the attention unchunked"
        )
    ratio = n // batch
    if q.ndim == 4 and ratio == 1:
        return 0, 1  # heads on axis 1: calls on groups of heads map row for row
    mode.folded_calls += 1
    if mode.folded_calls > 1:
        raise RuntimeError(
            f"attention layer {name!r} made several scaled_dot_product_attention calls with "
            f"{n} rows of {q.shape[-2]} tokens in one forward: chunks of a folded "
            "(batch x heads) axis and separate attentions look the same, so the perturbed "
            "rows cannot be mapped; run the attention unchunked, or select the inner "
            "attention modules"
        )
    return 0, ratio
