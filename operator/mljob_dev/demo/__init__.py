"""The `make demo` job: a stand-in model, worker supervision, progress and the report."""

from mljob_dev.demo.model import classify

__all__ = ["classify"]
