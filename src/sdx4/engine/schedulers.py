"""Swappable samplers: diffusers scheduler classes made from the model's own scheduler config.

The published model's scheduler is DDIM with v-prediction; every scheduler here is built from that
config (`from_config`), so `prediction_type="v_prediction"`, the beta schedule and `steps_offset`
carry over. A fresh instance is made for every image: multistep schedulers keep state between steps,
and no state may leak from one image (or thread) to the next.

Which samplers exist, their classes, arguments, usual step counts and papers: `options.SCHEDULER_SPECS`
(ddim: DDIMScheduler; dpmpp-2m: DPMSolverMultistepScheduler, dpmsolver++ order 2; euler:
EulerDiscreteScheduler; unipc: UniPCMultistepScheduler).
"""

from __future__ import annotations

from typing import Any

from ..options import SCHEDULER_SPECS, SCHEDULERS

#: Steps at which each scheduler is usually run (what the benchmark reports them at).
USUAL_STEPS = {name: spec.usual_steps for name, spec in SCHEDULER_SPECS.items()}


def make_scheduler(name: str, config: Any) -> Any:
    """A new scheduler `name` built from the model's scheduler config."""
    import diffusers

    spec = SCHEDULER_SPECS.get(name)
    if spec is None:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}; got {name!r}")
    return getattr(diffusers, spec.diffusers_class).from_config(config, **dict(spec.arguments))
