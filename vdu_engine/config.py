"""The settings of one unlearning run, validated before any work starts."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

from .errors import VDUError
from .layers import DEFAULT_PRESET, PRESETS
from .memory import MEMORY_PRESETS, PRECISIONS

OBJECTIVES = ("vdu", "esd", "score_align", "gradient_ascent", "uce")
PRIORS = ("isotropic", "fisher", "ensemble")


# What a memory option left unset (None) becomes when no --memory preset sets it. Every field a
# preset sets is here, so that a value the user gave can be told from one they left out.
# (Precision is no preset's: its default, auto, already depends on the device.)
MEMORY_DEFAULTS = {"gradient_checkpointing": False, "micro_batch_size": 0, "offload_encoders": False}


@dataclass
class UnlearnConfig:
    """Every knob of a run. Each field's `metadata["help"]` is its --help text.

    The memory options (MEMORY_DEFAULTS) default to None, "unset": `validate()` fills them from
    the --memory preset, else from MEMORY_DEFAULTS, and leaves values the user gave as they are."""

    objective: str = field(default="vdu", metadata={"help":
        f"training objective: {' | '.join(OBJECTIVES)} (vdu is this project's method, the others baselines)"})
    concept: str = field(default="", metadata={"help":
        "prompt naming the concept: the caption of images without a .txt; without images, the model "
        "generates --num-images of it"})
    anchor: str = field(default="", metadata={"help":
        'safe prompt the concept turns into ("" = the caption without the concept)'})
    steps: int = field(default=200, metadata={"help":
        "optimisation steps (fewer when --stop-when-bounded ends the run early)"})
    rank: int = field(default=4, metadata={"help": "LoRA rank"})
    alpha: float = field(default=4.0, metadata={"help": "LoRA alpha (the LoRA's scale is alpha / rank)"})
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate of the LoRA factors"})
    batch_size: int = field(default=4, metadata={"help": "forget images per step"})
    gamma: float = field(default=0.5, metadata={"help":
        "vdu: weight of the stability regularizer; 1 - gamma weighs the plasticity inducer"})
    prior: str = field(default="fisher", metadata={"help":
        f"vdu: variance of the Gaussian prior over the weights: {' | '.join(PRIORS)} (isotropic: one sigma; "
        "fisher: estimated from images the model generates; ensemble: the spread of other checkpoints)"})
    prior_sigma: float = field(default=10.0, metadata={"help":
        "prior standard deviation (isotropic), or its scale (fisher, ensemble)"})
    ensemble: List[str] = field(default_factory=list, metadata={"help":
        "other checkpoints of the same architecture, for --prior ensemble"})
    fisher_samples: int = field(default=32, metadata={"help":
        "images the model generates for its preservation prompts (the Fisher prior, replay) and for the destination"})
    fisher_prompts: List[str] = field(default_factory=list, metadata={"help":
        'prompts of what the Fisher prior preserves ("" = unconditional; none given = chosen automatically)'})
    keep: List[str] = field(default_factory=list, metadata={"help":
        'words whose images must not change, e.g. "orange" when forgetting "red"'})
    replay: float = field(default=10.0, metadata={"help":
        "weight of the penalty on drift of the model's own predictions on replayed images (0 = off)"})
    hold_unconditional: bool = field(default=True, metadata={"help":
        "replay also holds the unconditional prediction on every replayed image: classifier-free guidance "
        "evaluates it for every prompt, so its drift moves them all"})
    hold_neighbours: bool = field(default=True, metadata={"help":
        "replay on the forget images too: hold the frozen model's predictions there for the forget captions with "
        "a neighbour in the concept's place, so the concept does not move into its neighbours' prompts"})
    replay_batch: int = field(default=0, metadata={"help":
        "replayed images per step, in the same forward pass as the forget batch (0 = --batch-size)"})
    destination: float = field(default=1.0, metadata={"help":
        "weight of the destination term, which pulls the concept towards --destination-mode's target, so that "
        "its prompts still draw the rest of what they ask for (0 = off)"})
    destination_check: bool = field(default=True, metadata={"help":
        "auto mode: check that the model no longer draws the concept for its captions with the concept taken "
        "out (off: always take it out)"})
    destination_mode: str = field(default="auto", metadata={"help":
        "what the concept's prompts draw instead: remove (the caption without the concept) | neighbours (the "
        "caption with the concept's nearest neighbour in its place) | auto (remove, or neighbours where the model "
        "still draws the concept without its word)"})
    anchor_guidance: float = field(default=1.0, metadata={"help":
        "strength of the destination's negative guidance, away from the concept (remove and anchor; a neighbour "
        "is not pushed past)"})
    text_destination: bool = field(default=True, metadata={"help":
        "vdu: also teach the text encoder to read the concept's word (and its synonyms) as its destination word, "
        "in every context: the anchor if it is one word, else the nearby word the model draws most differently; "
        "off where the captions hold the concept alone or the text encoder is trained (--train-text-encoder)"})
    text_steps: int = field(default=800, metadata={"help":
        "vdu with --text-destination: the text encoder's training steps at most (it stops once the destination term "
        "is a hundredth of its first value)"})
    plasticity: float = field(default=0.5, metadata={"help":
        "vdu: weight of the bounded plasticity inducer against the destination's (1); the default 0.5 came from a "
        "sweep on the mini world (docs/quality/tuning.md)"})
    neighbours: int = field(default=8, metadata={"help":
        "nearest words checked: synonyms are forgotten too, the other neighbours held (0 = off)"})
    uce_preserve: float = field(default=1.0, metadata={"help":
        "uce: weight of the preserved embeddings against the erased ones"})
    uce_lambda: float = field(default=0.1, metadata={"help":
        "uce: ridge weight holding the edited projections near the loaded ones"})
    variational: bool = field(default=False, metadata={"help":
        "learn a mean-field Gaussian posterior over the LoRA factors (the saved LoRA is its mean)"})
    bound: float = field(default=2.0, metadata={"help":
        "plasticity bound: a sample's error is capped at bound x the frozen model's error on that same sample"})
    stop_when_bounded: float = field(default=0.9, metadata={"help":
        "stop once this share of samples sits at the bound (0 = never stop early)"})
    t_min: float = field(default=0.0, metadata={"help": "lowest timestep trained, as a fraction of the schedule"})
    t_max: float = field(default=0.6, metadata={"help": "highest timestep trained, as a fraction of the schedule"})
    esd_eta: float = field(default=1.0, metadata={"help": "esd: negative-guidance strength"})
    layers: str = field(default=DEFAULT_PRESET, metadata={"help":
        f"layers that get a LoRA: {' | '.join(PRESETS)}"})
    train_text_encoder: bool = field(default=False, metadata={"help": "also adapt the text encoder(s)"})
    resolution: Optional[int] = field(default=None, metadata={"help":
        "training resolution in pixels (default: the model's native one)"})
    own_forget_images: bool = field(default=True, metadata={"help":
        "vdu, image runs: also forget --fisher-samples images the model draws for the forget images' captions: "
        "what sampling draws for the concept, beside what the images show"})
    concept_prefix: bool = field(default=True, metadata={"help":
        "vdu: also forget each caption cut after the concept (\"a small orange circle on a grey background\" -> "
        "\"a small orange circle\"): a causal text encoder (CLIP) encodes that prefix alike in every prompt that "
        "goes on from it, so the forgetting reaches settings the captions do not name; the prefix is held as its "
        "caption is (the preservation prompts)"})
    num_images: int = field(default=32, metadata={"help":
        "prompt-only runs: how many images of the concept the model generates to forget (the default matches "
        "--fisher-samples, the model's own images an image run adds)"})
    forget_prompts: List[str] = field(default_factory=list, metadata={"help":
        'prompt-only runs: prompts naming the concept in the context it is used in ("a large red circle on '
        'a black background"), drawn in turn for the --num-images images (none given = the concept alone)'})
    sample_steps: int = field(default=20, metadata={"help": "sampler steps when the model generates images"})
    guidance: float = field(default=7.5, metadata={"help":
        "classifier-free guidance when the model generates images"})
    seed: int = field(default=0, metadata={"help": "seeds noise, timesteps, LoRA init and generated images"})
    cache_dir: Optional[str] = field(default=None, metadata={"help":
        "where the Fisher prior is cached (default: ~/.cache/vdu-unlearn)"})
    memory: str = field(default="", metadata={"help":
        f"memory preset: {' | '.join(MEMORY_PRESETS)}; it sets those of "
        f"{', '.join('--' + name.replace('_', '-') for name in MEMORY_DEFAULTS)} that are not given "
        '("" = none). No memory option changes what is learned beyond rounding'})
    precision: str = field(default="auto", metadata={"help":
        f"precision of the frozen model's forward: {' | '.join(PRECISIONS)} (auto = half on a GPU, fp32 on "
        "a CPU); the LoRA factors stay fp32"})
    gradient_checkpointing: Optional[bool] = field(default=None, metadata={"help":
        "recompute activations in the backward pass: less memory, more time"})
    micro_batch_size: Optional[int] = field(default=None, metadata={"help":
        "images per forward/backward pass; a step's batch is split into passes (0 = the whole batch in one)"})
    offload_encoders: Optional[bool] = field(default=None, metadata={"help":
        "move the VAE and text encoder(s) to the CPU while the UNet trains (not with --train-text-encoder)"})

    def validate(self) -> "UnlearnConfig":
        """A checked copy with the unset memory options resolved; this config is left as it is.

        Validating the result again gives an equal config: resolved values count as given."""
        return copy.deepcopy(self)._check_and_resolve()

    def _check_and_resolve(self) -> "UnlearnConfig":
        def bad(name, why):
            raise VDUError(f"--{name.replace('_', '-')}: {why}")

        if self.objective not in OBJECTIVES:
            bad("objective", f"{self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.prior not in PRIORS:
            bad("prior", f"{self.prior!r} is not one of {', '.join(PRIORS)}")
        if self.layers not in PRESETS:
            bad("layers", f"{self.layers!r} is not one of {', '.join(PRESETS)}")
        for name, lo in (("steps", 1), ("rank", 1), ("batch_size", 1), ("num_images", 1),
                         ("fisher_samples", 1), ("sample_steps", 1), ("replay_batch", 0), ("text_steps", 1)):
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
        preset = MEMORY_PRESETS.get(self.memory, {})
        for name, plain in MEMORY_DEFAULTS.items():
            if getattr(self, name) is None:  # unset: the preset's value, else the plain default
                value = preset.get(name, plain)
                if name == "offload_encoders" and self.train_text_encoder:
                    value = plain  # a trained text encoder stays where it is
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
        if self.destination_mode not in ("auto", "remove", "neighbours"):
            bad("destination_mode", f"{self.destination_mode!r} is not one of auto, remove, neighbours")
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
