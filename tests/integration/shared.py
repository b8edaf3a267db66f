"""Clusters that several test modules share, started on first use and stopped as soon as the
run moves on to a module that does not use them (not at the end of the session: a 2-core,
24 GiB machine running the suite in two processes cannot keep every cluster alive at once).

Contract:
- ``tests/integration/conftest.py`` declares each shared cluster as a fixture that calls
  ``SHARED.get(name, start, stop)``; ``start`` may use other shared clusters (``router`` starts on
  ``tiny_workers``), and clusters stop in the reverse order they started.
- ``tests/conftest.py`` records, at collection, which modules use which of them (``note_users``)
  and asks, after every test, to stop what the next test's module does not use
  (``release_for``); the end of the session stops the rest (``stop_all``).
- Modules that share a cluster run in one process and one after another: ``tests/conftest.py``
  puts them in one scheduling group, so each cluster starts once per run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


class SharedClusters:
    def __init__(self) -> None:
        self._live: dict[str, tuple[Any, Callable[[Any], None]]] = {}
        self._users: dict[str, set[str]] = {}

    def get(self, name: str, start: Callable[[], Any], stop: Callable[[Any], None]) -> Any:
        if name not in self._live:
            self._live[name] = (start(), stop)
        return self._live[name][0]

    def note_users(self, name: str, modules: Iterable[str]) -> None:
        self._users.setdefault(name, set()).update(modules)

    def users(self, name: str) -> set[str]:
        return set(self._users.get(name, ()))

    def release_for(self, next_module: str | None) -> None:
        """Stop every live cluster that ``next_module`` (None: nothing follows) does not use."""
        for name in reversed(list(self._live)):
            if next_module is None or next_module not in self._users.get(name, ()):
                self._stop(name)

    def stop_all(self) -> None:
        for name in reversed(list(self._live)):
            self._stop(name)

    def _stop(self, name: str) -> None:
        value, stop = self._live.pop(name)
        stop(value)


SHARED = SharedClusters()
