"""One behavioural suite for every agent runtime: what the engine relies on, checked against
real agents, so that the ``process`` and ``docker`` runtimes cannot drift apart.

``RuntimeSuite`` holds the tests. A test module subclasses it and provides a ``rut`` fixture:
a ``RuntimeUnderTest`` with an opened runtime and the ways to look behind that runtime (is
the agent's directory/container there, does its process still run, how many times did its
command start) without going through the interface under test.

Agents are ``sh -c`` scripts (``/bin/sh`` for processes, busybox ``sh`` in the Docker test
image), so the scripts stay POSIX: ``printf`` rather than ``echo`` for anything with a
backslash or a ``%``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

import pytest

from agentainer_flow.engine.runtimes.base import AgentRuntime, AgentSpec, AgentState

__all__ = ["RuntimeSuite", "RuntimeUnderTest", "sh"]

#: how long a "still running" agent sleeps: a kill that does not happen shows as a slow test
LONG = 30
#: the most a wait for a normal agent, a stop, a kill or a removal may take (kill grace is
#: 1 s in the fixtures); far below LONG, so an agent that was not killed fails the bound
PROMPT = 10.0


def sh(script: str, *args: str) -> list[str]:
    """``sh -c script`` with ``args`` as ``$1``...: what both runtimes run."""
    return ["sh", "-c", script, "sh", *args]


async def until(check: Callable[[], Awaitable[bool]], limit: float = PROMPT) -> None:
    """Poll ``check`` until it holds (fail after ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


class RuntimeUnderTest(ABC):
    """A runtime under test, opened, with what the suite needs to observe it from outside.

    ``scratch`` is a directory agents may write to that outlives each run of the agent
    (``mkdir -p`` it first): a command started twice finds what its first run wrote there.
    """

    def __init__(self, *, kind: str, runtime: AgentRuntime, image: str, scratch: str,
                 labels: dict[str, str]) -> None:
        self.kind = kind
        self.runtime = runtime
        self.image = image
        self.scratch = scratch
        self.labels = labels

    def new_id(self) -> str:
        """A fresh agent id (container names are global to the engine: never reuse one)."""
        return f"flow-suite-{uuid.uuid4().hex[:12]}"

    def spec(self, command: list[str], *, agent_id: str | None = None,
             env: dict[str, str] | None = None) -> AgentSpec:
        return AgentSpec(agent_id=agent_id or self.new_id(), name="agent", image=self.image,
                         command=command, env=env or {}, labels=dict(self.labels))

    def counted(self, agent_id: str, script: str) -> list[str]:
        """``script`` preceded by one line appended to ``<scratch>/<agent_id>.runs``; the
        script may read the count with ``grep -c run "$RUNS"``."""
        runs = f"{self.scratch}/{agent_id}.runs"
        return sh(f'RUNS="{runs}"; mkdir -p "{self.scratch}" && echo run >> "$RUNS"; {script}')

    @abstractmethod
    async def fresh(self) -> AgentRuntime:
        """Another opened runtime object on the same root / engine: the engine restarted
        after a crash. Closed by ``cleanup``."""

    @abstractmethod
    def present(self, agent_id: str) -> bool:
        """Whether what backs the agent (its directory, its container) exists."""

    @abstractmethod
    async def handle(self, agent_id: str) -> object:
        """Once the agent's command runs: what names its process, for ``running``."""

    @abstractmethod
    def running(self, handle: object) -> bool:
        """Whether the process ``handle`` names still runs."""

    @abstractmethod
    def runs(self, agent_id: str) -> int:
        """How many times the command of a ``counted`` agent started, as seen from outside
        the runtime."""

    @abstractmethod
    async def cleanup(self) -> None:
        """End and forget every agent the test made; close the runtimes."""


class RuntimeSuite:
    """The behaviour every runtime owes the engine. Subclass it where ``rut`` is defined."""

    # -- the output protocol --

    async def test_output_file_wins_over_stdout(self, rut: RuntimeUnderTest) -> None:
        """``$FLOW_OUTPUT``'s object is the output even if stdout prints a later JSON line."""
        s = rut.spec(sh('echo \'{"from": "file", "n": 1}\' > "$FLOW_OUTPUT"; '
                        'echo \'{"from": "stdout"}\''))
        await rut.runtime.launch(s)
        outcome = await rut.runtime.wait(s.agent_id, PROMPT)
        assert outcome.exit_code == 0, outcome.log_tail
        assert not outcome.timed_out
        assert outcome.output == {"from": "file", "n": 1}
        assert outcome.started_at is not None and outcome.finished_at is not None
        assert outcome.started_at <= outcome.finished_at

    async def test_output_is_the_last_json_object_line_of_stdout(
        self, rut: RuntimeUnderTest
    ) -> None:
        """Without a file (or with an empty one) the last stdout line that is a JSON object
        counts; later lines that are not objects (log lines, arrays) do not."""
        lines = ("echo '{\"a\": 1}'; echo '{\"b\": [2, \"x\"]}'; echo '[3]'; "
                 "echo '{progress} 40%'; echo done")
        plain = rut.spec(sh(lines))
        empty_file = rut.spec(sh(f': > "$FLOW_OUTPUT"; {lines}'))
        await asyncio.gather(rut.runtime.launch(plain), rut.runtime.launch(empty_file))
        for s in (plain, empty_file):
            outcome = await rut.runtime.wait(s.agent_id, PROMPT)
            assert outcome.exit_code == 0, outcome.log_tail
            assert outcome.output_error == ""
            assert outcome.output == {"b": [2, "x"]}, s.command

    async def test_unusable_output_is_an_error_not_an_empty_output(
        self, rut: RuntimeUnderTest, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A file that is not a JSON object, a last stdout line cut short and a file over
        ``$FLOW_MAX_OUTPUT_BYTES`` give ``output_error`` (and no output), never ``{}``
        passed off as the answer."""
        monkeypatch.setenv("FLOW_MAX_OUTPUT_BYTES", "100")
        not_object = rut.spec(sh('echo \'[1, 2]\' > "$FLOW_OUTPUT"; echo \'{"a": 1}\''))
        cut_short = rut.spec(sh('echo \'{"a": 1}\'; printf \'{"b": [1, 2\\n\''))
        big = "x" * 200
        too_big = rut.spec(sh(f'echo \'{{"big": "{big}"}}\' > "$FLOW_OUTPUT"'))
        agents = (not_object, cut_short, too_big)
        await asyncio.gather(*(rut.runtime.launch(s) for s in agents))
        outcomes = [await rut.runtime.wait(s.agent_id, PROMPT) for s in agents]
        for s, outcome in zip(agents, outcomes, strict=True):
            assert outcome.exit_code == 0, outcome.log_tail
            assert outcome.output == {}, s.command
        assert "$FLOW_OUTPUT" in outcomes[0].output_error
        assert "object" in outcomes[0].output_error
        assert "stdout" in outcomes[1].output_error
        assert "cut short" in outcomes[1].output_error
        assert "$FLOW_OUTPUT" in outcomes[2].output_error
        assert "over the limit of 100 bytes" in outcomes[2].output_error

    async def test_output_is_empty_without_a_json_object(self, rut: RuntimeUnderTest) -> None:
        """No file and no object line on stdout: ``{}`` (JSON that is not an object counts
        for nothing)."""
        s = rut.spec(sh("echo hello; echo '[1, 2]'; echo '\"text\"'; echo '{oops}'; echo 7"))
        await rut.runtime.launch(s)
        outcome = await rut.runtime.wait(s.agent_id, PROMPT)
        assert outcome.exit_code == 0, outcome.log_tail
        assert outcome.output == {}
        assert "hello" in outcome.log_tail  # it did run and print

    async def test_env_and_command_reach_the_agent(self, rut: RuntimeUnderTest) -> None:
        """The spec's environment and argv arrive intact (spaces kept, one arg per item)."""
        script = (r"""printf '{"greeting": "%s", "spaced": "%s", "args": ["%s", "%s"], """
                  r""""argc": %d}\n' "$GREETING" "$SPACED" "$1" "$2" "$#" """)
        s = rut.spec(sh(script, "world", "two  words"),
                     env={"GREETING": "hello", "SPACED": "a b  c"})
        await rut.runtime.launch(s)
        outcome = await rut.runtime.wait(s.agent_id, PROMPT)
        assert outcome.exit_code == 0, outcome.log_tail
        assert outcome.output == {"greeting": "hello", "spaced": "a b  c",
                                  "args": ["world", "two  words"], "argc": 2}

    # -- failures --

    async def test_non_zero_exit_gives_the_code_and_the_log_tail(
        self, rut: RuntimeUnderTest
    ) -> None:
        """A failing agent's outcome carries its exit code and what it printed on both
        streams; ``lookup`` and ``logs`` agree."""
        s = rut.spec(sh("echo 'progress: half way'; echo 'boom: it broke' >&2; exit 3"))
        await rut.runtime.launch(s)
        outcome = await rut.runtime.wait(s.agent_id, PROMPT)
        assert outcome.exit_code == 3
        assert not outcome.timed_out
        assert "boom: it broke" in outcome.log_tail
        assert "progress: half way" in outcome.log_tail
        status = await rut.runtime.lookup(s.agent_id)
        assert status.state is AgentState.EXITED and status.outcome == outcome
        logs = await rut.runtime.logs(s.agent_id)
        assert "boom: it broke" in logs and "progress: half way" in logs

    async def test_wait_timeout_kills_the_agent(self, rut: RuntimeUnderTest) -> None:
        """``wait(id, timeout)`` ends a running agent at the timeout and says so; another
        runtime reading it later also knows it timed out."""
        s = rut.spec(sh(f"echo started; sleep {LONG}"))
        await rut.runtime.launch(s)
        agent = await rut.handle(s.agent_id)
        begun = time.monotonic()
        outcome = await rut.runtime.wait(s.agent_id, 1.0)
        took = time.monotonic() - begun
        assert outcome.timed_out
        assert outcome.exit_code != 0
        assert 0.9 <= took < 1.0 + PROMPT
        assert not rut.running(agent)
        assert "started" in outcome.log_tail
        status = await rut.runtime.lookup(s.agent_id)
        assert status.state is AgentState.EXITED and status.outcome is not None
        assert status.outcome.timed_out and status.outcome.exit_code == outcome.exit_code
        later = await (await rut.fresh()).lookup(s.agent_id)
        assert later.state is AgentState.EXITED and later.outcome is not None
        assert later.outcome.timed_out

    # -- stop --

    async def test_stop_ends_a_running_agent_and_is_idempotent(
        self, rut: RuntimeUnderTest
    ) -> None:
        """``stop`` returns once the agent is gone (non-zero, not a timeout); stopping again,
        or stopping an agent that already exited, changes nothing."""
        busy = rut.spec(sh(f"echo ready; sleep {LONG}"))
        done = rut.spec(sh("echo '{\"done\": 1}'"))
        await asyncio.gather(rut.runtime.launch(busy), rut.runtime.launch(done))
        finished = await rut.runtime.wait(done.agent_id, PROMPT)
        agent = await rut.handle(busy.agent_id)

        async def ready() -> bool:
            return "ready" in await rut.runtime.logs(busy.agent_id)

        await until(ready)  # logs of a running agent show what it printed so far
        assert (await rut.runtime.lookup(busy.agent_id)).state is AgentState.RUNNING
        begun = time.monotonic()
        await rut.runtime.stop(busy.agent_id)
        assert time.monotonic() - begun < PROMPT
        assert not rut.running(agent)
        status = await rut.runtime.lookup(busy.agent_id)
        assert status.state is AgentState.EXITED and status.outcome is not None
        assert status.outcome.exit_code != 0 and not status.outcome.timed_out
        await rut.runtime.stop(busy.agent_id)
        assert await rut.runtime.lookup(busy.agent_id) == status
        assert await rut.runtime.wait(busy.agent_id, PROMPT) == status.outcome

        await rut.runtime.stop(done.agent_id)
        after = await rut.runtime.lookup(done.agent_id)
        assert after.state is AgentState.EXITED and after.outcome == finished
        assert finished.exit_code == 0 and finished.output == {"done": 1}

    # -- logs --

    async def test_logs_returns_the_last_lines(self, rut: RuntimeUnderTest) -> None:
        """``logs(id, tail)``: the last ``tail`` lines, in order; the default keeps them all."""
        s = rut.spec(sh("for i in 1 2 3 4 5; do echo line$i; done"))
        await rut.runtime.launch(s)
        await rut.runtime.wait(s.agent_id, PROMPT)
        every = [f"line{i}" for i in range(1, 6)]
        assert (await rut.runtime.logs(s.agent_id, 2)).splitlines() == ["line4", "line5"]
        assert (await rut.runtime.logs(s.agent_id, 5)).splitlines() == every
        assert (await rut.runtime.logs(s.agent_id)).splitlines() == every

    async def test_logs_tail_counts_the_lines_of_both_streams(
        self, rut: RuntimeUnderTest
    ) -> None:
        """The interface: ``logs`` is "the last ``tail`` lines of the agent's combined
        output". Stderr is printed well before stdout here, so the combined output's last
        two lines are the two stdout ones."""
        s = rut.spec(sh("echo err1 >&2; echo err2 >&2; sleep 0.5; echo out1; echo out2"))
        await rut.runtime.launch(s)
        await rut.runtime.wait(s.agent_id, PROMPT)
        assert sorted((await rut.runtime.logs(s.agent_id)).splitlines()) == [
            "err1", "err2", "out1", "out2"]
        assert (await rut.runtime.logs(s.agent_id, 2)).splitlines() == ["out1", "out2"]

    async def test_follow_logs_gives_each_line_once_and_resumes_from_a_cursor(
        self, rut: RuntimeUnderTest
    ) -> None:
        """``follow_logs`` gives lines while the agent runs, ends when it has exited, and a
        fresh runtime given a cursor goes on after it (an engine adopting after a crash)."""
        s = rut.spec(sh("for i in 1 2 3 4 5 6; do echo line$i; echo warn$i >&2; "
                        "sleep 0.3; done"))
        await rut.runtime.launch(s)
        seen: list[str] = []
        cursor = ""
        started = time.monotonic()
        async for text, cursor in rut.runtime.follow_logs(s.agent_id):  # noqa: B007
            seen += text.splitlines()
            if "line3" in seen:
                break  # the engine died here
        assert time.monotonic() - started < 1.8, "lines must come while the agent runs"
        assert cursor, "a cursor to go on from"
        rest: list[str] = []
        async for text, _ in (await rut.fresh()).follow_logs(s.agent_id, cursor):
            rest += text.splitlines()
        every = seen + rest
        assert sorted(every) == sorted([f"line{i}" for i in range(1, 7)]
                                       + [f"warn{i}" for i in range(1, 7)])
        assert [x for x in every if x.startswith("line")] == [f"line{i}" for i in range(1, 7)]
        assert (await rut.runtime.lookup(s.agent_id)).state is AgentState.EXITED

    # -- identity: launch is idempotent, a fresh runtime adopts --

    async def test_launch_twice_runs_once_and_lookup_follows_it(
        self, rut: RuntimeUnderTest
    ) -> None:
        """Launching an id again (concurrently, while it runs, after it exited) adopts it:
        the command starts once; ``lookup`` says RUNNING, then EXITED with the outcome."""
        agent_id = rut.new_id()
        s = rut.spec(rut.counted(agent_id, 'sleep 2; printf \'{"runs": %d}\\n\' '
                                           '"$(grep -c run "$RUNS")"'), agent_id=agent_id)
        await asyncio.gather(rut.runtime.launch(s), rut.runtime.launch(s))
        await rut.runtime.launch(s)
        status = await rut.runtime.lookup(agent_id)
        assert status.state is AgentState.RUNNING and status.outcome is None
        outcome = await rut.runtime.wait(agent_id, PROMPT)
        assert outcome.exit_code == 0, outcome.log_tail
        assert outcome.output == {"runs": 1}
        status = await rut.runtime.lookup(agent_id)
        assert status.state is AgentState.EXITED and status.outcome == outcome
        await rut.runtime.launch(s)  # exited: adopted, not run again
        await asyncio.sleep(0.5)  # time for a wrongly restarted command to show
        assert await rut.runtime.lookup(agent_id) == status
        assert rut.runs(agent_id) == 1

    async def test_a_fresh_runtime_adopts_what_another_launched(
        self, rut: RuntimeUnderTest
    ) -> None:
        """After a crash a new runtime object (same root / engine) finds the running agent,
        launching it adopts it, and waiting gets its outcome; it ran once."""
        agent_id = rut.new_id()
        s = rut.spec(rut.counted(agent_id, "sleep 1.5; echo '{\"adopted\": true}'"),
                     agent_id=agent_id)
        await rut.runtime.launch(s)
        other = await rut.fresh()
        assert (await other.lookup(agent_id)).state is AgentState.RUNNING
        await other.launch(s)
        outcome = await other.wait(agent_id, PROMPT)
        assert outcome.exit_code == 0, outcome.log_tail
        assert outcome.output == {"adopted": True}
        first = await rut.runtime.lookup(agent_id)  # both see the same outcome
        assert first.state is AgentState.EXITED and first.outcome == outcome
        assert rut.runs(agent_id) == 1

    # -- remove --

    async def test_remove_forgets_an_exited_agent_and_is_idempotent(
        self, rut: RuntimeUnderTest
    ) -> None:
        """After ``remove`` the agent is gone for every call; removing again is fine."""
        s = rut.spec(sh("echo bye"))
        await rut.runtime.launch(s)
        assert (await rut.runtime.wait(s.agent_id, PROMPT)).exit_code == 0
        assert rut.present(s.agent_id)
        await rut.runtime.remove(s.agent_id)
        assert not rut.present(s.agent_id)
        assert (await rut.runtime.lookup(s.agent_id)).state is AgentState.MISSING
        assert await rut.runtime.logs(s.agent_id) == ""
        with pytest.raises(LookupError):
            await rut.runtime.wait(s.agent_id, 1.0)
        await rut.runtime.remove(s.agent_id)
        assert (await rut.runtime.lookup(s.agent_id)).state is AgentState.MISSING

    async def test_remove_of_a_running_agent_ends_it(self, rut: RuntimeUnderTest) -> None:
        """Removing a running agent kills it and forgets it."""
        s = rut.spec(sh(f"echo working; sleep {LONG}"))
        await rut.runtime.launch(s)
        agent = await rut.handle(s.agent_id)
        assert rut.running(agent)
        begun = time.monotonic()
        await rut.runtime.remove(s.agent_id)
        assert time.monotonic() - begun < PROMPT
        assert not rut.running(agent)
        assert not rut.present(s.agent_id)
        assert (await rut.runtime.lookup(s.agent_id)).state is AgentState.MISSING
        await rut.runtime.remove(s.agent_id)
        assert (await rut.runtime.lookup(s.agent_id)).state is AgentState.MISSING

    # -- unknown ids --

    async def test_unknown_id(self, rut: RuntimeUnderTest) -> None:
        """An id never launched: MISSING, ``wait`` raises ``LookupError``, no logs; stop and
        remove do nothing (and create nothing)."""
        agent_id = rut.new_id()
        status = await rut.runtime.lookup(agent_id)
        assert status.state is AgentState.MISSING and status.outcome is None
        with pytest.raises(LookupError):
            await rut.runtime.wait(agent_id, 1.0)
        assert await rut.runtime.logs(agent_id) == ""
        await rut.runtime.stop(agent_id)
        await rut.runtime.remove(agent_id)
        assert not rut.present(agent_id)
        assert (await rut.runtime.lookup(agent_id)).state is AgentState.MISSING
