"""``GET /rebalance``: the rebalancer's config, current smoothed signals and recent decisions.

Who calls what: ``router/app.py`` calls ``add_rebalance_routes(app)`` when ``--rebalance`` is
set; the handler reads ``Rebalancer.describe()`` (the rebalancer owns everything it shows).
Like ``/workers``, the route needs the API key when one is configured.
"""

from __future__ import annotations

from aiohttp import web

from router import keys


async def rebalance_state(request: web.Request) -> web.Response:
    return web.json_response(request.app[keys.REBALANCER].describe())


def add_rebalance_routes(app: web.Application) -> None:
    app.router.add_get("/rebalance", rebalance_state, name="rebalance")
