"""What operators see: the admin HTTP API, Prometheus metrics, the dashboard."""
