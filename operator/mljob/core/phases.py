"""The MLJob phase state machine.

Terminal phases are absorbing; Canceling may only become Cancelled. Every writer (the CR
status, the Postgres guards, the CEL rules on the server) follows this one table.
"""

from __future__ import annotations

from mljob.api.models import TERMINAL_PHASES, Phase

_ALLOWED: dict[Phase | None, frozenset[Phase]] = {
    None: frozenset({Phase.PENDING, Phase.DISPATCHING, Phase.RUNNING, Phase.CANCELING, *TERMINAL_PHASES}),
    Phase.PENDING: frozenset({Phase.DISPATCHING, Phase.RUNNING, Phase.CANCELING, *TERMINAL_PHASES}),
    Phase.DISPATCHING: frozenset({Phase.RUNNING, Phase.CANCELING, *TERMINAL_PHASES}),
    Phase.RUNNING: frozenset({Phase.CANCELING, *TERMINAL_PHASES}),
    Phase.CANCELING: frozenset({Phase.CANCELLED}),
    Phase.SUCCEEDED: frozenset(),
    Phase.FAILED: frozenset(),
    Phase.CANCELLED: frozenset(),
}


def is_terminal(phase: Phase | None) -> bool:
    return phase in TERMINAL_PHASES


def can_transition(current: Phase | None, target: Phase) -> bool:
    """True when `current` may move to `target` (staying put is always allowed)."""
    return current == target or target in _ALLOWED[current]


def moves_to(current: Phase, target: Phase) -> bool:
    """True when a non-terminal change `current` -> `target` is one the table allows (staying
    put is no change): what Postgres records, with its transition row, for a phase change
    other than the terminal one, which only the guarded finish writes."""
    return target not in TERMINAL_PHASES and current != target and target in _ALLOWED[current]


def finalizable_from(target: Phase) -> frozenset[Phase]:
    """The phases from which the guarded terminal write to `target` may fire."""
    return frozenset(phase for phase in Phase if phase != target and target in _ALLOWED[phase])


#: Why the API server refuses a status write whose phase move the table refuses.
CEL_TRANSITION_MESSAGE = (
    "status.phase: a move the phase table refuses: a terminal phase (Succeeded, Failed, Cancelled) "
    "never changes, Canceling can only become Cancelled, and no phase goes back"
)


def cel_transition_rule() -> str:
    """The CRD's CEL rule on the status, generated from this table, so the API server refuses
    every phase move the table refuses, whoever writes (`mljob crd` renders it)."""
    moves = " || ".join(
        f"(oldSelf.phase == '{current.value}' && self.phase in {_cel_list(targets)})"
        for current, targets in _ALLOWED.items()
        if current is not None and targets
    )
    return f"!has(oldSelf.phase) || (has(self.phase) && (self.phase == oldSelf.phase || {moves}))"


def _cel_list(phases: frozenset[Phase]) -> str:
    return "[" + ", ".join(f"'{phase.value}'" for phase in sorted(phases)) + "]"
