# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
# Private to the liveclone.core collection: not a public API.

"""Plan types shared by the resources: an Operation, the Result a module
returns, and one read -> plan -> apply skeleton.

How a resource uses it (backstore is the worked example):

1. A `Desired` value is built once from the module's parameters.
2. A reader returns the current state as plain data; it changes nothing.
3. A pure planner turns (desired, current) into a list of Operation: each
   an `action` the applier dispatches on, the `text` the user reads in the
   result, and the `args` the applier needs. It raises the resource's
   error for a request that cannot be carried out.
4. An applier carries out a list of Operation, in order.
5. `execute(read, plan, apply, check_mode)` runs them: in check mode it
   returns the plan made from the state read, which is the very plan a real
   run carries out from that state; a real run applies it and reads the
   state again. An applier that must plan again after a first step (backstore
   removes an interrupted run's leftovers, then plans on the state they
   leave) returns the state and the operations it carried out; one that
   knows the state it leaves (snapper_cache reads its cache again only when
   it changed it) returns the whole Outcome.
6. `Result.of(outcome, diff=..., values=...)` is what the module returns:
   `changed` is "the plan was not empty", `operations` are the texts, the
   diff is before/after, and `values` are the resource's own fields.
   Warnings go on the Result; the module passes each to module.warn().
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Operation:
    action: str
    text: str
    args: dict = field(default_factory=dict)

    def __str__(self):
        return self.text


@dataclass
class Outcome:
    """What one run found and did."""

    before: object  # the state the operations were planned from
    operations: list  # of Operation: planned (check mode) or carried out
    after: object  # the state afterwards (before itself when nothing was applied)

    @property
    def changed(self):
        return bool(self.operations)


def execute(read, plan, apply, check_mode):
    """read() -> state; plan(state) -> [Operation]; apply(state, operations)
    carries them out and returns None, (state, operations) when it had to
    plan again after a first step, or the Outcome itself when it knows the
    state afterwards. Returns an Outcome."""
    before = read()
    operations = plan(before)
    if check_mode or not operations:
        return Outcome(before, operations, before)
    replanned = apply(before, operations)
    if isinstance(replanned, Outcome):
        return replanned
    if replanned is not None:
        before, operations = replanned
    return Outcome(before, operations, read())


@dataclass
class Result:
    """The module's result: the shared keys, then the resource's own values."""

    changed: bool
    operations: list  # texts
    warnings: list = field(default_factory=list)
    diff: dict | None = None  # {"before": ..., "after": ...}
    values: dict = field(default_factory=dict)

    @classmethod
    def of(cls, outcome, diff=None, values=None, warnings=None):
        return cls(changed=outcome.changed, operations=[str(operation) for operation in outcome.operations],
                   warnings=list(warnings or []), diff=diff, values=dict(values or {}))

    def module_result(self):
        """The keys for exit_json (warnings are the module's to warn about)."""
        result = dict(self.values, changed=self.changed, operations=self.operations)
        if self.diff is not None:
            result["diff"] = self.diff
        return result
