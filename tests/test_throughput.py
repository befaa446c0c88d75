"""Memory and speed: micro-batching, activation checkpointing, no host syncs inside a GRPO
step, and the throughput callback."""

import math

import lightning as L
import pytest
import torch
from helpers import (
    Brightness,
    ConstantReward,
    quiet_trainer,
    shapeworld_batch,
    tiny_data,
    tiny_module,
    tiny_policy,
)
from torch.overrides import TorchFunctionMode

from lit_grpo.callbacks import ThroughputMonitor
from lit_grpo.perception.detections import Detections
from lit_grpo.rewards import TranslationReward


class EverywhereSegmenter:
    """Finds "the object" everywhere, with tensor ops only (no host round trip)."""

    def __call__(self, images, phrases):
        n, _, h, w = images.shape
        full = torch.ones(n, h, w, dtype=torch.bool, device=images.device)
        box = images.new_tensor([0.0, 0.0, w, h]).expand(n, 4)
        return Detections(
            found=full[:, 0, 0],
            mask=full,
            box=box,
            centre=box[:, 2:] / 2,
            angle=images.new_zeros(n),
            area=images.new_full((n,), float(h * w)),
        )


def make_module(rewards=None, segmenter=None, checkpointing=False, **kw):
    """The tiny GRPO stage on a 2-block policy, 3 sampling steps, the translation reward."""
    policy = tiny_policy(depth=2, activation_checkpointing=checkpointing)
    rewards = rewards or [TranslationReward()]
    return tiny_module(
        rewards=rewards, policy=policy, segmenter=segmenter, **{"sample_steps": 3, **kw}
    )


def fit(module, steps=1, callbacks=(), **trainer_kw):
    trainer = quiet_trainer(max_steps=steps, max_epochs=10, callbacks=list(callbacks), **trainer_kw)
    trainer.fit(module, tiny_data(val_size=2))
    return trainer


class GradientRecorder(L.Callback):
    """The gradients of every optimiser step, as the update accumulated them (before
    clipping)."""

    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        assert grads, "no gradient reached the optimiser"
        self.steps.append(grads)


# --- micro-batching ------------------------------------------------------------------------
def test_micro_batched_sampling_draws_the_same_rollouts():
    batch = shapeworld_batch()
    whole = make_module().sample(batch, torch.Generator().manual_seed(3))
    module = make_module(micro_batch_size=3)  # 8 rollouts in chunks of 3, 3, 2
    rows = []
    velocity = module.policy.velocity
    module.policy.velocity = lambda x, s, c: rows.append(x.shape[0]) or velocity(x, s, c)
    chunked = module.sample(batch, torch.Generator().manual_seed(3))
    assert rows == [3, 3, 2] * 3  # 3 steps, never more than 3 rows in one forward
    # the same rollouts up to float32 rounding: a forward of 3 rows and one of 8 round their
    # matrix products differently (2e-7 here); a row paired with the wrong condition or
    # noise would be off by O(1)
    for field in ("states", "next_states", "latents", "images"):
        a, b = getattr(whole, field), getattr(chunked, field)
        assert torch.allclose(a, b, atol=1e-6, rtol=0), field
    # log-probs divide the squared residual by the small SDE variance: rounding grows there
    assert torch.allclose(whole.log_prob_elements, chunked.log_prob_elements, rtol=1e-5, atol=0)
    assert torch.equal(whole.sigmas, chunked.sigmas)


def test_micro_batched_update_accumulates_the_full_batch_gradient():
    grads = {}
    for micro in (None, 3):
        recorder = GradientRecorder()
        # the whole denoiser trains (LoRA's A matrices get no gradient while B is still 0)
        module = make_module(lora=None, micro_batch_size=micro, minibatches=2)
        fit(module, callbacks=[recorder])
        grads[micro] = recorder.steps
    assert len(grads[None]) == len(grads[3]) == 2  # two minibatches, one step each
    for whole, chunked in zip(grads[None], grads[3]):
        assert whole.keys() == chunked.keys()
        for name in whole:
            scale = whole[name].abs().max().item()
            assert scale > 0, name  # every trained tensor gets a gradient
            assert torch.allclose(whole[name], chunked[name], rtol=1e-4, atol=1e-6 * scale), name


def test_micro_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="micro_batch_size must be >= 1"):
        make_module(micro_batch_size=0)


# --- activation checkpointing --------------------------------------------------------------
def _loss_and_grads(policy, batch):
    cond = policy.encode_condition(batch["source"], list(batch["instruction"]))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        v = policy.velocity(x, torch.tensor([0.7, 0.3]), cond)
    loss = (v**2).mean()
    params = [p for p in policy.denoiser.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), grads, len(saved)


