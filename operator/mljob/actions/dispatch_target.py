"""The validated spec as dispatch and re-dispatch need it."""

from __future__ import annotations

from mljob.api.models import MLJobSpec
from mljob.dispatch import DispatchTarget
from mljob.jobview import JobView


def target_of(view: JobView) -> DispatchTarget:
    """Raises pydantic's ValidationError for a spec the API server should have refused."""
    spec = MLJobSpec.model_validate(dict(view.spec))
    return DispatchTarget(view.ref.uid, view.ref.namespace, view.ref.name, spec)
