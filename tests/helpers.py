"""What several test files build the same way: a tiny seeded policy and GRPO stage,
ShapeWorld batches and data modules, a quiet Trainer, rewards of known behaviour, the client
of a run's default MLflow store, a tiny open_clip model in local files, a tiny random SAM
and CLIP crop scorer, photo-like images; and small modules and callbacks for the callback
tests. Plain functions and classes (imported as `from helpers import ...`; the fixtures are
in conftest.py)."""

import json
from pathlib import Path

import lightning as L
import torch

from lit_grpo.datamodules import ShapeWorldDataModule
from lit_grpo.datamodules.shapeworld import ShapeWorld
from lit_grpo.loggers import DEFAULT_ROOT
from lit_grpo.modules import GRPOModule
from lit_grpo.policies import LoraSettings, TinyEditPolicy
from lit_grpo.rewards import BackgroundReward, Reward, RewardOutput, TranslationReward

# --- tiny GRPO runs ---------------------------------------------------------------------------

TINY_GRPO = {
    "lora": LoraSettings(rank=4, alpha=4),
    "group_size": 4,
    "sample_steps": 4,
    "eval_steps": 2,
}


def tiny_policy(depth: int = 1, open_gates: bool = True, cls=TinyEditPolicy, **kw):
    """A `TinyEditPolicy` (width 32, 2 heads, `depth` blocks) built under seed 0. adaLN-Zero
    starts with closed gates (the velocity is 0 and no gradient reaches LoRA): `open_gates`
    draws every weight from N(0, 0.1^2), as training would open them."""
    torch.manual_seed(0)
    policy = cls(width=32, depth=depth, heads=2, **kw)
    if open_gates:
        for p in policy.parameters():
            torch.nn.init.normal_(p, std=0.1)
    return policy


def tiny_module(rewards=None, *, cls=GRPOModule, policy=None, **kw):
    """A GRPO stage `cls` on `tiny_policy()` (or `policy`) with `TINY_GRPO`'s settings (LoRA
    rank 4, G = 4, 4 sampling and 2 evaluation steps) unless `kw` overrides them; the
    translation and background rewards unless `rewards` are given."""
    policy = tiny_policy() if policy is None else policy
    rewards = [TranslationReward(), BackgroundReward()] if rewards is None else rewards
    return cls(policy, rewards, **{**TINY_GRPO, **kw})


def shapeworld_batch(n: int = 2, resolution: int = 16, tasks=("translate",), split="train", **kw):
    """The first `n` scenes of a ShapeWorld split, collated (`kw`: ShapeWorld's, e.g. seed)."""
    data = ShapeWorld(split, n, resolution, tasks, **kw)
    return torch.utils.data.default_collate([data[i] for i in range(n)])


def tiny_data(train_size: int = 4, **kw) -> ShapeWorldDataModule:
    """ShapeWorld at 16 px, translations only, batches of 2 (`kw` overrides any setting)."""
    settings = dict(resolution=16, batch_size=2, tasks=["translate"], train_size=train_size)
    return ShapeWorldDataModule(**{**settings, **kw})


def quiet_trainer(**overrides) -> L.Trainer:
    """A Trainer for tests: no logger, bar, summary, sanity check or validation."""
    kwargs = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return L.Trainer(**{**kwargs, **overrides})


def fit_steps(module, max_steps: int, callbacks=(), **data) -> L.Trainer:
    """Fit for `max_steps` over as many epochs as it takes (at most 10: a run that never
    reaches max_steps fails the test instead of hanging it), on `tiny_data` (`data`
    overrides its settings)."""
    trainer = quiet_trainer(max_steps=max_steps, max_epochs=10, callbacks=list(callbacks))
    trainer.fit(module, tiny_data(**{"val_size": 2, **data}))
    return trainer


class Recorder(L.Callback):
    """The listed metrics after every training batch."""

    def __init__(self, *keys):
        self.keys, self.rows = keys, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.rows.append({k: float(m[k]) for k in self.keys})


