"""Operator subcommands of `pasid-broker`: backup, restore, withheld, health.

They read --db / --socket exactly as the daemon does (flag > env > file > default), so
`pasid-broker backup DEST` in the daemon's environment copies the daemon's database.
Exit status: 0 done, 1 failed (one line on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from broker import config


def _parser(name: str, help: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=f"pasid-broker {name}",
        description=help
        + " Other options (--db, --socket, --config, ...) are read as the daemon reads them.",
    )


def _last(p: argparse.ArgumentParser, what: str, rest: list[str]) -> tuple[str, list[str]]:
    """`pasid-broker backup [daemon options] DEST`: the operand is the last word."""
    p.usage = f"{p.prog} [--db PATH | --config FILE | ...] {what}"
    if not rest or rest[-1] in ("-h", "--help"):
        p.print_help()
        raise SystemExit(0 if rest else 2)
    if rest[-1].startswith("-"):
        p.error(f"the last argument must be {what}")
    return rest[-1], rest[:-1]


def _settings(rest: list[str]) -> config.Config:
    return config.load_full(rest).config


def _integrity(db: sqlite3.Connection) -> str:
    return str(db.execute("PRAGMA integrity_check").fetchone()[0])


# A copy of the database names every tenant's clients and pids and holds token hashes:
# for the broker's user only, as the database is (broker/store/opening.py).
COPY_MODE = 0o600


@contextlib.contextmanager
def private_files() -> Iterator[None]:
    """Files created inside (the copy, SQLite's journal beside it) are born 0600 whatever
    the caller's umask (an operator's shell may have 022 or 000)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def _new_private(path: Path) -> None:
    """Create `path` empty and 0600 (refusing one that exists: never reuse a file another
    user could have opened), so that SQLite writes into a file no one else can read."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, COPY_MODE))


def _check_writable_dir(dest: str) -> None:
    """The destination's directory exists and this user may create files there: said
    with the file and the cause, where the copy would fail with less."""
    parent = Path(dest).absolute().parent
    try:
        parent.stat()
    except FileNotFoundError:
        raise RuntimeError(
            f"cannot write {dest}: directory {parent} does not exist (create it, owned by"
            f" the user that runs the backup, uid {os.geteuid()})"
        ) from None
    except OSError as exc:
        raise RuntimeError(
            f"cannot write {dest}: directory {parent}: {exc.strerror} (uid {os.geteuid()})"
        ) from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RuntimeError(
            f"cannot write {dest}: directory {parent} is not writable by uid {os.geteuid()}"
        )


def backup(db: str, dest: str) -> str:
    """Copy `db` to `dest` with SQLite's online backup API, while the broker runs.

    The broker holds its database exclusively (no other process can read it), so while
    one runs on `db` the copy is made by that broker, on its own connection, and streamed
    over its admin socket (named in `db`'s lock file; PasidAdmin.Backup). With no broker
    running, the file is copied directly. Either way the copy is a consistent snapshot (a
    committed state; WAL included), written beside `dest` and renamed into place only
    after it passes integrity_check. It is 0600."""
    if not Path(db).exists():
        raise RuntimeError(f"no database at {db}")
    _check_writable_dir(dest)
    from broker.service.instance import running_broker

    running = running_broker(db)
    if running is not None and not running[1]:
        raise RuntimeError(
            f"{db} is in use by {running[0]}, which holds it exclusively and has no admin"
            " socket to make the copy (--admin-socket ''): give it one, or stop it first"
        )
    tmp = Path(f"{dest}.tmp-{os.getpid()}")
    with private_files():
        _new_private(tmp)
        try:
            if running is not None:
                _fetch(running[1], tmp)
            else:
                _copy(db, tmp)
            pages = _checked(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, dest)
    how = f" (made by the broker, {running[0]})" if running is not None else ""
    return f"backed up {db} to {dest}{how} ({pages} pages, integrity ok)"


def _fetch(admin_socket: str, tmp: Path) -> None:
    """The running broker's copy (PasidAdmin.Backup on its admin socket) into `tmp`."""
    import grpc
    from pasid.v1 import broker_pb2 as pb
    from pasid.v1 import broker_pb2_grpc as pb_grpc
    from pasid_client.errors import PasidClientError
    from pasid_client.handshake import identity_metadata

    target = f"unix:{admin_socket}"
    try:
        # An admin call: who we are comes from the kernel, by the peer handshake.
        metadata = identity_metadata(target)
    except (PasidClientError, OSError) as exc:
        raise RuntimeError(
            f"cannot reach the broker's admin socket {admin_socket}: {exc}"
        ) from None
    try:
        with grpc.insecure_channel(target) as ch, tmp.open("wb") as out:
            call = pb_grpc.PasidAdminStub(ch).Backup(
                pb.BackupRequest(), timeout=600, metadata=metadata
            )
            for chunk in call:
                out.write(chunk.data)
            out.flush()
            os.fsync(out.fileno())
    except grpc.RpcError as exc:
        raise RuntimeError(
            f"the broker's backup over {admin_socket} failed: {exc.code().name}: {exc.details()}"
        ) from None


def _copy(db: str, tmp: Path) -> None:
    """The backup of a database no broker holds into `tmp`."""
    src = sqlite3.connect(db, timeout=30)
    try:
        out = sqlite3.connect(tmp)
        try:
            src.backup(out)
        finally:
            out.close()
    finally:
        src.close()


def _checked(copy: Path) -> int:
    """The copy's page count, once it passes integrity_check."""
    out = sqlite3.connect(copy)
    try:
        check = _integrity(out)
        pages = int(out.execute("PRAGMA page_count").fetchone()[0])
    finally:
        out.close()
    if check != "ok":
        raise RuntimeError(f"the copy fails integrity_check: {check}")
    return pages


def restore(source: str, db: str, sockets: list[str]) -> str:
    """Replace `db` by `source`, only while no broker holds it (its instance lock).

    What was committed after the backup is rolled back: the copy says so (meta
    `restored`, reported once by the next start), and the witness is reset to the
    copy's revision, so that the start-up checks do not take the rollback for a lost
    WAL (broker/store/checks.py)."""
    from broker.core.errors import StoreError
    from broker.service.instance import InstanceLock, StartupError
    from broker.store import checks

    # A socket whose directory is gone has no broker on it (/run after a reboot, or a
    # RuntimeDirectory= removed at stop), and making /run directories is not ours to do:
    # its lock is skipped. The database's lock, which every broker takes first and holds
    # while it runs, still keeps one from starting on `db` meanwhile.
    present = [s for s in sockets if Path(s).parent.is_dir()]
    try:
        lock = InstanceLock.acquire(db, present)
    except StartupError as exc:
        raise RuntimeError(f"refusing to restore under a running broker: {exc}") from None
    try:
        try:
            witness = checks.read_witness(Path(db))
        except StoreError:
            witness = None
        src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        try:
            check = _integrity(src)
            if check != "ok":
                raise RuntimeError(f"{source} fails integrity_check: {check}")
            tmp = Path(f"{db}.restore-{os.getpid()}")
            with private_files():  # the database is 0600 from its first instant
                _new_private(tmp)
                out = sqlite3.connect(tmp)
                try:
                    src.backup(out)
                    revision = _mark_restored(out, source, witness)
                finally:
                    out.close()
        finally:
            src.close()
        for stale in (Path(db + "-wal"), Path(db + "-shm")):
            stale.unlink(missing_ok=True)
        os.replace(tmp, db)
        checks.write_witness(Path(db), revision)
    finally:
        lock.close()
    lost = (
        f"; {witness - revision} logged changes after it are rolled back"
        if witness is not None and witness > revision
        else ""
    )
    return (
        f"restored {db} from {source} (revision {revision}{lost}); the next start migrates"
        " and checks it, and reports the rollback"
    )


def _parse_pasids(text: str) -> list[int]:
    """ "5,7-9" -> [5, 7, 8, 9]."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        try:
            a, b = int(lo), int(hi or lo)
        except ValueError:
            raise config.ConfigError(f"--release: {part!r} is not a PASID or a range") from None
        if not 0 < a <= b:
            raise config.ConfigError(f"--release: {part!r} is not a PASID range")
        out.extend(range(a, b + 1))
    return out


def withheld(db: str, sockets: list[str], release: list[int] | None) -> str:
    """List the withheld PASIDs the store keeps from the pool (quarantine rows of kind
    detach/free/contested), or release the named ones: their rows go, so that the next
    start does not withhold them. Only while no broker holds `db` (its instance lock):
    a running one keeps them in memory, and holds the file exclusively.

    Releasing is the operator's proof, for what the broker cannot prove itself: a
    "detach" PASID whose device was open elsewhere for good, or whose row names no
    device (docs/runbook.md, "Withheld PASIDs")."""
    from broker.service.instance import InstanceLock, StartupError

    if not Path(db).exists():
        raise RuntimeError(f"no database at {db}")
    present = [s for s in sockets if Path(s).parent.is_dir()]
    try:
        lock = InstanceLock.acquire(db, present)
    except StartupError as exc:
        raise RuntimeError(f"stop the broker first: {exc}") from None
    try:
        con = sqlite3.connect(db)
        try:
            rows = con.execute(
                "SELECT pasid, kind, set_id, holder_pid, claimant, devices FROM quarantine"
                " WHERE kind != 'time' ORDER BY pasid"
            ).fetchall()
            if release is None:
                lines = [f"{len(rows)} withheld PASIDs in {db}"]
                for pasid, kind, set_id, holder, claimant, devices in rows:
                    what = {
                        "detach": f"DETACH failed at set {set_id}'s end; holder pid {holder},"
                        f" devices {devices or 'not recorded'}",
                        "free": f"the backend's free failed (set {set_id})",
                        "contested": "claimed by a witness",
                    }.get(kind, kind)
                    claim = f"; claimed by set {claimant}" if claimant else ""
                    lines.append(f"{pasid} {kind}: {what}{claim}")
                return "\n".join(lines)
            known = {r[0] for r in rows}
            missing = sorted(set(release) - known)
            if missing:
                raise RuntimeError(f"not withheld in {db}: {missing[:16]}; nothing released")
            with con:
                con.executemany(
                    "DELETE FROM quarantine WHERE pasid = ? AND kind != 'time'",
                    [(p,) for p in release],
                )
        finally:
            con.close()
    finally:
        lock.close()
    return f"released {len(release)} withheld PASIDs from {db}; the next start hands them out"


def _mark_restored(out: sqlite3.Connection, source: str, witness: int | None) -> int:
    """Note the restore in the copy (meta `restored`); returns the copy's revision."""
    from broker.store import checks

    tables = {n for (n,) in out.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    revision = 0
    if "events" in tables:
        (rev,) = out.execute("SELECT COALESCE(MAX(revision), 0) FROM events").fetchone()
        revision = int(rev or 0)
    if "meta" in tables:
        note = {"source": source, "at": time.time(), "revision": revision, "witness": witness}
        out.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            (checks.RESTORED_KEY, json.dumps(note)),
        )
        out.commit()
    return revision


def health(address: str, timeout: float, service: str = "") -> tuple[bool, str]:
    """grpc.health.v1 Check on `address`, as a container HEALTHCHECK asks. Service ""
    is readiness (NOT_SERVING while recovering, draining, or while commits are slow or
    failing);
    "liveness" answers SERVING whenever the process does."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as exc:
        return False, f"{address}: {exc.code().name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return status == "SERVING", f"{address}: {status}"


def main(argv: list[str]) -> int:
    name, rest = argv[0], argv[1:]
    try:
        if name == "backup":
            p = _parser(name, "Copy the database online (SQLite backup API) to DEST.")
            dest, rest = _last(p, "DEST", rest)
            print(backup(_settings(rest).db, dest))
            return 0
        if name == "restore":
            p = _parser(name, "Replace the database by SOURCE while the broker is stopped.")
            source, rest = _last(p, "SOURCE", rest)
            cfg = _settings(rest)
            print(restore(source, cfg.db, cfg.unix_sockets()))
            return 0
        if name == "withheld":
            p = _parser(
                name,
                "List the withheld PASIDs (a failed kernel call, a witness's claim) while"
                " the broker is stopped, or release some with --release.",
            )
            p.add_argument(
                "--release",
                metavar="PASIDS",
                help="e.g. 5,7-9: delete their rows, so that the next start hands them out;"
                " only once you know the kernel no longer uses them (docs/runbook.md)",
            )
            ns, rest = p.parse_known_args(rest)
            cfg = _settings(rest)
            release = _parse_pasids(ns.release) if ns.release is not None else None
            print(withheld(cfg.db, cfg.unix_sockets(), release))
            return 0
        p = _parser(name, "Exit 0 if the broker answers SERVING on grpc.health.v1, else 1.")
        p.add_argument("--address", help="unix:PATH or HOST:PORT (default: unix:--socket)")
        p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
        p.add_argument(
            "--service",
            default="",
            help="health service: '' (default) is readiness, NOT_SERVING while recovering,"
            " draining, while commits are slower than --slow-commit-seconds or while they"
            " fail (a full or read-only disk); 'liveness' is SERVING whenever the process"
            " answers",
        )
        ns, rest = p.parse_known_args(rest)
        ok, what = health(ns.address or f"unix:{_settings(rest).socket}", ns.timeout, ns.service)
        print(what)
        return 0 if ok else 1
    except config.ConfigError as exc:
        print(f"pasid-broker {name}: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError, sqlite3.Error) as exc:
        print(f"pasid-broker {name}: {exc}", file=sys.stderr)
        return 1
