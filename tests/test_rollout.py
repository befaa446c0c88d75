"""The rollout sampler: the same rollouts as before it existed, log-prob reductions, noise
builders, float32 transitions under bf16 latents, attention maps; what rewards may see."""

import pytest
import torch
from helpers import tiny_policy

from lit_grpo.datamodules.shapeworld import ShapeWorld
from lit_grpo.objectives.flow_grpo import clipped_policy_loss, kl_to_reference
from lit_grpo.rewards import EditSpec, Scorer, TranslationReward
from lit_grpo.rewards.base import Reward, RewardFailed, RewardOutput
from lit_grpo.sampling.noise import IndependentNoise, NoiseBuilder, SharedInitialNoise
from lit_grpo.sampling.rollout import RolloutSampler
from lit_grpo.sampling.sde import reduce_log_prob, sde_std, sde_step
from lit_grpo.sampling.strategies import EarlyExit, FullTrajectory


def conditions(n=2, resolution=32):
    data = ShapeWorld("val", 8, resolution, ("translate", "rotate", "scale"), seed=0)
    return torch.utils.data.default_collate([data[i] for i in range(n)])


def sample(strategy, policy=None, noise=None, seed=7, **kw):
    batch = conditions()
    sampler = RolloutSampler(steps=6, noise=noise)
    plan = strategy.plan(6)
    gen = torch.Generator().manual_seed(seed)
    return sampler(
        policy or tiny_policy(open_gates=False),
        batch["source"],
        batch["instruction"],
        3,
        plan,
        gen,
        **kw,
    )


# Recorded with GRPOModule.rollout before the sampler was split out of it (commit 1483bb1):
# same policy (seed 0, width 32, depth 1), conditions (ShapeWorld val 0-1), generator seed 7.
BEFORE = {
    "full": dict(
        states=-681.9608433949761,
        next_states=-853.9801985933445,
        images=9154.28225043416,
        first=[-1.4256242513656616, -1.315486192703247, -0.8591902256011963,
               -0.49787187576293945, -0.18737202882766724],
        last=[-1.4167925119400024, -1.3083868026733398, -0.8684810996055603,
              -0.527564287185669, -0.17893445491790771],
    ),
    "early4": dict(
        states=-545.4131937169004,
        next_states=-735.9321163510904,
        images=9153.200521945953,
        first=[-1.4256242513656616, -1.315486192703247, -0.8591902256011963,
               -0.49787187576293945],
        last=[-1.4167925119400024, -1.3083868026733398, -0.8684810996055603,
              -0.527564287185669],
    ),
}  # fmt: skip


@pytest.mark.parametrize("name,strategy", [("full", FullTrajectory()), ("early4", EarlyExit(4))])
def test_same_seed_gives_the_rollouts_recorded_before_the_change(name, strategy):
    record = sample(strategy)
    want = BEFORE[name]
    assert record.states.double().sum().item() == pytest.approx(want["states"], abs=1e-9)
    assert record.next_states.double().sum().item() == pytest.approx(want["next_states"], abs=1e-9)
    assert record.images.double().sum().item() == pytest.approx(want["images"], abs=1e-9)
    assert record.log_probs()[0].tolist() == want["first"]  # bit for bit
    assert record.log_probs()[-1].tolist() == want["last"]


def test_per_element_log_probs_reduce_to_the_per_sample_values():
    record = sample(FullTrajectory())
    elements = record.log_probs("none")
    assert elements.shape == record.states.shape == (6, 5, 3, 32, 32)
    assert torch.equal(record.log_probs("mean"), elements.flatten(2).mean(2))
    assert torch.allclose(record.log_probs("sum"), elements.flatten(2).sum(2))
    # each stored step is what an SDE step scores for that transition, element by element
    k, s = 2, record.sigmas
    policy = tiny_policy(open_gates=False)
    v = policy.velocity(record.states[:, k], s[k].expand(6), record.condition)
    again = sde_step(
        record.states[:, k], v, s[k], record.sigma_next[k], 1.0,
        prev_sample=record.next_states[:, k], reduction="none", sigma_max=record.sigma_max,
    )  # fmt: skip
    assert torch.allclose(again.log_prob, elements[:, k], atol=1e-5)


class CountingNoise(NoiseBuilder):
    """Constant noise: every rollout of a group ends up identical."""

    def __init__(self):
        self.calls = []

    def initial(self, like, group_size, generator=None, regions=None):
        self.calls.append(("initial", None))
        return torch.zeros_like(like)

    def step(self, like, group_size, step, generator=None, regions=None):
        self.calls.append(("step", step))
        return torch.zeros_like(like)


def test_a_swapped_noise_builder_is_used():
    noise = CountingNoise()
    record = sample(EarlyExit(3), policy=tiny_policy(open_gates=True), noise=noise)
    assert noise.calls == [("initial", None), ("step", 0), ("step", 1), ("step", 2)]
    assert torch.equal(record.images[0], record.images[1])  # no randomness left in a group
    assert not torch.equal(record.images[0], record.images[3])  # another condition


def test_shared_initial_noise_is_shared_within_groups_only():
    torch.manual_seed(0)
    like = torch.empty(6, 3, 4, 4)
    x = SharedInitialNoise().initial(like, 3, torch.Generator().manual_seed(0))
    assert torch.equal(x[0], x[2]) and not torch.equal(x[0], x[3])
    with pytest.raises(ValueError, match="groups of 4"):
        SharedInitialNoise().initial(like, 4)
    ind = IndependentNoise().initial(like, 3, torch.Generator().manual_seed(0))
    assert not torch.equal(ind[0], ind[1])


