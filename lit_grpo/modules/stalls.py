"""Runs that train nothing stop, and say why.

A GRPO iteration can train nothing: every group skipped (no row with a finite reward in a
group with reward spread: `train/skipped`), or every minibatch's loss or gradient non-finite
(`train/nonfinite_skipped`). One such iteration now and then is normal; many in a row mean
the run spends its compute on nothing while its logs look like a run. `InARow` counts such
iterations; at its limit it raises `TrainingStalled`, one line naming the cause, the
iterations and the global step. The CLI prints it without a traceback and exits 1, and
Lightning ends the logger's run as FAILED (never FINISHED).

Why a skipped iteration skipped (`skip_cause`) is read from the gathered rewards, so every
rank names the same cause (and every rank raises together: the skip itself is decided on
gathered data).
"""

from collections import Counter

import torch
from torch import Tensor

from lit_grpo.checks import RunFailed


class TrainingStalled(RunFailed):
    """Too many GRPO iterations in a row trained nothing (see module docstring)."""


# the causes of a skipped iteration, most telling first (see `skip_cause`)
NONFINITE = "every reward was NaN or inf (reward/nonfinite_fraction 1)"
ZERO_SPREAD = "no group had reward spread (groups/zero_spread_fraction 1)"
NOTHING_FOUND = (
    "no group had reward spread and the segmenter found the object in no edit "
    "(groups/zero_spread_fraction 1, reward/object_found 0)"
)
NONFINITE_LOSS = "a minibatch's loss or gradient was not finite (train/nonfinite_skipped)"


def skip_cause(total: Tensor, found: Tensor, gather) -> str:
    """Why an iteration had no row to train: `total` [N] this rank's total rewards, `found`
    [N] whether the segmenter found the object in each edit, `gather` the stage's collective
    (every rank's tensors stacked; every rank must call it)."""
    counts = torch.stack([torch.isfinite(total).sum(), found.bool().sum()]).float()
    finite, seen = gather(counts).reshape(-1, 2).sum(0).tolist()
    if finite == 0:
        return NONFINITE
    if seen == 0:
        return NOTHING_FOUND
    return ZERO_SPREAD


class InARow:
    """Consecutive iterations that trained nothing, by cause; `TrainingStalled` at `limit`.

    Args:
        limit: the iterations in a row that stop the run.
        what: what those iterations did, for the message ("trained nothing").
        setting: the constructor argument that sets `limit`, named in the message.
        advice: what to check, ending the message.
    """

    def __init__(self, limit: int, what: str, setting: str, advice: str):
        if limit < 1:
            raise ValueError(f"{setting} must be >= 1, got {limit}")
        self.limit, self.what, self.setting, self.advice = limit, what, setting, advice
        self.causes: Counter[str] = Counter()

    @property
    def count(self) -> int:
        return sum(self.causes.values())

    def update(self, cause: str | None, iteration: int, global_step: int) -> None:
        """Record iteration `iteration`: `cause` None trained, else why it did not."""
        if cause is None:
            self.causes.clear()
            return
        self.causes[cause] += 1
        if self.count < self.limit:
            return
        first = iteration - self.count + 1
        why = "; ".join(
            f"{c} ({n} of them)" if len(self.causes) > 1 else c
            for c, n in self.causes.most_common()
        )
        raise TrainingStalled(
            f"GRPO {self.what} for {self.count} iterations in a row (iterations "
            f"{first}..{iteration}, global_step {global_step}, model.init_args."
            f"{self.setting}={self.limit}): {why}. {self.advice}"
        )

    def state_dict(self) -> dict:
        return {"causes": dict(self.causes)}

    def load_state_dict(self, state: dict) -> None:
        self.causes = Counter(state.get("causes") or {})


class Stalls:
    """The two streaks a GRPO run keeps: iterations in a row that stepped nothing (a
    non-finite loss or gradient; `max_nonfinite_in_a_row`) and that had nothing to train
    (`max_skipped_in_a_row`). Each stops the run at its limit."""

    def __init__(self, max_nonfinite_in_a_row: int, max_skipped_in_a_row: int):
        for name, limit in (
            ("max_nonfinite_in_a_row", max_nonfinite_in_a_row),
            ("max_skipped_in_a_row", max_skipped_in_a_row),
        ):
            if limit < 1:
                raise ValueError(f"{name} must be >= 1, got {limit}")
        self.nonfinite = InARow(
            max_nonfinite_in_a_row,
            "stepped nothing",
            "max_nonfinite_in_a_row",
            "Those steps were skipped, not taken. Lower the learning rate, check the policy's "
            "outputs and the rewards (groups/dropped_samples), or resume from the last "
            "checkpoint.",
        )
        self.skipped = InARow(
            max_skipped_in_a_row,
            "trained nothing",
            "max_skipped_in_a_row",
            "Look at a few scored rollouts (lit_grpo.callbacks.RolloutImageLogger): do the "
            "rewards and the segmenter work on this data?",
        )

    def update(self, skipped: bool, scores, stats: dict, gather, iteration: int, step: int) -> None:
        """Count the iteration just logged (reads its statistics back: call it after
        logging); raises `TrainingStalled` at a limit."""
        if skipped:  # nothing computed: neither breaks nor extends a non-finite streak
            cause = skip_cause(scores.total, scores.parts["object_found"], gather)
            self.skipped.update(cause, iteration, step)
            return
        self.skipped.update(None, iteration, step)
        nonfinite = bool(stats["nonfinite_skipped"] > 0)
        self.nonfinite.update(NONFINITE_LOSS if nonfinite else None, iteration, step)
