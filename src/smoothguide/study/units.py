"""Work units, per-sample noise seeds and deterministic sharding over ranks.

A unit is one rule setting × a contiguous chunk of ``unit_size`` samples of the
(label / prompt, seed index) list, in label-major order. Unit ids
(``s003-c00012``) depend only on the study definition, so every process, in any
run, agrees on them.

Noise seeds
-----------
Every sample's noise comes from :func:`noise_seed` ``(study seed, label or prompt,
seed index)`` — a BLAKE2b hash — and never from the rank, the number of processes,
the unit size or the order of execution. A 1-process and an N-process run
therefore draw the same noise for every sample. The rule setting is deliberately
*not* an input: the sample of a setting and the unguided sample of the same
(label, seed index) start from the same noise, which is what "deviation from the
unguided sample of the same seed" (the paper's LPIPS axis) compares. Samples are
drawn one by one from their own generator, so a unit's noise does not depend on
how the list is chunked either.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Unit", "make_units", "noise_seed", "shard"]


def noise_seed(study_seed: int, item: int | str, seed_index: int) -> int:
    """63-bit seed of one sample: BLAKE2b-64 of ``"{study_seed}|{item!r}|{seed_index}"``.

    ``repr`` keeps the label ``3`` and the prompt ``"3"`` apart.

    Parameters
    ----------
    study_seed
        The study's ``seed``.
    item
        The label or prompt.
    seed_index
        Index of the seed, ``0 .. seeds-1``.

    Returns
    -------
    int
        A seed in ``[0, 2**63)`` for :meth:`torch.Generator.manual_seed`.

    Examples
    --------
    >>> noise_seed(0, 3, 1) == noise_seed(0, 3, 1) != noise_seed(0, "3", 1)
    True
    >>> 0 <= noise_seed(0, "a cat", 0) < 2**63
    True
    """
    text = f"{int(study_seed)}|{item!r}|{int(seed_index)}".encode()
    digest = hashlib.blake2b(text, digest_size=8, person=b"smoothguide").digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Unit:
    """One work unit.

    Attributes
    ----------
    setting
        Index of the setting (0: the unguided baseline).
    chunk
        Index of the sample chunk.
    items
        ``(item index, seed index)`` pairs of its samples.

    Examples
    --------
    >>> u = Unit(3, 12, ((0, 0), (0, 1)))
    >>> u.uid, u.baseline_uid
    ('s003-c00012', 's000-c00012')
    """

    setting: int
    chunk: int
    items: tuple[tuple[int, int], ...]

    @property
    def uid(self) -> str:
        """Stable id, e.g. ``"s003-c00012"``."""
        return f"s{self.setting:03d}-c{self.chunk:05d}"

    @property
    def baseline_uid(self) -> str:
        """Id of the unguided unit holding the same samples' paired references."""
        return f"s000-c{self.chunk:05d}"


def make_units(num_settings: int, num_items: int, seeds: int, unit_size: int) -> list[Unit]:
    """All units: settings × chunks, baseline units (setting 0) first.

    Parameters
    ----------
    num_settings
        Settings, the baseline included.
    num_items
        Labels or prompts.
    seeds
        Seed indices per item.
    unit_size
        Samples per unit (the last chunk may be smaller).

    Returns
    -------
    list of Unit

    Examples
    --------
    >>> units = make_units(2, 2, 3, 4)
    >>> [u.uid for u in units]
    ['s000-c00000', 's000-c00001', 's001-c00000', 's001-c00001']
    >>> units[1].items
    ((1, 1), (1, 2))
    """
    pairs = [(i, k) for i in range(num_items) for k in range(seeds)]
    chunks = [tuple(pairs[j : j + unit_size]) for j in range(0, len(pairs), unit_size)]
    return [Unit(s, c, ch) for s in range(num_settings) for c, ch in enumerate(chunks)]


def shard(units: Sequence[Unit], rank: int, world: int) -> list[Unit]:
    """The units of ``rank`` among ``world`` processes: every ``world``-th, from ``rank``.

    Static (it does not look at what is already done), so no two processes can
    ever take the same unit, whatever the state of the store when they start.

    Parameters
    ----------
    units
        All units (:func:`make_units`), in order.
    rank
        This process, ``0 <= rank < world``.
    world
        Number of processes.

    Returns
    -------
    list of Unit

    Examples
    --------
    >>> [u.uid for u in shard(make_units(1, 1, 6, 2), 1, 2)]
    ['s000-c00001']
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    return list(units[rank::world])


def unit_noise(study_seed: int, items: Sequence[Any], unit: Unit, shape: Sequence[int]) -> Any:
    """Standard normal noise of a unit's samples, shape ``(len(unit.items), *shape)`` float32."""
    import torch

    rows = []
    for i, k in unit.items:
        g = torch.Generator().manual_seed(noise_seed(study_seed, items[i], k))
        rows.append(torch.randn(tuple(shape), generator=g, dtype=torch.float32))
    return torch.stack(rows)
