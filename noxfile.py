"""Developer sessions: ``nox -s tests lint types bench``."""

import nox

nox.options.sessions = ["tests", "lint", "types"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (needs PostgreSQL at 127.0.0.1:5432 or skips those tests)."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


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
