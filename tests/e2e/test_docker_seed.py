"""The seed's ``DataWorkflow`` (section 1) end to end on real containers.

Four images with the seed's names (``my-fetcher:latest``, ``data-validator:latest``,
``processor:latest``, ``aggregator:latest``) are built ``FROM scratch`` with the host's
busybox; the seed deploys them without a ``command``, so each image's own ``CMD`` does the
agent's work and writes its JSON to ``$FLOW_OUTPUT``. The run is checked from outside the
engine: Docker's events count the containers created for the execution, the stored history
(through the client, the CLI, and the raw database) must not hold the secret, and no
container of the execution is left once the run is over.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets as pysecrets
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agentainer_flow import AgentResult, ExecutionMode, WorkflowClient
from tests.conftest import DockerEngine
from tests.sdk.seed_workflows import DataWorkflow  # the seed's class, verbatim

pytestmark = pytest.mark.docker

#: the seed's section-2 configuration
CONFIG = {"source_url": "https://api.example.com/data", "output_path": "s3://bucket/output"}
#: what the fetcher image derives from ``CONFIG["source_url"]``
DATA_PATH = "/data/api.example.com_data.json"
CHUNKS = 5  # the seed's parallel step: parallel=True, max_workers=5
PROCESSOR_SLEEP = 2  # seconds each processor runs, so that parallel runs overlap visibly
RESULT_TIMEOUT = 300  # seconds for the whole run

# -- the agents: busybox sh scripts, each an image's CMD ---------------------------------

FETCHER = r"""
set -eu
# proves the secret arrived without printing it: its digest is compared to the one baked in
digest=$(printf %s "${API_KEY-}" | sha256sum | cut -d' ' -f1)
if [ "$digest" = "@KEY_SHA256@" ]; then has_key=true; else has_key=false; fi
key=${API_KEY-}
name=$(printf %s "$SOURCE_URL" | sed -e 's#^[A-Za-z][A-Za-z0-9+.-]*://##' \
                                     -e 's#[^A-Za-z0-9._-]#_#g')
echo "fetching $SOURCE_URL (key: ${#key} chars)"
printf '{"data_path": "/data/%s.json", "source_url": "%s", "has_key": %s, "key_length": %d}\n' \
    "$name" "$SOURCE_URL" "$has_key" "${#key}" > "$FLOW_OUTPUT"
"""

VALIDATOR = r"""
set -eu
if [ -n "${DATA_PATH-}" ]; then valid=true; else valid=false; fi
echo "validating ${DATA_PATH-<unset>}"
printf '{"is_valid": %s, "data_path": "%s"}\n' "$valid" "${DATA_PATH-}" > "$FLOW_OUTPUT"
"""

PROCESSOR = r"""
set -eu
echo "chunk $CHUNK_ID of $TOTAL_CHUNKS from $DATA_PATH"
sleep @SLEEP@
printf '{"chunk": %d, "total": %d, "data_path": "%s"}\n' \
    "$CHUNK_ID" "$TOTAL_CHUNKS" "$DATA_PATH" > "$FLOW_OUTPUT"
"""

AGGREGATOR = r"""
set -eu
results=$CHUNK_RESULTS
numbers() {  # the numbers after "$1": in the results, sorted, comma-separated
    printf '%s' "$results" | grep -o "\"$1\": *[0-9]*" | sed 's/.*: *//' | sort -n \
        | tr '\n' ',' | sed 's/,$//'
}
count=$(printf '%s' "$results" | grep -o '"chunk"' | wc -l)
echo "aggregating $count chunk results into $OUTPUT_PATH"
printf '{"chunks": %d, "chunk_ids": [%s], "totals": [%s], "results_length": %d, ' \
    "$count" "$(numbers chunk)" "$(numbers total)" "${#results}" > "$FLOW_OUTPUT"
printf '"output_path": "%s", "written_to": "%s/result.json"}\n' \
    "$OUTPUT_PATH" "$OUTPUT_PATH" >> "$FLOW_OUTPUT"
"""

DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
COPY agent.sh /agent.sh
LABEL agentainer-flow-test.build="{build}"
CMD ["/bin/sh", "/agent.sh"]
"""


@dataclass(frozen=True)
class SeedImages:
    """The seed's four images, built for this module, and the secret the fetcher expects."""

    tags: tuple[str, ...]
    api_key: str


def _image_id(client: Any, tag: str) -> str | None:
    import docker.errors

    try:
        image_id: str = client.images.get(tag).id
    except docker.errors.ImageNotFound:
        return None
    return image_id


