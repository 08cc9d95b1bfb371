"""The I/O edge clients meet: sockets, TLS, HTTP, admission, websocket and long-poll."""
