"""Sphinx configuration of the smoothguide documentation.

Build (what ``nox -s docs`` runs)::

    python docs/figures/make_figures.py
    sphinx-build -W --keep-going -b html docs docs/_build/html

Pages are Markdown (MyST); the API reference is autodoc over the NumPy-style
docstrings (napoleon). Everything works offline: no intersphinx, no remote images.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no torchvision notices in the log

import smoothguide  # noqa: E402

project = "smoothguide"
author = "smoothguide developers"
copyright = "2026, smoothguide developers"
release = smoothguide.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = [
    "_build",
    "figures/*.py",
    "examples/*.py",
    "README.md",
    "Thumbs.db",
    ".DS_Store",
]

# -- MyST ------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
suppress_warnings = ["myst.header"]

# -- autodoc / napoleon ------------------------------------------------------------------------
# napoleon reads the NumPy-style sections; numpydoc would add member tables that
# duplicate the dataclass fields autodoc already documents.
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_ivar = True  # "Attributes" as a field list, not duplicate attribute objects
napoleon_use_rtype = False
napoleon_preprocess_types = False
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autodoc_class_signature = "mixed"
autodoc_inherit_docstrings = True
autosummary_generate = False  # the API pages are written by hand: no generated files
add_module_names = False
python_use_unqualified_type_names = True
nitpicky = False

# -- HTML ---------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"smoothguide {release}"
html_static_path: list[str] = []
html_last_updated_fmt = None
pygments_style = "friendly"
pygments_dark_style = "monokai"

# -- pages other helpers own: listed only when present --------------------------------------------
#: Pages written outside docs/ ownership (rules, adapters, reliability). A page
#: that exists is added to the toctree that names its marker; a missing page is
#: left out, so the build never fails on a page that has not landed yet.
OPTIONAL_PAGES = {
    "guides": ["rules", "torch", "diffusers", "transformers", "fork", "reliability"],
}
_MARKER = re.compile(r"<!-- optional-toctree: (\w+) -->")


def present_pages(group: str) -> list[str]:
    """The pages of ``group`` that exist in docs/."""
    return [p for p in OPTIONAL_PAGES[group] if (HERE / f"{p}.md").is_file()]


def _optional_toctree(app: Any, docname: str, source: list[str]) -> None:
    def toctree(match: re.Match[str]) -> str:
        pages = present_pages(match.group(1))
        if not pages:
            return ""
        body = "\n".join(pages)
        return f"```{{toctree}}\n:maxdepth: 1\n:caption: Guides\n\n{body}\n```\n"

    source[0] = _MARKER.sub(toctree, source[0])


def _optional_links(app: Any, docname: str, source: list[str]) -> None:
    """``{optional}`page|text``` becomes a link when docs/page.md exists, else plain text."""

    def link(match: re.Match[str]) -> str:
        page, text = match.group(1), match.group(2)
        if (HERE / f"{page}.md").is_file():
            return f"{{doc}}`{text} <{'/' + page}>`"
        return f"{text} (guide not in this build; see the {{doc}}`API reference </api/index>`)"

    source[0] = re.sub(r"\{optional\}`([\w/-]+)\|([^`]+)`", link, source[0])


# -- API pages of subpackages: one automodule per public submodule, found at build time ----------

_AUTOMODULES = re.compile(r"<!-- automodules: ([\w.]+) -->")


def public_submodules(package: str) -> list[str]:
    """The public (no leading underscore) submodules of ``package``, sorted."""
    pkg = importlib.import_module(package)
    return sorted(
        info.name
        for info in pkgutil.iter_modules(pkg.__path__, package + ".")
        if not info.name.rpartition(".")[2].startswith("_")
    )


def _automodules(app: Any, docname: str, source: list[str]) -> None:
    def block(match: re.Match[str]) -> str:
        parts = []
        for name in public_submodules(match.group(1)):
            parts.append(f"## `{name}`\n\n```{{eval-rst}}\n.. automodule:: {name}\n```\n")
        return "\n".join(parts)

    source[0] = _AUTOMODULES.sub(block, source[0])


def _toplevel_summary(app: Any, docname: str, source: list[str]) -> None:
    """``<!-- toplevel-summary -->``: autosummary tables of ``smoothguide.__all__``, by module."""
    if "<!-- toplevel-summary -->" not in source[0]:
        return
    groups: dict[str, list[str]] = {}
    for name in smoothguide.__all__:
        obj = getattr(smoothguide, name)
        if name.startswith("_") or not (isinstance(obj, type) or callable(obj)):
            continue
        groups.setdefault(
            obj.__module__.rpartition(".")[0] if ".rules." in obj.__module__ else obj.__module__, []
        ).append(name)
    parts = []
    for module, names in sorted(groups.items()):
        rows = "\n".join(f"   {n}" for n in names)
        parts.append(
            f"**{{mod}}`{module}`**\n\n```{{eval-rst}}\n.. currentmodule:: smoothguide\n\n"
            f".. autosummary::\n\n{rows}\n```\n"
        )
    source[0] = source[0].replace("<!-- toplevel-summary -->", "\n".join(parts))


#: Pages whose text depends on which pages or modules exist: re-read on every build.
DYNAMIC_PAGES = [
    "index",
    "api/index",
    "tutorials/diffusers",
    "api/rules",
    "api/sampling",
    "api/torch",
    "api/diffusers",
    "api/demo",
]


def _always_reread(app: Any, env: Any, added: Any, changed: Any, removed: Any) -> list[str]:
    return [d for d in DYNAMIC_PAGES if d in env.found_docs]


# -- re-exports: `smoothguide.X` links to where X is documented ------------------------------------


def _canonical(target: str) -> str | None:
    """Where a public name is defined: ``smoothguide.rules.SEG`` -> ``...rules.seg.SEG``."""
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            module = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        top = getattr(module, parts[i], None)
        real_mod = getattr(top, "__module__", None)
        qualname = getattr(top, "__qualname__", None)
        if not real_mod or not qualname:
            return None
        return ".".join([real_mod, qualname, *parts[i + 1 :]])
    return None


def _resolve_alias(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve references to re-exported names, and short names, to the documented object.

    The public names are re-exported from packages (``smoothguide``,
    ``smoothguide.rules``, ...) but documented once, in the module that defines
    them: ``smoothguide.blur_matrix`` is redirected to
    ``smoothguide.smoothing.blur_matrix``. A bare name (``LayerSpec``) that matches
    exactly one documented object is linked to it.
    """
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    domain = env.get_domain("py")
    new_target = None
    if target.startswith("smoothguide."):
        new_target = _canonical(target)
    elif target and "." not in target:
        matches = [name for name in domain.objects if name.endswith("." + target)]
        new_target = matches[0] if len(matches) == 1 else None
    if not new_target or new_target == target or new_target not in domain.objects:
        return None
    node["reftarget"] = new_target
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], new_target, node, contnode
    )


