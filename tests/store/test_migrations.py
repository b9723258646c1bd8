"""Migrations: the schema on disk is made by Alembic, and an old database is upgraded."""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from pasid_client import Client
from sqlalchemy import Connection, create_engine

from broker.core import StoreError
from broker.store import AddPasids, SqliteStore, WithheldRow, migrations
from broker.store.schema import metadata
from tests.harness import BrokerProcess, open_db, wait_until

V1_SQL = Path(__file__).parent / "fixtures" / "schema_v1.sql"
TOKEN = "resume-me-1"


def make_v1_db(path: Path) -> None:
    """A database as the first release left it, with data."""
    sql = V1_SQL.read_text()
    sql = sql.replace(":live_pid", str(os.getpid()))
    sql = sql.replace(":token_hash", f"'{hashlib.sha256(TOKEN.encode()).hexdigest()}'")
    with sqlite3.connect(path) as c:
        c.executescript(sql)
    c.close()


def test_migrations_build_exactly_the_tables_the_code_uses(tmp_path: Path) -> None:
    st = SqliteStore(tmp_path / "b.db")
    st.open()
    st.close()
    engine = create_engine(f"sqlite:///{tmp_path / 'b.db'}")
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
        assert migrations.current(conn) == migrations.head()
    engine.dispose()


def test_the_only_foreign_key_is_the_one_the_store_checks() -> None:
    """opening.load_snapshot checks allocations.set_id -> sets itself (instead of a second
    scan by PRAGMA foreign_key_check): another foreign key would need a check there."""
    fks = [
        (t.name, fk.parent.name, fk.target_fullname)
        for t in metadata.sorted_tables
        for fk in t.foreign_keys
    ]
    assert fks == [("allocations", "set_id", "sets.set_id")]


def test_store_upgrades_a_v1_database_in_place(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    make_v1_db(db)
    st = SqliteStore(db)
    snap = st.open()
    st.close()  # the store holds its file exclusively while open
    assert snap.holdings == {1: [1, 2, 7], 2: [3, 4]}
    with sqlite3.connect(db) as c:
        assert c.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (migrations.head(),)
        ]
        assert c.execute("SELECT count(*) FROM events").fetchone() == (0,)
        # Sets of unverified clients count for the one shared identity; no quotas saved.
        assert c.execute("SELECT DISTINCT owner FROM sets").fetchall() == [("anonymous",)]
        assert c.execute("SELECT count(*) FROM quotas").fetchone() == (0,)
        # Nothing was in quarantine (0005): the first release kept it in memory only.
        assert c.execute("SELECT count(*) FROM quarantine").fetchone() == (0,)
        assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
            str(int(migrations.head())),
        )
        # declared pids of 0.1 were never verified: no holder to recognise after restart
        assert c.execute("SELECT pid, holder_start_time FROM sets").fetchall() == [(0, None)] * 2
    c.close()


def test_broker_serves_a_v1_database(tmp_path: Path) -> None:
    b = BrokerProcess()
    try:
        make_v1_db(Path(b.db))
        b.args += ["--restart-grace", "1"]
        b.start()
        with Client(b.admin_address) as c:
            # 0.1 pids were only declared, so neither set has a holder to recognise: set 2
            # (grace 0) is reclaimed after --restart-grace, set 1 waits its own 60 s.
            def held() -> dict[int, list[int]]:
                return {s.set_id: list(s.pasids()) for s in c.list_sets()}

            wait_until(lambda: held() == {1: [1, 2, 7]}, what="set 2 reclaimed")
            with c.session(resume_token=TOKEN) as s:
                assert s.resumed and list(s.list().pasids()) == [1, 2, 7]
                assert s.alloc(1, 10, 2) == [3, 4]  # set 2's PASIDs were freed
        with open_db(b.db) as con:  # through the broker: it holds the file
            kinds = [k for (k,) in con.execute("SELECT kind FROM events ORDER BY revision")]
        # The restart detached both sets (attached when the old broker stopped), then:
        assert kinds[:5] == [
            "set_detached",
            "set_detached",
            "set_reclaimed",
            "set_reattached",
            "alloc",
        ]
    finally:
        b.cleanup()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.close()
    with sqlite3.connect(db) as c:
        c.execute("UPDATE alembic_version SET version_num = '0099'")
    c.close()
    with pytest.raises(StoreError, match=r"schema revision '0099' is unknown"):
        SqliteStore(db).open()


