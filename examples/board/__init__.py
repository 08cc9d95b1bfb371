"""The seed "board" app's back end: its channel logic as phxbroker hooks, over SQLite."""
