"""The running program: ``wsgate serve`` and ``wsgate check``.

It stands above the parts it assembles (the gateway, the admin server, the
worker supervisor), so none of them imports it.
"""
