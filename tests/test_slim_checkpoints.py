"""Checkpoints of a diffusers policy built from its local folder and trained with LoRA hold
the adapter, not the frozen transformer and VAE (`EditPolicy.frozen_from_source`); resume,
`weights: <ckpt>`, `export` and `LoraExporter` read their frozen weights from the folder.
A run started from `weights: <file>` writes them too, naming the file: its readers load it
over the folder's weights before the adapter."""

import shutil

import lightning as L
import pytest
import torch
from safetensors.torch import load_file
from test_backbone_files import save_flux_folder
from test_backbones import SIZE, quiet_fit, scenes

from lit_grpo.__main__ import main
from lit_grpo.callbacks import LoraExporter
from lit_grpo.datamodules import ShapeWorldDataModule
from lit_grpo.modules import SFTModule
from lit_grpo.policies import FluxKontextPolicy, LoraSettings
from lit_grpo.policies.lora import merged_state_dict
from lit_grpo.policies.weights import IncompatibleWeightsError, load_policy

LORA = LoraSettings(rank=4, alpha=8)


def flux(folder, **kw):
    kw = {"auto_resize": False, **kw}
    return FluxKontextPolicy(str(folder), dtype="float32", max_sequence_length=8, **kw)


def fit_one_step(folder, root, slim: bool = True):
    """A 1-step SFT fit with LoRA on the folder's policy; (module, its checkpoint's path).
    `slim=False` writes what a policy whose weights are not the folder's alone writes."""
    policy = flux(folder)
    module = SFTModule(policy, lora=LORA, lr=5e-2, warmup_steps=1)
    policy.built_from_folder = slim
    exporter = LoraExporter(dirpath=str(root / "lora"), diffusers_prefix="transformer")
    quiet_fit(module, steps=1, callbacks=[exporter], root=root)
    (ckpt,) = (root / "checkpoints").glob("*.ckpt")
    return module, ckpt


def velocity(policy):
    torch.manual_seed(1)
    batch = scenes()
    cond = policy.encode_condition(batch["source"], batch["instruction"])
    x = torch.randn(2, *policy.latent_shape((SIZE, SIZE)))
    with torch.no_grad():
        return policy.velocity(x, torch.tensor([0.4, 0.6]), cond)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux")
    save_flux_folder(folder)
    module, ckpt = fit_one_step(folder, tmp_path_factory.mktemp("run"))
    return folder, module, ckpt


def test_the_checkpoint_holds_the_adapter_not_the_frozen_weights(trained, tmp_path):
    folder, module, ckpt = trained
    policy = module.policy
    assert policy.frozen_from_source
    lora = {f"policy.{k}" for k in policy.state_dict() if "lora_" in k}
    frozen = {f"policy.{k}" for k in policy.source_state_keys()}
    assert lora and frozen and not lora & frozen
    assert any(k.startswith("policy.vae.") for k in frozen)
    assert any(".base_layer." in k for k in frozen)  # the frozen layers LoRA wraps
    saved = torch.load(ckpt, weights_only=True, map_location="cpu")
    assert set(saved["state_dict"]) == lora
    for key in lora:
        assert torch.equal(saved["state_dict"][key], module.state_dict()[key])
    entry = saved["lit_grpo_policy"]
    assert entry["class"] == "FluxKontextPolicy" and entry["config"]["pretrained"] == str(folder)
    assert entry["lora"] == {
        "rank": 4,
        "alpha": 8,
        "target_modules": sorted(FluxKontextPolicy.lora_targets),
        "dropout": 0.0,
    }
    assert set(entry["state_dict"]) == {k.removeprefix("policy.") for k in lora}

    _, full = fit_one_step(folder, tmp_path, slim=False)  # today's checkpoint of the same run
    full_state = torch.load(full, weights_only=True, map_location="cpu")
    assert frozen | lora == set(full_state["state_dict"])
    frozen_bytes = sum(v.numel() * v.element_size() for v in policy.state_dict().values())
    frozen_bytes -= sum(module.state_dict()[k].numel() * 4 for k in lora)
    # the full one holds the frozen weights twice: in state_dict and merged in the entry
    assert full.stat().st_size - ckpt.stat().st_size > 1.9 * frozen_bytes
    assert ckpt.stat().st_size < 0.4 * full.stat().st_size


