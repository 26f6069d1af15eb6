"""The results collector: worker results into the ledger (Postgres) and Redis."""
