"""NATS client helpers shared by every process, workers included: connect, publish, pull."""
