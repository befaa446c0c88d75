"""Early-exit step selection by within-group reward variance (Talk2Move), as a callback.

Every `every_n_steps` training batches the callback asks the module to probe each candidate
exit step k on the current batch: roll out groups with SDE noise on steps 0..k-1, jump to the
end with the one-step ODE shortcut, score them, and report the mean within-group variance of
the rewards. The exit step becomes the argmax (the most informative place to explore), and
is broadcast from rank 0 so every rank trains with the same K.

The protocol a LightningModule implements to use it (nothing else of the module is used):

    def exit_step_variance(self, batch, candidates: list[int]) -> torch.Tensor:
        '''Within-group reward variance for each candidate exit step, shape [len(candidates)].'''

    def set_exit_step(self, step: int) -> None:
        '''Train with SDE on steps 0..step-1 and the ODE shortcut from `step` on.'''

Its history (every probe's variances and choice) and the current K live in `state_dict`, so a
resumed run keeps them. It logs `early_exit/K` and `early_exit/var_k{k}` through
`pl_module.log`, i.e. to whatever logger the trainer has, and (with `plot=True`) an image
`early_exit_variance`: the variance profile of every probe so far, the chosen K marked.
"""

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class EarlyExitSelector(Callback):
    """Choose the early-exit step K = argmax_k Var_group(reward | exit at k), every N steps.

    Args:
        candidates: exit steps to probe (e.g. [2, 4, 6, 8] of a 10-step schedule).
        every_n_steps: probe before training batches 0, N, 2N, ... (batches, not optimiser
            steps: a GRPO iteration may step the optimiser several times or not at all)
        plot: also log the variance profiles as an image (matplotlib) at every probe.
    """

    def __init__(self, candidates: list[int], every_n_steps: int = 50, plot: bool = True):
        if not candidates or any(k < 1 for k in candidates):
            raise ValueError(f"candidates must be exit steps >= 1, got {candidates}")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.candidates = sorted(set(candidates))
        self.every_n_steps = every_n_steps
        self.plot = plot
        self.exit_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.batches_seen = 0  # training batches so far (resumed from the checkpoint)

    @staticmethod
    def _check(pl_module: LightningModule) -> None:
        for name in ("exit_step_variance", "set_exit_step"):
            if not callable(getattr(pl_module, name, None)):
                raise TypeError(
                    f"EarlyExitSelector needs {type(pl_module).__name__}.{name}(); see the "
                    "protocol in lit_grpo/callbacks/early_exit.py"
                )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check(pl_module)
        if self.exit_step is not None:  # resumed: train with the K chosen before the stop
            pl_module.set_exit_step(self.exit_step)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # Count training batches, not trainer.global_step: under manual optimisation a batch
        # may step the optimiser several times (minibatches x inner epochs) or not at all,
        # and global_step would skip probes (every 3 with 2 optimiser steps per batch probed
        # at 0 and 6, not 0, 3, 6, 9).
        step = self.batches_seen
        self.batches_seen += 1
        if step % self.every_n_steps:
            return
        variances = pl_module.exit_step_variance(batch, self.candidates).detach().float()
        variances = trainer.strategy.reduce(variances, reduce_op="mean")  # every rank's probe
        choice = self.candidates[int(torch.argmax(variances))]
        choice = trainer.strategy.broadcast(choice, src=0)
        self.exit_step = int(choice)
        pl_module.set_exit_step(self.exit_step)
        values = [float(v) for v in variances.cpu()]
        self.history.append(
            {
                "step": step,
                "candidates": list(self.candidates),
                "variances": values,
                "exit_step": self.exit_step,
            }
        )
        pl_module.log("early_exit/K", float(self.exit_step), batch_size=1)
        for k, v in zip(self.candidates, values):
            pl_module.log(f"early_exit/var_k{k}", v, batch_size=1)
        if self.plot and trainer.is_global_zero and trainer.loggers:
            from lit_grpo.loggers import log_image

            log_image(
                trainer,
                "early_exit_variance",
                variance_plot(self.history),
                step=trainer.global_step,
            )

    def state_dict(self) -> dict[str, Any]:
        return {
            "candidates": self.candidates,
            "every_n_steps": self.every_n_steps,
            "exit_step": self.exit_step,
            "history": self.history,
            "batches_seen": self.batches_seen,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.exit_step = state_dict["exit_step"]
        self.history = list(state_dict["history"])
        # older checkpoints: the step after the last probe is the closest we know
        last = self.history[-1]["step"] + 1 if self.history else 0
        self.batches_seen = int(state_dict.get("batches_seen", last))


def variance_plot(history: list[dict[str, Any]]):
    """uint8 [H, W, 3]: within-group reward variance against the candidate exit step, one
    line per probe (later probes darker), the chosen K of each probe marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    candidates = history[-1].get("candidates")
    for i, h in enumerate(history):
        ks = h.get("candidates") or candidates or list(range(1, len(h["variances"]) + 1))
        shade = 0.8 - 0.7 * (i + 1) / len(history)
        ax.plot(ks, h["variances"], "-o", color=(shade, shade, 1.0), label=f"step {h['step']}")
        j = ks.index(h["exit_step"])
        ax.plot([h["exit_step"]], [h["variances"][j]], "*", color="red", markersize=12)
    ax.set_xlabel("exit step K")
    ax.set_ylabel("within-group reward variance")
    ax.set_title(f"early exit: K = {history[-1]['exit_step']} (red: chosen)")
    if len(history) <= 8:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return image
