"""Loading and saving policy weights, with errors that tell the user what to do.

Formats:
- `.safetensors` written by `save_policy_weights`: the merged (adapter-free) state dict and,
  in the metadata, the policy class and its constructor config, so an incompatible file is
  named as such instead of failing deep inside `load_state_dict`;
- a Lightning `.ckpt` of a lit_grpo stage (its `lit_grpo_policy` entry, written by the stage:
  the merged policy, or for a policy whose frozen weights come from local files
  (`EditPolicy.frozen_from_source`) the LoRA adapter alone and, under `weights`, the file
  the policy was started from (`weights:`), if any: when loaded, that file is loaded over
  the pretrained folder's weights first, then the adapter merged);
- a built-in name: a file shipped in `lit_grpo/weights/` (see `BUILTIN`).
"""

import copy
import json
from pathlib import Path

import torch
from torch import nn

from lit_grpo.checks import ConfigError, is_distributed_checkpoint, local_copy, read_checkpoint

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
BUILTIN = {"shapeworld-sft": WEIGHTS_DIR / "shapeworld_sft.safetensors"}


# constructor values that say where files are, not what the policy is: a folder may move
LOCATIONS = ("pretrained",)


class IncompatibleWeightsError(ConfigError):
    pass


def resolve_weights_path(weights: str) -> Path:
    if weights in BUILTIN:
        path = BUILTIN[weights]
        if not path.is_file():
            raise FileNotFoundError(
                f"built-in weights {weights!r} are missing from the installed package ({path}); "
                "reinstall lit_grpo or reproduce them with `python -m lit_grpo fit --config "
                "configs/sft.yaml` and pass the checkpoint path instead"
            )
        return path
    path = local_copy(weights, "policy weights")  # a URL: fetched, then read as data only
    if is_distributed_checkpoint(path):
        raise IncompatibleWeightsError(
            f"{path} is a distributed checkpoint (written under ModelParallelStrategy): its "
            "weights are in shards, not one file. Start from the run's base weights and its "
            "adapter (model.init_args.lora.init_from: <run>/checkpoints/lora/lora-step=N."
            "safetensors), or resume the same stage with --ckpt_path"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"policy weights file not found: {path.resolve()}. Pass a .safetensors written by "
            f"lit_grpo, a lit_grpo .ckpt, one of the built-in names {sorted(BUILTIN)}, or "
            "weights: null to start from random initialisation"
        )
    return path


def weights_reference(weights: str) -> str:
    """How a policy records the `weights` it was started from, so that its checkpoints can
    name the file from any working directory: a built-in name or a URL as given, a local
    path made absolute."""
    if weights in BUILTIN or "://" in weights:
        return weights
    return str(Path(weights).expanduser().resolve())


