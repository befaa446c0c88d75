"""The diffusers backbones' files: LoRA export that diffusers' pipelines load, loading from
local folders (and naming what is missing), and the config overlays."""

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_backbones import BACKBONES, SIZE, quiet_fit, scenes, tiny_flux_parts

from lit_grpo.__main__ import main
from lit_grpo.callbacks import LoraExporter
from lit_grpo.modules import SFTModule
from lit_grpo.policies import FluxKontextPolicy, LoraSettings, QwenImageEditPolicy
from lit_grpo.policies.diffusers_common import ModelFilesError, WordEmbedder
from lit_grpo.policies.lora import save_diffusers_lora

# --- LoRA export: what diffusers' pipelines load ---------------------------------------------


@pytest.mark.parametrize("name", BACKBONES)
def test_exported_lora_loads_into_the_diffusers_pipeline_and_gives_the_policy_output(
    name, tmp_path
):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxKontextPipeline,
        QwenImageEditPipeline,
    )

    policy = BACKBONES[name]()
    base = copy.deepcopy(policy.transformer)
    module = SFTModule(policy, lora=LoraSettings(rank=4, alpha=8), lr=5e-2, warmup_steps=1)
    exporter = LoraExporter(dirpath=str(tmp_path / "lora"), diffusers_prefix="transformer")
    quiet_fit(module, steps=2, callbacks=[exporter], root=tmp_path)  # one epoch: one checkpoint
    (from_callback,) = (tmp_path / "lora").glob("*.safetensors")
    path = tmp_path / "lora.safetensors"
    save_diffusers_lora(policy.transformer, path)
    (ckpt,) = (tmp_path / "checkpoints").glob("*.ckpt")
    from_command = tmp_path / "command.safetensors"
    assert main(["export", str(ckpt), str(from_command), "--lora-diffusers"]) == 0
    written = load_file(path)
    for other in (from_callback, from_command):  # three writers, one file
        assert load_file(other).keys() == written.keys()
        assert all(torch.equal(load_file(other)[k], v) for k, v in written.items())

    if name == "flux":
        pipe = FluxKontextPipeline(
            FlowMatchEulerDiscreteScheduler(), policy.vae, None, None, None, None, base
        )
    else:
        pipe = QwenImageEditPipeline(
            FlowMatchEulerDiscreteScheduler(), policy.vae, None, None, None, base
        )
    pipe.load_lora_weights(str(from_callback))
    loaded = BACKBONES[name]()
    loaded.transformer = pipe.transformer  # the pipeline's transformer, adapter from the file

    batch = scenes()
    cond = policy.encode_condition(batch["source"], batch["instruction"])
    x = torch.randn(2, *policy.latent_shape((SIZE, SIZE)))
    sigma = torch.tensor([0.4, 0.6])
    with torch.no_grad():
        ours, theirs = policy.velocity(x, sigma, cond), loaded.velocity(x, sigma, cond)
        with policy.reference():
            reference = policy.velocity(x, sigma, cond)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert (ours - reference).abs().max() > 1e-4  # the file carries the trained adapter


# --- loading from a local folder -------------------------------------------------------------


def test_missing_folder_and_files_are_named(tmp_path):
    with pytest.raises(ModelFilesError, match="pretrained folder not found"):
        FluxKontextPolicy(pretrained=str(tmp_path / "nowhere"))
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ModelFilesError, match=r"transformer/config\.json is missing"):
        FluxKontextPolicy(pretrained=str(tmp_path))
    for sub in ("transformer", "vae", "text_encoder"):
        (tmp_path / sub).mkdir(exist_ok=True)
        (tmp_path / sub / "config.json").write_text("{}")
    with pytest.raises(ModelFilesError, match=r"QwenImageEditPolicy: .*/processor is missing"):
        QwenImageEditPolicy(pretrained=str(tmp_path))


def save_flux_folder(root, text_encoders: bool = False):
    """A Kontext folder of tiny parts; the text encoders are configs only unless asked for
    (then a random CLIP and T5 with hand-made word vocabularies)."""
    transformer, vae = tiny_flux_parts()
    transformer.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    if text_encoders:
        save_tiny_text_encoders(root)
        return transformer
    for sub in ("text_encoder", "text_encoder_2"):  # configs only: loaded on first use
        (root / sub).mkdir()
        (root / sub / "config.json").write_text("{}")
    for sub in ("tokenizer", "tokenizer_2"):
        (root / sub).mkdir()
    return transformer


