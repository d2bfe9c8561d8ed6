"""The SQLAlchemy engine: a SQLite file by default, PostgreSQL (psycopg 3) through a `postgresql://` URL.

    engine = make_engine("sqlite:////var/lib/moedisco/moedisco.db")
    with session_factory(engine)() as session: ...

The API process and every job actor open their own engine on the same URL, so SQLite runs in WAL mode with a
generous busy timeout: readers never block the writer, and concurrent writers wait instead of failing. What the
database holds (the tables, and `init_db`, which creates them) is the store's: `service.store.models`.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

SQLITE_BUSY_TIMEOUT_S = 30


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


def session_factory(engine: Engine) -> sessionmaker:
    # expire_on_commit=False: rows read in a session stay usable after it closes (responses are built later).
    return sessionmaker(engine, expire_on_commit=False)
