"""BanaServe's rebalancing controller in the router (``--rebalance``; ``docs/rebalancer.md``).

``config`` (RebalanceConfig), ``messages`` (the typed control messages router and worker share;
pure, imported by the worker too), ``signals`` (utilisations, the parsed worker status), ``decide``
(the pure Planner), ``loop`` (the Rebalancer that reads, decides and acts), ``api``
(``GET /rebalance``). Only ``config`` is imported here, so ``router.config`` can use it.
"""

from router.rebalance.config import RebalanceConfig

__all__ = ["RebalanceConfig"]
