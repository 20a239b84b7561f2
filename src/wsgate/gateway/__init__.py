"""The data plane: accept, read the request head, admit, connect, relay, release."""
