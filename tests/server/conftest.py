"""A real ``flow server`` and a real ``flow worker``, each a subprocess, on one store.

``Stack`` starts both (the server on a free port, the worker with the seed's agents mapped
to local commands), makes tokens with ``flow token create`` and keeps every process's
output in a file, so tests can grep it for tokens and secrets.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet

from agentainer_flow._server.auth import SCOPES, create_token
from agentainer_flow.store import create_store

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
SEED_MODULE = ROOT / "tests" / "sdk" / "seed_workflows.py"
WORKFLOWS = HERE / "server_workflows.py"
LAUNCH = HERE / "launch.py"
AGENTS = HERE / "seed_agents.py"

#: the seed's secret (section 2), and the digest the fetcher agent checks it against
SEED_SECRET = "secret-key"
_SECRETS_KEY = Fernet.generate_key().decode()
_CLEARED = ("FLOW_STORE", "FLOW_RUNTIME", "FLOW_HOME", "FLOW_TEST_KILL_AT",
            "AGENTAINER_API_URL", "AGENTAINER_API_TOKEN")


def process_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["FLOW_SECRETS_KEY"] = _SECRETS_KEY  # the secrets reach the worker, encrypted at rest
    env.update(extra)
    return env


def flow(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``flow ARGS`` (with the server commands) in a subprocess."""
    done = subprocess.run([sys.executable, str(LAUNCH), *args], env=process_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stderr
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _agent_images() -> list[str]:
    digest = hashlib.sha256(SEED_SECRET.encode()).hexdigest()
    run = f"{sys.executable} {AGENTS}"
    return [f"my-fetcher:latest={run} fetcher {digest}",
            f"data-validator:latest={run} validator",
            f"processor:latest={run} processor",
            f"aggregator:latest={run} aggregator"]


@dataclass
class Stack:
    """A server and a worker on ``store``; ``url`` is the server's."""

    store: str
    folder: Path
    port: int = field(default_factory=free_port)
    server: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    tokens: dict[str, str] = field(default_factory=dict)
    _starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{name}.log").open("ab")
        try:
            return subprocess.Popen(args, env=process_env(), cwd=ROOT, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def start_server(self) -> None:
        self._starts += 1
        self.server = self._spawn("server", [
            sys.executable, str(LAUNCH), "server", "--store", self.store, "--port",
            str(self.port), "-m", str(SEED_MODULE), "-m", str(WORKFLOWS)])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.server.poll() is not None:
                pytest.fail(f"flow server exited ({self.server.returncode}):\n{self.log('server')}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        pytest.fail(f"flow server did not answer within 60 s:\n{self.log('server')}")

    def start_worker(self) -> None:
        args = [sys.executable, "-m", "agentainer_flow._cli", "worker", "-m", str(SEED_MODULE),
                "-m", str(WORKFLOWS), "--store", self.store, "--runtime", "process",
                "--concurrency", "8", "--poll-interval", "0.1", "--grace", "0"]
        for image in _agent_images():
            args += ["--image", image]
        self.worker = self._spawn("worker", args)

    def kill_server(self) -> None:
        """SIGKILL: the server gets no chance to close anything."""
        assert self.server is not None
        self.server.kill()
        self.server.wait(30)

    def stop(self) -> None:
        for proc in (self.server, self.worker):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.server, self.worker):
            if proc is not None:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(30)

    def make_tokens(self) -> None:
        """A token of each scope (the store's API; ``flow token`` is tested on its own)."""

        async def make() -> None:
            async with create_store(self.store) as store:
                for scope in SCOPES:
                    self.tokens[scope], _ = await create_token(store, f"test-{scope}", scope)

        asyncio.run(make())

    def token(self, scope: str) -> str:
        return self.tokens[scope]

    def log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def http(self, scope: str = "admin") -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30,
                            headers={"Authorization": f"Bearer {self.token(scope)}"})


def start_stack(store: str, folder: Path) -> Stack:
    stack = Stack(store=store, folder=folder)
    stack.make_tokens()
    stack.start_worker()
    try:
        stack.start_server()
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flow.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def stack(store_url: str, tmp_path: Path) -> Iterator[Stack]:
    """A server and a worker on each store (a fresh one per test)."""
    started = start_stack(store_url, tmp_path)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def sqlite_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One server and worker on a SQLite file for a whole module."""
    folder = tmp_path_factory.mktemp("stack")
    started = start_stack(f"sqlite:///{folder / 'flow.db'}", folder)
    try:
        yield started
    finally:
        started.stop()