def save_tiny_text_encoders(root):
    import json

    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    words = "move the red blue square circle left right".split()
    (root / "tokenizer").mkdir()
    vocab = {
        "<|startoftext|>": 0,
        "<|endoftext|>": 1,
        **{f"{w}</w>": i + 2 for i, w in enumerate(words)},
    }
    (root / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (root / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    clip_tok = CLIPTokenizer(
        str(root / "tokenizer" / "vocab.json"), str(root / "tokenizer" / "merges.txt")
    )
    clip_tok.model_max_length = 16
    clip_tok.save_pretrained(root / "tokenizer")
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words]
    T5TokenizerFast(vocab=pieces, extra_ids=0).save_pretrained(root / "tokenizer_2")
    torch.manual_seed(0)
    clip = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=1,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(clip).save_pretrained(root / "text_encoder")
    t5 = T5Config(vocab_size=len(pieces), d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4)
    T5EncoderModel(t5).save_pretrained(root / "text_encoder_2")


def test_flux_loads_transformer_and_vae_from_a_local_folder(tmp_path):
    saved = save_flux_folder(tmp_path)
    policy = FluxKontextPolicy(pretrained=str(tmp_path), dtype="float32", guidance=2.0)
    assert policy.text.embedder.models is None  # the text encoders load on first use
    assert all(
        torch.equal(a, b) for a, b in zip(saved.parameters(), policy.transformer.parameters())
    )
    assert policy.config == {
        "pretrained": str(tmp_path),
        "dtype": "float32",
        "guidance": 2.0,
        "max_sequence_length": 512,
    }
    bf16 = FluxKontextPolicy(pretrained=str(tmp_path))
    assert bf16.latent_dtype == torch.bfloat16
    bf16.add_lora(LoraSettings(rank=2, alpha=2))
    lora = [p for n, p in bf16.named_parameters() if "lora_" in n]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    x = torch.randn(1, *bf16.latent_shape((SIZE, SIZE)))
    cond = FluxKontextPolicy.from_components(
        bf16.transformer, bf16.vae, WordEmbedder(32, 32)
    ).encode_condition(scenes(1)["source"], ["move the red square left"])
    assert bf16.velocity(x, torch.tensor([0.5]), cond).dtype == torch.bfloat16
    for weights in (tmp_path / "transformer").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelFilesError, match="could not load FluxTransformer2DModel"):
        FluxKontextPolicy(pretrained=str(tmp_path))


def test_flux_text_encoders_load_from_the_folder_on_first_use(tmp_path):
    save_flux_folder(tmp_path, text_encoders=True)
    policy = FluxKontextPolicy(str(tmp_path), dtype="float32", max_sequence_length=8)
    encoders = policy.text.embedder
    assert encoders.models is None
    images = scenes()["source"]
    cond = policy.encode_condition(images, ["move the red square left", "move the blue circle"])
    assert encoders.models is not None
    assert cond.text.shape == (2, 8, 32) and cond.pooled.shape == (2, 32)
    # padding is attended (as the pipeline does) but marked: 5 words + </s>, 4 words + </s>
    assert cond.text_mask.sum(1).tolist() == [6, 5]
    v = policy.velocity(torch.randn(2, *policy.latent_shape((SIZE, SIZE))), torch.rand(2), cond)
    assert v.shape == (2, 2, 8, 8) and torch.isfinite(v).all()
    again = policy.encode_condition(images, ["move the blue circle", "move the red square left"])
    assert torch.equal(again.text, cond.text.flip(0))  # from the cache, row for row


# --- the config overlays ---------------------------------------------------------------------

OVERLAYS = sorted((Path(__file__).resolve().parent.parent / "configs/backbones").glob("*.yaml"))
METHODS = ["sft.yaml", "talk2move.yaml"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_backbone_overlays_parse_over_method_configs(overlay, method, capsys):
    from lit_grpo.cli import run_cli

    config = str(overlay.parent.parent / method)
    with pytest.raises(SystemExit) as exit_:
        run_cli(["fit", "--config", config, "--config", str(overlay), "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    policy = "FluxKontextPolicy" if "flux" in overlay.name else "QwenImageEditPolicy"
    assert f"class_path: lit_grpo.policies.{policy}" in printed
    assert "rank: 64" in printed and "lr: 0.0001" in printed and "weights: null" in printed


def test_an_overlay_without_local_weights_is_refused_in_one_line(in_tmp, capsys):
    capsys.readouterr()
    overlay = OVERLAYS[0]  # both policies check their folder with the same code
    sft = str(overlay.parent.parent / "sft.yaml")
    assert main(["fit", "--config", sft, "--config", str(overlay)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    assert "FluxKontextPolicy: pretrained folder not found: /models/FLUX.1-Kontext-dev" in lines[0]


def test_importing_the_policies_does_not_import_diffusers():
    import subprocess
    import sys

    code = (
        "import sys, lit_grpo.policies; "
        "print(sorted(m for m in ('diffusers', 'transformers', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr
