"""Neighbor GRPO (He et al., arXiv 2511.16955): a likelihood-free surrogate for
deterministic ODE rollouts, the objective of RC-GRPO-Editing's paper path.

Neighbor GRPO, as we implement it (its equation numbers):

    eps_i     = sqrt(1 - s^2) eps* + s delta_i                       (7; s = sigma x region)
    rollouts  : G deterministic ODE trajectories from eps_1..eps_G; states x_t^(i) recorded
    anchor k  : its recorded state at the level before t, one ODE (Euler / DDIM) step under
                the current policy -> x_t^(theta)
    pi_theta(i | k) = softmax_i( -||x_t^(i) - x_t^(theta)||^2 / tau )     (8)
    loss      = - mean_k sum_i min( A_i rho_i|k, A_i clip(rho_i|k, 1 - e, 1 + e) ),
                rho_i|k = pi_theta(i | k) / pi_old(i | k)                  (9)
    A_i       = c_i / (||c||_p / sqrt(G)),  c = r - mean_group(r),  p = 0.8  (11)

pi_old is the same softmax around the anchor's recorded step (the rollout policy's), so the
first ratio is 1. The surrogate is a training device only: sampling stays the ODE.
Maximising it pulls the anchor's step towards high-advantage neighbours and pushes it away
from low-advantage ones (the paper's contrastive reading of SDE-GRPO).

Where the paper leaves a detail open (its text as summarised; the code is not public), our
choices: the distance is the mean over elements with a temperature tau (the paper's squared
L2 norm is tau = 1 / D); "symmetric anchor sampling" is `anchors` rollouts drawn per group
and epoch without replacement, every rollout equally likely, each anchor scored against its
whole group (itself included); the trained steps are every ODE step (`ODETrajectory`), the
training step is the same Euler step the rollout took (the paper rolls out with DPM++ and
trains with one DDIM step; we roll out with Euler, so the two solvers coincide); the
quasi-norm's scale is sqrt(G) (p = 2 gives GRPO's group z-score); no KL term.
"""

import torch
from torch import Tensor

from lit_grpo.objectives.base import Advantages, LossInputs, LossStats, Objective
from lit_grpo.objectives.flow_grpo import clipped_policy_loss
from lit_grpo.sampling.flow import host_to_device, ode_step


def quasi_norm_advantages(
    rewards: Tensor,
    group_size: int,
    p: float = 0.8,
    clamp: float = 5.0,
    eps: float = 1e-4,
    spread_tol: float = 1e-6,
) -> Advantages:
    """Neighbor GRPO's group-wise quasi-norm reweighting (arXiv 2511.16955, eq. 11):

        c_i = r_i - mean_group(r),   A_i = c_i / (||c||_p / sqrt(G) + eps),   clamped

    with ||c||_p = (sum_k |c_k|^p)^(1/p) over the group. The paper writes A_i / ||A||_p and
    leaves the scale open; we scale by sqrt(G) so that p = 2 is exactly GRPO's per-group
    z-score (`group_advantages(std="group")`). With p < 2 the norm grows when the spread is
    shared evenly among many rollouts (a flat group with small differences everywhere)
    relative to one where few stand out, which damps the updates of reward-flat groups
    (the paper's "reward flattening"; p = 0.8 is its best setting). Non-finite rewards and
    zero-spread groups are handled as in `group_advantages` (G counts the finite rollouts).
    """
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [B * {group_size}], got {tuple(rewards.shape)}")
    if not 0.0 < p <= 2.0:
        raise ValueError(f"p must be in (0, 2], got {p}")
    r = rewards.double().view(-1, group_size)  # [B, G]
    finite = torch.isfinite(r)
    count = finite.sum(1, keepdim=True).clamp_min(1)
    mean = torch.where(finite, r, torch.zeros_like(r)).sum(1, keepdim=True) / count
    centred = torch.where(finite, r - mean, torch.zeros_like(r))
    norm = (centred.abs() ** p).sum(1, keepdim=True) ** (1 / p)  # [B, 1]
    adv = (centred / (norm / count.sqrt() + eps)).clamp(-clamp, clamp)
    group_std = ((centred**2).sum(1) / count.squeeze(1)).sqrt()
    zero_spread = (group_std <= spread_tol) | (finite.sum(1) < 2)
    valid = finite & ~zero_spread[:, None]
    adv = torch.where(valid, adv, torch.zeros_like(adv))
    dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return Advantages(adv.flatten().to(dtype), zero_spread, valid.flatten())


