"""The words the data plane reports in: kinds, outcomes, and why the gateway closed.

They are :class:`~enum.StrEnum` members, so each *is* the string that the access
log, the metric labels and the admin API show (see docs/observability.md):
changing a value changes what operators see.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["CloseReason", "Ending", "Kind", "Outcome"]


class Kind(StrEnum):
    """What a connection is: a WebSocket session or one HTTP request."""

    WEBSOCKET = "websocket"
    HTTP = "http"


class Ending(StrEnum):
    """How the backend's side of one exchange ended (what the upstream reports)."""

    COMPLETE = "complete"  # the response ended as its framing said
    COMPLETE_AT_EOF = "complete_at_eof"  # a close-delimited body ended with the connection
    UPGRADED = "upgraded"  # 101: the exchange became a session
    BAD_RESPONSE = "bad_response"  # the backend's bytes were not a response
    BACKEND_CLOSED = "backend_closed"  # closed during the response
    BACKEND_FAILED = "backend_failed"  # closed before any response


class Outcome(StrEnum):
    """How an admitted connection ended, as its access-log line says.

    Rejections use their :class:`~wsgate.admission.Reason` instead; a session
    the gateway closed itself ends ``closed_<reason>`` (a :class:`CloseReason`).
    The relay reports ``client_closed``, ``client_error``, ``backend_closed``,
    ``backend_error`` and ``finished`` in these same words.
    """

    OK = "ok"
    BACKEND_ERROR = "backend_error"
    BAD_REQUEST = "bad_request"
    BAD_RESPONSE = "bad_response"
    BACKEND_CLOSED = "backend_closed"
    BACKEND_FAILED = "backend_failed"
    CLIENT_CLOSED = "client_closed"
    CLIENT_ERROR = "client_error"
    HANDOFF_FAILED = "handoff_failed"
    RELAY_FAILED = "relay_failed"
    IDLE_TIMEOUT = "idle_timeout"
    GATEWAY_STOPPED = "gateway_stopped"


class CloseReason(StrEnum):
    """Why the gateway closed a session itself (``wsgate_closed_by_gateway_total``)."""

    DRAIN = "drain"
    BACKEND_REMOVED = "backend_removed"
    REBALANCE = "rebalance"
    MAX_DURATION = "max_duration"
    EXCESS = "excess"
    ROUTE_REMOVED = "route_removed"