def lora_params(module) -> dict[str, torch.Tensor]:
    """A copy of every LoRA weight of `module`, by name."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}


def moved(before: dict[str, torch.Tensor], module) -> list[str]:
    """The names of `before` (`lora_params`) whose weights in `module` changed since."""
    now = dict(module.named_parameters())
    return [n for n in before if not torch.equal(before[n], now[n].detach())]


class ConstantReward(Reward):
    """1 for every edit: every group has zero spread, nothing can train."""

    name = "constant"

    def forward(self, inputs):
        return RewardOutput(inputs.images.new_ones(inputs.images.shape[0]))


class NaNReward(Reward):
    """NaN for every edit: nothing can train."""

    name = "nan"

    def forward(self, inputs):
        return RewardOutput(torch.full((inputs.images.shape[0],), float("nan")))


class Brightness(Reward):
    """The mean pixel value of the edit, computed on its device: it differs between rollouts
    of random tiny models, so every group has spread (where the spatial rewards cannot find
    objects in their images)."""

    name = "brightness"

    def forward(self, inputs):
        return RewardOutput(inputs.images.float().mean((1, 2, 3)))


# --- stores and local model files --------------------------------------------------------------


def store_client(folder):
    """The MLflow client of the store a run started in `folder` writes by default
    (`folder/mlruns/mlflow.db`, with MLFLOW_TRACKING_URI unset: the `in_tmp` fixture)."""
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{folder}/{DEFAULT_ROOT}/mlflow.db")


TINY_CLIP = {  # 1.7M parameters; the vocabulary of open_clip's bundled tokenizer
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_tiny_clip(folder, config: str = "lit-grpo-tiny-clip.json", seed: int = 0):
    """A random open_clip model of `TINY_CLIP`'s shape, built under `seed`, in local files of
    `folder` (its config as `config`, its weights as tiny_clip.pt): (config path, weights
    path, the model)."""
    import open_clip

    config_path, weights = Path(folder) / config, Path(folder) / "tiny_clip.pt"
    config_path.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(seed)
    net = open_clip.CLIP(**TINY_CLIP)
    torch.save(net.state_dict(), weights)
    return str(config_path), str(weights), net


def tiny_sam(checkpoint=None):
    """A random 79k-parameter SAM on 64 px inputs (FACTS.md); a stand-in for
    `segment_anything.sam_model_registry[...]`, which is called with checkpoint=None."""
    from functools import partial

    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    assert checkpoint is None  # what load_sam must ask for
    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        img_size=64,
        patch_size=16,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2,
        out_chans=32,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=2,
        global_attn_indexes=[1],
    )
    decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2),
        transformer_dim=32,
        iou_head_depth=2,
        iou_head_hidden_dim=16,
    )
    prompt = PromptEncoder(
        embed_dim=32, image_embedding_size=(4, 4), input_image_size=(64, 64), mask_in_chans=4
    )
    sam = Sam(encoder, prompt, decoder, [123.675, 116.28, 103.53], [58.395, 57.12, 57.375])
    return sam.eval()


def tiny_clip_scorer():
    import open_clip

    from lit_grpo.perception.text_segmenter import ClipCropScorer

    torch.manual_seed(0)
    net = open_clip.CLIP(**TINY_CLIP)
    mean, std = open_clip.constants.OPENAI_DATASET_MEAN, open_clip.constants.OPENAI_DATASET_STD
    return ClipCropScorer(net, open_clip.get_tokenizer("ViT-B-32"), (32, 32), mean, std)


def toy_photo(height: int, width: int, seed: int) -> torch.Tensor:
    """[3, H, W] in [0, 1], photo-like rather than ShapeWorld's flat palette: a lit gradient
    backdrop, three soft ellipses of random colours and sensor noise."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(
        torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij"
    )
    base = torch.rand(3, 1, 1, generator=g) * 0.4 + 0.3
    image = base * (0.7 + 0.3 * xs) * (0.8 + 0.2 * ys)
    for _ in range(3):
        cy, cx, ry, rx = (torch.rand(4, generator=g) * torch.tensor([0.6, 0.6, 0.2, 0.2])).tolist()
        inside = ((ys - 0.2 - cy) / (0.1 + ry)) ** 2 + ((xs - 0.2 - cx) / (0.1 + rx)) ** 2
        weight = torch.sigmoid((1 - inside) * 8)  # a soft edge
        image = image * (1 - weight) + torch.rand(3, 1, 1, generator=g) * weight
    image = image + 0.02 * torch.randn(image.shape, generator=g)
    return image.clamp(0, 1)


# --- plain modules and callbacks for the callback tests ----------------------------------------


class PlainModule(L.LightningModule):
    """A LightningModule with none of the protocols lit_grpo's callbacks look for."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), 0.1)


def plain_loader(n: int = 4) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(n, 1)))


class SignalAt(L.Callback):
    """Sends `signum` to this very process as training step `step` starts (a user's Ctrl+C,
    a scheduler's SIGTERM), so the signal arrives in the middle of that step."""

    def __init__(self, step: int = 2, signum: int = 15):
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import os

        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), self.signum)


class LoggingModule(PlainModule):
    """PlainModule that logs its loss each step and validates (for metric-history tests)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).sum())


class SleepAt(L.Callback):
    """Sleeps `seconds` as training step `step` starts: a step that takes that long (a huge
    group, a stuck reward), printing `sleeping` first so that a test can time a signal."""

    def __init__(self, step: int = 2, seconds: float = 600.0):
        self.step, self.seconds = step, seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        import time

        if trainer.global_step == self.step - 1:
            print("sleeping", flush=True)
            time.sleep(self.seconds)


class StopAt(L.Callback):
    """Stops the run after step `step` through `trainer.should_stop`, as `max_time` and early
    stopping do."""

    def __init__(self, step: int = 2):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True