def test_a_resume_from_it_has_the_trained_velocity_exactly(trained, tmp_path):
    folder, module, ckpt = trained
    trained_v = velocity(module.policy)
    resumed = SFTModule(flux(folder), lora=LORA, lr=5e-2, warmup_steps=1)
    fresh_v = velocity(resumed.policy)
    assert (fresh_v - trained_v).abs().max() > 1e-4  # the step moved the adapter
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    data = ShapeWorldDataModule(resolution=SIZE, batch_size=2, tasks=["translate"], train_size=4)
    trainer.fit(resumed, data, ckpt_path=str(ckpt))  # restores, has no step left to train
    assert torch.equal(velocity(resumed.policy), trained_v)

    state = torch.load(ckpt, weights_only=True, map_location="cpu")["state_dict"]
    state.pop(next(iter(state)))  # a LoRA weight missing is still an error, in one line
    with pytest.raises(IncompatibleWeightsError, match=r"lacks 1 weights .*lora_"):
        resumed.load_state_dict(state)


def test_weights_and_export_merge_the_adapter_into_the_folder_weights(trained, tmp_path):
    folder, module, ckpt = trained
    merged = merged_state_dict(module.policy)
    started = flux(folder, weights=str(ckpt))  # policy.init_args.weights: <ckpt>
    assert not started.has_lora and started.base_weights == str(ckpt.resolve())
    assert started.state_dict().keys() == merged.keys()
    assert all(torch.equal(v, merged[k]) for k, v in started.state_dict().items())

    out = tmp_path / "policy.safetensors"
    assert main(["export", str(ckpt), str(out)]) == 0
    written = load_file(out)
    assert all(torch.equal(written[k], v) for k, v in merged.items())
    assert torch.allclose(velocity(load_policy(str(out))), velocity(module.policy), atol=1e-5)

    lora = tmp_path / "lora.safetensors"
    assert main(["export", str(ckpt), str(lora), "--lora-diffusers"]) == 0
    (from_callback,) = (ckpt.parent.parent / "lora").glob("*.safetensors")
    assert load_file(lora).keys() == load_file(from_callback).keys()
    assert all(torch.equal(v, load_file(from_callback)[k]) for k, v in load_file(lora).items())


