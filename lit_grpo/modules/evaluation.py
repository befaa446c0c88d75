"""Validation and test edits scored with the edit metrics; shared by the stages.

A stage owns an `EditMetrics` (`self.edit_metrics`) and a segmenter. Each validation/test
batch: ODE edits -> segment the object in source and edit -> `update_edit_metrics` (GRPO
feeds `edit_metrics` the detections its rewards already made). At the end
of the epoch `report_edit_metrics` computes the metrics on every rank (they gather their own
state under DDP), logs `{stage}/{task}/{metric}`, and on `test` prints the table and stores
it as `{stage}_edits.txt` with the loggers.

Metric states and the LPIPS / CLIP networks stay out of `state_dict`: checkpoints hold the
stage only, and load whatever metrics the config now asks for.
"""

import lightning as L
import torch
from torch import Tensor

from lit_grpo.loggers import log_text
from lit_grpo.metrics import format_table
from lit_grpo.modules.statistics import nanmean


def update_edit_metrics(module: L.LightningModule, batch: dict, edits: Tensor) -> None:
    before = module.segmenter(batch["source"], batch["object"])
    after = module.segmenter(edits, batch["object"])
    module.edit_metrics.update(batch["source"], edits, batch, before, after)


def report_edit_metrics(module: L.LightningModule, stage: str) -> dict:
    """Compute, log and reset; prints the table on `test`. Returns {task: {metric: value}}."""
    results = module.edit_metrics.compute()
    module.edit_metrics.reset()
    trainer = module.trainer
    if not results or trainer.sanity_checking:
        return results
    # compute() already gathered every rank's state: no second reduction
    flat = {f"{stage}/{t}/{k}": v for t, r in results.items() for k, v in r.items() if k != "n"}
    module.log_dict(flat, sync_dist=False, rank_zero_only=False)
    table = format_table(results)
    if stage == "test" and trainer.is_global_zero:
        n = sum(int(r["n"]) for r in results.values())
        steps = module.hparams.get("eval_steps") or module.hparams.get("sample_steps")
        print(f"\nTalk2Move table: {n} {stage} edits, {steps} ODE steps\n{table}\n", flush=True)
    if trainer.is_global_zero:
        log_text(trainer, f"{stage}_edits.txt", table)
    return results


def evaluate_grpo_edits(module, batch: dict, batch_idx: int, stage: str) -> Tensor:
    """A GRPO stage's ODE edits of `batch`, scored by its training rewards (logs
    `{stage}/reward` and every part) and fed to its edit metrics (with the detections the
    rewards already made; logged at the end of the epoch)."""
    with module.policy.capture_attention(module.capture_attention) as maps:
        edits = module.edit(
            batch["source"], batch["instruction"], batch_idx, batch.get("source_path")
        )
    attention = torch.stack(maps).mean(0) if maps else None  # over the ODE steps
    inputs = module.observe(edits, batch, attention=attention)
    module.edit_metrics.update(batch["source"], edits, batch, inputs.before, inputs.after)
    scores = module.scorer.judge(inputs)
    n = batch["source"].shape[0]
    module.log(
        f"{stage}/reward", nanmean(scores.total), batch_size=n, sync_dist=True, prog_bar=True
    )
    for key, value in scores.parts.items():
        module.log(f"{stage}/{key}", nanmean(value), batch_size=n, sync_dist=True)
    return edits
