"""The `phxbroker` command line: serve, inspect, kick, publish, tokens."""
