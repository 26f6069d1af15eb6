"""The `make demo` job: a stand-in model (`model.classify`), worker supervision, progress and
the report."""
