"""Forward hooks on the UNet: the batch layout before each call, the predicted noise after it.

Under classifier-free guidance SD pipelines call the UNet on ``cat([uncond, cond])`` and split the
output with ``chunk(2)``; without guidance (``guidance_scale <= 1``, LCM/turbo) the UNet sees only
the conditional batch. The recorder decides which case it is from the UNet's batch size compared
with the number of latents (batch items), never by assumption. Inpainting UNets take 9 input
channels (latents, mask, masked-image latents); SDXL passes ``added_cond_kwargs``: neither matters
here, the hooks only read the sample's shape and the output.
"""

from __future__ import annotations

from typing import Callable

import torch


class UNetHooks:
    """Installs ``register_forward_pre_hook`` / ``register_forward_hook`` on ``unet``.

    Args:
        unet: the pipeline's ``UNet2DConditionModel``.
        before: called with the UNet's input sample (B_unet, C_in, h, w) before each forward.
        after: called with the UNet's output (B_unet, C_out, h, w) after each forward.
    """

    def __init__(self, unet: torch.nn.Module, before: Callable[[torch.Tensor], None],
                 after: Callable[[torch.Tensor], None]):
        self.unet = unet
        self._before, self._after = before, after
        self.handles = []
        try:
            self.handles.append(unet.register_forward_pre_hook(self._pre, with_kwargs=True))
            self.handles.append(unet.register_forward_hook(self._post, with_kwargs=True))
        except Exception:
            self.remove()
            raise

    def _pre(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if torch.is_tensor(sample):
            self._before(sample)
        return None

    def _post(self, module, args, kwargs, output):
        if isinstance(output, (tuple, list)):
            out = output[0]
        else:
            out = getattr(output, "sample", output)
        if torch.is_tensor(out):
            self._after(out)
        return None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
