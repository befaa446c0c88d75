"""Sampling and scoring a step's conditions in chunks; with `overlap`, the rewards of one
chunk run in a background thread while the next chunk samples (issue 25).

    for each chunk of `score_chunk` conditions (x G rollouts: whole groups):
        record_c = module.sample(chunk, plan)        the module's generator, chunk after chunk
        inputs_c = module.observe(record_c, chunk)   segmenting, the policy's helpers: here
        scores_c = scorer.judge(inputs_c)            the rewards: here, or in the worker thread
    record, scores = cat(records), cat(scores)       in order, before the advantages

The algorithm does not change: every chunk is sampled by the policy of this step (nothing
is pipelined across GRPO iterations, which would sample with the policy before the last
update: off-policy), a group never straddles two chunks, and the advantages are computed
on all chunks' scores at once. The rollouts do not depend on `overlap` (the generator is
drawn chunk after chunk either way), so neither do the losses and gradients; they do
differ from unchunked rollouts, whose noise is drawn in another order.

What overlap cannot hide is the last chunk's scoring (nothing samples after it), and every
chunk costs a policy call per sampling step on fewer rows. So `score_chunk` may be a list
of shrinking sizes, e.g. [4, 2, 1, 1] for 8 conditions: a chunk only has to be scored
within the next chunk's sampling, and the last, unhidden one is small (1/8 of the rewards'
time, in 4 chunks rather than 8 of one condition).

Only rewards that release the GIL gain: a `RemoteReward` waiting on its server, rewards
running on a GPU. Pure-Python or CPU-bound rewards would compete with sampling for the
same cores. The worker is one thread: chunks are judged one after another, in order, so a
reward's state (`RemoteReward`'s failures in a row) sees them as in the serial path. The
worker runs under the training thread's grad mode, CUDA device and autocast (all per
thread in torch), so a reward computes as it would in the training thread. An
exception it raised is raised again, unchanged, in the training thread, before the next
chunk samples if it has already arrived, else when the scores are gathered.
"""

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack

import torch
from torch import Tensor

from lit_grpo.checks import ConfigError
from lit_grpo.modules.phases import PhaseClock
from lit_grpo.rewards.scoring import Scores
from lit_grpo.sampling.rollout import RolloutRecord


def check_chunking(score_chunk: int | list[int] | None, overlap_scoring: bool) -> None:
    """Refuse, at construction, a chunk size below 1 (or an empty list) and overlap without
    chunks."""
    sizes = score_chunk if isinstance(score_chunk, (list, tuple)) else [score_chunk]
    if not sizes or any(s is not None and (isinstance(s, bool) or s < 1) for s in sizes):
        raise ValueError(
            f"score_chunk must be >= 1, a list of sizes >= 1, or None; got {score_chunk}"
        )
    if overlap_scoring and score_chunk is None:
        raise ValueError(
            "overlap_scoring needs score_chunk: the conditions sampled while the previous "
            "ones are scored (e.g. model.init_args.score_chunk: 1)"
        )


def chunk_sizes(b: int, size: int | list[int] | None) -> list[int]:
    """The sizes of the chunks of `b` conditions: `size` at a time (the last chunk what is
    left), or a list's sizes in turn, its last size repeated while conditions remain and the
    last chunk cut to what is left (so [4, 2, 1] on 10 conditions is 4, 2, 1, 1, 1, 1)."""
    if size is None:
        return [b]
    sizes, wanted = [], list(size) if isinstance(size, (list, tuple)) else [size]
    while sum(sizes) < b:
        sizes.append(min(wanted[min(len(sizes), len(wanted) - 1)], b - sum(sizes)))
    return sizes


