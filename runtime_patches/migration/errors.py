"""The one error type of the worker's migration control: a request that cannot be carried out.

Raised by ``ranges``, ``offloads`` and ``manager`` where the problem is found; turned into the
HTTP status and OpenAI error body in one place (``MigrationManager.handle`` gives the status,
``control.py`` the body). Nothing has changed when it is raised.
"""

from __future__ import annotations


class MigrationError(Exception):
    """A control request that cannot be carried out; nothing was changed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
