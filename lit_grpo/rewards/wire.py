"""The reward wire format: a rollout batch's `RewardInputs` to the reward server and its
`Scores` back, each one safetensors file in an HTTP body.

safetensors (already a dependency, for weights) carries raw tensors with their dtypes and
shapes and a string-to-string metadata header: no base64, no pickle (a reply is data, never
code), and any language with a safetensors reader can serve or call. Tensors travel on the
CPU, contiguous; strings and lists travel as JSON in the metadata.

request  (POST /score): tensors `images`, `source` ([N, 3, H, W], float32 in [0, 1], or
         uint8 0..255 when the client sends `pixels="uint8"`), `spec.direction` [N, 2],
         `spec.angle` [N], `spec.factor` [N]; when the client sends detections, `before.*`
         and `after.*` (the `Detections` fields: found, mask, box, centre, angle, area); and
         any of `ids`, `source_objects`, `attention`, `attention_region`,
         `attention_tokens` the inputs hold. Metadata: `protocol`, `lit_grpo` (the
         version), `instructions`, `task`, `object` (JSON lists of N strings).
reply    (200): tensors `total` [N], `parts.<name>` [N] (every reward's and sub-score's
         values), `regions.<reward>` [N, R] and `region_masks.<reward>` [N, R, H, W] for
         the rewards that score regions. Metadata: `protocol`, `lit_grpo`, `region_names`
         (JSON {reward: [R names]}).
errors   a JSON body {"error": one line}: 409 another protocol or lit_grpo version, 400 a
         request that does not decode, 422 a reward that raised or broke its contract.
"""

import json
from dataclasses import fields

import torch
from safetensors.torch import load, save
from torch import Tensor

from lit_grpo import __version__
from lit_grpo.perception.detections import Detections
from lit_grpo.rewards.base import EditSpec, RewardInputs, RewardOutput
from lit_grpo.rewards.scoring import Scores

PROTOCOL = 1
OPTIONAL = ("ids", "source_objects", "attention", "attention_region", "attention_tokens")


class WireError(ValueError):
    """A body that does not decode as the reward wire format; the message says what."""


def versions() -> dict[str, str]:
    """The versions a client and a server must share."""
    return {"protocol": str(PROTOCOL), "lit_grpo": __version__}


def version_mismatch(trainer: dict, server: dict) -> str | None:
    """One line naming both sides' versions when they differ, else None."""
    keys = ("protocol", "lit_grpo")
    trainer, server = ({k: str(side.get(k)) for k in keys} for side in (trainer, server))
    if trainer == server:
        return None
    return (
        f"the reward server speaks protocol {server['protocol']} of lit_grpo "
        f"{server['lit_grpo']}, the trainer protocol {trainer['protocol']} of lit_grpo "
        f"{trainer['lit_grpo']}; serve the rewards with the trainer's lit_grpo version"
    )


def _flat(t: Tensor) -> Tensor:
    return t.detach().to("cpu").contiguous()


def encode_inputs(inputs: RewardInputs, pixels: str = "float32", detections: bool = True) -> bytes:
    """The request body of `inputs` (see the module docstring)."""
    images, source = inputs.images, inputs.source
    if pixels == "uint8":  # 4x smaller; the rewards then see the edits as saved images
        images, source = (x.clamp(0, 1).mul(255).round().to(torch.uint8) for x in (images, source))
    tensors = {
        "images": _flat(images.float() if pixels == "float32" else images),
        "source": _flat(source.float() if pixels == "float32" else source),
        "spec.direction": _flat(inputs.spec.direction),
        "spec.angle": _flat(inputs.spec.angle),
        "spec.factor": _flat(inputs.spec.factor),
    }
    if detections:
        for side in ("before", "after"):
            for f in fields(Detections):
                tensors[f"{side}.{f.name}"] = _flat(getattr(getattr(inputs, side), f.name))
    for key in OPTIONAL:
        value = getattr(inputs, key)
        if value is not None:
            tensors[key] = _flat(value)
    meta = {
        **versions(),
        "instructions": json.dumps(list(inputs.instructions)),
        "task": json.dumps(list(inputs.spec.task)),
        "object": json.dumps(list(inputs.spec.object)),
    }
    return save(tensors, metadata=meta)