def test_activation_checkpointing_gives_the_same_loss_and_gradient_with_less_kept():
    batch = shapeworld_batch()
    plain = make_module().policy
    ckpt = make_module(checkpointing=True).policy
    assert ckpt.checkpointing_activations and not plain.checkpointing_activations
    loss_a, grads_a, saved_a = _loss_and_grads(plain, batch)
    loss_b, grads_b, saved_b = _loss_and_grads(ckpt, batch)
    assert torch.equal(loss_a, loss_b)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads_a, grads_b))
    assert saved_b < saved_a / 2  # the blocks keep their inputs, not their activations
    # the names LoRA and checkpoints see are unchanged, and it can be switched off again
    assert plain.state_dict().keys() == ckpt.state_dict().keys()
    ckpt.checkpoint_activations(False)
    assert not ckpt.checkpointing_activations
    assert _loss_and_grads(ckpt, batch)[2] == saved_a


def test_a_checkpointed_policy_trains_the_same_weights():
    trained = []
    for checkpointing in (False, True):
        module = make_module(lora=None, checkpointing=checkpointing)
        before = [p.detach().clone() for p in module.policy.denoiser.parameters()]
        fit(module)
        after = [p.detach() for p in module.policy.denoiser.parameters()]
        assert all(not torch.equal(a, b) for a, b in zip(before, after))
        trained.append(after)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*trained))


# --- no host syncs inside a step -------------------------------------------------------------
SYNCS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__")


class _BooleanIndex(TorchFunctionMode):
    """Records every boolean-mask index (its size is data-dependent: a host sync)."""

    def __init__(self, record, originals: dict):
        super().__init__()
        self.record, self.originals = record, originals

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            index = args[1]
            keys = index if isinstance(index, tuple) else (index,)
            if any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys):
                self.record("boolean index")
        # a counted method (`SyncCounter._wrap`) reaches here as itself: run the original,
        # or the call would be counted twice
        return self.originals.get(func, func)(*args, **(kwargs or {}))


class _ModeSwitch:
    """`on = True` enters the mode, `on = False` leaves it (monkeypatch.setattr's undo)."""

    def __init__(self, mode):
        self.mode, self._on = mode, False

    @property
    def on(self) -> bool:
        return self._on

    @on.setter
    def on(self, value: bool) -> None:
        if value and not self._on:
            self.mode.__enter__()
        elif not value and self._on:
            self.mode.__exit__(None, None, None)
        self._on = value


class SyncCounter(L.Callback):
    """Counts, while a phase of the step runs (the phase protocol: sampling, rewards,
    update), every call that would make the host wait for a GPU: reading a value back
    (`.item()`, `bool(t)`, `float(t)`, `.tolist()`, `.cpu()`, `.numpy()`, `.nonzero()`),
    a boolean-mask index (its size is data-dependent), and a tensor built from host data
    straight onto a device (a blocking copy). The calls in the "idle" gap between the
    rewards and the update (no phase running) go to `between`."""

    def __init__(self, monkeypatch):
        self.active = False
        self.gap = False  # idle after the rewards, before the update
        self.calls: list[str] = []
        self.between: list[str] = []
        self.phases: list[str] = []
        originals = {}
        for name in SYNCS:
            original = getattr(torch.Tensor, name)
            originals[counted := self._wrap(name, original)] = original
            monkeypatch.setattr(torch.Tensor, name, counted)
        # indexing is watched by a TorchFunctionMode, not by patching Tensor.__getitem__:
        # setting (and then deleting) __getitem__ on the class leaves CPython's sequence slot
        # behind, so every 0-d tensor looks like a sequence to later tests (`torch.tensor([t])`
        # raises "len() of a 0-d tensor"). The mode is entered here and left when
        # monkeypatch undoes its changes (`_ModeSwitch`).
        monkeypatch.setattr(_ModeSwitch(_BooleanIndex(self._record, originals)), "on", True)
        for name in ("tensor", "as_tensor"):
            build = getattr(torch, name)

            def built(data, *args, _build=build, _name=name, **kwargs):
                if kwargs.get("device") is not None and not isinstance(data, torch.Tensor):
                    self._record(f"torch.{_name}(host data, device=...)")
                return _build(data, *args, **kwargs)

            monkeypatch.setattr(torch, name, built)

    def _record(self, what: str) -> None:
        if self.active or self.gap:
            import traceback

            where = self.calls if self.active else self.between
            where.append(f"{what}\n{''.join(traceback.format_stack(limit=6)[:-2])}")

    def _wrap(self, name, original):
        def counted(t, *args, **kwargs):
            self._record(f"Tensor.{name}")
            return original(t, *args, **kwargs)

        return counted

    def set_phase(self, phase: str) -> None:
        self.gap = phase == "idle" and self.active and self.phases[-1] == "rewards"
        self.active = phase != "idle"
        if self.active:
            self.phases.append(phase)


def test_a_grpo_step_reads_one_value_back_from_the_device_until_it_logs(monkeypatch):
    """Sampling, scoring (with a device-side reward and segmenter), advantages and the
    update, with micro-batches, two minibatches and two inner epochs: no sync inside a
    phase; between the rewards and the update, exactly one read per step, whether anything
    trains (so that an iteration with nothing to train runs no update at all)."""
    module = make_module(
        [Brightness()],
        segmenter=EverywhereSegmenter(),
        micro_batch_size=3,
        minibatches=2,
        inner_epochs=2,
    )
    counter = SyncCounter(monkeypatch)
    trainer = fit(module, steps=2, callbacks=[counter])
    assert counter.phases == ["sampling", "rewards", "update"] * 2
    assert not counter.calls, f"{len(counter.calls)} host syncs, the first:\n{counter.calls[0]}"
    assert len(counter.between) == 2, counter.between
    assert all(c.startswith("Tensor.__bool__") and "training_step" in c for c in counter.between)
    m = trainer.callback_metrics
    assert m["train/optimizer_steps"].item() == 4.0  # the device-side steps were taken


