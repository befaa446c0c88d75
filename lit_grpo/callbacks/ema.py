"""An EMA of the weights with a warm-up, on Lightning's WeightAveraging.

Lightning's EMAWeightAveraging applies a constant decay from the first step, so after n
steps the average still holds decay^n of the random initialisation (13% after 1000 steps at
0.998), and its `update_starting_at_step` leaves a run shorter than that step with its
initial weights (the average is copied into the model when training ends). The usual cure
in diffusion training (timm, diffusers' EMAModel warm-up) is a decay that grows with the
number of updates n: min(decay, (1 + n) / (10 + n)).
"""

from lightning.pytorch.callbacks import WeightAveraging


def warmup_ema(decay: float):
    def avg_fn(averaged, current, num_averaged):
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        return averaged + (current - averaged) * (1.0 - d)

    return avg_fn


class EMAWeightAveraging(WeightAveraging):
    """EMA of the weights, decay min(decay, (1 + n) / (10 + n)) after n updates.

    Validation, checkpoints (`state_dict`) and the model after training use the average.

    Args:
        decay: the decay the warm-up approaches (0.995 averages roughly the last 200 steps).
    """

    def __init__(self, decay: float = 0.995):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        super().__init__(use_buffers=True, avg_fn=warmup_ema(decay))
        self.decay = decay
