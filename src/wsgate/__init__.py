"""wsgate: a gateway for long-lived connections (WebSocket sessions and slow HTTP).

It spreads new connections over a pool of backends, holds each backend under a
hard cap of concurrent connections shared exactly by all replicas, limits the
connect rate, and rejects what it cannot admit with 429/503 and Retry-After.
"""

__version__ = "0.1.0"