def _no_inline_attribute_type(
    app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """Keep napoleon from reading ``"Summary: more"`` of a property as ``type: description``."""
    if what not in ("attribute", "property", "data") or not lines:
        return
    from sphinx.ext.napoleon.docstring import NumpyDocstring

    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        return
    before, colon, after = NumpyDocstring._partition_field_on_colon(None, lines[first])  # type: ignore[arg-type]
    if colon and after:  # "Summary: more" -> "Summary:" / "more": read as description only
        indent = lines[first][: len(lines[first]) - len(lines[first].lstrip())]
        lines[first : first + 1] = [f"{indent}{before}{colon}", f"{indent}{after}"]


_SEEN: set[tuple[str, str]] = set()


def _reset_seen(app: Any, env: Any, docnames: list[str]) -> None:
    _SEEN.clear()


def _skip_repeated_reexport(
    app: Any, what: str, name: str, obj: Any, skip: bool, options: Any
) -> bool | None:
    """Document a class or function once, where it is first met (re-exports list it again)."""
    if what != "module" or not (isinstance(obj, type) or callable(obj)):
        return None
    key = (getattr(obj, "__module__", "") or "", getattr(obj, "__qualname__", name))
    if key in _SEEN:
        return True
    _SEEN.add(key)
    return None


def setup(app: Any) -> dict[str, Any]:
    app.connect("source-read", _optional_toctree)
    app.connect("source-read", _optional_links)
    app.connect("source-read", _automodules)
    app.connect("source-read", _toplevel_summary)
    app.connect("env-get-outdated", _always_reread)
    app.connect("env-before-read-docs", _reset_seen)
    app.connect("autodoc-skip-member", _skip_repeated_reexport)
    app.connect("autodoc-process-docstring", _no_inline_attribute_type, priority=400)
    app.connect("missing-reference", _resolve_alias)
    return {"parallel_read_safe": False, "parallel_write_safe": True}
