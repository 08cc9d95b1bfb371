"""Helpers for end-to-end tests: a real broker process and a real phoenix.js client."""
