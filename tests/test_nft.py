"""DiffusionNFT: exact values of its loss, v_old fixed at the sampling policy, a CLI fit."""

import contextlib
import weakref

import pytest
import torch
from helpers import store_client
from test_cli import GRPO_TINY, ROOT

from lit_grpo.cli import run_cli
from lit_grpo.objectives import DiffusionNFT, LossInputs, PolicyTargets
from lit_grpo.objectives.nft import nft_loss, optimality
from lit_grpo.sampling.rollout import RolloutSampler


def test_optimality_by_hand():
    a = torch.tensor([-10.0, -2.5, 0.0, 5.0, 7.0])
    assert torch.equal(optimality(a, 5.0), torch.tensor([0.0, 0.25, 0.5, 1.0, 1.0]))


# one image of two elements: v = [1, 0], v_old = [0, 0], target = [1, 1], beta 0.5, r 0.75
V, V_OLD, TARGET = torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.ones(1, 2)
R, SIGMA = torch.tensor([0.75]), torch.tensor([0.5])


def test_nft_loss_by_hand_paper_weighting():
    # v+ = 0.5 v + 0.5 v_old = [0.5, 0]: mean sq error (0.25 + 1) / 2 = 0.625
    # v- = 1.5 v_old - 0.5 v = [-0.5, 0]: (2.25 + 1) / 2 = 1.625
    # (0.75 * 0.625 + 0.25 * 1.625) / 0.5 = 1.75
    loss = nft_loss(V, V_OLD, TARGET, SIGMA, R, beta=0.5, adaptive=False)
    assert torch.allclose(loss, torch.tensor([1.75]))


def test_nft_loss_by_hand_adaptive_weighting():
    # x0 errors sigma (v -+ target): [-0.25, -0.5] -> mse 0.15625 / mae 0.375 = 5/12;
    # [-0.75, -0.5] -> 0.40625 / 0.625 = 0.65; (0.75 * 5/12 + 0.25 * 0.65) / 0.5 = 0.95
    loss = nft_loss(V, V_OLD, TARGET, SIGMA, R, beta=0.5, adaptive=True)
    assert torch.allclose(loss, torch.tensor([0.95]))


@pytest.mark.parametrize("r", [0.0, 0.75, 1.0])
def test_first_gradient_is_flow_matching_weighted_by_2r_minus_1(r):
    # with v_old = v (the update's first step): d/dv = 2 / D (2r - 1)(v - target), any beta
    v = V.clone().requires_grad_()
    loss = nft_loss(v, V.clone(), TARGET, SIGMA, torch.tensor([r]), beta=0.3, adaptive=False)
    loss.sum().backward()
    assert torch.allclose(v.grad, (2 * r - 1) * (V - TARGET), atol=1e-6)  # 2 / D = 1, D = 2


class _Policy(torch.nn.Module):
    """velocity = w x; the reference (adapter-off view) has w = 0."""

    latent_dtype = torch.float32

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.off = False

    def velocity(self, x, sigma, condition):
        return torch.zeros_like(x) if self.off else self.w * x

    @contextlib.contextmanager
    def reference(self):
        self.off = True
        try:
            yield
        finally:
            self.off = False


class _Record:
    def __init__(self, latents):
        self.latents, self.condition = latents, torch.zeros(latents.shape[0])
        self.sigmas = torch.tensor([1.0, 0.5])

    def __len__(self):
        return self.latents.shape[0]

    @property
    def num_trained_steps(self):
        return 2


def test_v_old_is_the_sampling_policy_for_the_whole_update():
    torch.manual_seed(0)
    policy, record, nft = _Policy(), _Record(torch.randn(2, 1, 2, 2)), DiffusionNFT()
    targets = PolicyTargets(torch.tensor([1.0, -1.0]), torch.tensor([True, True]), 2.0)
    inputs = LossInputs(policy, RolloutSampler(), record, targets, torch.arange(2), 1)
    assert nft.terms(record) == 2
    _, first = nft.loss(inputs)
    assert first.approx_kl == 0  # v_theta = v_old before any step
    noise, v_old = nft.draws(inputs)
    with torch.no_grad():
        policy.w.fill_(1.5)  # an optimiser step: v_old stays the sampling policy's
    _, later = nft.loss(inputs)
    assert torch.equal(nft.draws(inputs)[1], v_old)
    x_s = 0.5 * record.latents + 0.5 * noise[:, 1]
    assert torch.allclose(later.approx_kl, ((0.5 * x_s) ** 2).mean())
    # a new record draws again, under the policy as it is now
    fresh = LossInputs(policy, RolloutSampler(), _Record(record.latents), targets, inputs.rows, 1)
    nft.loss(fresh)
    assert not torch.equal(nft.draws(fresh)[1], v_old)


def test_noise_comes_from_the_modules_generator_not_the_global_rng():
    record, state = _Record(torch.randn(2, 1, 2, 2)), torch.get_rng_state()
    a, b = DiffusionNFT(), DiffusionNFT()
    a.epoch_rows(record, 1, "cpu", torch.Generator().manual_seed(3))
    b.epoch_rows(record, 2, "cpu", torch.Generator().manual_seed(3))
    assert torch.equal(a._noise, b._noise) and a._noise.shape == (2, 2, 1, 2, 2)
    assert torch.equal(torch.get_rng_state(), state)
    noise = a._noise
    a.epoch_rows(record, 1, "cpu", torch.Generator().manual_seed(4))  # a second inner epoch
    assert a._noise is noise


def test_kl_term_against_the_reference_by_hand():
    torch.manual_seed(0)
    policy, record = _Policy(), _Record(torch.randn(2, 1, 2, 2))
    targets = PolicyTargets(torch.zeros(2), torch.tensor([True, False]), 1.0)
    inputs = LossInputs(policy, RolloutSampler(), record, targets, torch.arange(2), 0)
    nft = DiffusionNFT(kl_beta=0.1)
    loss, stats = nft.loss(inputs)
    noise, _ = nft.draws(inputs)
    # level 0 is sigma 1: x_s = noise, v = x_s and v_ref = 0, so the KL of the one valid row
    # is mean(noise^2); the loss is the NFT loss plus 0.1 of it
    assert torch.allclose(stats.kl, (noise[0, 0] ** 2).mean())
    plain = DiffusionNFT()
    plain._record, plain._noise, plain._v_old = weakref.ref(record), *nft.draws(inputs)
    assert torch.allclose(loss, plain.loss(inputs)[0] + 0.1 * stats.kl)


def test_nft_fit_through_cli_trains_lora(in_tmp):

    config = str(ROOT / "configs/nft.yaml")
    args = [*GRPO_TINY, "--model.init_args.strategy.init_args.steps=[0, 3]"]
    cli = run_cli(["fit", "--config", config, *args])
    lora = {n: p for n, p in cli.model.named_parameters() if "lora_" in n}
    initial = dict(run_cli(["--config", config, *args], run=False).model.named_parameters())
    assert lora and all(not torch.equal(p.detach(), initial[n].detach()) for n, p in lora.items())
    client = store_client(in_tmp)
    (run,) = client.search_runs([client.get_experiment_by_name("shapeworld-nft").experiment_id])
    for key in ("train/loss", "train/approx_kl", "reward/total", "val/reward"):
        assert key in run.data.metrics, key
