"""InstructRL4Pix's CLIP reward: how well the edit matches its instruction (papers/003).

The score of an edit is the cosine similarity of open_clip's embeddings of the edited image
and of its instruction, cos(E_image(edit), E_text(instruction)) in [-1, 1]
(`perception.clip.OpenCLIP.cosine`; open_clip's eval preprocessing on the image tensor).
InstructRL4Pix adds a CLIP term to its attention-map reward for instruction alignment; the
summary names no formula, so the plain cosine is our choice (no 100x scale and no clamp at
0, unlike the CLIP score metric `lit_grpo.metrics.CLIPScore`: a reward keeps the sign of bad
matches). It pairs the edit with the instruction, not with a caption of the edited scene
(ShapeWorld has none).

The model is loaded once, from local files (`model`: an open_clip architecture name or a
model-config JSON; `pretrained`: the weights file; nothing is downloaded, a missing file is
named), held frozen outside the module tree (not in checkpoints, not seen by the optimiser)
and run without gradients on the device of the images it scores. CLIP reads little geometry:
on ShapeWorld's spatial edits it checks that the scene still shows what the instruction
names, not that the object moved.
"""

from lit_grpo.perception.clip import load_open_clip
from lit_grpo.rewards.base import Reward, RewardInputs, RewardOutput


class CLIPReward(Reward):
    """cos(E_image(edit), E_text(instruction)) in [-1, 1] through open_clip.

    Args:
        model: open_clip architecture name ("ViT-B-32") or the path of a model-config JSON.
        pretrained: local weights file for it (required: lit_grpo never downloads).
        weight: this reward's share of the total.
    """

    name = "clip"

    def __init__(self, model: str, pretrained: str, weight: float = 1.0):
        super().__init__(weight)
        self.model, self.pretrained = model, pretrained
        self.judge = load_open_clip(model, pretrained)

    def forward(self, inputs: RewardInputs) -> RewardOutput:
        return RewardOutput(self.judge.cosine(inputs.images, list(inputs.instructions)))