def condition_chunks(batch: dict, size: int | list[int] | None) -> list[dict]:
    """`batch` (B conditions) split into consecutive chunks of `chunk_sizes(B, size)`
    conditions: every tensor and list of B rows is sliced, anything else kept."""
    b = batch["source"].shape[0]
    sizes = chunk_sizes(b, size)
    if len(sizes) == 1:
        return [batch]

    def rows(value, part: slice):
        if isinstance(value, Tensor) and value.ndim and value.shape[0] == b:
            return value[part]
        if isinstance(value, (list, tuple)) and len(value) == b:
            return value[part]
        return value

    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    parts = [slice(start, start + n) for start, n in zip(starts, sizes)]
    return [{k: rows(v, part) for k, v in batch.items()} for part in parts]


def sample_and_score(
    module,
    batch: dict,
    size: int | list[int] | None,
    overlap: bool,
    clock: PhaseClock,
    trainer=None,
) -> tuple[RolloutRecord, Scores]:
    """The rollouts and scores of `batch`, `size` conditions at a time (see module docstring);
    the phases "sampling" and "rewards" are announced and timed chunk by chunk, so that with
    `overlap` the rewards' time is the part of their work sampling did not hide."""
    plan = module.strategy.plan(module.hparams.sample_steps, module.iteration)
    records, scored = [], []
    pool = ThreadPoolExecutor(1, thread_name_prefix="lit_grpo-rewards") if overlap else None
    context = (module.device, _autocast())  # the thread-local state the rewards run under
    try:
        for chunk in condition_chunks(batch, size):
            _raise_early(scored)
            with clock.phase(trainer, "sampling"):
                record = module.sample(chunk, plan=plan)
            with clock.phase(trainer, "rewards"):
                inputs = module.observe(record.images, chunk, record.group_size, record.attention)
                if pool is None:
                    scored.append(module.scorer.judge(inputs))
                else:
                    scored.append(pool.submit(_judge, module.scorer, inputs, *context))
            records.append(record)
        with clock.phase(trainer, "rewards"):
            scores = [s.result() if isinstance(s, Future) else s for s in scored]
    finally:
        if pool is not None:  # on an error: drop the chunks not started, wait for the one
            pool.shutdown(wait=True, cancel_futures=True)  # running (bounded by its timeout)
    _check_conditions(module, records)
    return RolloutRecord.cat(records), Scores.cat(scores)


def _check_conditions(module, records: list[RolloutRecord]) -> None:
    """Chunks join only if their encoded conditions have the same shape beyond the rows: a
    policy that pads its text per batch would need padding the stored conditions, and the
    update would rescore them otherwise than they were sampled."""
    first = records[0].condition
    for k, record in enumerate(records[1:], 2):
        for name, value in vars(record.condition).items():
            mine, theirs = getattr(first, name), value
            if isinstance(mine, Tensor) and mine.shape[1:] != theirs.shape[1:]:
                raise ConfigError(
                    f"score_chunk: {type(module.policy).__name__} encodes chunk {k}'s "
                    f"condition.{name} as {tuple(theirs.shape[1:])} per row, chunk 1's as "
                    f"{tuple(mine.shape[1:])} (it pads per batch); leave score_chunk unset "
                    "with this policy"
                )


def _judge(scorer, inputs, device: torch.device, autocast: list) -> Scores:
    """`scorer.judge(inputs)` in the worker under the training thread's settings, which are
    per thread: no grad, the CUDA device of this rank, the Trainer's autocast (bf16-mixed)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        for device_type, dtype in autocast:
            stack.enter_context(torch.autocast(device_type, dtype=dtype))
        return scorer.judge(inputs)


def _autocast() -> list[tuple[str, torch.dtype]]:
    """The autocast regions the calling thread is in: (device type, dtype)."""
    return [
        (d, torch.get_autocast_dtype(d)) for d in ("cuda", "cpu") if torch.is_autocast_enabled(d)
    ]


def _raise_early(scored: list) -> None:
    """Raise the error of a chunk already judged in the worker, as the serial path would
    have before sampling on."""
    for s in scored:
        if isinstance(s, Future) and s.done() and s.exception() is not None:
            s.result()
