"""Swappable samplers: diffusers scheduler classes made from the model's own scheduler config.

The published model's scheduler is DDIM with v-prediction; every scheduler here is built from that
config (`from_config`), so `prediction_type="v_prediction"`, the beta schedule and `steps_offset`
carry over. A fresh instance is made for every image: multistep schedulers keep state between steps,
and no state may leak from one image (or thread) to the next.

| name | class | paper |
|---|---|---|
| ddim | DDIMScheduler | Song et al. 2021, https://arxiv.org/abs/2010.02502 |
| dpmpp-2m | DPMSolverMultistepScheduler (dpmsolver++, order 2) | Lu et al. 2022, https://arxiv.org/abs/2211.01095 |
| euler | EulerDiscreteScheduler | Karras et al. 2022, https://arxiv.org/abs/2206.00364 |
| unipc | UniPCMultistepScheduler | Zhao et al. 2023, https://arxiv.org/abs/2302.04867 |
"""

from __future__ import annotations

from typing import Any

from ..options import SCHEDULERS

#: Steps at which each scheduler is usually run (what the benchmark reports them at).
USUAL_STEPS = {"ddim": 50, "dpmpp-2m": 20, "euler": 30, "unipc": 15}
assert tuple(USUAL_STEPS) == SCHEDULERS


def make_scheduler(name: str, config: Any) -> Any:
    """A new scheduler `name` built from the model's scheduler config."""
    import diffusers

    if name == "ddim":
        return diffusers.DDIMScheduler.from_config(config)
    if name == "dpmpp-2m":
        return diffusers.DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler.from_config(config)
    if name == "unipc":
        return diffusers.UniPCMultistepScheduler.from_config(config)
    raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {name!r}")