@pytest.fixture(scope="module")
def seed_images(docker_engine: DockerEngine,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeedImages]:
    """Builds the seed's images (FROM scratch + busybox + the agent's script as CMD).

    A tag that existed before is pointed back at its old image afterwards; a tag this
    fixture created is removed (if it still names the image built here)."""
    client = docker_engine.client
    api_key = pysecrets.token_urlsafe(18)  # 24 characters
    assert len(api_key) == 24
    key_sha256 = hashlib.sha256(api_key.encode()).hexdigest()
    scripts = {
        "my-fetcher:latest": FETCHER.replace("@KEY_SHA256@", key_sha256),
        "data-validator:latest": VALIDATOR,
        "processor:latest": PROCESSOR.replace("@SLEEP@", str(PROCESSOR_SLEEP)),
        "aggregator:latest": AGGREGATOR,
    }
    busybox = shutil.which("busybox") or "/bin/busybox"
    build = uuid.uuid4().hex  # a label: this run's images are its own, not a concurrent run's
    before = {tag: _image_id(client, tag) for tag in scripts}
    built: dict[str, str] = {}
    try:
        for tag, script in scripts.items():
            context = tmp_path_factory.mktemp(tag.split(":")[0])
            shutil.copy(busybox, context / "busybox")
            (context / "agent.sh").write_text(script.lstrip())
            (context / "Dockerfile").write_text(DOCKERFILE.format(build=build))
            image, _ = client.images.build(path=str(context), tag=tag, rm=True)
            built[tag] = image.id
        yield SeedImages(tuple(scripts), api_key)
    finally:
        for tag, image_id in built.items():
            if _image_id(client, tag) != image_id:
                continue  # retagged by someone else since: theirs now
            old = before[tag]
            if old is not None and _image_id(client, old) is not None:
                repository, _, version = tag.rpartition(":")
                client.images.get(old).tag(repository, version)  # restore the old tag
            client.images.remove(image_id, force=False, noprune=False)


# -- the run and what is checked ----------------------------------------------------------


class CreateEvents:
    """Docker's ``container create`` events for ``label``, read live from before the run.

    (Asking afterwards with ``since=`` is not enough: the engine replays only its last 256
    events, which a busy engine turns over within seconds.)"""

    def __init__(self, engine: DockerEngine, label: str) -> None:
        self.names: list[str] = []
        self._closed = False
        self._stream = engine.client.events(
            since=int(time.time()) - 1, decode=True,
            filters={"type": "container", "event": "create", "label": label})
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(Exception):  # the stream is closed under it at the end
            for event in self._stream:
                self.names.append(event["Actor"]["Attributes"]["name"])

    def stop(self, expected: int, wait: float = 10.0) -> list[str]:
        """The names created so far, once ``expected`` are in (or ``wait`` seconds passed),
        a moment later (so that a duplicate would be counted too)."""
        if self._closed:
            return list(self.names)
        deadline = time.monotonic() + wait
        while len(self.names) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        self._closed = True
        self._stream.close()
        self._thread.join(5)
        return list(self.names)


async def containers_left(engine: DockerEngine, label: str, wait: float = 10.0) -> list[Any]:
    """The execution's containers still on the engine (waiting up to ``wait`` seconds for
    removals under way to finish)."""
    deadline = time.monotonic() + wait
    while True:
        left: list[Any] = engine.client.containers.list(all=True, filters={"label": label},
                                                        ignore_removed=True)
        if not left or time.monotonic() > deadline:
            return left
        await asyncio.sleep(0.2)


def cli(*args: str) -> str:
    """Runs the ``flow`` CLI (as a user would) and returns its stdout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOW_")}
    proc = subprocess.run([sys.executable, "-c", "from agentainer_flow._cli import main; main()",
                           *args], env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def sqlite_bytes(directory: Path) -> bytes:
    """The raw bytes of the store's SQLite files: the database and any -wal/-journal."""
    files = sorted(directory.glob("flow.db*"))
    assert files, f"no SQLite database in {directory}"
    return b"".join(f.read_bytes() for f in files)


def postgres_bytes(url: str) -> bytes:
    """Every value of every table of the store's database: ``bytea`` as stored, the rest as
    text."""
    import psycopg
    from psycopg import sql

    out: list[bytes] = []
    with psycopg.connect(url, connect_timeout=5) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        assert tables, "no tables in the store's database"
        for table in tables:
            for row in conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table))):
                out.extend(bytes(v) if isinstance(v, bytes | memoryview) else str(v).encode()
                           for v in row)
    return b"\n".join(out)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/flow.db"
    url: str = request.getfixturevalue("postgres_url")
    return url


