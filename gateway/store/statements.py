"""Statements the store's body writes once and each backend runs its own way: an
``Insert`` spec (one row with ``Tx.insert``, many with ``Tx.insert_many``). No import of
the store here, so a backend's transaction code (pgcommit.py) can use it freely."""

from __future__ import annotations

import dataclasses

__all__ = ["Column", "Insert"]

# A column of a batch insert: its name and its SQL type (PostgreSQL's arrays need it).
Column = tuple[str, str]


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Insert:
    """An insert into a table whose ``seq`` the database gives, written once. With a
    ``key`` (unique columns) a duplicate inserts nothing (``ON CONFLICT DO NOTHING``).
    ``sql`` returns the new ``seq``; ``bare`` does not (SQLite reads ``lastrowid``:
    ``RETURNING`` costs it ~20 µs a row). A backend may run many rows as one statement
    of its own (``Tx.insert_many``)."""

    table: str
    columns: tuple[Column, ...]
    key: str | None = None
    bare: str = ""
    sql: str = ""

    def __post_init__(self) -> None:
        names = ", ".join(name for name, _ in self.columns)
        marks = ",".join("?" * len(self.columns))
        bare = f"INSERT INTO {self.table} ({names}) VALUES ({marks})"
        if self.key is not None:
            bare += f" ON CONFLICT ({self.key}) DO NOTHING"
        object.__setattr__(self, "bare", bare)
        object.__setattr__(self, "sql", bare + " RETURNING seq")
