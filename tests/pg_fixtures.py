"""A throwaway PostgreSQL server for tests (Debian's postgresql package; `make setup` installs it).

``postgres_url`` starts one cluster (:class:`PostgresCluster`) per test session in a temporary
folder, on a free loopback port, with fsync off, and stops and deletes it at the end. PostgreSQL
refuses to run as root, so when the tests run as root the cluster runs as the ``postgres`` system
user (created by the package).
Each test that asks for ``postgres_db`` gets a fresh, empty database; ``postgres_cluster`` is a
cluster of the test's own, which it may stop and start.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware_sim.procutil import free_port


def _pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if not found:
        raise RuntimeError("PostgreSQL is not installed (Debian package postgresql; run `make setup`)")
    return Path(found[0]).parent


def _as_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    pwd.getpwnam("postgres")  # KeyError if the package did not create the user
    return ["runuser", "-u", "postgres", "--"]


class PostgresCluster:
    """One throwaway cluster in a temporary folder on a free loopback port; :meth:`stop` and
    :meth:`start` again keep its data and port (a database restart as clients see it)."""

    def __init__(self) -> None:
        self.bindir, self.prefix = _pg_bin(), _as_user()
        self.base = Path(tempfile.mkdtemp(prefix="edge-pg-"))
        self.data, self.sock = self.base / "data", self.base / "sock"
        self.sock.mkdir()
        if self.prefix:
            shutil.chown(self.base, "postgres")
            shutil.chown(self.sock, "postgres")
        subprocess.run([*self.prefix, str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                        "-A", "trust", "--no-sync", "-E", "UTF8"],
                       check=True, capture_output=True, timeout=120)
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import psycopg

        proc = subprocess.Popen([*self.prefix, str(self.bindir / "postgres"), "-D", str(self.data),
                                 "-p", str(self.port), "-h", "127.0.0.1", "-k", str(self.sock),
                                 "-c", "fsync=off", "-c", "synchronous_commit=off",
                                 "-c", "full_page_writes=off"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.proc = proc
        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres").close()
                return
            except psycopg.OperationalError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                    raise RuntimeError(f"PostgreSQL did not start: {err.strip()[-300:]}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server (a fast shutdown: clients are disconnected)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@contextlib.contextmanager
def running_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """SQLAlchemy URL of the server's maintenance database (``postgres``)."""
    with running_cluster() as cluster:
        yield cluster.url


@pytest.fixture
def postgres_cluster() -> Iterator[PostgresCluster]:
    """A cluster of the test's own (to stop and start during the test)."""
    with running_cluster() as cluster:
        yield cluster


@pytest.fixture
def postgres_db(postgres_url: str) -> Iterator[str]:
    """URL of a new, empty database on the session's PostgreSQL server (dropped afterwards)."""
    import psycopg

    name = f"t_{secrets.token_hex(6)}"
    dsn = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn, contextlib.suppress(psycopg.Error):
            conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
