"""mljob-operator: a Kubernetes operator for large ML batch jobs."""

__version__ = "0.1.0"
