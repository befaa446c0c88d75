"""RegionNFT: DiffusionNFT on SpatialFlow-GRPO's region credit, with a scene hold (ours)."""

import weakref
from dataclasses import replace

import pytest
import torch
from helpers import shapeworld_batch, store_client, tiny_module
from test_cli import GRPO_TINY, ROOT

from lit_grpo.cli import run_cli
from lit_grpo.objectives import DiffusionNFT, LossInputs, RegionNFT
from lit_grpo.objectives.base import ALONE
from lit_grpo.objectives.nft import nft_loss, optimality
from lit_grpo.objectives.region_nft import region_nft_loss
from lit_grpo.objectives.spatialflow import SpatialFlowGRPO, region_mean
from lit_grpo.rewards import RegionReward, TranslationReward
from lit_grpo.sampling.strategies import ODETrajectory

FLAT = lambda e: e.flatten(1)  # noqa: E731  one latent element per token


@pytest.mark.parametrize("adaptive", [False, True])
def test_one_region_over_every_token_is_diffusion_nft(adaptive):
    torch.manual_seed(0)
    v, v_old, target = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    sigma, adv = torch.tensor([1.0, 0.7, 0.4]), torch.tensor([2.0, -1.0, 7.0])
    cover = torch.ones(3, 1, 4)  # tokens of 2 x 1 x 1 latent elements: mean over channels
    tokens = lambda e: e.mean(1).flatten(1)  # noqa: E731
    ours = region_nft_loss(
        v, v_old, target, sigma, adv[:, None], cover, torch.ones(1), 5.0, 0.3, adaptive, tokens
    )
    theirs = nft_loss(v, v_old, target, sigma, optimality(adv, 5.0), 0.3, adaptive)
    assert torch.allclose(ours, theirs, rtol=1e-6)


def test_region_nft_loss_by_hand():
    # two tokens, one element each: the edit region is token 0, the background token 1
    v, v_old, target = torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2), torch.ones(1, 2)
    cover = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [1, R = 2, T = 2]
    adv = torch.tensor([[2.5, -5.0]])  # r = 0.75 on the edit, 0 on the background
    # beta 0.5: v+ = [0.5, 1], v- = [-0.5, -1]; squared errors against 1:
    # token 0: v+ 0.25, v- 2.25 -> (0.75 * 0.25 + 0.25 * 2.25) / 0.5 = 1.5
    # token 1: v+ 0, v- 4 -> (0 * 0 + 1 * 4) / 0.5 = 8
    loss = lambda w: region_nft_loss(  # noqa: E731
        v, v_old, target, torch.ones(1), adv, cover, torch.tensor(w), 5.0, 0.5, False, FLAT
    )
    assert torch.allclose(loss([1.0, 0.0]), torch.tensor([1.5]))
    assert torch.allclose(loss([1.0, 1.0]), torch.tensor([(1.5 + 8) / 2]))
    assert torch.allclose(loss([1.0, 3.0]), torch.tensor([(1.5 + 3 * 8) / 4]))


def test_a_zero_weight_regions_advantages_never_reach_loss_or_gradient():
    torch.manual_seed(1)
    v = torch.randn(2, 1, 2, 2, requires_grad=True)
    v_old, target = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    cover = torch.rand(2, 2, 4)
    weights = torch.tensor([1.0, 0.0])

    def loss_and_grad(background_adv):
        adv = torch.tensor([[1.0, background_adv], [-2.0, background_adv]])
        loss = region_nft_loss(
            v, v_old, target, torch.ones(2), adv, cover, weights, 5.0, 0.1, True, FLAT
        ).sum()
        return loss, torch.autograd.grad(loss, v)[0]

    loss, grad = loss_and_grad(0.0)
    for other in (3.0, -4.0, float("inf"), float("nan")):
        other_loss, other_grad = loss_and_grad(other)
        assert torch.equal(other_loss, loss) and torch.equal(other_grad, grad)


def region_nft_setup(**objective_kwargs):
    """A tiny GRPO stage on RegionNFT (ODE rollouts, 2 trained levels), its adapter moved off
    the reference, one rollout batch of it and every row at level 0."""
    # the background's weight: the tiny random editor's edit regions all score alike
    weights = {"edit": 1.0, "background": 1.0}
    objective = RegionNFT(**{"region_weights": weights, **objective_kwargs})
    module = tiny_module(
        [RegionReward([TranslationReward()])],
        objective=objective,
        strategy=ODETrajectory(steps=[0, 2]),
    )
    for name, p in module.policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=1.0)
    batch = shapeworld_batch(2, objects=(2, 3))
    record = module.sample(batch, torch.Generator().manual_seed(0))
    _, targets = module.advantages(module.scorer(record.images, batch, 4), record)
    rows = torch.arange(len(record))
    return module, LossInputs(module.policy, module.sampler, record, targets, rows, 0)


