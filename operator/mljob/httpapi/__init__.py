"""The read-only HTTP API (`mljob api`): job summaries, items and results for people, checked
by Kubernetes RBAC.

`auth` (TokenReview and SubjectAccessReview through the apiserver, cached by token hash),
`params` (query parameters and the paging cursor; pure), `disagree` (where the stores disagree,
in plain words; pure), `ledger` (the Postgres reads), `summary` (a job as every store sees it),
`routes` (the aiohttp routes) and `server` (the process). Named `httpapi`: `mljob.api` holds the
CRD's models. docs/architecture.md, "The read-only API", says why it is a process of its own.
"""
