"""Helpers for end-to-end tests: operator and worker processes, waiting on MLJob phases."""
