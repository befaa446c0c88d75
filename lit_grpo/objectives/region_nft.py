"""A masked forward-process objective: DiffusionNFT with SpatialFlow-GRPO's region credit,
and the scene held to the SFT editor at the same noise levels (ours, issue 23; no paper
combines the two).

Why: Flow-GRPO's update reads rewards from one-step shortcut images of the early steps it
trains (early exit) and holds the scene with a KL on those steps only, while evaluation runs
every step; the excess background change of the main job is made where that hold does not
look (docs/benchmarks.md). DiffusionNFT trains on the full ODE rollouts' clean edits, noised
again at levels spread over the whole schedule (`ODETrajectory`'s recorded steps, e.g.
1.0, 0.7, 0.4, 0.1), so reward and hold both see the late steps.

What, per row, at one noise level s (`nft.py` for r, v+, v-, l):

    loss(row) = region_mean_w( cover, ( r_R l_tok(v+) + (1 - r_R) l_tok(v-) ) / beta )
              + hold_beta * region_mean_h( cover, mean_{elements of token} (v - v_ref)^2 )

- l_tok is DiffusionNFT's per-element error (adaptive weighting: scaled by the whole
  image's detached mean absolute x0 error, as in `nft.py`) averaged over each token's
  elements; r_R = 1/2 + 1/2 clip(A_R / C, -1, 1) with A_R region R's group advantage
  (SpatialFlow-GRPO's region-level advantages, `spatialflow.py`), so a token is pulled
  towards the rollout's edit as its region's score beat the group's, and pushed away
  from it as it fell short;
- region_mean_w is `spatialflow.region_mean`: each region's cover-weighted mean over its
  tokens, then the `region_weights`-weighted mean over the regions present. A region of
  weight 0 never reaches the loss (its advantages are not read, as in `spatialflow.py`);
- the hold: the squared velocity difference to the reference (the adapter-off SFT editor)
  on the same noised state, over the regions of `hold_region_weights` (`scene_hold.py`'s
  term, here at NFT's levels rather than drawn ones). Pulled to the SFT editor's own
  velocity, not to the source image: pulled to the source, the editor learns to copy it
  (docs/benchmarks.md).

One region covering every token with weight 1 gives DiffusionNFT's loss exactly (tested).
"""

import torch
from torch import Tensor

from lit_grpo.objectives.base import Advantages, LossInputs, LossStats, PolicyTargets, Ranks
from lit_grpo.objectives.nft import DiffusionNFT, branch_elements, optimality
from lit_grpo.objectives.scene_hold import velocity_hold
from lit_grpo.objectives.spatialflow import SpatialFlowGRPO, region_mean, weights_by_name
from lit_grpo.sampling.flow import host_to_device


def region_nft_loss(
    v: Tensor,
    v_old: Tensor,
    target: Tensor,
    sigma: Tensor,
    region_adv: Tensor,
    cover: Tensor,
    region_weights: Tensor,
    adv_clip: float,
    beta: float,
    adaptive: bool,
    to_tokens,
) -> Tensor:
    """The region NFT term of each row [n] (module docstring): v (with grad), v_old, target
    [n, C, h, w]; sigma [n]; region_adv [n, R]; cover [n, R, T]; region_weights [R];
    to_tokens: the policy's per-element [n, C, h, w] -> per-token [n, T] mean."""
    v_old = v_old.detach()
    w = region_weights.to(region_adv)
    adv = torch.where(w[None] != 0, region_adv, torch.zeros_like(region_adv))  # [n, R]
    r = optimality(adv, adv_clip)[:, :, None]  # [n, R, 1]
    pos = to_tokens(branch_elements((1 - beta) * v_old + beta * v, target, sigma, adaptive))
    neg = to_tokens(branch_elements((1 + beta) * v_old - beta * v, target, sigma, adaptive))
    per_token = (r * pos[:, None] + (1 - r) * neg[:, None]) / beta  # [n, R, T]
    return region_mean(per_token, cover, w)


