"""List public functions and classes whose docstring lacks Parameters, Returns or Examples.

The documentation promises (issue 9) that every public function and class has a
NumPy-style docstring with *Parameters* / *Returns* and at least one *Examples*
section. This script checks it over every public module of the installed
``smoothguide`` (modules and names without a leading underscore, objects listed in
a module's ``__all__`` and defined there):

- functions: *Parameters* when they take arguments, *Returns* (or *Yields*) and
  *Examples*;
- classes: *Parameters* (or *Attributes*) when they take constructor arguments,
  and *Examples*; protocols and exceptions need only a docstring.

Usage::

    python docs/check_docstrings.py          # prints the gaps, exit status 1 if any

Modules whose optional dependency is missing (torch, diffusers, matplotlib) are
reported as skipped, not as passing.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from typing import Any, Protocol


def public_modules() -> list[str]:
    import smoothguide

    names = ["smoothguide"]
    for info in pkgutil.walk_packages(smoothguide.__path__, "smoothguide.", onerror=lambda _: None):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return names


def _sections(doc: str) -> set[str]:
    lines = doc.splitlines()
    return {
        lines[i].strip()
        for i in range(len(lines) - 1)
        if lines[i].strip() and set(lines[i + 1].strip()) == {"-"}
    }


def _takes_arguments(obj: Any) -> bool:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return False
    return any(p.name not in ("self", "cls") for p in sig.parameters.values())


def gaps(obj: Any) -> list[str]:
    """The sections ``obj``'s docstring is missing (empty when complete)."""
    doc = inspect.getdoc(obj) or ""
    if not doc:
        return ["docstring"]
    have = _sections(doc)
    missing = []
    if inspect.isclass(obj):
        if issubclass(obj, BaseException) or Protocol in getattr(obj, "__mro__", ()):
            return []
        if getattr(obj, "_is_protocol", False):
            return []
        if _takes_arguments(obj) and not have & {"Parameters", "Attributes"}:
            missing.append("Parameters")
    else:
        if _takes_arguments(obj) and "Parameters" not in have:
            missing.append("Parameters")
        if not have & {"Returns", "Yields"}:
            missing.append("Returns")
    if "Examples" not in have:
        missing.append("Examples")
    return missing


def main() -> int:
    found: dict[str, list[str]] = {}
    skipped: list[str] = []
    for name in public_modules():
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            skipped.append(f"{name} ({exc})")
            continue
        for attr in getattr(module, "__all__", ()):
            obj = getattr(module, attr, None)
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", None) != name:
                continue  # a re-export: checked where it is defined
            missing = gaps(obj)
            if missing:
                found[f"{name}.{attr}"] = missing
    for qualname, missing in sorted(found.items()):
        print(f"{qualname}: missing {', '.join(missing)}")
    for s in skipped:
        print(f"skipped {s}")
    print(f"{len(found)} public objects with incomplete docstrings")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
