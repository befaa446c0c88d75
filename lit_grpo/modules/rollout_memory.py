"""Before a fit's first rollout: refuse, on every rank, a batch and group whose rollouts
alone would not fit the rank's memory (the arithmetic is `lit_grpo.sampling.memory`)."""

import torch

from lit_grpo.checks import ConfigError
from lit_grpo.sampling.memory import available_bytes, check_rollout_memory


def check_first_rollouts(module, batch: dict) -> None:
    """Raise `ConfigError` (on every rank, if any rank's would not fit) when the rollouts of
    `batch` x `group_size` under the module's plan exceed its device's memory."""
    source = batch["source"]  # [B, 3, H, W]
    image = tuple(source.shape[1:])
    latent = module.policy.latent_shape(tuple(source.shape[-2:]))
    plan = module.strategy.plan(module.hparams.sample_steps, module.iteration)
    keys = batch.get("source_path")
    with torch.no_grad():  # one condition, to measure what each rollout repeats
        one = module.policy.encode_condition(
            source[:1], list(batch["instruction"])[:1], None if keys is None else list(keys)[:1]
        )
    tensors = [t for t in vars(one).values() if isinstance(t, torch.Tensor)]
    condition = sum(t.numel() * t.element_size() for t in tensors)
    available, what = available_bytes(module.device)
    args = (source.shape[0], module.hparams.group_size, plan, latent, image, condition)
    try:
        check_rollout_memory(*args, available, what)
        too_big = None
    except ConfigError as err:
        too_big = err
    trainer = module._trainer  # None outside a fit (the tests' direct calls)
    if trainer is not None and trainer.world_size > 1:
        if trainer.strategy.reduce_boolean_decision(too_big is not None, all=False):
            raise too_big or ConfigError("another rank's rollouts would not fit its memory")
    elif too_big is not None:
        raise too_big
