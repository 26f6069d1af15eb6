"""The controller: kopf wiring, the reconcile loop, its observation and its actions."""
