"""The SQLAlchemy engine: a SQLite file by default, PostgreSQL (psycopg 3) through a `postgresql://` URL.

    engine = make_engine("sqlite:////var/lib/moedisco/moedisco.db")
    init_db(engine)                                  # creates missing tables and columns; safe on every start
                                                     # (new tables, e.g. users and tokens, come from create_all)
    with session_factory(engine)() as session: ...

The API process and every job actor open their own engine on the same URL, so SQLite runs in WAL mode with a
generous busy timeout: readers never block the writer, and concurrent writers wait instead of failing.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import sessionmaker

from service.models import Base

SQLITE_BUSY_TIMEOUT_S = 30

# Columns added to a table after its first release: `create_all` never alters an existing table, so a store created
# by an older moedisco gets them here. Same DDL on SQLite and PostgreSQL.
ADDED_COLUMNS = {("moedisco_jobs", "version"): "INTEGER NOT NULL DEFAULT 0",
                 ("moedisco_jobs", "runner_id"): "VARCHAR(32)",
                 ("moedisco_jobs", "heartbeat_at"): "TIMESTAMP WITH TIME ZONE",
                 # Jobs from before users existed belong to the bootstrap admin (MOEDISCO_API_TOKEN).
                 ("moedisco_jobs", "owner"): "VARCHAR(64) NOT NULL DEFAULT 'admin'",
                 # Cost rows from before then have none: they count in the month their job was created.
                 ("moedisco_costs", "priced_at"): "TIMESTAMP WITH TIME ZONE",
                 # Work lost to restarts, counted since spot preemptions were: none before.
                 ("moedisco_costs", "lost_steps"): "INTEGER NOT NULL DEFAULT 0",
                 ("moedisco_costs", "lost_usd"): "DOUBLE PRECISION NOT NULL DEFAULT 0",
                 ("moedisco_costs", "preemptions"): "INTEGER NOT NULL DEFAULT 0"}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL is durable across process crashes
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S, "check_same_thread": False})
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _columns(engine: Engine, table: str) -> set[str]:
    return {column["name"] for column in inspect(engine).get_columns(table)}


def init_db(engine: Engine) -> None:
    Base.metadata.create_all(engine)
    for (table, column), ddl in ADDED_COLUMNS.items():
        if column in _columns(engine, table):
            continue
        try:
            with engine.begin() as connection:
                connection.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}"))
        except DBAPIError:
            if column not in _columns(engine, table):  # not another process (the API, a job actor) adding it first
                raise


def session_factory(engine: Engine) -> sessionmaker:
    # expire_on_commit=False: rows read in a session stay usable after it closes (responses are built later).
    return sessionmaker(engine, expire_on_commit=False)
