"""The results store: atomic unit files and an append-only JSONL index per rank.

Layout of an output folder::

    study.json                  the canonical definition and its SHA-256 (the folder's identity)
    reference.safetensors       reference features of fd / kid (written once by rank 0)
    units/s003-c00012.safetensors   the unit's samples, features, labels, seeds
    units/s003-c00012.json          its per-sample metric rows
    index/rank-00001.jsonl      one line per finished unit: its id and the files' SHA-256
    metrics.json, summary.json  written by rank 0 once every unit is done

Why it loses nothing:

- every file is written to a temporary name in the same folder, flushed, fsynced
  and renamed with :func:`os.replace` (atomic on POSIX), so a reader sees the old
  file or the complete new one, never a half-written one;
- a unit counts as done only when its index line exists *and* its files still have
  the SHA-256 recorded there; a unit killed before its index line, a truncated or
  corrupted file, or a torn last index line is simply redone;
- the unit files are written before the index line, so the index never points at
  a file that is not complete.

Why JSONL rather than SQLite: many ranks, often on different machines, write at
once to a shared filesystem (NFS, Lustre, GPFS). SQLite needs working POSIX locks
there (often broken or slow on network filesystems) and serialises writers; one
append-only file per rank needs no locking at all (each file has one writer), a
torn line at a crash is detected and ignored, and the files are readable with
``cat`` / ``jq`` / pandas. Parquet files cannot be appended to.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from .definition import StudyError

__all__ = ["Store", "atomic_write", "sha256_file"]

STUDY_FILE = "study.json"


def sha256_file(path: str) -> str:
    """SHA-256 hex digest of a file (read in 1 MiB chunks).

    Parameters
    ----------
    path
        The file.

    Returns
    -------
    str
        64 hex characters.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile(delete=False) as fh:
    ...     _ = fh.write(b"abc")
    >>> sha256_file(fh.name)[:16]
    'ba7816bf8f01cfea'
    >>> os.unlink(fh.name)
    """
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically (tmp, fsync, :func:`os.replace`); return SHA-256.

    The temporary file lives in the same folder (so the rename is atomic), ends in
    ``.tmp`` and is removed if writing fails; the folder is fsynced after the rename.

    Parameters
    ----------
    path
        Destination.
    data
        The bytes.

    Returns
    -------
    str
        SHA-256 hex digest of ``data``.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     atomic_write(os.path.join(tmp, "f"), b"abc")[:16], os.listdir(tmp)
    ('ba7816bf8f01cfea', ['f'])
    """
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)
    return hashlib.sha256(data).hexdigest()


