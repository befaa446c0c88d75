"""The early-exit callback on the GRPO stage: it probes, chooses argmax variance, resumes."""

import lightning as L
import numpy as np
import pytest
import torch
from helpers import quiet_trainer, tiny_data, tiny_module

from lit_grpo.callbacks import EarlyExitSelector
from lit_grpo.sampling.strategies import EarlyExit


def trainer(tmp_path, steps, callbacks):
    return quiet_trainer(
        max_steps=steps,
        max_epochs=-1,
        default_root_dir=tmp_path,
        enable_checkpointing=True,
        callbacks=callbacks,
    )


def data():
    return tiny_data(train_size=8)


def test_selector_chooses_argmax_and_resumes_with_same_k(tmp_path):
    module = tiny_module(strategy=EarlyExit(exit_step=1), sample_steps=6)
    selector = EarlyExitSelector(candidates=[1, 3, 5], every_n_steps=2)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit = trainer(tmp_path, 3, [selector, ckpt])
    fit.fit(module, data())
    assert [h["step"] for h in selector.history] == [0, 2]
    for h in selector.history:
        best = max(range(3), key=lambda i: h["variances"][i])
        assert h["exit_step"] == [1, 3, 5][best]
    assert module.strategy.exit_step == selector.exit_step
    assert "early_exit/K" in fit.callback_metrics and "early_exit/var_k3" in fit.callback_metrics

    # resume in a fresh process state: the K and the history come back from the checkpoint
    resumed_module = tiny_module(strategy=EarlyExit(exit_step=1), sample_steps=6)
    resumed = EarlyExitSelector(candidates=[1, 3, 5], every_n_steps=100)
    seen = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.strategy.exit_step)

    trainer(tmp_path, 4, [resumed, Spy()]).fit(
        resumed_module, data(), ckpt_path=str(tmp_path / "last.ckpt")
    )
    assert resumed.history == selector.history
    assert seen == [selector.exit_step]  # step 3 trained with the K chosen before the stop


def test_selector_refuses_a_module_without_the_protocol(tmp_path):
    from helpers import PlainModule, plain_loader

    with pytest.raises(TypeError, match="exit_step_variance"):
        trainer(tmp_path, 1, [EarlyExitSelector([1, 2])]).fit(PlainModule(), plain_loader())


def test_warmup_ema_forgets_the_initialisation():
    from lit_grpo.callbacks.ema import warmup_ema

    avg_fn = warmup_ema(0.995)
    init, trained = torch.zeros(1), torch.ones(1)
    avg = init
    for n in range(1, 201):  # AveragedModel calls avg_fn with n = 1, 2, ... after its first copy
        avg = avg_fn(avg, trained, torch.tensor(n))
    # a constant 0.995 would still hold 0.995^200 = 37% of the initial weights
    assert 1 - avg.item() < 0.03
    with pytest.raises(ValueError):
        from lit_grpo.callbacks import EMAWeightAveraging

        EMAWeightAveraging(decay=1.0)


def test_variance_profile_is_logged_as_an_image(tmp_path):
    class Peaked(L.LightningModule):
        """Variance peaks at exit step 2; nothing else happens."""

        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)
            self.exit_step = None

        def exit_step_variance(self, batch, candidates):
            return torch.tensor([1.0 / (1 + abs(k - 2)) for k in candidates])

        def set_exit_step(self, step):
            self.exit_step = step

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), 0.1)

    from PIL import Image

    logger = L.pytorch.loggers.CSVLogger(tmp_path)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)))
    model = Peaked()
    L.Trainer(
        max_steps=3,
        logger=logger,
        callbacks=[EarlyExitSelector([1, 2, 3], every_n_steps=2)],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(model, loader)
    assert model.exit_step == 2
    pngs = sorted((tmp_path / "lightning_logs").rglob("early_exit_variance_*.png"))
    assert [p.name for p in pngs] == [
        "early_exit_variance_000000.png",
        "early_exit_variance_000002.png",
    ]
    image = np.asarray(Image.open(pngs[-1]).convert("RGB")).astype(int)
    assert image.shape == (320, 500, 3)
    red = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)
    assert red.sum() > 20  # the chosen-K markers


def test_probes_and_window_moves_count_grpo_iterations_not_optimizer_steps(tmp_path):
    from lit_grpo.sampling.strategies import SlidingWindow

    # 2 minibatches: every GRPO iteration takes 2 optimiser steps, and one global step
    module = tiny_module(strategy=EarlyExit(exit_step=1), sample_steps=6, minibatches=2)
    selector = EarlyExitSelector(candidates=[1, 2], every_n_steps=2, plot=False)
    fit = trainer(tmp_path, 5, [selector])
    fit.fit(module, data())
    assert fit.global_step == 5 and module.iteration == 5
    assert [h["step"] for h in selector.history] == [0, 2, 4]  # not [0, 4] (optimiser steps)

    window = tiny_module(strategy=SlidingWindow(window=2, shift_every=1), minibatches=2)
    starts = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            plan = pl_module.strategy.plan(pl_module.hparams.sample_steps, pl_module.iteration)
            starts.append(plan.sde_steps[0])

    trainer(tmp_path / "w", 3, [Spy()]).fit(window, data())
    assert starts == [0, 1, 0]  # one move per iteration (4 steps: 2 window positions)
