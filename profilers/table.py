"""Latency tables: SQLite files of measured subgraph latencies, one engine identity each.

Schema (format 1):

- ``meta(key, value)``: ``format`` and ``identity`` (the engine identity as JSON);
- ``latency(signature, widths, median_ms, p90_ms, p99_ms, cv, samples, measured_at)``, keyed
  by the term signature and its widths as text (``"64,128"``);
- ``kv(key, value)``: JSON records kept with the table (calibrations, whole-model
  measurements).

Every write is its own committed transaction, so a killed profile keeps everything it
measured and resumes where it stopped. Creating a table is idempotent (several processes may
open a new path at once), and every value read back is checked: a latency that is not a
finite positive number makes the table corrupt, naming the row. A table whose file or folder
is not writable is opened read-only: its rows serve as they are, records written during the
run (calibrations, whole-model measurements) stay in memory, and new rows are refused. A table is bound to the identity it was created
with: opening it under another identity raises :class:`TableError`, so measurements from
one engine, device, precision, batch size or resolution are never mixed with another's.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mdp_common.errors import TableError
from profilers.engines.base import EngineIdentity
from profilers.timing import Timing

TABLE_FORMAT = 1

BUSY_TIMEOUT_S = 60.0
"""How long a connection waits for another process's write transaction to end."""

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS latency (
    signature TEXT NOT NULL,
    widths TEXT NOT NULL,
    median_ms REAL NOT NULL,
    p90_ms REAL NOT NULL,
    p99_ms REAL NOT NULL,
    cv REAL NOT NULL,
    samples INTEGER NOT NULL,
    measured_at TEXT NOT NULL,
    PRIMARY KEY (signature, widths)
)""",
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


def widths_key(widths: Sequence[int]) -> str:
    """Widths as stored: ``(64, 128)`` -> ``"64,128"``."""
    return ",".join(str(int(w)) for w in widths)


def parse_widths(text: str) -> tuple[int, ...]:
    """``"64,128"`` -> ``(64, 128)``; anything else is a corrupt table."""
    try:
        return tuple(int(w) for w in text.split(",")) if text else ()
    except (ValueError, AttributeError) as exc:
        raise TableError(f"corrupt widths {text!r} in a latency table") from exc


def default_table_path(label: str, model: str, engine: str, precision: str, batch_size: int,
                       resolution: int | None, root: str | Path = "luts", clock: str = "wall") -> Path:
    """``<root>/<label>/<model>-<engine>-<precision>-bs<batch>-r<res>.sqlite``: the one naming rule
    (``<engine>-cputime`` for tables timed by thread CPU time)."""
    res = "native" if resolution is None else str(resolution)
    safe_model = model.replace("/", "_").replace(":", "_")
    eng = engine if clock == "wall" else f"{engine}-{clock}time"
    return Path(root) / label / f"{safe_model}-{eng}-{precision}-bs{batch_size}-r{res}.sqlite"


def shard_path(path: str | Path, shard: tuple[int, int]) -> Path:
    """Where shard ``i`` of ``n`` is written by default: ``name.shard-i-of-n.sqlite``."""
    p = Path(path)
    i, n = shard
    return p.with_name(f"{p.stem}.shard-{i}-of-{n}{p.suffix}")


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` with ``0 <= i < n`` (shards are numbered from 0)."""
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError as exc:
        raise TableError(f"shard must look like i/n (e.g. 0/4), got {text!r}") from exc
    if n < 1 or not 0 <= i < n:
        raise TableError(f"shard {text!r}: need 0 <= i < n (shards are numbered from 0)")
    return i, n


