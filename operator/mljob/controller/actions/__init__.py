"""One module per reconcile action; `mljob.controller.loop` picks one per tick from `core.reconcile`.

Each action is a few functions over the shared `Services` and the job's `JobView`; none decides
anything `core.reconcile` could decide from a snapshot.
"""
