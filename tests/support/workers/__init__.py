"""Test-only worker handlers, imported by `mljob worker` subprocesses (tests/ is on their PYTHONPATH)."""