def _load(body: bytes, what: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors body, or a WireError naming `what`."""
    bad = f"the {what} is not a safetensors body ({len(body)} bytes: {body[:40]!r})"
    if len(body) < 8:
        raise WireError(bad)
    try:
        size = int.from_bytes(body[:8], "little")
        header = json.loads(body[8 : 8 + size])
        tensors = load(body)
    except Exception as err:  # safetensors raises its own errors on a bad header
        raise WireError(bad) from err
    meta = header.get("__metadata__") or {}
    return tensors, meta


def body_versions(body: bytes, what: str = "request") -> dict[str, str]:
    """The versions a request or reply body says it speaks ({} when it says none)."""
    return _load(body, what)[1]


def decode_inputs(body: bytes) -> tuple[RewardInputs | None, dict]:
    """(the request's `RewardInputs` with float images in [0, 1], None if it carries no
    detections, the metadata). Raises WireError on a body that does not decode."""
    tensors, meta = _load(body, "request")
    try:
        instructions, task, obj = (json.loads(meta[k]) for k in ("instructions", "task", "object"))
        images, source = tensors["images"], tensors["source"]
        if images.dtype == torch.uint8:
            images, source = images.float() / 255, source.float() / 255
        spec = EditSpec(
            task=task,
            object=obj,
            direction=tensors["spec.direction"],
            angle=tensors["spec.angle"],
            factor=tensors["spec.factor"],
        )
        found = {
            side: Detections(**{f.name: tensors[f"{side}.{f.name}"] for f in fields(Detections)})
            for side in ("before", "after")
            if f"{side}.found" in tensors
        }
    except (KeyError, TypeError, ValueError) as err:
        raise WireError(f"the request lacks or garbles {err}") from err
    n = images.shape[0]
    if not (len(instructions) == len(task) == len(obj) == source.shape[0] == n):
        raise WireError(f"the request's rows disagree: {n} images, {len(instructions)} texts")
    inputs = RewardInputs(
        images=images,
        source=source,
        instructions=instructions,
        spec=spec,
        before=found.get("before"),
        after=found.get("after"),
        **{key: tensors.get(key) for key in OPTIONAL},
    )
    return inputs, meta


def encode_scores(scores: Scores, server: dict[str, str] | None = None) -> bytes:
    """The reply body of `scores`, from a server of versions `server` (ours if None)."""
    tensors = {"total": _flat(scores.total)}
    tensors.update({f"parts.{k}": _flat(v.float()) for k, v in scores.parts.items()})
    names = {}
    for reward, out in scores.regions.items():
        tensors[f"regions.{reward}"] = _flat(out.regions.float())
        tensors[f"region_masks.{reward}"] = _flat(out.region_masks.float())
        names[reward] = list(out.region_names)
    meta = {**(server or versions()), "region_names": json.dumps(names)}
    return save(tensors, metadata=meta)


def decode_scores(body: bytes, n: int) -> Scores:
    """The `Scores` of a reply for `n` rows; WireError on anything else (a body that is not
    safetensors, a missing `total`, a tensor of the wrong shape)."""
    tensors, meta = _load(body, "reply")
    total = tensors.get("total")
    if total is None or tuple(total.shape) != (n,):
        got = "no total" if total is None else f"total of shape {tuple(total.shape)}"
        raise WireError(f"the reply has {got}, not [N] = ({n},)")
    parts = {k.removeprefix("parts."): v for k, v in tensors.items() if k.startswith("parts.")}
    bad = [k for k, v in parts.items() if tuple(v.shape) != (n,)]
    if bad:
        raise WireError(f"the reply's parts {bad} are not [N] = ({n},)")
    try:
        names = json.loads(meta.get("region_names", "{}"))
        regions = {
            reward: RewardOutput(
                total,
                regions=tensors[f"regions.{reward}"],
                region_names=tuple(region_names),
                region_masks=tensors[f"region_masks.{reward}"],
            )
            for reward, region_names in names.items()
        }
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise WireError(f"the reply's regions do not decode ({err})") from err
    return Scores(total, parts, regions)
