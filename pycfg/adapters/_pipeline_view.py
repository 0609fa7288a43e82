"""The user's pipeline seen with a request's private scheduler, so the pipeline's own helpers can run on it.

Some stock helpers read ``self.scheduler`` (img2img's ``get_timesteps`` sets the scheduler's begin index;
``prepare_latents`` noises the input image with ``self.scheduler.scale_noise``). Calling them on the user's
pipeline would step the user's scheduler; copying their arithmetic would drift from stock. A view is a shallow
copy of the pipeline whose ``scheduler`` is the private one: same modules, same config, same helpers.
"""

from __future__ import annotations

import copy


def with_scheduler(pipe, scheduler):
    """A shallow copy of ``pipe`` whose ``scheduler`` is ``scheduler`` (the user's pipeline is not touched)."""
    view = copy.copy(pipe)
    # bypass DiffusionPipeline.__setattr__: it would re-register the component in the (shared) config
    view.__dict__["scheduler"] = scheduler
    return view
