"""The edge: what a connection says about its client before its first request.

- :mod:`.proxy_protocol`: the PROXY protocol header (v1 and v2) a load balancer
  may put in front of a connection, parsed incrementally;
- :mod:`.client_address`: which address is the client's, given the peer, the
  trusted networks and the forwarding headers;
- :mod:`.tls`: the listener's TLS context, its certificate's facts, and reload.

The first two are plain code without sockets; :mod:`.tls` reads files only.
"""
