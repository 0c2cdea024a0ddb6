"""`vdu` / `python -m vdu_engine`: unlearn a concept into a LoRA, and render before/after grids."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import List, Optional

from . import __version__
from .config import MEMORY_DEFAULTS, UnlearnConfig
from .errors import VDUError
from .memory import MEMORY_PRESETS


def _unset_help(name: str) -> str:
    """What a memory option that is not given becomes: its plain default, or a preset's value."""
    def show(v):
        return ("on" if v else "off") if isinstance(v, bool) else str(v)
    by_value: dict = {}
    for preset, values in MEMORY_PRESETS.items():
        if name in values:
            by_value.setdefault(values[name], []).append(preset)
    return f"default: {show(MEMORY_DEFAULTS[name])}" + "".join(
        f", {show(v)} with --memory {' or '.join(presets)}" for v, presets in by_value.items())


def _flag_type(hint):
    """The type argparse converts to: Optional[X] is X."""
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per UnlearnConfig field, its help from the field's metadata. A memory option that
    is not given stays None, so that validate() can tell it from a value the user chose."""
    hints = typing.get_type_hints(UnlearnConfig)
    for f in fields(UnlearnConfig):
        if f.name == "concept":
            continue  # declared with --images below
        default = f.default if f.default is not MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        h = f.metadata["help"] + (f" ({_unset_help(f.name)})" if f.name in MEMORY_DEFAULTS else "")
        typ = _flag_type(hints[f.name])
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=h)
        elif typ is list:
            p.add_argument(flag, nargs="+", default=default, metavar="TEXT", help=h)
        else:
            p.add_argument(flag, type=typ, default=default, help=h)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except a None that the help text already explains."""

    def _get_help_string(self, action):
        if action.default is None and "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def config_from_args(args: argparse.Namespace) -> UnlearnConfig:
    """The validated settings of `vdu unlearn`: flags not given take the preset's or the default."""
    return UnlearnConfig(**{f.name: getattr(args, f.name) for f in fields(UnlearnConfig)}).validate()


def build_parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="vdu",
                                  description="Make a Stable Diffusion model forget a concept, as a LoRA.")
    top.add_argument("--version", action="version", version=f"vdu-unlearn {__version__}")
    sub = top.add_subparsers(dest="command", required=True)

    u = sub.add_parser("unlearn", help="train an unlearning LoRA", formatter_class=_HelpFormatter)
    _model_flags(u)
    src = u.add_argument_group("what to forget (images, a prompt, or both)")
    src.add_argument("--images", metavar="DIR",
                     help="folder of png/jpg/webp images of the concept; a .txt beside an image is its caption")
    concept = next(f for f in fields(UnlearnConfig) if f.name == "concept")
    src.add_argument("--concept", default=concept.default, metavar="TEXT", help=concept.metadata["help"])
    u.add_argument("--out", required=True, metavar="FILE", help="LoRA file to write (.safetensors, kohya format)")
    u.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    _add_config_flags(u.add_argument_group("training"))

    s = sub.add_parser("sample", help="render prompts with and without a LoRA, side by side",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _model_flags(s)
    s.add_argument("--lora", required=True, metavar="FILE", help="LoRA file (kohya format)")
    s.add_argument("--prompts", nargs="+", required=True, metavar="TEXT", help="one grid column per prompt")
    s.add_argument("--out", required=True, metavar="FILE", help="PNG to write")
    s.add_argument("--per-prompt", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    s.add_argument("--strength", type=float, default=1.0, help="LoRA strength")
    s.add_argument("--seed", type=int, default=0, help="first seed")
    s.add_argument("--steps", type=int, default=20, help="DDIM steps")
    s.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    s.add_argument("--resolution", type=int, default=None, help="pixels (None: the model's native resolution)")
    return top


def _model_flags(p):
    p.add_argument("model", help="diffusers pipeline folder (SD 1.x, 2.x, SDXL) or a single-file checkpoint")
    p.add_argument("--config-dir", metavar="DIR",
                   help="for a single-file checkpoint whose configs cannot be read from its weights: "
                        "a diffusers folder of the same architecture")
    p.add_argument("--prediction-type", choices=("auto", "epsilon", "v_prediction"), default="auto",
                   help="auto: from the file (v_pred key, modelspec metadata, SD 2.x test) or the folder's scheduler")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a .ckpt checkpoint (a pickle, which can run code when loaded)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (None: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="dtype of the frozen model (None: as stored); LoRA weights stay float32")


def _backend(args):
    import torch
    from .diffusers_backend import DiffusersBackend
    dtype = getattr(torch, args.dtype) if args.dtype else None
    pred = None if args.prediction_type == "auto" else args.prediction_type
    return DiffusersBackend.load(args.model, args.config_dir, device=args.device, dtype=dtype,
                                 prediction_type=pred, trust_pickle=args.trust_pickle)


def cmd_unlearn(args) -> int:
    from tqdm import tqdm
    from .data import ForgetSet
    from .saving import check_output_path
    from .distributed import Workers
    from .train import unlearn
    cfg = config_from_args(args)
    out = check_output_path(args.out, args.overwrite)  # fail before hours of work, not after
    forget = ForgetSet.from_folder(args.images) if args.images else None
    if forget:
        forget.captions_for(cfg.concept)
    workers = Workers()  # one process, or one of several under `accelerate launch`
    if workers.active and args.device is None:
        from accelerate import PartialState
        args.device = str(PartialState().device)  # this process's GPU (or the CPU)
    backend = _backend(args)
    bar = tqdm(total=cfg.steps, desc=f"{cfg.objective}", unit="step", disable=not workers.is_main)

    def progress(step, total, terms):
        bar.update(step - bar.n)
        bar.set_postfix({k: f"{v:.4g}" for k, v in terms.items()})
    try:
        result = unlearn(backend, cfg, forget, progress=progress)
    finally:
        bar.close()
    if workers.is_main:  # every process holds the same factors; one writes them
        result.save(out, overwrite=args.overwrite)
        print(f"wrote {out} ({len(result.lora) // 3} layers, {result.metadata['vdu_steps']} steps"
              + (f", {workers.world} processes)" if workers.active else ")"))
        print(result.summary())
    workers.barrier()
    return 0


def cmd_sample(args) -> int:
    from .grid import before_after_grid
    out = Path(args.out)
    if not out.parent.is_dir():
        raise VDUError(f"output directory {out.parent} does not exist; create it or pass another --out")
    if not Path(args.lora).is_file():
        raise VDUError(f"LoRA file {args.lora} does not exist; pass the .safetensors that `vdu unlearn` wrote")
    backend = _backend(args)
    img = before_after_grid(backend, args.lora, args.prompts, seed=args.seed, per_prompt=args.per_prompt,
                            steps=args.steps, guidance=args.guidance, resolution=args.resolution,
                            strength=args.strength)
    img.save(out)
    print(f"wrote {out}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return {"unlearn": cmd_unlearn, "sample": cmd_sample}[args.command](args)
    except VDUError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
