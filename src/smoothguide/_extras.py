"""The one message for a missing optional dependency: which extra, and how to install it."""

from __future__ import annotations

__all__ = ["MissingExtraError", "install_hint", "missing_extra"]


class MissingExtraError(ImportError):
    """An optional dependency of an extra is not installed (the message says how to get it)."""


def install_hint(extra: str) -> str:
    """How to install ``extra``: torch first, then the extra from a checkout or a wheel.

    Parameters
    ----------
    extra
        The extra's name, e.g. ``"demo"``.

    Returns
    -------
    str
        One sentence.

    Examples
    --------
    >>> print(install_hint("demo"))  # doctest: +NORMALIZE_WHITESPACE
    install PyTorch first (here `pip install torch==2.13.0`, or your own build), then the
    'demo' extra: `pip install ".[demo]"` from a checkout or `pip install "DIST.whl[demo]"`
    for a built wheel (`pip install "smoothguide[demo]"` once released on PyPI)
    """
    return (
        "install PyTorch first (here `pip install torch==2.13.0`, or your own build), then the "
        f'{extra!r} extra: `pip install ".[{extra}]"` from a checkout or '
        f'`pip install "DIST.whl[{extra}]"` for a built wheel '
        f'(`pip install "smoothguide[{extra}]"` once released on PyPI)'
    )


def missing_extra(what: str, module: str, extra: str) -> MissingExtraError:
    """The error for ``what`` lacking ``module``, naming ``extra`` and how to install it once.

    Examples
    --------
    >>> str(missing_extra("smoothguide.torch", "torch", "torch")).split(";")[0]
    "smoothguide.torch needs 'torch', which is not installed"
    """
    return MissingExtraError(
        f"{what} needs {module!r}, which is not installed; {install_hint(extra)}"
    )
