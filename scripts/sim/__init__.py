"""A discrete-event simulator of a serving cluster that runs BanaServe's real control plane.

``docs/simulator.md`` walks through it; ``python -m scripts.sim --help`` lists the commands.
"""