def test_a_moved_folder_is_named_and_can_be_passed_again(trained, tmp_path, capsys):
    folder, module, ckpt = trained
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    shutil.move(str(folder), str(tmp_path / "gone"))
    try:
        out = tmp_path / "policy.safetensors"
        assert main(["export", str(ckpt), str(out)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and f"pretrained folder not found: {folder}" in err[0], err
        assert main(["export", str(ckpt), str(out), "--pretrained", str(moved)]) == 0
        merged = merged_state_dict(module.policy)
        assert all(torch.equal(v, merged[k]) for k, v in load_file(out).items())
        # the folder given in the config, not the recorded one, is where a resume reads from
        assert flux(moved, weights=str(ckpt)).config["pretrained"] == str(moved)
    finally:
        shutil.move(str(tmp_path / "gone"), str(folder))


def test_the_cli_compares_the_policy_not_where_its_folder_is():
    from lit_grpo.checks import ConfigError
    from lit_grpo.ckpt_path import _check_policy_architecture

    entry = {"class": "FluxKontextPolicy", "config": {"pretrained": "/a", "dtype": "float32"}}

    def model(**args):
        policy = {"class_path": "lit_grpo.policies.FluxKontextPolicy", "init_args": args}
        return {"init_args": {"policy": policy}}

    _check_policy_architecture(entry, model(pretrained="/b", dtype="float32"), "ckpt", "x.ckpt")
    with pytest.raises(ConfigError, match="dtype: checkpoint float32 vs config bfloat16"):
        _check_policy_architecture(entry, model(pretrained="/a", dtype="bfloat16"), "ckpt", "x")


# --- a run started from `weights:` --------------------------------------------------------------


@pytest.fixture(scope="module")
def chained(trained, tmp_path_factory):
    """A second 1-step run, started with `weights:` the first run's checkpoint (a copy, so
    that a test may remove it): (folder, its base file, module, its checkpoint)."""
    folder, _, ckpt = trained
    base = tmp_path_factory.mktemp("base") / "first.ckpt"
    shutil.copy(ckpt, base)
    policy = flux(folder, weights=str(base))
    module = SFTModule(policy, lora=LORA, lr=5e-2, warmup_steps=1)
    root = tmp_path_factory.mktemp("second")
    quiet_fit(module, steps=1, root=root)
    (second,) = (root / "checkpoints").glob("*.ckpt")
    return folder, base, module, second


def test_a_run_started_from_weights_writes_slim_checkpoints_naming_them(chained, trained):
    folder, base, module, second = chained
    policy = module.policy
    assert policy.frozen_from_source and policy.base_weights == str(base)
    saved = torch.load(second, weights_only=True, map_location="cpu")
    lora = {f"policy.{k}" for k in policy.state_dict() if "lora_" in k}
    assert set(saved["state_dict"]) == lora
    entry = saved["lit_grpo_policy"]
    assert entry["weights"] == str(base) and entry["config"]["pretrained"] == str(folder)
    # the adapter's size, as the first run's: the frozen (merged) weights are not in it
    assert second.stat().st_size < 1.2 * trained[2].stat().st_size


def test_weights_of_it_load_the_base_then_merge_the_adapter(chained):
    folder, _, module, second = chained
    merged = merged_state_dict(module.policy)  # folder + first adapter + second adapter
    started = flux(folder, weights=str(second))
    assert started.base_weights == str(second)
    assert started.state_dict().keys() == merged.keys()
    assert all(torch.equal(v, merged[k]) for k, v in started.state_dict().items())
    first = flux(folder, weights=str(chained[1]))  # not the first run's weights alone
    assert any(not torch.equal(v, merged[k]) for k, v in first.state_dict().items())


def test_a_resume_of_it_rebuilds_the_frozen_weights_from_the_config(chained, tmp_path):
    folder, base, module, second = chained
    trained_v = velocity(module.policy)
    resumed = SFTModule(flux(folder, weights=str(base)), lora=LORA, lr=5e-2, warmup_steps=1)
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    data = ShapeWorldDataModule(resolution=SIZE, batch_size=2, tasks=["translate"], train_size=4)
    trainer.fit(resumed, data, ckpt_path=str(second))
    assert torch.equal(velocity(resumed.policy), trained_v)
    # the CLI refuses a config without the file the run started from, and the reverse
    from lit_grpo.checks import ConfigError
    from lit_grpo.ckpt_path import _check_policy_architecture

    entry = torch.load(second, weights_only=True, map_location="cpu")["lit_grpo_policy"]

    def model(**args):
        policy = {"class_path": "lit_grpo.policies.FluxKontextPolicy", "init_args": args}
        return {"init_args": {"policy": policy}}

    _check_policy_architecture(entry, model(weights=str(base)), "checkpoint", second)
    with pytest.raises(ConfigError) as err:
        _check_policy_architecture(entry, model(weights=None), "checkpoint", second)
    assert str(err.value) == (
        f"checkpoint {second} holds a LoRA adapter trained over `weights: {base}`, and its "
        f"frozen weights are rebuilt from the config: set the policy's init_args weights: {base}"
    )
    first = torch.load(chained[1], weights_only=True, map_location="cpu")["lit_grpo_policy"]
    with pytest.raises(ConfigError, match="over the pretrained folder alone.* weights: null$"):
        _check_policy_architecture(first, model(weights=str(base)), "checkpoint", second)


def test_export_of_it_needs_the_base_file_and_names_it(chained, tmp_path, capsys):
    folder, base, module, second = chained
    out = tmp_path / "policy.safetensors"
    assert main(["export", str(second), str(out)]) == 0
    merged = merged_state_dict(module.policy)
    assert all(torch.equal(v, merged[k]) for k, v in load_file(out).items())
    moved = tmp_path / "moved.ckpt"
    shutil.move(str(base), str(moved))
    try:
        capsys.readouterr()
        assert main(["export", str(second), str(tmp_path / "again.safetensors")]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1, err
        assert f"{second} holds a LoRA adapter trained over the policy weights {base}" in err[0]
        assert f"policy weights file not found: {base}" in err[0]
    finally:
        shutil.move(str(moved), str(base))
