"""The one base class of everything a pull can fail with.

Each step of a pull (reference, catalog, source listing, file choice, transfer) raises its own subclass, defined
next to the code that raises it; they share this base so that the daemon can catch one type and answer with
`http_status` and `str(error)`, which always says what to do next.
"""

from __future__ import annotations


class PullError(Exception):
    http_status: int = 500