def test_targets_are_spatialflows_region_advantages_and_cover():
    module, inputs = region_nft_setup()
    batch = shapeworld_batch(2, objects=(2, 3))
    scores = module.scorer(inputs.record.images, batch, 4)
    weights = {"edit": 1.0, "background": 1.0}
    theirs = SpatialFlowGRPO(region_weights=weights).advantages(scores, 4, ALONE, module.policy)[1]
    ours = module.objective.advantages(scores, 4, ALONE, module.policy)[1]
    assert ours.regions.shape == (8, 3) and ours.cover.shape == (8, 3, 16)
    assert ours.regions.abs().sum() > 0 and ours.valid.all()
    assert torch.equal(ours.regions, theirs.regions) and torch.equal(ours.cover, theirs.cover)


def test_scene_hold_is_beta_times_the_held_regions_velocity_gap_at_nfts_level():
    held = {"others": 1.0, "background": 1.0}
    module, inputs = region_nft_setup(hold_beta=0.5, hold_region_weights=held)
    objective, policy, record = module.objective, module.policy, inputs.record
    with_hold, stats = objective.loss(inputs)
    noise, _ = objective.draws(inputs)
    # the hold by hand: NFT's own noised state at level 0, both velocities, held regions
    sigma = record.sigmas[0]
    x_s = (1 - sigma) * record.latents.float() + sigma * noise[:, 0]
    s = sigma.expand(len(record))
    with torch.no_grad():
        v = policy.velocity(x_s, s, record.condition)
        with policy.reference():
            v_ref = policy.velocity(x_s, s, record.condition)
    per_token = policy.latent_to_tokens((v - v_ref) ** 2, tuple(record.images.shape[-2:]))
    expected = region_mean(per_token, inputs.targets.cover, torch.tensor([0.0, 1.0, 1.0]))
    expected = (expected * inputs.weights).sum() / inputs.targets.denominator
    assert expected > 0
    assert stats.hold.item() == pytest.approx(expected.item(), rel=1e-5)
    objective.hold_beta = 0.0
    without, _ = objective.loss(inputs)
    assert (with_hold - without).item() == pytest.approx(0.5 * expected.item(), rel=1e-3)


def test_through_the_module_one_whole_image_region_is_diffusion_nft():
    # region weights on the background only, and a record whose background covers every
    # token: the loss is DiffusionNFT's on the background's advantages, same draws
    module, inputs = region_nft_setup(region_weights={"background": 1.0})
    n, tokens = inputs.targets.cover.shape[0], inputs.targets.cover.shape[2]
    cover = torch.zeros(n, 3, tokens)
    cover[:, 2] = 1.0
    targets = replace(inputs.targets, cover=cover)
    ours, _ = module.objective.loss(replace(inputs, targets=targets))
    nft = DiffusionNFT()
    nft._record = weakref.ref(inputs.record)
    nft._noise, nft._v_old = module.objective.draws(inputs)
    plain = replace(targets, advantages=targets.regions[:, 2])
    theirs, _ = nft.loss(replace(inputs, targets=plain))
    assert torch.allclose(ours, theirs, rtol=1e-5)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="needs the regions to hold"):
        RegionNFT(hold_beta=1.0)
    with pytest.raises(ValueError, match="no region a weight > 0"):
        RegionNFT(region_weights={"edit": 0.0})
    with pytest.raises(ValueError, match="beta must be > 0"):
        RegionNFT(beta=0.0)
    with pytest.raises(ValueError, match="needs a LoRA adapter"):
        tiny_module(
            [RegionReward([TranslationReward()])],
            objective=RegionNFT(hold_beta=1.0, hold_region_weights={"background": 1.0}),
            strategy=ODETrajectory(),
            lora=None,
        )


def test_spatialflow_nft_config_fits_through_the_cli_and_logs_the_hold(in_tmp):
    config = str(ROOT / "configs/spatialflow_nft.yaml")
    args = [*GRPO_TINY, "--model.init_args.strategy.init_args.steps=[0, 3]"]
    cli = run_cli(["fit", "--config", config, *args])
    lora = {n: p for n, p in cli.model.named_parameters() if "lora_" in n}
    initial = dict(run_cli(["--config", config, *args], run=False).model.named_parameters())
    assert lora and any(not torch.equal(p.detach(), initial[n].detach()) for n, p in lora.items())
    client = store_client(in_tmp)
    experiment = client.get_experiment_by_name("shapeworld-region-nft").experiment_id
    (run,) = client.search_runs([experiment])
    for key in ("train/loss", "train/hold", "reward/region_edit", "val/reward"):
        assert key in run.data.metrics, key
    assert run.data.metrics["train/hold"] >= 0
