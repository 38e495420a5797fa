"""Work units, noise seeds, sharding and the results store."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from smoothguide.study import Store, StudyError, make_units, noise_seed, shard
from smoothguide.study.store import atomic_write
from smoothguide.study.units import unit_noise


def test_noise_seed_is_blake2b_of_study_seed_item_and_index():
    # the documented formula, computed here from hashlib directly
    digest = hashlib.blake2b(b"7|'a cat'|3", digest_size=8, person=b"smoothguide").digest()
    assert noise_seed(7, "a cat", 3) == int.from_bytes(digest, "little") >> 1
    seeds = {noise_seed(0, item, k) for item in ("null", 0, 1, "0") for k in range(50)}
    assert len(seeds) == 4 * 50  # distinct per (item, seed index), label 0 != prompt "0"


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_units_cover_every_sample_once_and_shards_partition_them(world):
    units = make_units(4, 3, 5, 4)
    triples = [(u.setting, i, k) for u in units for i, k in u.items]
    assert sorted(triples) == [(s, i, k) for s in range(4) for i in range(3) for k in range(5)]
    shards = [shard(units, r, world) for r in range(world)]
    uids = [u.uid for sh in shards for u in sh]
    assert sorted(uids) == sorted(u.uid for u in units)
    assert len(set(uids)) == len(uids)


def test_unit_noise_does_not_depend_on_chunking_or_setting():
    items = ["null", 3]
    a = make_units(2, 2, 3, 1)
    b = make_units(2, 2, 3, 4)
    per_sample = {}
    for u in a:
        x = unit_noise(5, items, u, (1, 4, 4))
        for j, ik in enumerate(u.items):
            per_sample.setdefault(ik, []).append(x[j])
    for u in b:
        x = unit_noise(5, items, u, (1, 4, 4))
        for j, ik in enumerate(u.items):
            for other in per_sample[ik]:  # every setting and chunking: the same bits
                assert bytes(x[j].numpy().tobytes()) == bytes(other.numpy().tobytes())


def test_atomic_write_replaces_whole_files(tmp_path):
    p = str(tmp_path / "f.bin")
    assert atomic_write(p, b"abc") == hashlib.sha256(b"abc").hexdigest()
    atomic_write(p, b"de")
    with open(p, "rb") as fh:
        assert fh.read() == b"de"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left


def _store_with_unit(tmp_path):
    s = Store(str(tmp_path / "out"))
    s.write_definition({"name": "x"}, "h" * 64)
    s.write_unit("s000-c00000", b"0123456789", {"rows": [], "seconds": 0.1}, rank=0)
    return s


def test_store_detects_truncated_and_changed_unit_files(tmp_path):
    s = _store_with_unit(tmp_path)
    assert list(s.done()) == ["s000-c00000"]
    path = s.unit_paths("s000-c00000")["samples"]
    with open(path, "r+b") as fh:
        fh.truncate(4)
    assert s.done() == {}
    with open(path, "wb") as fh:
        fh.write(b"0123456780")  # same size, other bytes
    assert s.done() == {}
    assert list(s.done(verify=False)) == ["s000-c00000"]


def test_torn_index_line_is_ignored_and_repaired(tmp_path):
    s = _store_with_unit(tmp_path)
    with open(s.index_path(0), "a", encoding="utf-8") as fh:
        fh.write('{"unit": "s000-c00001", "sha')  # killed mid-append
    assert list(s.done()) == ["s000-c00000"]
    s.clean_partial(0)
    with open(s.index_path(0), encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    assert [json.loads(x)["unit"] for x in lines] == ["s000-c00000"]


def test_other_study_folder_is_refused(tmp_path):
    s = _store_with_unit(tmp_path)
    assert s.check_definition({"name": "x"}, "h" * 64) is True
    with pytest.raises(StudyError, match="another study.*name"):
        s.check_definition({"name": "y"}, "g" * 64)