def neighbor_log_probs(anchor: Tensor, candidates: Tensor, temperature: float) -> Tensor:
    """Neighbor GRPO's surrogate leaping policy (arXiv 2511.16955, eq. 8): the log-probability
    that the anchor's step lands on each candidate of its group,

        log pi(i | anchor) = log_softmax_i( -d_i / temperature ),
        d_i = mean over elements of (x_i - x_anchor)^2

    anchor [n, ...] (the anchor's next state as the policy predicts it), candidates
    [n, G, ...] (the group's recorded states at the same step) -> [n, G].

    The paper uses the squared L2 norm with no temperature, i.e. our mean with temperature
    1 / D (D elements per sample); the mean and an explicit temperature keep one setting
    meaningful across image sizes (the paper names no temperature; choosing it is ours).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if candidates.shape[0] != anchor.shape[0] or candidates.shape[2:] != anchor.shape[1:]:
        raise ValueError(
            f"candidates must be [n, G, *anchor.shape[1:]], got {tuple(candidates.shape)} "
            f"for anchors {tuple(anchor.shape)}"
        )
    d = ((candidates.float() - anchor.float()[:, None]) ** 2).flatten(2).mean(2)  # [n, G]
    return torch.log_softmax(-d / temperature, dim=1)


class NeighborGRPO(Objective):
    """Neighbor GRPO's clipped surrogate over anchors (see module docstring); it needs ODE
    rollouts that record their states (`ODETrajectory`).

    Args:
        clip_range: PPO clip epsilon on the softmax policy's ratio (the paper: 0.2).
        anchors: anchors per group and inner epoch (the paper: 4 of 12); None: every rollout.
        temperature: tau of the softmax over mean squared distances.
        quasi_norm_p: p of the quasi-norm advantages (the paper: 0.8; 2 = GRPO's z-score).
        adv_clamp: advantages are clamped to +- this.
    """

    def __init__(
        self,
        clip_range: float = 0.2,
        anchors: int | None = None,
        temperature: float = 1e-3,
        quasi_norm_p: float = 0.8,
        adv_clamp: float = 5.0,
    ):
        if anchors is not None and anchors < 1:
            raise ValueError(f"anchors must be >= 1 (or None for all), got {anchors}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 < quasi_norm_p <= 2.0:
            raise ValueError(f"quasi_norm_p must be in (0, 2], got {quasi_norm_p}")
        self.clip_range, self.anchors, self.temperature = clip_range, anchors, temperature
        self.quasi_norm_p, self.adv_clamp = quasi_norm_p, adv_clamp

    def normalise(self, rewards: Tensor, group_size: int) -> Advantages:
        return quasi_norm_advantages(rewards, group_size, p=self.quasi_norm_p, clamp=self.adv_clamp)

    def per_group(self, g: int) -> int:
        """Anchors per group of g."""
        return g if self.anchors is None else min(self.anchors, g)

    def epoch_rows(self, record, minibatches: int, device, generator=None) -> Tensor:
        """`anchors` rows per group, drawn without replacement (shuffled across groups when
        split in minibatches)."""
        g = record.group_size
        groups = len(record) // g
        pick = torch.rand(groups, g, generator=generator).argsort(1)[:, : self.per_group(g)]
        rows = (pick + torch.arange(groups)[:, None] * g).flatten()  # [B x anchors]
        if minibatches > 1:
            rows = rows[torch.randperm(rows.numel(), generator=generator)]
        return host_to_device(rows, device)

    def loss(self, inputs: LossInputs) -> tuple[Tensor, LossStats]:
        record, rows, k, policy = inputs.record, inputs.rows, inputs.k, inputs.policy
        targets, g = inputs.targets, record.group_size
        x = record.states[rows, k]  # [n, C, h, w] the anchors' states before step k
        sigma, sigma_next = record.sigmas[k], record.sigma_next[k]
        v = policy.velocity(
            x.to(policy.latent_dtype), sigma.expand(x.shape[0]), record.condition[rows]
        )
        step = ode_step(x, v.float(), sigma, sigma_next)  # [n, C, h, w], with grad
        members = (rows // g)[:, None] * g + torch.arange(g, device=rows.device)  # [n, G]
        candidates = record.next_states[members, k]  # [n, G, C, h, w]
        log_prob = neighbor_log_probs(step, candidates, self.temperature)  # [n, G]
        old = neighbor_log_probs(record.next_states[rows, k], candidates, self.temperature)
        # eq. 9 sums over a group's candidates and averages over anchors: the denominator
        # counts anchors (valid rows x anchors / G), as Flow-GRPO's counts rollouts
        denominator = targets.denominator * self.per_group(g) / g
        loss, s = clipped_policy_loss(
            log_prob,
            old,
            targets.advantages[members],
            self.clip_range,
            targets.valid[members].float(),
            denominator,
        )
        return loss, s.with_loss(loss)
