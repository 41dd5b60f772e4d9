"""Paging the executions list: a page costs the store about its own length of rows, however
many executions there are (the cursor is where the previous page ended), and the pages
hold each execution once, also with exact time bounds and executions created meanwhile."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest

from agentainer_flow import WorkflowClient
from agentainer_flow._server.app import _search
from agentainer_flow._server.schemas import SearchBody
from agentainer_flow.store import ExecutionRecord, NewExecution
from agentainer_flow.store.events import ExecutionStarted


async def _made(client: WorkflowClient, n: int) -> list[str]:
    for i in range(n):
        await client.store.create_execution(
            NewExecution(id=f"x{i:04d}", workflow_name="paged", tags={"kind": "paged"}),
            ExecutionStarted(workflow_name="paged", tags={"kind": "paged"}))
    return [r.id for r in await client.store.list_executions(workflow_name="paged",
                                                             limit=None)]


@pytest.mark.parametrize("url", ["memory://", "sqlite"])
async def test_each_page_reads_about_its_own_length(url: str, tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'flow.db'}" if url == "sqlite" else url
    async with WorkflowClient(store=store_url, runtime="mock") as client:
        expected = await _made(client, 300)
        read: list[int] = []
        listed = client.store.list_executions

        async def counted(**filters: Any) -> list[ExecutionRecord]:
            rows = await listed(**filters)
            read.append(len(rows))
            return rows

        client.store.list_executions = counted  # type: ignore[method-assign]
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            page = await _search(client, SearchBody(workflow="paged", limit=25, cursor=cursor))
            pages += 1
            seen += [e.id for e in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
            if pages == 3:  # newer than every page: shows up in none of the later ones
                await client.store.create_execution(
                    NewExecution(id="late", workflow_name="paged"),
                    ExecutionStarted(workflow_name="paged"))
        assert seen == expected
        assert pages == 12
        assert max(read) <= 26 and sum(read) <= 12 * 26  # not the whole table, page after page

        # an exact upper time bound: what was created before the 100th newest one
        record = await client.store.get_execution(expected[99])
        assert record is not None
        bound = dt.datetime.fromtimestamp(record.created_at, dt.UTC)
        before = await _search(client, SearchBody(workflow="paged", limit=1000,
                                                  created_before=bound))
        assert [e.id for e in before.items] == expected[100:]
