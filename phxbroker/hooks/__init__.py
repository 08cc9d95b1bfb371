"""The app's back end over HTTP: connect, join and event hooks, and lifecycle batches."""
