"""Loading pipelines, and telling what kind of pipeline a user handed us.

>>> pipe = load_pipeline()                                   # the shipped "shapes" model, CPU
>>> pipe = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda",
...                      dtype=torch.float16)                 # any SD 1.x / 2.x / SDXL from the hub
>>> describe(pipe)                                           # PipelineInfo(family='sd1', task='txt2img', ...)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlens.engine import schedules
from sdlens.engine.arch import SUPPORTED_PIPELINES, adapter_for

SHIPPED_MODEL = Path(__file__).parent / "models" / "shapes" / "weights"
# the models that ship in the package, by the names load_pipeline takes (None: the first)
SHIPPED_MODELS = {
    "shapes": SHIPPED_MODEL,  # UNet (SD 1.x architecture), attention maps taught
    "shapes-mmdit": Path(__file__).parent / "models" / "shapes" / "weights_mmdit",  # SD3, learned freely
}

#: A model folder's recommended call settings (``{"guidance_scale": 3, "max_sequence_length": 0,
#: ...}``): written next to the weights from the model's measured results (the shipped MMDiT's by
#: ``sdlens.models.shapes.card``, whose card reads the same file).
RECOMMENDED = "recommended.json"


def recommended_settings(model) -> dict:
    """The call settings ``model`` recommends (its folder's :data:`RECOMMENDED`; {} where there
    is none): what Studio and the CLI use by default, and what ``pipe(prompt, **settings)`` needs
    to get the figures of the model's card. ``model``: a pipeline (its ``name_or_path``), a
    folder, or a shipped model's name ("shapes-mmdit")."""
    if isinstance(model, (str, os.PathLike)) or model is None:
        folder = SHIPPED_MODELS.get(model if model is not None else "shapes", model)
    else:
        folder = getattr(model, "name_or_path", None)
    if not folder:
        return {}
    path = Path(str(folder)).expanduser() / RECOMMENDED
    if not path.is_file():
        return {}
    return dict(json.loads(path.read_text()))


# Short scheduler names accepted wherever a scheduler is chosen.
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@dataclass(frozen=True)
class PipelineInfo:
    """What a pipeline is: ``family`` in {"shapes", "sd1", "sd2", "sdxl", "sdxl-refiner"},
    ``task`` in {"txt2img", "img2img", "inpaint"}, and the facts sdlens relies on."""

    family: str
    task: str
    pipeline_class: str
    scheduler_class: str
    prediction_type: str
    vae_scaling_factor: float
    latent_channels: int
    cross_attention_layers: int
    name_or_path: str


def pipeline_task(pipe) -> str:
    """"txt2img", "img2img" or "inpaint", from the pipeline's class."""
    cls = type(pipe).__name__
    return "inpaint" if "Inpaint" in cls else "img2img" if "Img2Img" in cls else "txt2img"


def describe(pipe) -> PipelineInfo:
    """Tell what kind of pipeline ``pipe`` is; TypeError for pipelines sdlens cannot trace."""
    adapter = adapter_for(pipe)
    return PipelineInfo(
        family=adapter.family(), task=pipeline_task(pipe), pipeline_class=type(pipe).__name__,
        scheduler_class=type(pipe.scheduler).__name__,
        prediction_type=schedules.prediction_kind(pipe.scheduler),  # "flow": a velocity
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        latent_channels=int(pipe.vae.config.latent_channels),
        cross_attention_layers=len(adapter.sites()),
        name_or_path=str(getattr(pipe, "name_or_path", "") or ""),
    )


def make_scheduler(scheduler, config):
    """A scheduler from a short name (see ``SCHEDULERS``), a class name, a class or an instance,
    configured from ``config`` (the pipeline's scheduler config) where it is a name or class."""
    import diffusers

    if isinstance(scheduler, diffusers.SchedulerMixin):
        return scheduler
    if isinstance(scheduler, str):
        name = SCHEDULERS.get(scheduler.lower(), scheduler)
        cls = getattr(diffusers, name, None)
        if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
            raise ValueError(f"unknown scheduler {scheduler!r}; allowed: "
                             f"{', '.join(SCHEDULERS)} or a diffusers scheduler class name")
        scheduler = cls
    if isinstance(scheduler, type) and issubclass(scheduler, diffusers.SchedulerMixin):
        return scheduler.from_config(config)
    raise TypeError(f"scheduler must be a name ({', '.join(SCHEDULERS)}), a diffusers scheduler "
                    f"class or instance; got {type(scheduler).__name__}")