def test_a_pre_alembic_database_with_events_is_stamped_0002(tmp_path: Path) -> None:
    """Databases written by the event-log commit (create_all, no alembic_version)."""
    db = tmp_path / "b.db"
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:  # the v2 tables as create_all made them then
        for stmt in V1_SQL.read_text().split(";"):
            if "CREATE" in stmt:
                conn.exec_driver_sql(stmt)
        conn.exec_driver_sql(
            "CREATE TABLE events (revision INTEGER NOT NULL PRIMARY KEY AUTOINCREMENT,"
            " ts FLOAT NOT NULL, kind VARCHAR NOT NULL, set_id INTEGER NOT NULL,"
            " pasids VARCHAR NOT NULL, reason VARCHAR NOT NULL)"
        )
        conn.exec_driver_sql("INSERT INTO sets VALUES (1, 'vm', 0, 1000, 0, 'h', 1.0)")
        conn.exec_driver_sql("INSERT INTO allocations VALUES (5, 1)")
        conn.exec_driver_sql(
            "INSERT INTO events (ts, kind, set_id, pasids, reason) VALUES (1, 'alloc', 1, '5', '')"
        )
    engine.dispose()
    st = SqliteStore(db)
    snap = st.open()
    assert snap.holdings == {1: [5]} and snap.revision == 1
    [ev] = st.commit([AddPasids(1, (6,))])
    assert ev.revision == 2
    st.close()
    with sqlite3.connect(db) as c:  # stamped 0002, then upgraded
        assert c.execute("SELECT version_num FROM alembic_version").fetchall() == [
            (migrations.head(),)
        ]
    c.close()


def test_head_names_the_newest_migration() -> None:
    """The store skips Alembic when the database is at HEAD: HEAD must be the newest."""
    assert migrations.head() == migrations.HEAD


