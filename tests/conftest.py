"""Fixtures shared by every test tier: store URLs, an opened store on each backend, a Docker
engine with a test image.

Postgres tests get a fresh database each (``CREATE DATABASE`` copies ``template1``, tens of
milliseconds) on ``$FLOW_TEST_POSTGRES_URL`` (default: postgres on 127.0.0.1:5432, trust
auth). Without a reachable server they skip, except under CI (``$CI`` set), where a missing
database is a broken build, not a reason to skip. Docker tests do the same with the engine
``docker.from_env()`` finds (``$DOCKER_HOST``); no registry is needed: the test image is built
``FROM scratch`` with the host's ``/bin/busybox``.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import structlog

from agentainer_flow.store import EventStore, create_store

POSTGRES_ADMIN_URL = os.environ.get(
    "FLOW_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _admin_url() -> sa.URL:
    return sa.make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql")


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The admin URL of a reachable PostgreSQL server, or skip (fail under CI)."""
    shown = _admin_url().render_as_string(hide_password=True)
    try:
        import psycopg

        with psycopg.connect(
            _admin_url().render_as_string(hide_password=False), autocommit=True, connect_timeout=5
        ) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        message = f"PostgreSQL not reachable at {shown}: {reason}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: Postgres tests must run)")
        pytest.skip(message)
    return POSTGRES_ADMIN_URL


TEST_IMAGE = "agentainer-flow-test/busybox:1"


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """A test that runs the CLI in-process configures structlog (a level filter, stderr);
    later tests that capture logs must not inherit it."""
    yield
    structlog.reset_defaults()


@dataclass(frozen=True)
class DockerEngine:
    """A reachable Docker engine: its SDK client and the test image (busybox, ``sh``)."""

    client: Any
    image: str


@pytest.fixture(scope="session")
def docker_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerEngine]:
    """A Docker engine with the test image built, or skip (fail under CI)."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
        busybox = shutil.which("busybox") or "/bin/busybox"
        if not os.path.isfile(busybox):
            raise RuntimeError("no busybox binary to build the test image (apt install "
                               "busybox-static)")
        context = tmp_path_factory.mktemp("docker-image")
        shutil.copy(busybox, context / "busybox")
        (context / "Dockerfile").write_text(
            'FROM scratch\nCOPY busybox /bin/busybox\n'
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
        )
        client.images.build(path=str(context), tag=TEST_IMAGE, rm=True)
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        message = f"Docker engine not usable ({os.environ.get('DOCKER_HOST') or 'default'}): "
        message += reason
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: Docker tests must run)")
        pytest.skip(message)
    try:
        yield DockerEngine(client, TEST_IMAGE)
    finally:
        client.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite store URL on a fresh file in the test's temporary directory."""
    return f"sqlite:///{tmp_path / 'flow.db'}"


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """The URL of a fresh, empty PostgreSQL database, dropped after the test."""
    import psycopg
    from psycopg import sql

    name = f"flow_test_{uuid.uuid4().hex[:12]}"
    admin = _admin_url().render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _admin_url().set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        "sqlite-thread",  # the writer-thread mode of the SQLite store
        pytest.param("postgres", marks=pytest.mark.postgres),
    ]
)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[EventStore]:
    """An opened store on each backend; closed after the test."""
    if request.param == "memory":
        url = "memory://"
    elif request.param == "sqlite-thread":
        url = str(request.getfixturevalue("sqlite_url")) + "?writer=thread"
    else:
        url = str(request.getfixturevalue(f"{request.param}_url"))
    async with create_store(url) as opened:
        yield opened


@pytest.fixture(params=["process", pytest.param("docker", marks=pytest.mark.docker)])
def runtime_image(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(runtime name, an image for ``sh -c`` agents) for each real runtime: the process
    runtime runs the command locally, the docker runtime in the busybox test image."""
    if request.param == "docker":
        engine: DockerEngine = request.getfixturevalue("docker_engine")
        return "docker", engine.image
    return "process", "local-shell:latest"
