"""The functional core: pure decisions over observed snapshots. No I/O lives here."""