def _opens_without_alembic(db: Path) -> None:
    code = (
        "import sys\n"
        "from broker.store import SqliteStore\n"
        f"SqliteStore({str(db)!r}).open()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'sqlalchemy')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_an_up_to_date_store_opens_without_alembic(tmp_path: Path) -> None:
    """Alembic and SQLAlchemy are a third of the daemon's start: loaded only to migrate."""
    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()  # creates the database
    st.close()
    _opens_without_alembic(db)


def test_a_new_store_is_created_without_alembic(tmp_path: Path) -> None:
    """A new database gets the schema the migrations leave (head_schema.py) without
    replaying them, so without importing Alembic either."""
    _opens_without_alembic(tmp_path / "b.db")


def _statements(db: Path) -> list[str]:
    c = sqlite3.connect(db)
    try:
        return list(c.iterdump())
    finally:
        c.close()


def test_head_schema_is_what_the_migrations_leave(tmp_path: Path) -> None:
    """head_schema.py (tools/genschema.py) against a run of every migration on an empty
    database: a migration added without regenerating it fails here. And a store created
    from it holds exactly those statements (before the store's own first rows)."""
    from broker.store.migrations import head_schema
    from broker.store.opening import migrate

    replayed = tmp_path / "replayed.db"
    migrate(replayed, "FULL")
    assert (head_schema.REVISION, list(head_schema.STATEMENTS)) == (
        migrations.head(),
        _statements(replayed),
    ), "stale broker/store/migrations/head_schema.py: run tools/genschema.py"
    created = tmp_path / "created.db"
    c = sqlite3.connect(created, isolation_level=None)
    assert migrations.is_new(c)
    assert migrations.create(c) == migrations.HEAD
    assert not migrations.is_new(c) and migrations.is_current(c)
    c.close()
    assert _statements(created) == _statements(replayed)


def test_a_failed_create_leaves_nothing(tmp_path: Path) -> None:
    """create is one transaction: a database that refuses it mid-way (a read-only
    connection here) is left with no table, and the next open starts again."""
    db = tmp_path / "b.db"
    sqlite3.connect(db).close()
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
    with pytest.raises(sqlite3.OperationalError):
        migrations.create(c)
    assert not c.in_transaction
    c.close()
    c = sqlite3.connect(db)
    assert migrations.is_new(c)
    c.close()


@contextlib.contextmanager
def _upgraded(db: Path, revision: str) -> Iterator[Connection]:
    """A connection (in one transaction) to `db` just upgraded to `revision`, to fill in
    what an older broker would have left there."""
    from alembic import command

    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        command.upgrade(migrations._config(conn), revision)
        yield conn
    engine.dispose()


@contextlib.contextmanager
def _downgraded(db: Path, revision: str) -> Iterator[Connection]:
    """A connection (in one transaction) to `db` just downgraded to `revision`, to check
    what the downgrade gave back."""
    from alembic import command

    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        command.downgrade(migrations._config(conn), revision)
        yield conn
    engine.dispose()


def _insert_two_sets(conn: Connection) -> None:
    """Sets 1 and 2, as a broker before the migration under test stored them."""
    for set_id in (1, 2):
        conn.exec_driver_sql(
            "INSERT INTO sets (set_id, client, pid, quota, grace_seconds, token_hash,"
            f" created_unix) VALUES ({set_id}, 'vm', 0, 1000, 0, 'h{set_id}', 1.0)"
        )


def test_0007_keeps_a_0006_quarantine_and_round_trips(tmp_path: Path) -> None:
    """0006 -> 0007: existing quarantine rows become kind "time" (nothing else changes
    meaning), sets get no detach time; and 0007's downgrade gives back 0006's tables."""

    db = tmp_path / "b.db"
    with _upgraded(db, "0006") as conn:
        conn.exec_driver_sql(
            "INSERT INTO sets (set_id, client, pid, quota, grace_seconds, token_hash,"
            " created_unix) VALUES (1, 'vm', 0, 1000, 0, 'h', 1.0)"
        )
        conn.exec_driver_sql("INSERT INTO quarantine VALUES (9, 4000000000.0)")
    st = SqliteStore(db)
    snap = st.open()
    st.close()
    assert snap.quarantine == {9: 4_000_000_000.0} and snap.withheld == {}
    assert [r.detached_unix for r in snap.sets] == [None]
    with _downgraded(db, "0006") as conn:
        cols = [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(quarantine)")]
        assert cols == ["pasid", "release_unix"]
        assert conn.exec_driver_sql("SELECT * FROM quarantine").fetchall() == [(9, 4_000_000_000.0)]


def test_0008_names_the_claimant_of_0007_contests_and_round_trips(tmp_path: Path) -> None:
    """0007 -> 0008: a contested row's claimant (0007 kept it in set_id) is copied into
    quarantine.claimant; the others have none. The downgrade folds a claimed "free" row
    into the claimant's contest (0007 has one set_id per row)."""
    from alembic import command

    db = tmp_path / "b.db"
    with _upgraded(db, "0007") as conn:
        conn.exec_driver_sql(
            "INSERT INTO quarantine (pasid, release_unix, kind, set_id, holder_pid,"
            " holder_start_time) VALUES (5, 1e999, 'contested', 3, NULL, NULL),"
            " (6, 1e999, 'detach', 9, 42, 7), (7, 4000000000.0, 'time', NULL, NULL, NULL)"
        )
    st = SqliteStore(db)
    snap = st.open()
    st.close()
    assert snap.withheld == {
        5: WithheldRow("contested", 3, claimant=3),
        6: WithheldRow("detach", 9, 42, 7),
    }
    assert snap.quarantine == {7: 4_000_000_000.0}
    engine = create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO quarantine (pasid, release_unix, kind, set_id, claimant)"
            " VALUES (8, 1e999, 'free', 9, 3)"
        )
        command.downgrade(migrations._config(conn), "0007")
        rows = conn.exec_driver_sql(
            "SELECT pasid, kind, set_id FROM quarantine ORDER BY pasid"
        ).fetchall()
        assert rows == [
            (5, "contested", 3),
            (6, "detach", 9),
            (7, "time", None),
            (8, "contested", 3),
        ]
    engine.dispose()


def test_0009_gives_existing_sets_a_witness_epoch_and_round_trips(tmp_path: Path) -> None:
    """0008 -> 0009: each existing set gets a random, non-zero witness epoch that no
    client knows yet (so no client's complete witness is honoured on it until a listing
    tells it); 0009's downgrade gives back 0008's sets table."""

    db = tmp_path / "b.db"
    with _upgraded(db, "0008") as conn:
        _insert_two_sets(conn)
    st = SqliteStore(db)
    snap = st.open()
    st.close()
    epochs = [r.witness_epoch for r in snap.sets]
    assert all(0 < e < 2**63 for e in epochs) and len(set(epochs)) == 2, epochs
    with _downgraded(db, "0008") as conn:
        cols = [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(sets)")]
        assert "witness_epoch" not in cols and "detached_unix" in cols


def test_0011_adds_the_deferred_frees_and_the_witness_wait_and_round_trips(
    tmp_path: Path,
) -> None:
    """0010 -> 0011: existing sets are awaited by nobody (witness_wait 0) and nothing is
    deferred; the store writes and reads both back; the downgrade gives back 0010."""

    from broker.store import AwaitWitnesses, DeferRefrees

    db = tmp_path / "b.db"
    with _upgraded(db, "0010") as conn:
        _insert_two_sets(conn)
    st = SqliteStore(db)
    snap = st.open()
    assert [r.witness_wait for r in snap.sets] == [0, 0] and snap.deferred_refrees == {}
    st.commit([AddPasids(1, (3, 4, 5)), AwaitWitnesses((1, 2), True)])
    st.commit([DeferRefrees(1, (3, 4)), AwaitWitnesses((1,), False)])
    st.close()
    st = SqliteStore(db)
    snap = st.open()
    st.close()
    assert [bool(r.witness_wait) for r in snap.sets] == [False, True]
    assert snap.deferred_refrees == {1: [3, 4]}
    with _downgraded(db, "0010") as conn:
        cols = [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(sets)")]
        assert "witness_wait" not in cols and "witness_epoch" in cols
        tables = [r[0] for r in conn.exec_driver_sql("SELECT name FROM sqlite_master")]
        assert "deferred_refrees" not in tables


def test_0012_adds_the_further_claimants_and_round_trips(tmp_path: Path) -> None:
    """0011 -> 0012: existing rows have no further claimant; the store writes and reads
    them back; a value that is not set ids is refused as corruption; the downgrade gives
    back 0011's quarantine table."""

    from broker.store import Withhold

    db = tmp_path / "b.db"
    with _upgraded(db, "0011") as conn:
        conn.exec_driver_sql(
            "INSERT INTO quarantine (pasid, release_unix, kind, set_id, claimant)"
            " VALUES (5, 1e999, 'contested', 3, 3)"
        )
    st = SqliteStore(db)
    snap = st.open()
    assert snap.withheld == {5: WithheldRow("contested", 3, claimant=3)}
    st.commit([Withhold((5,), "contested", 3, claimant=3, also_claimed="4,7")])
    st.close()
    st = SqliteStore(db)
    snap = st.open()
    st.close()
    assert snap.withheld == {5: WithheldRow("contested", 3, claimant=3, also_claimed="4,7")}
    with _downgraded(db, "0011") as conn:
        cols = [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(quarantine)")]
        assert "also_claimed" not in cols and "devices" in cols


def test_further_claimants_that_are_not_set_ids_are_refused(tmp_path: Path) -> None:
    from broker.store import Withhold

    db = tmp_path / "b.db"
    st = SqliteStore(db)
    st.open()
    st.commit([Withhold((5,), "contested", 3, claimant=3, also_claimed="4")])
    st.close()
    with sqlite3.connect(db) as c:
        c.execute("UPDATE quarantine SET also_claimed = '4,x'")
    c.close()
    with pytest.raises(StoreError, match="also_claimed"):
        SqliteStore(db).open()