class Store:
    """An output folder of one study.

    Parameters
    ----------
    root
        The folder.

    Examples
    --------
    >>> Store("out").unit_paths("s001-c00002")["samples"]
    'out/units/s001-c00002.safetensors'
    """

    def __init__(self, root: str) -> None:
        self.root = os.fspath(root)
        self.units_dir = os.path.join(self.root, "units")
        self.index_dir = os.path.join(self.root, "index")

    # -- identity -----------------------------------------------------------------
    def read_definition(self) -> dict[str, Any] | None:
        """The recorded ``study.json``, or ``None`` for a new folder."""
        path = os.path.join(self.root, STUDY_FILE)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as fh:
            try:
                data: dict[str, Any] = json.load(fh)
            except json.JSONDecodeError as exc:
                raise StudyError(f"{path}: damaged study.json ({exc})") from None
        return data

    def check_definition(self, definition: Mapping[str, Any], digest: str) -> bool:
        """``True`` if the folder holds this study, ``False`` if it is new; refuse another study.

        Raises
        ------
        StudyError
            If the folder was written by a study with another definition hash.
        """
        old = self.read_definition()
        if old is None:
            if os.path.isdir(self.index_dir) and os.listdir(self.index_dir):
                raise StudyError(
                    f"{self.root}: has an index but no study.json; refusing to mix results"
                )
            return False
        if old.get("hash") != digest:
            changed = sorted(
                k
                for k in set(old.get("definition", {})) | set(definition)
                if old.get("definition", {}).get(k) != definition.get(k)
            )
            raise StudyError(
                f"{self.root} holds another study (definition hash {str(old.get('hash'))[:12]}, "
                f"this one {digest[:12]}; keys that differ: {', '.join(changed) or '?'}); "
                "use a new --out folder or restore the original study file"
            )
        return True

    def write_definition(self, definition: Mapping[str, Any], digest: str) -> None:
        """Create the folder and write ``study.json`` (rank 0, before any unit)."""
        os.makedirs(self.units_dir, exist_ok=True)
        os.makedirs(self.index_dir, exist_ok=True)
        body = {"hash": digest, "definition": definition}
        data = json.dumps(body, indent=1, sort_keys=True, ensure_ascii=False).encode()
        atomic_write(os.path.join(self.root, STUDY_FILE), data + b"\n")

    # -- units --------------------------------------------------------------------
    def unit_paths(self, uid: str) -> dict[str, str]:
        """Paths of a unit's files: ``{"samples": ..., "rows": ...}``."""
        return {
            "samples": os.path.join(self.units_dir, uid + ".safetensors"),
            "rows": os.path.join(self.units_dir, uid + ".json"),
        }

    def index_path(self, rank: int) -> str:
        """The JSONL index of ``rank``."""
        return os.path.join(self.index_dir, f"rank-{rank:05d}.jsonl")

    def records(self) -> Iterator[dict[str, Any]]:
        """Every well-formed index line of every rank (a torn last line is skipped)."""
        if not os.path.isdir(self.index_dir):
            return
        for name in sorted(os.listdir(self.index_dir)):
            if not name.endswith(".jsonl"):
                continue
            with open(os.path.join(self.index_dir, name), encoding="utf-8") as fh:
                for line in fh:
                    if not line.endswith("\n"):
                        continue  # torn by a crash mid-append
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(rec, dict) and "unit" in rec and "sha256" in rec:
                        yield rec

    def _valid(self, rec: Mapping[str, Any]) -> bool:
        paths = self.unit_paths(rec["unit"])
        for key, path in paths.items():
            want = rec["sha256"].get(key)
            if want is None or not os.path.isfile(path):
                return False
            if os.path.getsize(path) != rec.get("size", {}).get(key, -1):
                return False
            if sha256_file(path) != want:
                return False
        return True

    def done(
        self, *, verify: bool = True, only: Collection[str] | None = None
    ) -> dict[str, dict[str, Any]]:
        """Finished units: ``{uid: record}``, the last record of each.

        Parameters
        ----------
        verify
            Re-hash the files and leave out a unit whose files are missing, truncated
            or changed (so it is redone).
        only
            Look at these unit ids only (a rank verifies its own shard, not the study).

        Returns
        -------
        dict
            Unit id -> its index record.

        Examples
        --------
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     s = Store(tmp)
        ...     s.write_definition({"name": "x"}, "0" * 64)
        ...     _ = s.write_unit("s000-c00000", b"samples", {"rows": []}, rank=0)
        ...     list(s.done())
        ['s000-c00000']
        """
        last: dict[str, dict[str, Any]] = {}
        for rec in self.records():
            if only is None or rec["unit"] in only:
                last[rec["unit"]] = rec
        if not verify:
            return last
        return {u: r for u, r in last.items() if self._valid(r)}

    def clean_partial(self, rank: int) -> None:
        """Remove this rank's leftovers of a crash: a torn last index line.

        Temporary files of any rank are left alone (another rank may be writing
        one); :meth:`clean_tmp` removes them when no rank is running.
        """
        path = self.index_path(rank)
        if not os.path.exists(path):
            return
        with open(path, "rb+") as fh:
            data = fh.read()
            if data and not data.endswith(b"\n"):
                fh.truncate(data.rfind(b"\n") + 1)
                fh.flush()
                os.fsync(fh.fileno())

    def clean_tmp(self) -> int:
        """Delete temporary files left by killed writers (call when no rank runs)."""
        n = 0
        for folder in (self.root, self.units_dir):
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                if name.endswith(".tmp"):
                    os.unlink(os.path.join(folder, name))
                    n += 1
        return n

    def write_unit(
        self, uid: str, samples: bytes, rows: Mapping[str, Any], rank: int, kill: Any = None
    ) -> dict[str, Any]:
        """Write a unit's files atomically, then append its index line (fsynced).

        ``kill`` (testing only) is called between the files and the index line.
        """
        paths = self.unit_paths(uid)
        row_bytes = json.dumps(rows, indent=None, sort_keys=True, allow_nan=True).encode() + b"\n"
        sha = {"samples": atomic_write(paths["samples"], samples)}
        if kill is not None:
            kill()
        sha["rows"] = atomic_write(paths["rows"], row_bytes)
        rec = {
            "unit": uid,
            "rank": rank,
            "sha256": sha,
            "size": {"samples": len(samples), "rows": len(row_bytes)},
            "seconds": rows.get("seconds"),
        }
        line = json.dumps(rec, sort_keys=True) + "\n"
        fd = os.open(self.index_path(rank), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return rec

    def read_rows(self, uid: str) -> dict[str, Any]:
        """The metric rows JSON of a unit."""
        with open(self.unit_paths(uid)["rows"], encoding="utf-8") as fh:
            data: dict[str, Any] = json.load(fh)
        return data

    def read_tensors(self, uid: str, keys: Collection[str] | None = None) -> dict[str, Any]:
        """The tensors of a unit's safetensors file (``samples``, ``features`` ...).

        ``keys`` reads only those tensors (the metric reduction does not load samples).
        """
        from safetensors import safe_open

        with safe_open(self.unit_paths(uid)["samples"], framework="pt") as fh:
            names = fh.keys()  # a safe_open handle is not iterable
            return {k: fh.get_tensor(k) for k in names if keys is None or k in keys}

    def write_json(self, name: str, data: Any) -> None:
        """Write ``root/name`` atomically as JSON."""
        text = json.dumps(data, indent=1, sort_keys=False, ensure_ascii=False, allow_nan=True)
        atomic_write(os.path.join(self.root, name), text.encode() + b"\n")
