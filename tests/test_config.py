"""Settings mean what they say: every field has help, explicit values beat a memory preset,
and validate() returns a resolved copy without touching its input."""

import dataclasses

import pytest

from vdu_engine import UnlearnConfig, VDUError
from vdu_engine.cli import build_parser, config_from_args, main
from vdu_engine.config import MEMORY_DEFAULTS
from vdu_engine.memory import MEMORY_PRESETS


def _cli(*flags):
    args = build_parser().parse_args(["unlearn", "model", "--out", "x.safetensors", "--concept", "x", *flags])
    return config_from_args(args)


def test_every_field_has_help_and_unlearn_help_shows_it(capsys):
    with pytest.raises(SystemExit) as e:
        main(["unlearn", "--help"])
    assert e.value.code == 0
    shown = "".join(capsys.readouterr().out.split())  # argparse rewraps lines and may break at hyphens
    for f in dataclasses.fields(UnlearnConfig):
        text = f.metadata.get("help", "")
        assert text.strip(), f"{f.name} has no help"
        assert "".join(text.split()) in shown, f.name
    # what an unset memory option becomes
    assert "(default:0,1with--memorybalancedorlow)" in shown
    assert "(default:off,onwith--memorylow)" in shown


def test_presets_only_set_memory_options_that_can_be_left_unset():
    for values in MEMORY_PRESETS.values():
        assert set(values) <= set(MEMORY_DEFAULTS)
    by_name = {f.name: f for f in dataclasses.fields(UnlearnConfig)}
    assert all(by_name[name].default is None for name in MEMORY_DEFAULTS)


@pytest.mark.parametrize("make", [
    lambda **kw: UnlearnConfig(concept="x", **kw).validate(),
    lambda **kw: _cli(*[a for k, v in kw.items() for a in _flag(k, v)]),
], ids=["dataclass", "cli"])
def test_an_explicit_value_beats_the_preset(make):
    cfg = make(memory="balanced", micro_batch_size=0)
    assert (cfg.micro_batch_size, cfg.offload_encoders, cfg.gradient_checkpointing) == (0, True, False)
    cfg = make(memory="low", gradient_checkpointing=False)
    assert (cfg.micro_batch_size, cfg.offload_encoders, cfg.gradient_checkpointing) == (1, True, False)
    cfg = make(memory="low", offload_encoders=False)
    assert (cfg.micro_batch_size, cfg.offload_encoders, cfg.gradient_checkpointing) == (1, False, True)
    cfg = make(memory="low")
    assert (cfg.micro_batch_size, cfg.offload_encoders, cfg.gradient_checkpointing) == (1, True, True)
    cfg = make()  # no preset: the plain defaults
    assert (cfg.micro_batch_size, cfg.offload_encoders, cfg.gradient_checkpointing) == (0, False, False)
    assert cfg.precision == "auto"
    cfg = make(memory="fast", micro_batch_size=2, gradient_checkpointing=True)
    assert (cfg.micro_batch_size, cfg.offload_encoders, cfg.gradient_checkpointing) == (2, False, True)


def _flag(name, value):
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [flag, str(value)]


def test_the_cli_passes_none_for_memory_flags_not_given():
    args = build_parser().parse_args(["unlearn", "model", "--out", "x.safetensors"])
    assert all(getattr(args, name) is None for name in MEMORY_DEFAULTS)
    args = build_parser().parse_args(["unlearn", "model", "--out", "x", "--no-offload-encoders",
                                      "--gradient-checkpointing", "--micro-batch-size", "0"])
    assert (args.offload_encoders, args.gradient_checkpointing, args.micro_batch_size) == (False, True, 0)


def test_validate_returns_a_resolved_copy_and_leaves_its_input_alone():
    cfg = UnlearnConfig(concept="x", memory="low", keep=["orange"])
    before = cfg.to_dict()
    out = cfg.validate()
    assert cfg.to_dict() == before
    assert all(getattr(cfg, name) is None for name in MEMORY_DEFAULTS)
    assert out is not cfg and out.keep is not cfg.keep
    assert (out.micro_batch_size, out.offload_encoders, out.gradient_checkpointing) == (1, True, True)
    assert out.validate() == out  # resolved values count as given
    assert out.to_dict()["micro_batch_size"] == 1  # what a run's metadata and logs see


def test_a_trained_text_encoder_is_not_offloaded_by_a_preset():
    cfg = UnlearnConfig(concept="x", memory="low", train_text_encoder=True).validate()
    assert cfg.offload_encoders is False and cfg.micro_batch_size == 1
    with pytest.raises(VDUError, match="--offload-encoders"):
        UnlearnConfig(concept="x", train_text_encoder=True, offload_encoders=True).validate()
    with pytest.raises(VDUError, match="--micro-batch-size"):
        UnlearnConfig(concept="x", memory="balanced", micro_batch_size=-1).validate()


def test_config_and_cli_lines_fit_120_characters():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    for rel in ("vdu_engine/config.py", "vdu_engine/cli.py", "nodes/unlearn_nodes.py"):
        long = [i for i, line in enumerate((root / rel).read_text(encoding="utf-8").splitlines(), 1)
                if len(line) > 120]
        assert not long, f"{rel}: lines {long} are over 120 characters"


def test_every_tracked_python_file_fits_120_characters():
    import shutil
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None:
        pytest.skip("git is not available")
    proc = subprocess.run(["git", "ls-files", "-z", "*.py"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"git ls-files failed: {proc.stderr.strip()}")
    long = []
    for rel in filter(None, proc.stdout.split("\0")):
        path = root / rel
        if not path.is_file():  # tracked but deleted in the work tree
            continue
        with open(path, encoding="utf-8") as f:
            lengths = [len(line.rstrip("\n")) for line in f]
        long += [f"{rel}:{i}:{n}" for i, n in enumerate(lengths, 1) if n > 120]
    assert not long, "lines over 120 characters (file:line:length):\n" + "\n".join(long)
