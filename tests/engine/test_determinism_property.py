"""Property: for generated DAGs, a crash at any hypothesis-chosen point of the history
resumes to the uncrashed result and history, launching every agent exactly once."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentainer_flow import RetryPolicy, step, workflow
from agentainer_flow.engine.runtimes.base import AgentSpec
from agentainer_flow.engine.runtimes.mock import MockRegistry, MockRuntime
from agentainer_flow.store import MemoryEventStore
from agentainer_flow.store.events import AgentDeployRequested, AgentStarted
from agentainer_flow.testing import mock_agent

from .helpers import by_instance, client_for, store_with_prefix

_names = itertools.count()


Shape = list[tuple[list[int], int, str]]


@st.composite
def dags(draw: st.DrawFn) -> Shape:
    """Steps as (dependencies, parallel count, flavour); count 0 is an ordinary step. A
    ``flaky`` step fails its first attempt and is retried; a ``skipped`` one has a false
    ``when=`` (so its dependants are skipped too)."""
    n = draw(st.integers(2, 6))
    steps = []
    for i in range(n):
        deps = draw(st.lists(st.integers(0, i - 1), unique=True, max_size=2)) if i else []
        flavour = draw(st.sampled_from(["plain", "plain", "flaky", "skipped"] if deps
                                       else ["plain", "flaky"]))
        steps.append((sorted(deps), draw(st.sampled_from([0, 0, 2, 3])), flavour))
    return steps


def build(shape: Shape) -> type:
    """A workflow class for the shape: every step deploys an agent, writes state, and
    returns its agent's value plus what its dependencies returned."""
    attrs: dict[str, Any] = {}
    for i, (deps, count, flavour) in enumerate(shape):
        params = "".join(f", s{d}_result" for d in deps)
        index = ", i" if count else ""
        flaky = ""
        if flavour == "flaky":
            flaky = "    if ctx.attempt == 1: raise RuntimeError('flaky')\n"
        src = (
            f"async def s{i}(self, ctx{params}{index}):\n"
            f"    inst = {'i' if count else 0}\n"
            f"{flaky}"
            f"    agent = await ctx.deploy_agent(f's{i}-{{inst}}', 'img:1')\n"
            f"    value = (await agent.wait_for_completion())['v']\n"
            f"    ctx.state['s{i}-' + str(inst)] = value\n"
            f"    await ctx.log('s{i} done')\n"
            f"    ups = [{', '.join(f's{d}_result' for d in deps)}]\n"
            f"    flat = [x for u in ups for x in (u if isinstance(u, list) else [u])]\n"
            f"    return value + sum(flat)\n"
        )
        ns: dict[str, Any] = {}
        exec(src, ns)  # generated test workflows need real parameter names
        options: dict[str, Any] = {"depends_on": [f"s{d}" for d in deps]}
        if flavour == "flaky":
            options["retry_policy"] = RetryPolicy(max_attempts=2, initial_delay="1m")
        if flavour == "skipped":
            options["when"] = lambda _upstream: False
        if count:
            options.update(parallel=True, count=count)
        attrs[f"s{i}"] = step(**options)(ns[f"s{i}"])
    cls = type(f"Generated{next(_names)}", (), attrs)
    return workflow(name=cls.__name__)(cls)


def registry() -> MockRegistry:
    reg = MockRegistry()
    mock_agent("s*", registry=reg).returns(
        lambda call: {"v": sum(map(ord, call.name)) % 97})
    return reg


async def check(shape: Shape, cut: float) -> None:
    cls = build(shape)
    async with client_for(MemoryEventStore(), MockRuntime(registry())) as client:
        ex = await client.run_workflow(cls())
        expected = await ex.get_result()
        history = await client.store.load(ex.id)
        record = await client.describe(ex.id)
    k = max(1, int(cut * len(history)))
    runtime = MockRuntime(registry())
    started = {s.event.agent_id for s in history[:k] if isinstance(s.event, AgentStarted)}
    for s in history[:k]:
        ev = s.event
        if isinstance(ev, AgentDeployRequested) and ev.agent_id in started:
            await runtime.launch(AgentSpec(agent_id=ev.agent_id, name=ev.name, image=ev.image))
    async with client_for(await store_with_prefix(record, history, k), runtime) as client:
        resumed = await client.resume(record.id)
        assert await resumed.get_result() == expected
        again = await client.store.load(record.id)
    assert by_instance([s.event for s in again]) == by_instance([s.event for s in history])
    launched = [spec.agent_id for spec in runtime.launches]
    assert len(launched) == len(set(launched))
    assert set(launched) == {s.event.agent_id for s in history
                             if isinstance(s.event, AgentStarted)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=dags(), cut=st.floats(0.0, 1.0))
def test_generated_dags_resume_identically(shape: Shape, cut: float) -> None:
    asyncio.run(check(shape, cut))
