"""vdu-unlearn's engine: make a Stable Diffusion model forget a concept, as a LoRA.

    from vdu_engine import DiffusersBackend, ForgetSet, UnlearnConfig, unlearn
    backend = DiffusersBackend.load("path/to/model")  # a diffusers folder, or one .safetensors checkpoint
    result = unlearn(backend, UnlearnConfig(concept="a red circle"), ForgetSet.from_folder("imgs"))
    result.save("forget-red.safetensors")

Pure torch + diffusers + safetensors: this package never imports ComfyUI or the WebUI.
"""

__version__ = "0.1.0"

from .backend import AdaptTarget, Backend, NoiseSchedule  # noqa: E402
from .config import OBJECTIVES, PRIORS, UnlearnConfig  # noqa: E402
from .data import ForgetSet  # noqa: E402
from .errors import VDUError  # noqa: E402
from .layers import PRESETS  # noqa: E402
from .train import UnlearnResult, unlearn  # noqa: E402


def __getattr__(name):
    # diffusers is heavy to import; load the backend only when it is asked for.
    if name == "DiffusersBackend":
        from .diffusers_backend import DiffusersBackend
        return DiffusersBackend
    raise AttributeError(name)


__all__ = ["AdaptTarget", "Backend", "DiffusersBackend", "ForgetSet", "NoiseSchedule", "OBJECTIVES",
           "PRESETS", "PRIORS", "UnlearnConfig", "UnlearnResult", "VDUError", "unlearn"]
