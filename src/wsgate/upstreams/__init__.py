"""The backend pool: which backends exist, which are healthy, and what they hold."""
