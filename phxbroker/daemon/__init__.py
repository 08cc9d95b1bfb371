"""The running daemon: the broker task, the assembly of every part, start to drain."""
