"""``relay ledger migrate``: copy an SQLite ledger into an empty PostgreSQL one, and prove it.

Keys (hashes, hints, limits, expiry, rotation, credits granted and used), credit grants and
usage rows are copied as stored, ids included, in one PostgreSQL transaction: the target has all
of them or, if anything fails, none. Then both sides are counted again: rows per table, and the
sums that make the balances (credits granted and used of the keys, grant amounts, usage costs).
A difference is an error (:class:`MigrationError`), not a warning.

Stop the relays that write the SQLite file first: rows written during the copy would be missed
(the verification would then fail, saying by how much).
"""

from __future__ import annotations

from dataclasses import dataclass

from .backend import StoreError
from .postgres import PostgresStore
from .store import Store

#: Tables copied, each with the sums compared after the copy.
TABLES = {
    "api_keys": ("credits_granted_nano", "credits_used_nano"),
    "credit_grants": ("amount_nano",),
    "usage": ("cost_nano", "input_tokens", "output_tokens"),
}
CHUNK_ROWS = 5_000


class MigrationError(StoreError):
    """The copy was refused (target not empty, unknown columns) or does not add up."""


@dataclass(frozen=True)
class TableFigures:
    rows: int
    sums: dict[str, int]


def figures_sqlite(source: Store) -> dict[str, TableFigures]:
    result = {}
    for table, sums in TABLES.items():
        select = ", ".join([f"coalesce(sum({c}), 0)" for c in sums])
        row = source.db.conn.execute(f"select count(*), {select} from {table}").fetchone()
        values = {c: int(v) for c, v in zip(sums, row[1:], strict=True)}
        result[table] = TableFigures(row[0], values)
    return result


def figures_postgres(target: PostgresStore) -> dict[str, TableFigures]:
    result = {}
    with target.transaction() as conn:
        for table, sums in TABLES.items():
            select = ", ".join([f"coalesce(sum({c}), 0)::text as {c}" for c in sums])
            row = conn.execute(f"select count(*) as n, {select} from {table}").fetchone()
            result[table] = TableFigures(row["n"], {c: int(row[c]) for c in sums})
    return result


def migrate(source: Store, target: PostgresStore) -> dict[str, TableFigures]:
    """Copy ``source`` into ``target`` (which must hold no key, grant or usage row) and verify
    it; the figures both sides agree on."""
    before = figures_postgres(target)
    filled = [table for table, figures in before.items() if figures.rows]
    if filled:
        raise MigrationError(
            f"the target {target.url} already holds rows in {', '.join(filled)}: migrate into "
            "an empty database (a new one, or one no relay has used)"
        )
    with target.transaction() as conn:
        for table in TABLES:
            source_columns = [
                row[1] for row in source.db.conn.execute(f"pragma table_info({table})")
            ]
            target_columns = {
                row["column_name"]
                for row in conn.execute(
                    "select column_name from information_schema.columns "
                    "where table_schema = current_schema() and table_name = %s",
                    [table],
                )
            }
            unknown = [c for c in source_columns if c not in target_columns]
            if unknown:
                raise MigrationError(
                    f"{table} in {source.path} has columns the PostgreSQL ledger does not: "
                    f"{', '.join(unknown)} (a newer relay made it? use that relay's migrate)"
                )
            cursor = source.db.conn.execute(
                f"select {', '.join(source_columns)} from {table} order by rowid"
            )
            with conn.cursor() as copying, copying.copy(
                f"copy {table} ({', '.join(source_columns)}) from stdin"
            ) as copy:
                while rows := cursor.fetchmany(CHUNK_ROWS):
                    for row in rows:
                        copy.write_row(row)
        for table in ("usage", "credit_grants"):
            conn.execute(
                f"select setval(pg_get_serial_sequence('{table}', 'id'), "
                f"coalesce((select max(id) from {table}), 0) + 1, false)"
            )
    expected, copied = figures_sqlite(source), figures_postgres(target)
    if expected != copied:
        differences = [
            f"{table}: {expected[table]} in SQLite, {copied[table]} in PostgreSQL"
            for table in TABLES
            if expected[table] != copied[table]
        ]
        raise MigrationError("the copy does not add up: " + "; ".join(differences))
    return copied
