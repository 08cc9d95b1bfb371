"""The broker, sans-io: topics, subscriptions, presence, the status map and its counters."""
