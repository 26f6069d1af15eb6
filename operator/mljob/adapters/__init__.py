"""Thin adapters: the only code that talks to Kubernetes, NATS, Redis and Postgres."""