class RegionNFT(DiffusionNFT):
    """DiffusionNFT trained region by region on SpatialFlow-GRPO's region advantages, with
    an optional scene hold (module docstring). Needs a region reward
    (`lit_grpo.rewards.RegionReward`) and rollouts that record their noise levels
    (`ODETrajectory`).

    Args:
        beta, adv_clip, adv_std, adaptive_weighting: DiffusionNFT's (`DiffusionNFT`).
        region_reward, region_weights: SpatialFlow-GRPO's (`SpatialFlowGRPO`), e.g.
            region_weights {edit: 1.0}: only the edit region's tokens train on the reward.
        hold_beta: weight of the scene hold (velocity units squared; 0: off).
        hold_region_weights: the regions the hold holds, by name, e.g. {others: 1.0,
            background: 1.0}; needed with hold_beta > 0.
    """

    def __init__(
        self,
        beta: float = 0.1,
        adv_clip: float = 5.0,
        adv_std: str = "global",
        adaptive_weighting: bool = True,
        region_reward: str | None = None,
        region_weights: dict[str, float] | None = None,
        hold_beta: float = 0.0,
        hold_region_weights: dict[str, float] | None = None,
    ):
        super().__init__(beta, adv_clip, adv_std, adaptive_weighting, kl_beta=0.0)
        # the region advantages and the weights' checks are SpatialFlow-GRPO's, reused
        self.credit = SpatialFlowGRPO(
            adv_std=adv_std,
            adv_clamp=adv_clip,
            region_reward=region_reward,
            region_weights=region_weights,
            hold_beta=hold_beta,
            hold_region_weights=hold_region_weights,
        )
        self.hold_beta, self.hold_region_weights = hold_beta, hold_region_weights

    def check_rewards(self, rewards: list) -> None:
        self.credit.check_rewards(rewards)

    def advantages(
        self, scores, group_size: int, ranks: Ranks, policy
    ) -> tuple[Advantages, PolicyTargets]:
        """SpatialFlow-GRPO's per-region advantages [N, R] and cover [N, R, T]."""
        return self.credit.advantages(scores, group_size, ranks, policy)

    def _weights(self, names, device) -> tuple[Tensor, Tensor | None]:
        loss = weights_by_name(self.credit.region_weights, names, "region_weights")
        hold = (
            None
            if self.hold_beta == 0
            else weights_by_name(self.hold_region_weights, names, "hold_region_weights")
        )
        as_tensor = lambda w: host_to_device(torch.tensor(w, dtype=torch.float32), device)  # noqa: E731
        return as_tensor(loss), None if hold is None else as_tensor(hold)

    def loss(self, inputs: LossInputs) -> tuple[Tensor, LossStats]:
        """The region NFT loss at noise level k on the rows (+ hold_beta x the hold)."""
        t, targets, rows = self.forward(inputs), inputs.targets, inputs.rows
        size = tuple(inputs.record.images.shape[-2:])
        to_tokens = lambda e: inputs.policy.latent_to_tokens(e, size)  # noqa: E731
        weights, hold_weights = self._weights(self.credit.region_names, t.v.device)
        cover = targets.cover[rows]
        per_row = region_nft_loss(
            t.v,
            t.old,
            t.eps - t.x0,
            t.sigma,
            targets.regions[rows],
            cover,
            weights,
            self.adv_clip,
            self.beta,
            self.adaptive_weighting,
            to_tokens,
        )
        loss = inputs.per_row_sum(per_row)
        stats = t.stats(loss, inputs.weights)
        if hold_weights is not None:
            v_ref = t.reference_velocity(inputs.policy)
            hold = inputs.per_row_sum(
                region_mean(velocity_hold(t.v, v_ref, to_tokens), cover, hold_weights)
            )
            loss = loss + self.hold_beta * hold
            stats.loss, stats.hold = loss.detach(), hold.detach()
        return loss, stats
