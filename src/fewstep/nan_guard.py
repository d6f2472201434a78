"""What a non-finite training step does (`nan_policy`), counted over consecutive bad steps.

The trainer finds a step bad when any rank's loss or gradients are non-finite (one flag in the step's single
reduction, so every rank agrees), discards its update (`fewstep.engine.nonfinite.skip_step`: parameters, optimizer
state, LR schedule and step count stay as they were) and asks this guard whether to go on.
"""
from __future__ import annotations

from fewstep.errors import NonFiniteStop


class NonFiniteGuard:
    def __init__(self, policy: str, max_bad_in_a_row: int):
        self.policy, self.limit = policy, max_bad_in_a_row
        self.in_a_row = 0  # saved with the checkpoint: a run requeued amid a streak does not count it afresh
        self.skipped = 0   # bad steps skipped since the run began, resumes included

    def good(self) -> None:
        self.in_a_row = 0

    def bad(self, step: int) -> None:
        """Record a skipped step; raises NonFiniteStop when the policy says the run must end."""
        self.in_a_row += 1
        self.skipped += 1
        where = f"non-finite loss or gradients at step {step}"
        if self.policy == "stop":
            raise NonFiniteStop(f"{where} (nan_policy stop): the update was not applied; the last checkpoint is "
                                "intact. Lower learning_rate, or check the data and mixed_precision")
        if self.policy == "skip-then-stop" and self.in_a_row >= self.limit:
            raise NonFiniteStop(f"{where}, {self.in_a_row} steps in a row (nan_max_bad_steps {self.limit}): the "
                                "training has diverged; none of these updates was applied and the last checkpoint is "
                                "intact. Lower learning_rate, or check the data and mixed_precision")

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.in_a_row, self.skipped = int(state.get("in_a_row", 0)), int(state.get("skipped", 0))
