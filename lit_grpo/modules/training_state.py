"""GRPO's training state: what counts an iteration, and what a checkpoint holds beside the
weights (the iteration, the stall streaks of `lit_grpo.modules.stalls` and every
data-parallel rank's rollout-noise generator), so a run killed and resumed trains the same
weights as one never stopped."""

from lightning.pytorch.utilities import rank_zero_warn

from lit_grpo.modules.stalls import NONFINITE_LOSS


def count_iteration(trainer) -> None:
    """Advance `trainer.global_step` by one: it counts GRPO iterations.

    Under manual optimisation Lightning counts every `LightningOptimizer.step()` as a
    global step, so `max_steps` would mean minibatches x inner_epochs per iteration, and a
    run whose iterations all skip (every group zero-spread, every reward NaN) would never
    reach it. The update therefore steps through `strategy.optimizer_step`, which bypasses
    the counting, and each training batch completes exactly one step here. Lightning has no
    public API to advance the counter (`global_step` is read-only): this writes the
    manual-optimisation loop's progress, the state `global_step` reads and checkpoints
    keep, so a resumed run continues at the right step.
    """
    if trainer is None:
        return
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    progress.increment_ready()
    progress.increment_completed()


def save(module, checkpoint: dict) -> None:
    checkpoint["grpo_iteration"] = module.iteration
    checkpoint["grpo_nonfinite_in_a_row"] = module.stalls.nonfinite.count
    checkpoint["grpo_skipped_in_a_row"] = module.stalls.skipped.state_dict()
    # every data-parallel rank draws its own noise: the checkpoint (written by rank 0, or
    # rank 0's meta.pt) keeps them all, [ranks, state bytes]
    checkpoint["grpo_generators"] = module.gather(module.generator.get_state())


def load(module, checkpoint: dict) -> None:
    module.iteration = int(checkpoint.get("grpo_iteration", 0))
    nonfinite = int(checkpoint.get("grpo_nonfinite_in_a_row", 0))
    module.stalls.nonfinite.load_state_dict({"causes": {NONFINITE_LOSS: nonfinite}})
    module.stalls.skipped.load_state_dict(checkpoint.get("grpo_skipped_in_a_row") or {})
    states = checkpoint.get("grpo_generators")
    if states is None and checkpoint.get("grpo_generator") is not None:
        states = checkpoint["grpo_generator"][None]  # written before ranks were kept
    if states is None:  # older checkpoints: a fresh seed
        return
    states = states.reshape(-1, states.shape[-1])
    if states.shape[0] != module.data_parallel_size:
        rank_zero_warn(
            f"the checkpoint holds the rollout noise of {states.shape[0]} data-parallel "
            f"rank(s), this run has {module.data_parallel_size}: the noise restarts from "
            "the seed, so the run will not repeat the interrupted one exactly"
        )
        return
    module.generator.set_state(states[module.data_parallel_rank].clone())  # own storage
