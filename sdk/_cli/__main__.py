"""``python -m agentainer_flow._cli``: the ``flow`` program."""

from agentainer_flow._cli import main

main()
