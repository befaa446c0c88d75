"""RC-GRPO-Editing as the paper runs it: deterministic ODE rollouts from region-decoupled
initial noise, and Neighbor GRPO's policy objective (He et al., arXiv 2511.16955).

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

RC-GRPO's part: the perturbation acts inside the edit region only (outside a group shares
eps*), and the attention concentration reward (`RCGRPOModule`'s plumbing).
"""

import torch
from torch import Tensor

from lit_grpo.modules.objectives import (
    Advantages,
    clipped_policy_loss,
    neighbor_log_probs,
    quasi_norm_advantages,
)
from lit_grpo.modules.rcgrpo import RCGRPOModule
from lit_grpo.modules.update import ClippedUpdate, PolicyTargets
from lit_grpo.policies.base import EditPolicy
from lit_grpo.rewards.base import Reward
from lit_grpo.sampling.flow import host_to_device, ode_step
from lit_grpo.sampling.noise import RegionDecoupledNoise
from lit_grpo.sampling.rollout import RolloutRecord, RolloutSampler
from lit_grpo.sampling.strategies import ODETrajectory


class NeighborUpdate(ClippedUpdate):
    """Neighbor GRPO's clipped surrogate over anchors (see module docstring).

    Args (beside `ClippedUpdate`'s; `kl_beta` must be 0):
        anchors: anchors per group and inner epoch (None: every rollout).
        temperature: tau of the softmax over mean squared distances.
    """

    def __init__(self, *settings, anchors: int | None = None, temperature: float = 1e-3):
        super().__init__(*settings)
        if self.kl_beta > 0:
            raise ValueError("Neighbor GRPO has no KL term here: set kl_beta to 0")
        if anchors is not None and anchors < 1:
            raise ValueError(f"anchors must be >= 1 (or None for all), got {anchors}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.anchors, self.temperature = anchors, temperature

    def _per_group(self, g: int) -> int:
        return g if self.anchors is None else min(self.anchors, g)

    def epoch_rows(
        self, record: RolloutRecord, targets: PolicyTargets, device, generator=None
    ) -> Tensor:
        g = record.group_size
        groups = len(record) // g
        pick = torch.rand(groups, g, generator=generator).argsort(1)[:, : self._per_group(g)]
        rows = (pick + torch.arange(groups)[:, None] * g).flatten()  # [B x anchors]
        if self.minibatches > 1:
            rows = rows[torch.randperm(rows.numel(), generator=generator)]
        return host_to_device(rows, device)

    def step_loss(
        self,
        module,
        sampler: RolloutSampler,
        record: RolloutRecord,
        targets: PolicyTargets,
        rows: Tensor,
        k: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        g, policy = record.group_size, module.policy
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
        # counts anchors (valid rows x anchors / G), as ClippedUpdate counts rollouts
        denominator = targets.denominator * self._per_group(g) / g
        loss, s = clipped_policy_loss(
            log_prob,
            old,
            targets.advantages[members],
            self.clip_range,
            targets.valid[members].float(),
            denominator,
        )
        return loss, {
            "loss": loss.detach(),
            "approx_kl": s.approx_kl,
            "clip_fraction": s.clip_fraction,
            "ratio": s.ratio_mean,
        }


class NeighborRCGRPOModule(RCGRPOModule):
    """RC-GRPO-Editing (paper path): ODE rollouts, region-decoupled perturbed initial noise,
    Neighbor GRPO's objective and quasi-norm advantages (see module docstring). Takes every
    `RCGRPOModule` argument; `strategy` defaults to `ODETrajectory()` and `noise` to
    `RegionDecoupledNoise(perturbation)`; `noise_level` and `kl_beta` do not apply (kl_beta
    must stay 0).

    Args:
        perturbation: sigma of eq. 7 inside the edit region (the paper: 0.3 on whole images).
        anchors: anchors per group (the paper: 4 of 12); None: every rollout.
        temperature: tau of the distance softmax (mean squared distance per element).
        quasi_norm_p: p of the quasi-norm advantages (the paper: 0.8; 2 = GRPO's z-score).
    """

    def __init__(
        self,
        policy: EditPolicy,
        rewards: list[Reward],
        perturbation: float = 0.3,
        anchors: int | None = None,
        temperature: float = 1e-3,
        quasi_norm_p: float = 0.8,
        **kwargs,
    ):
        self.perturbation, self.anchors, self.temperature = perturbation, anchors, temperature
        self.quasi_norm_p = quasi_norm_p
        if kwargs.get("strategy") is None:
            kwargs["strategy"] = ODETrajectory()
        if kwargs.get("kl_beta", 0.0) > 0:
            raise ValueError("NeighborRCGRPOModule has no KL term: set kl_beta to 0")
        super().__init__(policy, rewards, **kwargs)

    def default_noise(self) -> RegionDecoupledNoise:
        return RegionDecoupledNoise(perturbation=self.perturbation)

    def build_updater(self, *settings) -> ClippedUpdate:
        return NeighborUpdate(*settings, anchors=self.anchors, temperature=self.temperature)

    def normalise(self, rewards: Tensor, group_size: int) -> Advantages:
        return quasi_norm_advantages(
            rewards, group_size, p=self.quasi_norm_p, clamp=self.hparams.adv_clamp
        )
