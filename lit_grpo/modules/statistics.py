"""What a GRPO step logs about its rewards, advantages, update and phase times, and the
logging itself (`log_step`: where the step reads its values back from the device).

Masked reductions instead of boolean indexing (`x[torch.isfinite(x)]`) and branches on
counts: both would read a value back from the device. The results stay 0-d tensors until
the step logs them.

Reward means and stds are over the finite values only, accumulated in float64 (a float32
sum of rewards near 1e38 overflows to inf); a mean over no finite value is NaN, never 0.
The non-finite rewards are counted on their own: `reward/nonfinite_fraction` (of the
rollouts whose total reward is NaN or inf) and `groups/dropped_samples` (their number).
"""

import torch
from torch import Tensor

from lit_grpo.modules.phases import PhaseClock
from lit_grpo.objectives.base import Advantages
from lit_grpo.rewards.scoring import Scores


def log_step(
    module, batch: dict, scores: Scores, adv: Advantages, stats: dict, clock: PhaseClock
) -> None:
    """Log a GRPO step through `module.log_dict`: `step_statistics`, the update's `stats`
    (`train/*`), the phase times (`time/*`), and `reward` on the progress bar."""
    log = step_statistics(scores, adv)
    log.update({f"train/{k}": v for k, v in stats.items()})
    timings = {"update": 0.0, **clock.seconds()}  # a skipped update took no time
    log.update({f"time/{k}": v for k, v in timings.items()})
    n_cond = batch["source"].shape[0]
    module.log_dict(log, batch_size=n_cond)
    module.log("reward", log["reward/total"], prog_bar=True, logger=False, batch_size=n_cond)


def step_statistics(scores: Scores, adv: Advantages) -> dict[str, Tensor]:
    """Reward mean / std per reward and sub-score and of the total, advantage statistics over
    the valid rollouts, the zero-spread fraction, dropped samples, and whether nothing
    trained (`train/skipped`)."""
    total = scores.total
    valid = adv.valid.float()
    values = adv.values.float()
    n_valid = valid.sum()
    adv_mean = (values * valid).sum() / n_valid.clamp_min(1)
    adv_var = (((values - adv_mean) * valid) ** 2).sum() / (n_valid - 1).clamp_min(1)
    log = {f"reward/{k}": nanmean(v) for k, v in scores.parts.items()}
    log.update({f"reward_std/{k}": nanstd(v) for k, v in scores.parts.items()})
    log.update(
        {
            "reward/total": nanmean(total),
            "reward_std/total": nanstd(total),
            "adv/mean": adv_mean,
            "adv/std": torch.where(n_valid > 1, adv_var.sqrt(), 0.0),
            "adv/abs_max": values.abs().max(),
            "groups/zero_spread_fraction": adv.zero_spread.float().mean(),
            "groups/dropped_samples": (~torch.isfinite(total)).sum().float(),
            "reward/nonfinite_fraction": (~torch.isfinite(total)).float().mean(),
            "train/skipped": (~adv.valid.any()).float(),
        }
    )
    return log


def nanmean(x: Tensor) -> Tensor:
    """Mean of the finite values (NaN if none), in float64."""
    x = x.double()
    finite = torch.isfinite(x)
    return torch.where(finite, x, 0.0).sum() / finite.sum()


def nanstd(x: Tensor) -> Tensor:
    """Unbiased std of the finite values (0 with fewer than two), in float64."""
    x = x.double()
    finite = torch.isfinite(x)
    n = finite.sum()
    mean = torch.where(finite, x, 0.0).sum() / n.clamp_min(1)
    var = (torch.where(finite, x - mean, 0.0) ** 2).sum() / (n - 1).clamp_min(1)
    return torch.where(n > 1, var.sqrt(), 0.0)
