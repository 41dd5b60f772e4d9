"""``flow`` with the server commands: ``python tests/server/launch.py server ...``.

Until the ``flow`` program registers ``server`` and ``token`` itself, this adds them
(``agentainer_flow._server.cli.register``); once it does, this is plain ``flow``.
"""

from agentainer_flow._cli import app, main
from agentainer_flow._server.cli import register

if "server" not in {c.name for c in app.registered_commands}:
    register(app)
main()