def in_shard(signature: str, widths: Sequence[int], shard: tuple[int, int]) -> bool:
    """Whether a grid point belongs to ``shard``: a stable hash, the same in every process."""
    i, n = shard
    if n == 1:
        return True
    digest = hashlib.sha1(f"{signature}|{widths_key(widths)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % n == i


@dataclass(frozen=True)
class Row:
    """One measured grid point."""

    median_ms: float
    p90_ms: float
    p99_ms: float
    cv: float
    samples: int
    measured_at: str


class LatencyTable:
    """A latency table file bound to one engine identity. Use :meth:`open` or :meth:`read`."""

    def __init__(self, path: Path, conn: sqlite3.Connection, identity: EngineIdentity,
                 read_only: bool = False) -> None:
        self.path = path
        self._conn = conn
        self.identity = identity
        self.read_only = read_only
        self._memory: dict[str, str] = {}  # records of a read-only table, kept for this run only

    # -- opening ------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, identity: EngineIdentity) -> LatencyTable:
        """Open (or create) the table at ``path`` for ``identity``; another identity is refused.

        Creation is idempotent: of several processes opening a new path at once, the first
        creates the table and the others open it. A table that cannot be written is opened
        read-only (see :attr:`read_only`)."""
        path = Path(path)
        if not path.exists() or _writable(path):
            _create(path, identity)
        table = cls.read(path)
        diff = table.identity.differences(identity)
        if diff:
            table.close()
            raise TableError(
                f"latency table {path} was measured under another engine identity "
                f"({'; '.join(diff)}): it is not used or extended under this one; "
                "profile into another file (--out) or remove it"
            )
        return table

    @classmethod
    def read(cls, path: str | Path) -> LatencyTable:
        """Open an existing table under the identity it was created with (read-only when the
        file or its folder is not writable)."""
        path = Path(path)
        if not path.is_file():
            raise TableError(f"no latency table at {path}")
        read_only = not _writable(path)
        conn: sqlite3.Connection | None = None
        try:
            if read_only:
                conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
            else:
                conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"meta", "latency", "kv"} <= tables:
                raise TableError(f"{path} is not a latency table (tables: {sorted(tables) or 'none'})")
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("format") != str(TABLE_FORMAT):
                raise TableError(f"latency table {path} has format {meta.get('format')!r}, "
                                 f"this version reads {TABLE_FORMAT}")
            identity = EngineIdentity.from_dict(json.loads(meta["identity"]))
            conn.execute("SELECT count(*) FROM latency").fetchone()
        except TableError:
            if conn is not None:
                conn.close()
            raise
        except (sqlite3.Error, KeyError, ValueError, TypeError) as exc:
            if conn is not None:
                conn.close()
            raise TableError(f"corrupt latency table {path}: {exc}") from exc
        return cls(path, conn, identity, read_only=read_only)

    def read_only_note(self) -> str | None:
        """The line to tell the user once when the table is read-only; ``None`` otherwise."""
        if not self.read_only:
            return None
        return (f"note: latency table {self.path} is read-only: its rows are used, but new measurements "
                "and calibrations of this run are not stored")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> LatencyTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- measurements -------------------------------------------------------------------

    def put(self, signature: str, widths: Sequence[int], timing: Timing) -> None:
        """Record one measurement and commit it."""
        self.put_row(signature, widths, Row(timing.median_ms, timing.p90_ms, timing.p99_ms,
                                            timing.cv, timing.samples, _now()))

    def put_row(self, signature: str, widths: Sequence[int], row: Row) -> None:
        self.put_rows([(signature, widths, row)])

    def put_rows(self, rows: Iterable[tuple[str, Sequence[int], Row]]) -> None:
        """Record several rows in one committed transaction."""
        self._write_many(
            "INSERT OR REPLACE INTO latency VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(sig, widths_key(w), r.median_ms, r.p90_ms, r.p99_ms, r.cv, r.samples, r.measured_at)
             for sig, w, r in rows],
        )

    def get(self, signature: str, widths: Sequence[int]) -> Row | None:
        key = widths_key(widths)
        r = self._query("SELECT median_ms, p90_ms, p99_ms, cv, samples, measured_at FROM latency "
                        "WHERE signature = ? AND widths = ?", (signature, key))
        return self._row(signature, key, r[0]) if r else None

    def rows(self, signature: str) -> dict[tuple[int, ...], Row]:
        """Every measured point of one signature, by widths."""
        rs = self._query("SELECT widths, median_ms, p90_ms, p99_ms, cv, samples, measured_at "
                         "FROM latency WHERE signature = ?", (signature,))
        return {parse_widths(r[0]): self._row(signature, r[0], r[1:]) for r in rs}

    def points(self, signature: str) -> dict[tuple[int, ...], float]:
        """Median latency (ms) of every measured point of one signature, by widths."""
        return {w: r.median_ms for w, r in self.rows(signature).items()}

    def signatures(self) -> list[str]:
        return [r[0] for r in self._query("SELECT DISTINCT signature FROM latency ORDER BY signature")]

    def keys(self) -> set[tuple[str, tuple[int, ...]]]:
        """Every measured (signature, widths)."""
        return {(s, parse_widths(w)) for s, w in self._query("SELECT signature, widths FROM latency")}

    def __len__(self) -> int:
        return int(self._query("SELECT count(*) FROM latency")[0][0])

    def __contains__(self, key: tuple[str, Sequence[int]]) -> bool:
        sig, widths = key
        return bool(self._query("SELECT 1 FROM latency WHERE signature = ? AND widths = ?",
                                (sig, widths_key(widths))))

    def iter_rows(self) -> Iterator[tuple[str, tuple[int, ...], Row]]:
        for r in self._query("SELECT signature, widths, median_ms, p90_ms, p99_ms, cv, samples, "
                             "measured_at FROM latency ORDER BY signature, widths"):
            yield r[0], parse_widths(r[1]), self._row(r[0], r[1], r[2:])

    # -- key-value records ----------------------------------------------------------------

    def kv_get(self, key: str, default: Any = None) -> Any:
        """The record under ``key``; a whole-model measurement (a record with ``median_ms``)
        that is not a finite positive number makes the table corrupt."""
        if key in self._memory:
            text = self._memory[key]
        else:
            r = self._query("SELECT value FROM kv WHERE key = ?", (key,))
            if not r:
                return default
            text = r[0][0]
        try:
            value = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise TableError(f"corrupt record {key!r} in latency table {self.path}: {exc}") from exc
        if isinstance(value, dict) and "median_ms" in value and not _positive(value["median_ms"]):
            raise TableError(f"corrupt latency table {self.path}: record {key!r} has median_ms = "
                             f"{value['median_ms']!r} (a latency must be a finite positive number)")
        return value

    def kv_set(self, key: str, value: Any) -> None:
        """Store a JSON-serializable record under ``key`` (replacing any previous one); in a
        read-only table it is kept in memory for this run."""
        text = json.dumps(value, sort_keys=True)
        if self.read_only:
            self._memory[key] = text
            return
        self._write("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, text))

    def kv_keys(self, prefix: str = "") -> list[str]:
        keys = {r[0] for r in self._query("SELECT key FROM kv")} | set(self._memory)
        return sorted(k for k in keys if k.startswith(prefix))

    # -- plumbing -----------------------------------------------------------------------

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        try:
            return self._conn.execute(sql, tuple(args)).fetchall()
        except sqlite3.Error as exc:
            raise TableError(f"cannot read latency table {self.path}: {exc}") from exc

    def _write(self, sql: str, args: Sequence[Any]) -> None:
        self._write_many(sql, [tuple(args)])

    def _row(self, signature: str, widths: str, values: Sequence[Any]) -> Row:
        """A row as read from the file, checked: latencies finite and positive, ``cv`` finite and
        not negative, at least one sample; anything else is a corrupt table, naming the row."""
        median, p90, p99, cv, samples, at = values
        for name, v, ok in (("median_ms", median, _positive(median)), ("p90_ms", p90, _positive(p90)),
                            ("p99_ms", p99, _positive(p99)), ("cv", cv, _positive(cv, zero=True)),
                            ("samples", samples, _positive(samples))):
            if not ok:
                raise TableError(f"corrupt latency table {self.path}: row {signature} at widths "
                                 f"({widths}) has {name} = {v!r} (must be a finite positive number)")
        return Row(float(median), float(p90), float(p99), float(cv), int(samples), str(at))

    def _write_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if self.read_only:
            raise TableError(f"latency table {self.path} is read-only (file or folder not writable): "
                             "new measurements cannot be stored in it")
        try:
            with self._conn:
                self._conn.executemany(sql, [tuple(r) for r in rows])
        except sqlite3.Error as exc:  # disk full, read-only file...: what was committed stays
            raise TableError(f"cannot write latency table {self.path}: {exc}") from exc


def merge(inputs: Iterable[str | Path], out: str | Path) -> dict[str, int]:
    """Merge tables of one identity (shards) into ``out``, created or extended.

    Rows present in several inputs keep the first input's measurement; records (kv) too.
    Returns counts: inputs, rows added, duplicates skipped.
    """
    paths = [Path(p) for p in inputs]
    if not paths:
        raise TableError("merge needs at least one input table")
    tables = [LatencyTable.read(p) for p in paths]
    try:
        ref = tables[0].identity
        for t in tables[1:]:
            diff = ref.differences(t.identity)
            if diff:
                raise TableError(f"cannot merge {t.path} into tables of {tables[0].path}: "
                                 f"another engine identity ({'; '.join(diff)})")
        with LatencyTable.open(out, ref) as dst:
            have = dst.keys()
            added = dup = 0
            for t in tables:
                if t.path.resolve() == dst.path.resolve():
                    continue
                new = []
                for sig, widths, row in t.iter_rows():
                    if (sig, widths) in have:
                        dup += 1
                        continue
                    new.append((sig, widths, row))
                    have.add((sig, widths))
                dst.put_rows(new)
                added += len(new)
                for key in t.kv_keys():
                    if dst.kv_get(key) is None:
                        dst.kv_set(key, t.kv_get(key))
    finally:
        for t in tables:
            t.close()
    return {"inputs": len(paths), "added": added, "duplicates": dup}


def _positive(value: Any, zero: bool = False) -> bool:
    """Whether ``value`` is a finite number above 0 (or equal to it, with ``zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value >= 0 if zero else value > 0


def _writable(path: Path) -> bool:
    """Whether SQLite can write the table at ``path``: the file and its folder (the journal)."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _create(path: Path, identity: EngineIdentity) -> None:
    """Create the schema of a new table under ``identity`` in one write transaction, unless
    the file already holds tables (another process made it first, or it is another file)."""
    conn: sqlite3.Connection | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        try:
            if not conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(TABLE_FORMAT),))
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('identity', ?)", (identity.to_json(),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except sqlite3.DatabaseError as exc:
        if path.is_file() and path.stat().st_size:
            raise TableError(f"corrupt latency table {path}: {exc}") from exc
        raise TableError(f"cannot create latency table {path}: {exc}") from exc
    except OSError as exc:
        raise TableError(f"cannot create latency table {path}: {exc}") from exc
    finally:
        if conn is not None:
            conn.close()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
