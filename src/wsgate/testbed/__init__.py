"""The test bench: demo backend, load generator, local demo topology and their reports."""