def test_bf16_latents_keep_float32_transitions_and_the_first_ratio_is_one():
    policy = tiny_policy(open_gates=True).to(torch.bfloat16)
    batch = conditions()
    sampler = RolloutSampler(steps=6)
    plan = FullTrajectory().plan(6)
    gen = torch.Generator().manual_seed(3)
    src = batch["source"].to(torch.bfloat16)
    record = sampler(policy, src, batch["instruction"], 3, plan, gen)
    assert record.states.dtype == record.next_states.dtype == torch.float32
    assert record.latents.dtype == torch.bfloat16
    rows = torch.arange(6)
    for k in range(record.num_trained_steps):
        step = sampler.rescore(policy, record, rows, k)
        new, old = reduce_log_prob(step.log_prob), record.step_log_prob(k)
        _, stats = clipped_policy_loss(new, old, torch.ones(6), 2e-4)
        assert stats.ratio_mean.item() == 1.0, k


def test_attention_maps_are_recorded_when_asked():
    record = sample(EarlyExit(2), attention=True)
    # 6 rollouts, 16 instruction tokens, the 8 x 8 token grid of a 32 px image (patch 4)
    assert record.attention.shape == (6, 16, 8, 8)
    batch = conditions()
    ids, mask = tiny_policy(open_gates=False).tokenizer(batch["instruction"])
    mask = mask.repeat_interleave(3, 0)
    sums = record.attention.flatten(2).sum(-1)
    assert (sums[~mask] == 0).all()  # padding tokens carry no map
    assert ((sums[mask] > 0) & (sums[mask] <= 1 + 1e-5)).all()  # a share of the attention
    assert sample(EarlyExit(2)).attention is None


def test_kl_uses_flow_grpos_sigma_level_std():
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    s, s1 = torch.tensor(0.5), torch.tensor(0.4)
    step = sde_step(x, v, s, s1, 1.0, generator=torch.Generator().manual_seed(0))
    ref = sde_step(x, v + 0.1, s, s1, 1.0, prev_sample=step.sample)
    assert torch.allclose(step.diffusion, sde_std(s, s1, 1.0).expand(2))
    assert torch.allclose(step.std, step.diffusion * 0.1**0.5)
    kl = kl_to_reference(step.mean, ref.mean, step.diffusion)
    sq = ((step.mean - ref.mean) ** 2).flatten(1).mean(1)
    assert torch.allclose(kl, sq / (2 * 1.0**2))  # std = sqrt(0.5 / 0.5) = 1, no sqrt(-dt)


def test_loss_inputs_of_different_shapes_raise_instead_of_broadcasting():
    logp = torch.zeros(4, 4)  # per token, N = T = 4: broadcasting would go unnoticed
    with pytest.raises(ValueError, match="one shape"):
        clipped_policy_loss(logp, logp, torch.ones(4), 0.1)
    loss, _ = clipped_policy_loss(logp, logp, torch.ones(4)[:, None].expand(4, 4), 0.1)
    assert loss.item() == -1.0


class SpyReward(Reward):
    name = "spy"
    seen = None

    def forward(self, inputs):
        SpyReward.seen = inputs
        return RewardOutput(torch.zeros(inputs.images.shape[0]))


class WrongShapeReward(Reward):
    name = "wrong"

    def forward(self, inputs):
        return RewardOutput(torch.zeros(inputs.images.shape[0], 2))


def test_rewards_see_the_edit_spec_and_detections_never_the_ground_truth():
    batch = conditions(3)
    scorer = Scorer([SpyReward(), TranslationReward()])
    scores = scorer(batch["source"].repeat_interleave(2, 0), batch, 2)
    inputs = SpyReward.seen
    assert scores.total.shape == (6,) and inputs.spec.task == [
        t for t in batch["task"] for _ in "ab"
    ]
    assert torch.equal(inputs.spec.angle, batch["angle"].repeat_interleave(2))
    assert inputs.instructions[1] == batch["instruction"][0]
    seen = set(vars(inputs)) | set(vars(inputs.spec))
    for truth in ("target", "mask_after", "box_after", "centre_after", "batch"):
        assert truth not in seen
    assert torch.equal(EditSpec.from_batch(batch).factor, batch["factor"])
    with pytest.raises(RewardFailed) as err:
        Scorer([WrongShapeReward()])(batch["source"], batch)
    assert str(err.value) == (
        "reward WrongShapeReward 'wrong' returned scores of shape (3, 2); the contract is "
        "[N] = (3,), one score per edit"
    )
    with pytest.raises(KeyError, match="edit-spec"):
        EditSpec.from_batch({"source": batch["source"]})


def test_two_rewards_of_one_name_log_under_their_own_keys():
    from lit_grpo.rewards import Scorer, TranslationReward

    batch = torch.utils.data.default_collate(
        [ShapeWorld("train", 2, 16, ("translate",))[i] for i in range(2)]
    )
    near, far = TranslationReward(move_fraction=0.25), TranslationReward(move_fraction=0.5)
    scores = Scorer([near, far])(batch["target"], batch)
    assert set(scores.parts) >= {"translation", "translation_2"}
    assert not torch.equal(scores.parts["translation"], scores.parts["translation_2"])