def test_an_iteration_with_nothing_to_train_runs_no_update_pass():
    """Every group zero-spread on every step: no forward with grad, no backward, and
    neither the optimiser nor the LR schedule steps (the warm-up is not used up)."""
    module = make_module([ConstantReward()], segmenter=EverywhereSegmenter(), minibatches=2)
    with_grad = []
    velocity = module.policy.velocity
    module.policy.velocity = lambda *a: with_grad.append(torch.is_grad_enabled()) or velocity(*a)
    trainer = fit(module, steps=2)
    assert len(with_grad) == 2 * 3 and not any(with_grad)  # the rollouts' 3 steps only
    assert module.iteration == 2 and trainer.callback_metrics["train/skipped"].item() == 1.0
    assert trainer.callback_metrics["train/optimizer_steps"].item() == 0.0
    assert trainer.callback_metrics["time/update"].item() == 0.0
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 0
    assert not trainer.optimizers[0].state  # AdamW never stepped


def test_the_sync_counter_sees_a_sync(monkeypatch):
    """The counter is not blind: an `.item()` inside the update is caught."""
    module = make_module([Brightness()], segmenter=EverywhereSegmenter())
    counter = SyncCounter(monkeypatch)
    step_loss = module.objective.loss

    def with_a_sync(inputs):
        loss, stats = step_loss(inputs)
        stats.loss.item()
        return loss, stats

    module.objective.loss = with_a_sync
    fit(module, callbacks=[counter])
    assert len(counter.calls) == 2 and counter.calls[0].startswith("Tensor.item")


# --- the throughput callback ---------------------------------------------------------------
def test_throughput_monitor_counts_flops_per_phase_and_logs_rates():
    # a reward with spread in every group: both steps train (a step with nothing to train
    # runs no update phase, and the monitor logs only the phases that ran)
    module = make_module([Brightness()], segmenter=EverywhereSegmenter(), micro_batch_size=4)
    monitor = ThroughputMonitor(peak_tflops=1.0)
    trainer = fit(module, steps=2, callbacks=[monitor])
    flops = monitor.flops
    assert set(flops) >= {"sampling", "rewards", "update"}
    # the update runs forward + backward of the same rows as sampling's steps: more FLOPs
    assert flops["sampling"] > 0 and flops["update"] > flops["sampling"]
    m = trainer.callback_metrics
    for phase in ("sampling", "update"):
        rate = m[f"throughput/{phase}_tflops"].item()
        seconds = m[f"throughput/{phase}_sec"].item()
        assert rate > 0 and seconds > 0
        assert math.isclose(rate, flops[phase] / seconds / 1e12, rel_tol=1e-5)
        assert math.isclose(m[f"throughput/{phase}_mfu"].item(), rate, rel_tol=1e-5)  # peak 1
    step = m["throughput/step_sec"].item()
    assert m["throughput/images_per_sec"].item() == pytest.approx(2 * 4 / step, rel=1e-5)
    assert step >= m["throughput/sampling_sec"].item() + m["throughput/update_sec"].item()


def test_throughput_monitor_without_the_phase_protocol():
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(8, 8)

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), 0.1)

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(12, 8)), 3)
    monitor = ThroughputMonitor()
    trainer = L.Trainer(
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor],
        enable_checkpointing=False,
    )
    trainer.fit(Plain(), data)
    # the first step, counted: forward 2 * 3 * 8 * 8 (a [3, 8] x [8, 8] product), backward
    # the weight's gradient only (the input needs none): the same again
    assert monitor.flops == {"step": 2 * (2 * 3 * 8 * 8)}
    m = trainer.callback_metrics
    assert m["throughput/images_per_sec"].item() > 0 and "throughput/mfu" not in m


@pytest.mark.gpu
def test_no_cuda_sync_inside_a_step_under_sync_debug_mode():
    """On a GPU, the real check: CUDA's own sync detector raises on any synchronising call
    while a phase runs (`set_sync_debug_mode("error")` from each phase to "idle")."""

    class SyncDebug(L.Callback):
        phases = 0

        def set_phase(self, phase):
            torch.cuda.set_sync_debug_mode(0 if phase == "idle" else "error")
            self.phases += phase != "idle"

        def on_exception(self, trainer, pl_module, exception):
            torch.cuda.set_sync_debug_mode(0)

    module = make_module(
        [Brightness()], segmenter=EverywhereSegmenter(), micro_batch_size=3, minibatches=2
    )
    debug = SyncDebug()
    fit(module, steps=2, callbacks=[debug], accelerator="cuda", devices=1, precision="bf16-mixed")
    assert debug.phases == 6