async def test_seed_data_workflow_on_real_containers(
    docker_engine: DockerEngine, seed_images: SeedImages, store_url: str, tmp_path: Path
) -> None:
    secret = seed_images.api_key
    eid = str(uuid.uuid4())
    label = f"agentainer.flow.execution_id={eid}"
    creates = CreateEvents(docker_engine, label)
    try:
        async with WorkflowClient(store=store_url, runtime="docker") as client:
            execution = await client.run_workflow(
                DataWorkflow(CONFIG), mode=ExecutionMode.ASYNC, secrets={"api_key": secret},
                execution_id=eid)
            assert execution.execution_id == eid
            result = await execution.get_result(timeout=RESULT_TIMEOUT)
            history = await client.get_history(eid)
            logs = await client.get_logs(eid)
            state = await client.get_state(eid)

        # -- the result is what the agents computed
        assert isinstance(result, AgentResult)
        assert result.output == {
            "chunks": CHUNKS,
            "chunk_ids": list(range(CHUNKS)),
            "totals": [CHUNKS] * CHUNKS,
            "results_length": result["results_length"],
            "output_path": CONFIG["output_path"],
            "written_to": CONFIG["output_path"] + "/result.json",
        }
        assert state == {"raw_data": DATA_PATH, "processed_chunks": CHUNKS}

        deploys = {e.details["agent_id"]: e for e in history
                   if e.type == "agent_deploy_requested"}
        outputs = {e.details["agent_id"]: e.details for e in history
                   if e.type == "agent_completed"}
        by_name = {e.details["name"]: e for e in deploys.values()}
        names = ["fetcher", "validator", *(f"processor-{i}" for i in range(CHUNKS)),
                 "aggregator"]
        assert sorted(by_name) == sorted(names)
        assert set(outputs) == set(deploys), "an agent did not complete"
        images = {"fetcher": "my-fetcher:latest", "validator": "data-validator:latest",
                  "aggregator": "aggregator:latest"}
        for name, ev in by_name.items():
            assert ev.details["image"] == images.get(name, "processor:latest")
            # no command (msgspec leaves a default out): the image's own CMD did the work
            assert ev.details.get("command") is None

        # the fetcher got the real secret (its digest matched inside the container)...
        fetched = outputs[by_name["fetcher"].details["agent_id"]]["output"]
        assert fetched == {"data_path": DATA_PATH, "source_url": CONFIG["source_url"],
                           "has_key": True, "key_length": 24}
        # ...while the history holds only a reference to it
        assert by_name["fetcher"].details["env"] == {
            "SOURCE_URL": CONFIG["source_url"], "API_KEY": "[secret:api_key]"}
        validated = outputs[by_name["validator"].details["agent_id"]]["output"]
        assert validated == {"is_valid": True, "data_path": DATA_PATH}
        # every processor ran once, with its own chunk id, and they ran side by side
        spans = []
        for i in range(CHUNKS):
            done = outputs[by_name[f"processor-{i}"].details["agent_id"]]
            assert done["output"] == {"chunk": i, "total": CHUNKS, "data_path": DATA_PATH}
            spans.append((done["started_at"], done["finished_at"]))
        assert max(s for s, _ in spans) < min(f for _, f in spans), (
            f"the {CHUNKS} processors did not overlap (max_workers=5): {spans}")
        # the aggregator counted what it was given
        chunk_results = by_name["aggregator"].details["env"]["CHUNK_RESULTS"]
        assert len(json.loads(chunk_results)) == CHUNKS
        assert result["results_length"] == len(chunk_results)

        # -- one container per agent, each created exactly once (Docker's own count)
        created = await asyncio.to_thread(creates.stop, len(deploys))
        assert sorted(created) == sorted(deploys), created

        # -- no container of the execution outlives it, and none on the engine has the secret
        assert await containers_left(docker_engine, label) == []
        for container in docker_engine.client.containers.list(all=True, ignore_removed=True):
            assert secret not in json.dumps(container.attrs), container.name
        for tag in seed_images.tags:
            image = docker_engine.client.images.get(tag)
            assert secret not in json.dumps(image.attrs) + json.dumps(image.history())

        # -- the secret is nowhere in what was stored or shown
        assert secret not in repr(history)
        assert secret not in json.dumps([e.to_dict() for e in history], default=str)
        assert "[secret:api_key]" in repr(history)
        assert logs and secret not in "\n".join(logs)
        shown = cli("logs", eid, "--store", store_url)
        shown += cli("history", eid, "--json", "--store", store_url)
        shown += cli("status", eid, "--json", "--store", store_url)
        assert eid in shown and "[secret:api_key]" in shown and secret not in shown
        if store_url.startswith("sqlite"):
            raw = sqlite_bytes(tmp_path)
        else:
            raw = postgres_bytes(store_url)
        # the events are readable there (so the secret's absence means something)
        assert eid.encode() in raw and b"[secret:api_key]" in raw
        assert secret.encode() not in raw
        assert secret.encode().hex().encode() not in raw.lower()
    finally:
        await asyncio.to_thread(creates.stop, 0, 0)  # idempotent
        for container in docker_engine.client.containers.list(  # what a failed run left
                all=True, filters={"label": label}):
            container.remove(force=True)
