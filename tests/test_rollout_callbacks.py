"""The rollout image logger and the LoRA exporter on the GRPO stage."""

import lightning as L
import numpy as np
import pytest
import torch
from helpers import tiny_data
from PIL import Image

from lit_grpo.callbacks import LoraExporter, RolloutImageLogger
from lit_grpo.callbacks.rollout_images import rollout_grid


def data(batches=2):
    return tiny_data(train_size=2 * batches, val_size=2)


def test_rollout_grid_layout_and_reward_colours():
    source = torch.zeros(3, 3, 8, 8)
    edits = torch.ones(3 * 4, 3, 8, 8)  # [B * G, ...] with groups contiguous
    rewards = torch.tensor([0.1, 0.9, 0.5, float("nan")] * 3)
    grid = rollout_grid(source, edits, rewards, ["move it"] * 3, scale=6, max_rows=2)
    pad, text, side = 4, 14, 48
    assert grid.dtype == np.uint8
    assert grid.shape == (pad + 2 * (text + side + text + pad), pad + 5 * (side + pad), 3)
    # the source cell of row 0 is black, its first edit white
    y = pad + text
    assert (grid[y : y + side, pad : pad + side] == 0).all()
    assert (grid[y : y + side, 2 * pad + side : 2 * pad + 2 * side] == 255).all()

    def caption_has(channel, col):  # caption of edit `col` of row 0 drawn in a pure colour
        x = pad + (col + 1) * (side + pad)
        cell = grid[y + side : y + side + text, x : x + side].reshape(-1, 3).astype(int)
        others = np.delete(cell, channel, axis=1)
        return ((cell[:, channel] > 100) & (others.max(1) < 60)).any()

    assert caption_has(1, 1)  # best reward (0.9) in green
    assert caption_has(0, 0)  # worst (0.1) in red
    assert not caption_has(1, 2) and not caption_has(0, 2)  # 0.5 in black


def test_rollout_logger_writes_images_to_mlflow(tmp_path, monkeypatch):
    import mlflow
    from helpers import quiet_trainer, tiny_module

    from lit_grpo.loggers import MLflowLogger

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    logger = MLflowLogger(experiment_name="rollouts", run_name="r")
    trainer = quiet_trainer(
        max_steps=3,
        max_epochs=-1,
        logger=logger,
        callbacks=[RolloutImageLogger(every_n_steps=2, max_conditions=2, scale=2)],
    )
    trainer.fit(tiny_module(), data())
    client = mlflow.MlflowClient(uri)
    images = [a.path for a in client.list_artifacts(logger.run_id, "images")]
    # logged at steps 0 and 2 (not 1): one PNG per logged step
    pngs = sorted(p for p in images if p.endswith(".png"))
    assert len(pngs) == 2, images
    local = client.download_artifacts(logger.run_id, pngs[0], str(tmp_path))
    w = Image.open(local).size[0]
    assert w == 4 + 5 * (32 + 4)  # source + G = 4 edits at 16 px x 2


def test_rollout_logger_names_the_missing_protocol(tmp_path):
    from helpers import PlainModule, plain_loader, quiet_trainer

    with pytest.raises(TypeError, match="rollout"):
        quiet_trainer(max_steps=1, callbacks=[RolloutImageLogger()]).fit(
            PlainModule(), plain_loader()
        )


def test_lora_exporter_writes_each_checkpoint_and_loads_back(tmp_path):
    from helpers import quiet_trainer, tiny_module
    from safetensors import safe_open

    from lit_grpo.policies import LoraSettings, TinyEditPolicy
    from lit_grpo.policies.lora import load_lora

    module = tiny_module()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1, save_last=True
    )
    exporter = LoraExporter()
    trainer = quiet_trainer(
        max_steps=2, max_epochs=-1, enable_checkpointing=True, callbacks=[ckpt, exporter]
    )
    trainer.fit(module, data())
    files = sorted(p.name for p in (tmp_path / "ckpt" / "lora").iterdir())
    assert files == ["lora-step=000001.safetensors", "lora-step=000002.safetensors"]
    path = tmp_path / "ckpt" / "lora" / files[-1]
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(".default." not in k and "lora_" in k for k in keys)
    assert meta["global_step"] == "2" and '"rank": 4' in meta["lit_grpo.lora"]

    # a fresh policy with the same base weights + the exported adapter = the trained policy
    torch.manual_seed(0)
    fresh = TinyEditPolicy(width=32, depth=1, heads=2)
    base = {k.replace(".base_layer", ""): v for k, v in module.policy.state_dict().items()}
    fresh.load_state_dict({k: v for k, v in base.items() if "lora_" not in k})
    settings = load_lora(fresh.denoiser, str(path))
    assert settings == LoraSettings(
        rank=4, alpha=4.0, target_modules=sorted(settings.target_modules), dropout=0.0
    )
    cond = module.policy.encode_condition(
        torch.rand(2, 3, 16, 16), ["move the red circle left"] * 2
    )
    sigma = torch.full((2,), 0.5)
    x = torch.randn(2, *module.policy.encode_images(torch.rand(2, 3, 16, 16)).shape[1:])
    with torch.no_grad():
        trained = module.policy.velocity(x, sigma, cond)
        loaded = fresh.velocity(x, sigma, cond)
        with module.policy.reference():
            reference = module.policy.velocity(x, sigma, cond)
    assert torch.allclose(trained, loaded, atol=1e-6)
    assert not torch.allclose(trained, reference, atol=1e-4)  # the adapter did change outputs
