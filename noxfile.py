"""Developer sessions: ``nox -s tests lint types bench``; ``chaos`` and ``soak`` run the
long profiles of the chaos and suspension tests."""

import nox

nox.options.sessions = ["tests", "lint", "types"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite as CI runs it (``scripts/test.py``: two workers, then the
    Postgres outage tests alone); needs PostgreSQL at 127.0.0.1:5432 or skips those tests."""
    session.install("-e", ".[dev]")
    session.run("python", "scripts/test.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def types(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("python", "scripts/typecheck.py")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks; results are written to benchmarks/RESULTS.md."""
    session.install("-e", ".[dev]")
    session.run("python", "benchmarks/run.py", *session.posargs)


@nox.session
def chaos(session: nox.Session) -> None:
    """The chaos test with several seeds (CI runs one): 4 workers, 200 executions, kills."""
    session.install("-e", ".[dev]")
    for seed in range(1, 6):
        session.run("pytest", "-q", "-s", "tests/e2e/test_chaos.py",
                    env={"FLOW_CHAOS_SEED": str(seed)})


@nox.session
def soak(session: nox.Session) -> None:
    """The long profiles: 1,000 executions sleeping the full minute; each race 20 times."""
    session.install("-e", ".[dev]")
    session.run("pytest", "-q", "-s", "tests/e2e/test_suspend.py", "tests/e2e/test_races.py",
                env={"FLOW_SOAK": "1"})
