"""The settings of one unlearning run, validated before any work starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

from .errors import VDUError
from .layers import DEFAULT_PRESET, PRESETS
from .memory import MEMORY_PRESETS, PRECISIONS

OBJECTIVES = ("vdu", "esd", "score_align", "gradient_ascent", "uce")
PRIORS = ("isotropic", "fisher", "ensemble")


@dataclass
class UnlearnConfig:
    """Every knob of a run. Field comments are the CLI's help text."""

    objective: str = "vdu"  # vdu | esd | score_align | gradient_ascent | uce
    concept: str = ""  # prompt naming the concept: caption of images without a .txt, and the prompt of prompt-only runs
    anchor: str = ""  # safe prompt the concept turns into ("" = the caption without it)
    steps: int = 200  # optimisation steps
    rank: int = 4  # LoRA rank
    alpha: float = 4.0  # LoRA alpha (scale = alpha / rank)
    lr: float = 3e-3  # AdamW learning rate of the LoRA factors
    batch_size: int = 4  # forget images per step
    gamma: float = 0.5  # VDU weight of the stability regularizer (1 − gamma weighs the plasticity inducer)
    prior: str = "fisher"  # isotropic | fisher | ensemble: variance of the Gaussian prior over weights
    prior_sigma: float = 10.0  # prior standard deviation (isotropic), or its scale (fisher, ensemble)
    ensemble: List[str] = field(default_factory=list)  # other checkpoints of the same architecture (prior=ensemble)
    fisher_samples: int = 32  # images the model generates to estimate the Fisher prior
    fisher_prompts: List[str] = field(default_factory=list)  # preservation prompts ("" = unconditional; none = automatic)
    keep: List[str] = field(default_factory=list)  # words to hold, e.g. "orange" when forgetting "red"
    replay: float = 10.0  # weight of the drift of the model's own predictions (0 = off)
    replay_batch: int = 0  # replayed images per step, in the same forward pass as the forget batch (0 = --batch-size)
    destination: float = 0.0  # weight of the destination term (0 = off: it slowed forgetting)
    destination_mode: str = "remove"  # remove (caption without it) | neighbours (their mean)
    anchor_guidance: float = 1.0  # strength of the destination's negative guidance
    plasticity: float = 1.0  # VDU weight of the bounded plasticity inducer (the paper's term)
    neighbours: int = 8  # nearest words checked: synonyms forgotten, neighbours held
    uce_preserve: float = 1.0  # uce: weight of the preserved embeddings against the erased ones
    uce_lambda: float = 0.1  # uce: ridge weight holding the edited projections near the loaded ones
    variational: bool = False  # mean-field Gaussian posterior over the LoRA factors (exports the mean)
    bound: float = 2.0  # plasticity bound: per-sample error capped at bound × the frozen model's error at that timestep
    stop_when_bounded: float = 0.9  # stop once this share of samples sits at the bound (0 disables)
    t_min: float = 0.0  # lowest timestep trained, as a fraction of the schedule
    t_max: float = 0.6  # highest timestep trained, as a fraction of the schedule
    esd_eta: float = 1.0  # ESD negative-guidance strength
    layers: str = DEFAULT_PRESET  # cross_attention | attention | attention_ff | all
    train_text_encoder: bool = False  # also adapt the text encoder(s)
    resolution: Optional[int] = None  # training resolution in pixels (default: the model's native one)
    num_images: int = 16  # prompt-only mode: forget images generated with the model itself
    sample_steps: int = 20  # sampler steps when the model generates images
    guidance: float = 7.5  # classifier-free guidance when the model generates images
    seed: int = 0  # seeds noise, timesteps, LoRA init and generated images
    cache_dir: Optional[str] = None  # where the Fisher prior is cached (default ~/.cache/vdu-unlearn)
    memory: str = ""  # memory preset: fast | balanced | low ("" = the memory flags as given; flags override it)
    precision: str = "auto"  # auto | fp32 | half | bf16 | fp16 (auto = half on a GPU)
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, more time)
    micro_batch_size: int = 0  # images per forward/backward pass; a step's batch is split into passes (0 = whole batch)
    offload_encoders: bool = False  # move the VAE and text encoder(s) to the CPU while the UNet trains

    def validate(self) -> "UnlearnConfig":
        def bad(name, why):
            raise VDUError(f"--{name.replace('_', '-')}: {why}")

        if self.objective not in OBJECTIVES:
            bad("objective", f"{self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.prior not in PRIORS:
            bad("prior", f"{self.prior!r} is not one of {', '.join(PRIORS)}")
        if self.layers not in PRESETS:
            bad("layers", f"{self.layers!r} is not one of {', '.join(PRESETS)}")
        for name, lo in (("steps", 1), ("rank", 1), ("batch_size", 1), ("num_images", 1),
                         ("fisher_samples", 1), ("sample_steps", 1), ("replay_batch", 0)):
            if int(getattr(self, name)) < lo:
                bad(name, f"must be at least {lo}, got {getattr(self, name)}")
        if not float(self.replay) >= 0:
            bad("replay", f"must be 0 (off) or positive, got {self.replay}")
        for name in ("lr", "alpha", "prior_sigma", "bound"):
            if not float(getattr(self, name)) > 0:
                bad(name, f"must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.gamma < 1.0:
            bad("gamma", f"must be in [0, 1) (1 leaves nothing to forget), got {self.gamma}")
        if not 0.0 <= self.stop_when_bounded <= 1.0:
            bad("stop_when_bounded", f"must be in [0, 1], got {self.stop_when_bounded}")
        if not 0.0 <= self.t_min < self.t_max <= 1.0:
            bad("t_min", f"need 0 ≤ t-min < t-max ≤ 1, got {self.t_min} and {self.t_max}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            bad("resolution", f"must be a positive multiple of 8, got {self.resolution}")
        if self.memory and self.memory not in MEMORY_PRESETS:
            bad("memory", f"{self.memory!r} is not one of {', '.join(MEMORY_PRESETS)}")
        defaults = UnlearnConfig()
        for name, value in MEMORY_PRESETS.get(self.memory, {}).items():
            if name == "offload_encoders" and self.train_text_encoder:
                continue  # a trained text encoder stays where it is
            if getattr(self, name) == getattr(defaults, name):  # an explicit flag wins over the preset
                setattr(self, name, value)
        if self.precision not in PRECISIONS:
            bad("precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if int(self.micro_batch_size) < 0:
            bad("micro_batch_size", f"must be 0 (whole batch) or more, got {self.micro_batch_size}")
        if self.offload_encoders and self.train_text_encoder:
            bad("offload_encoders", "the text encoder cannot be offloaded while it is trained; "
                "drop --train-text-encoder or --offload-encoders")
        if self.objective in ("esd", "score_align") and not self.concept.strip():
            bad("concept", f"the {self.objective} objective needs the concept prompt; pass --concept TEXT")
        word = self.concept.strip().lower()
        if any(k.strip().lower() == word for k in self.keep) and word:
            bad("keep", f"{self.concept!r} is both forgotten and kept; drop it from --keep")
        if self.keep and not word:
            bad("keep", "kept concepts take the concept's place in the captions; pass --concept TEXT too")
        if any(not k.strip() for k in self.keep):
            bad("keep", "an empty concept to keep; give words such as --keep orange")
        if self.destination_mode not in ("remove", "neighbours"):
            bad("destination_mode", f"{self.destination_mode!r} is not one of remove, neighbours")
        if not float(self.destination) >= 0 or not float(self.plasticity) >= 0:
            bad("destination", "the destination and plasticity weights must be 0 (off) or positive")
        if int(self.neighbours) < 0:
            bad("neighbours", f"must be 0 (off) or more, got {self.neighbours}")
        if self.objective == "vdu" and self.destination == 0 and self.plasticity == 0:
            bad("plasticity", "with --destination 0 and --plasticity 0 nothing is forgotten; raise one of them")
        if self.prior == "ensemble" and self.objective == "vdu" and not self.ensemble:
            bad("ensemble", "prior=ensemble needs at least one other checkpoint; pass --ensemble PATH")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in fields(cls)]
