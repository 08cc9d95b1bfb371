"""phxbroker: a standalone Phoenix Channels broker."""

__version__ = "0.1.0"
