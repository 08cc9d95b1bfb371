"""Operator surfaces: the HTTP API, control socket, health, metrics, logs and systemd."""
