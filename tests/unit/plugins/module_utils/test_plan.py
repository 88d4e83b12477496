# Copyright (c) liveclone.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

import pytest

from ansible_collections.liveclone.core.plugins.module_utils._common.plan import Operation, Outcome, Result, execute


class Counter:
    """A resource of plain data: a number, planned up to a wanted value one step at a time."""

    def __init__(self, value, wanted):
        self.value, self.wanted, self.applied = value, wanted, []

    def read(self):
        return self.value

    def plan(self, value):
        return [Operation("add", "add 1 to %d" % n, {"to": n}) for n in range(value, self.wanted)]

    def apply(self, value, operations):
        self.applied.append(list(operations))
        self.value += len(operations)


@pytest.mark.parametrize("check_mode", [True, False])
def test_check_mode_returns_the_plan_the_real_run_carries_out(check_mode):
    counter = Counter(1, 3)
    outcome = execute(counter.read, counter.plan, counter.apply, check_mode)
    assert [str(op) for op in outcome.operations] == ["add 1 to 1", "add 1 to 2"]
    assert outcome.before == 1 and outcome.changed
    if check_mode:
        assert counter.applied == [] and outcome.after == 1
    else:
        assert counter.applied == [outcome.operations] and outcome.after == 3


def test_an_empty_plan_applies_nothing_and_reads_once():
    counter = Counter(3, 3)
    reads = []
    outcome = execute(lambda: reads.append(1) or counter.read(), counter.plan, counter.apply, False)
    assert (outcome.changed, outcome.operations, counter.applied, len(reads)) == (False, [], [], 1)


def test_an_applier_that_plans_again_reports_what_it_carried_out():
    def apply(state, operations):
        return state + 1, operations + [Operation("extra", "and one more")]

    outcome = execute(lambda: 0, lambda state: [Operation("first", "first")], apply, False)
    assert (outcome.before, [op.action for op in outcome.operations]) == (1, ["first", "extra"])


def test_an_applier_that_knows_the_state_it_leaves_saves_the_last_read():
    reads = []

    def apply(state, operations):
        return Outcome(state, operations + [Operation("done", "done")], "left")

    outcome = execute(lambda: reads.append(1) or 0, lambda state: [Operation("first", "first")], apply, False)
    assert (len(reads), outcome.after, [op.action for op in outcome.operations]) == (1, "left", ["first", "done"])


def test_result_of_an_outcome():
    outcome = Outcome(before={"size": 1}, operations=[Operation("grow", "grow to 2", {"size": 2})], after={"size": 2})
    result = Result.of(outcome, diff={"before": {"size": 1}, "after": {"size": 2}}, values={"size": 2},
                       warnings=["w"])
    assert result.module_result() == {"changed": True, "operations": ["grow to 2"], "size": 2,
                                      "diff": {"before": {"size": 1}, "after": {"size": 2}}}
    assert result.warnings == ["w"]
    assert "diff" not in Result.of(Outcome(1, [], 1)).module_result()