def _resolve(model: str | os.PathLike | None) -> tuple[str, dict]:
    """Return (folder or hub id, model_index.json contents); clear errors instead of the hub's."""
    if model is None or (isinstance(model, str) and model in SHIPPED_MODELS):
        name = model or "shapes"
        model = SHIPPED_MODELS[name]
        if not (model / "model_index.json").exists():
            arch = " --arch mmdit" if name == "shapes-mmdit" else ""
            raise FileNotFoundError(
                f"the shipped model {name!r} is missing from {model}; reinstall sdlens or rebuild "
                f"it with `python -m sdlens.models.shapes.train{arch} --export {model}`")
    path = Path(model).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise FileNotFoundError(f"{path} is a folder but has no model_index.json: not a "
                                    "diffusers pipeline folder (save one with pipe.save_pretrained)")
        return str(path), json.loads(index.read_text())
    text = str(model)
    looks_like_path = text.startswith((".", "/", "~")) or os.sep in text.strip("/").replace("/", "", 1) \
        or path.suffix in (".safetensors", ".ckpt")
    if path.exists():
        raise ValueError(f"{path} is a file; load_pipeline takes a diffusers folder or hub id "
                         "(single-file checkpoints: StableDiffusionPipeline.from_single_file)")
    if looks_like_path or text.count("/") > 1:
        raise FileNotFoundError(f"no such folder: {path}")
    # a hub id "owner/name": ask the hub (or its cache) for model_index.json
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    unreachable = ConnectionError(
        f"the Hugging Face hub is unreachable and {text} is not in the local cache; connect once "
        "to download it, or pass a local folder")
    try:
        # an unreachable hub costs the hub client ~25 s of retries: look it up first, and then
        # settle for the local cache
        local_only = not _hub_reachable()
        return text, json.loads(Path(hf_hub_download(
            text, "model_index.json", local_files_only=local_only)).read_text())
    except GatedRepoError as e:
        raise PermissionError(f"{text} is gated on the hub: accept its licence and log in "
                              "(`hf auth login`)") from e
    except RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{text!r} is neither a local folder nor a model on the hub "
                                "(check the spelling; private models need a login)") from e
    except LocalEntryNotFoundError as e:  # (a subclass of EntryNotFoundError: catch it first)
        raise unreachable from e
    except EntryNotFoundError as e:
        raise FileNotFoundError(f"{text} exists on the hub but has no model_index.json: it is "
                                "not a diffusers pipeline") from e
    except ValueError as e:  # malformed ids
        raise ValueError(f"{text!r} is not a valid hub id or folder: {e}") from e


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host resolves and accepts a connection (False offline)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class _DropNotice(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _quiet_loading():
    """Loading prints third-party chatter that is not the user's business: diffusers' and
    transformers' per-component progress bars, and transformers' notice that an image processor
    (which the pipelines sdlens loads never use) "requires torchvision ... falling back". Exactly
    those are silenced for the length of the load; everything else still reaches the user."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    bars = (d_logging.is_progress_bar_enabled(), t_logging.is_progress_bar_enabled())
    notice = logging.getLogger("transformers.utils.import_utils")
    drop = _DropNotice("requires torchvision (not installed); falling back to")
    d_logging.disable_progress_bar()
    t_logging.disable_progress_bar()
    notice.addFilter(drop)
    try:
        yield
    finally:
        notice.removeFilter(drop)
        if bars[0]:
            d_logging.enable_progress_bar()
        if bars[1]:
            t_logging.enable_progress_bar()


def load_pipeline(model: str | os.PathLike | None = None, device: str | torch.device | None = None,
                  dtype: torch.dtype | None = None, scheduler=None, progress_bar: bool = False):
    """Load a Stable Diffusion pipeline that sdlens can trace.

    Args:
        model: None or "shapes" for the shipped UNet model; "shapes-mmdit" for the shipped SD3
            (MMDiT) model, whose calls should pass ``max_sequence_length=0`` (it has no T5: see
            its model card; sdlens's own commands do); a hub id ("stable-diffusion-v1-5/
            stable-diffusion-v1-5") or a local diffusers folder. The pipeline class (SD 1.x / 2.x /
            SDXL, txt2img / img2img / inpaint) comes from the folder's model_index.json.
        device: "cuda", "cpu", ... (default: cuda when available, else cpu).
        dtype: default float16 on cuda, float32 elsewhere.
        scheduler: None keeps the model's; else a short name (ddim, ddpm, pndm, euler, euler_a,
            lms, heun, dpm++, unipc), a diffusers scheduler class or instance.
        progress_bar: show diffusers' per-step progress bar.
    """
    import diffusers

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype such as torch.float16, got {dtype!r}")
    source, index = _resolve(model)
    cls_name = index.get("_class_name", "")
    if cls_name not in SUPPORTED_PIPELINES:
        raise TypeError(f"{source} is a {cls_name or 'pipeline of unknown class'}; sdlens "
                        f"supports {', '.join(SUPPORTED_PIPELINES)}")
    kwargs = {}
    if "safety_checker" in index:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    # components the folder says are absent ([null, null], e.g. SD3 without T5): diffusers
    # skips them and then asks for them, unless they are passed as None
    kwargs.update({k: None for k, v in index.items()
                   if isinstance(v, list) and len(v) == 2 and v[0] is None})
    with _quiet_loading():  # the class lookup imports the pipeline's module: quiet it too
        pipe = getattr(diffusers, cls_name).from_pretrained(source, dtype=dtype, **kwargs)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress_bar)
    describe(pipe)  # refuses pipelines sdlens cannot trace
    return pipe
