"""Hooks that sdlens installs for the length of one traced pipeline call (always removed):

* :mod:`sdlens.hooks.attention`: a recording processor wrapping every selected ``attn2`` processor
* :mod:`sdlens.hooks.unet`: forward (pre-)hooks on the UNet for the batch layout and the noise
* :mod:`sdlens.hooks.scheduler`: a ``scheduler.step`` wrapper for latents, timesteps and x0
"""

from .attention import RecordingProcessor, attention_probabilities
from .scheduler import StepWrapper, compute_x0, schedule_form
from .unet import UNetHooks

__all__ = ["RecordingProcessor", "attention_probabilities", "StepWrapper", "compute_x0",
           "schedule_form", "UNetHooks"]