def policy_state(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's weights with any LoRA adapter merged in (a plain, adapter-free state dict)."""
    from lit_grpo.policies.lora import merged_state_dict

    return merged_state_dict(policy)


def policy_checkpoint_entry(
    policy: nn.Module, module_state: dict | None = None, prefix: str = "policy."
) -> dict:
    """What a lit_grpo stage stores under `checkpoint["lit_grpo_policy"]`: a self-describing,
    adapter-merged copy of the policy that any later stage can start from.

    `module_state` is the checkpoint's `state_dict`: callbacks such as Lightning's
    EMAWeightAveraging put the averaged weights there, and those are the ones to keep.
    """
    if module_state is not None:
        state = {k[len(prefix) :]: v for k, v in module_state.items() if k.startswith(prefix)}
        live = policy.state_dict()
        if any(k in live and not torch.equal(live[k], v) for k, v in state.items()):
            policy = copy.deepcopy(policy)
            policy.load_state_dict(state)
    return {
        "class": type(policy).__name__,
        "config": getattr(policy, "config", {}),
        "state_dict": policy_state(policy),
    }


def sharded_checkpoint_entry(policy: nn.Module) -> dict:
    """The `lit_grpo_policy` entry of a distributed (sharded) checkpoint: the policy's class
    and config, no weights (they are in the checkpoint's shards; gathering them into one
    copy per save is what sharding avoids). A later stage starts from the base weights and
    the exported adapter instead (`LoraExporter`, `lora.init_from`)."""
    return {
        "class": type(policy).__name__,
        "config": getattr(policy, "config", {}),
        "state_dict": None,
    }


def adapter_checkpoint_entry(
    policy: nn.Module, module_state: dict, prefix: str = "policy."
) -> dict:
    """The `lit_grpo_policy` entry of a policy whose frozen weights come from local files
    (`EditPolicy.frozen_from_source`): its class and config (the folder's path included),
    the weights file it was started from (`weights`, or None), the adapter's settings, and
    the policy's part of `module_state` (the checkpoint's `state_dict`, from which the stage
    has dropped the frozen weights: the adapter, unmerged, and anything else the folder
    does not hold). `load_policy_weights` loads that file over the folder's weights, then
    merges the adapter."""
    from lit_grpo.policies.lora import peft_settings

    return {
        "class": type(policy).__name__,
        "config": getattr(policy, "config", {}),
        "weights": getattr(policy, "base_weights", None),
        "state_dict": {
            k[len(prefix) :]: v for k, v in module_state.items() if k.startswith(prefix)
        },
        "lora": peft_settings(policy.denoiser),
    }


def save_policy_weights(policy: nn.Module, path: str | Path, resolution: int | None = None) -> Path:
    """`resolution`: the image side the policy was trained at, recorded for `edit`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in policy_state(policy).items()}
    meta = {"class": type(policy).__name__, "config": json.dumps(getattr(policy, "config", {}))}
    if resolution is not None:
        h, w = resolution
        meta["resolution"] = str(h) if h == w else f"{h}x{w}"
    save_file(state, str(path), metadata=meta)
    return path


def recorded_resolution(weights: str) -> tuple[int, int] | None:
    """(H, W) a weights file (`resolution` metadata) or a lit_grpo checkpoint (its data
    module's `resolution`) says the policy was trained at; None where it says nothing."""
    path = resolve_weights_path(weights)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            value = (f.metadata() or {}).get("resolution")
    else:  # mmap: only the small dict of hyper-parameters is read
        ckpt = read_checkpoint(path, "checkpoint")
        value = (ckpt.get("datamodule_hyper_parameters") or {}).get("resolution")
    if value is None:
        return None
    if isinstance(value, str):  # "32" or "32x48"
        value = [int(v) for v in value.strip("[]() ").replace("x", ",").split(",")]
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[-1])


def read_policy_file(weights: str) -> tuple[dict, dict, str | None]:
    """(state dict, constructor config, class name) stored in a weights file or checkpoint
    (of a checkpoint that holds the adapter alone: the adapter's tensors, unmerged)."""
    entry = _read_entry(weights)
    return entry["state_dict"], entry["config"], entry["class"]


def _read_entry(weights: str) -> dict:
    """A weights file or checkpoint as a `lit_grpo_policy` entry: state_dict, config, class,
    and lora (the adapter's settings where the state is an adapter to merge; else None)."""
    path = resolve_weights_path(weights)
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for a corrupt file
            raise IncompatibleWeightsError(f"could not read weights file {path}: {err}") from err
        entry = {"state_dict": state, "config": json.loads(meta.get("config", "{}"))}
        entry["class"] = meta.get("class")
    else:
        try:
            ckpt = read_checkpoint(path, "checkpoint")
        except ConfigError as err:  # the same file problem, as a weights error
            raise IncompatibleWeightsError(f"could not read checkpoint: {err}") from None
        entry = ckpt.get("lit_grpo_policy")
        if entry is None:
            raise IncompatibleWeightsError(
                f"{path} holds no lit_grpo policy (no 'lit_grpo_policy' entry): it was not "
                "written by a lit_grpo stage"
            )
        if entry["state_dict"] is None:
            raise IncompatibleWeightsError(
                f"{path} was written under sharding and holds no full copy of the policy; "
                "start from the base weights and the run's LoRA export (lora.init_from)"
            )
    return {"lora": None, "weights": None, **entry}


def load_policy(weights: str, **overrides) -> nn.Module:
    """Build the policy a weights file describes and load it (no config needed);
    `overrides` replace stored constructor values (`pretrained`: where the folder is now)."""
    _, config, cls = read_policy_file(weights)
    factory = policy_class(cls)
    if factory is None:
        known = ", ".join(sorted(policy_classes()))
        raise IncompatibleWeightsError(
            f"{weights} holds weights of unknown policy class {cls!r}; lit_grpo builds {known}"
        )
    return factory(**{**config, **overrides}, weights=weights)


def policy_classes() -> dict[str, type]:
    """The policy classes a weights file may name: lit_grpo's own `EditPolicy` subclasses
    exported by `lit_grpo.policies`, by bare class name."""
    from lit_grpo import policies
    from lit_grpo.policies.base import EditPolicy

    exported = (getattr(policies, name) for name in policies.__all__)
    return {
        c.__name__: c
        for c in exported
        if isinstance(c, type) and issubclass(c, EditPolicy) and c is not EditPolicy
    }


def policy_class(name: str | None) -> type | None:
    """The policy class a weights file names (its bare class name, or the full path
    `lit_grpo.policies....Name` of one of lit_grpo's policies); None for anything else.
    Never imports or calls a name outside `policy_classes()`: a weights file chooses among
    lit_grpo's policies, not arbitrary code."""
    if not name:
        return None
    module, _, bare = name.rpartition(".")
    cls = policy_classes().get(bare)
    if cls is None or (
        module and f"{cls.__module__}.{bare}" != name and module != "lit_grpo.policies"
    ):
        return None
    return cls


def load_policy_weights(policy: nn.Module, weights: str) -> None:
    path = resolve_weights_path(weights)
    entry = _read_entry(weights)
    state, lora = entry["state_dict"], entry["lora"]
    _check_compatible(policy, path, entry["class"], entry["config"])
    frozen: set[str] = set()
    if lora is not None:  # the adapter alone: merge it into the folder's weights
        from lit_grpo.policies.lora import has_lora, merge_lora_tensors

        if has_lora(policy):
            raise IncompatibleWeightsError(
                f"{path} holds a LoRA adapter to merge into the policy's pretrained weights; "
                "load it before the policy gets its own adapter"
            )
        if entry["weights"] is not None:  # the file that run started from, first
            _load_base(policy, entry["weights"], path)
        adapter = {k: v for k, v in state.items() if "lora_" in k}
        try:
            merge_lora_tensors(policy, adapter, lora["rank"], lora["alpha"])
        except ValueError as err:
            raise IncompatibleWeightsError(
                f"{path} does not fit {type(policy).__name__}: {err}"
            ) from None
        state = {k: v for k, v in state.items() if "lora_" not in k}
        frozen = policy.source_state_keys()  # from the pretrained folder, as built
    missing, unexpected = policy.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in frozen]
    if missing or unexpected:
        raise IncompatibleWeightsError(
            f"{path} does not fit {type(policy).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def _load_base(policy: nn.Module, weights: str, path: Path) -> None:
    """Load the weights file a checkpoint's run was started from (its entry's `weights`)."""
    try:
        load_policy_weights(policy, weights)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{path} holds a LoRA adapter trained over the policy weights {weights}, which "
            f"are needed to read it: {err}"
        ) from None


def _check_compatible(policy: nn.Module, path: Path, cls: str | None, config: dict) -> None:
    if cls and cls != type(policy).__name__:
        raise IncompatibleWeightsError(
            f"{path} holds weights of {cls}, not {type(policy).__name__}; choose the matching "
            "policy class_path in the config"
        )
    mine = getattr(policy, "config", {})
    differ = {
        k: (config[k], mine[k])
        for k in config
        if k in mine and k not in LOCATIONS and config[k] != mine[k]
    }
    if differ:
        lines = ", ".join(
            f"{k}: file {a!r} vs config {b!r}" for k, (a, b) in differ.items() if k != "vocabulary"
        )
        if "vocabulary" in differ:
            lines += (", " if lines else "") + "vocabulary differs"
        raise IncompatibleWeightsError(
            f"{path} was trained with another architecture ({lines}); set the policy's "
            "init_args to the file's values"
        )
