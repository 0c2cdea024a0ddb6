"""Memory options change how a step is computed, never what it learns; several processes under
`accelerate launch` learn what one process learns."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from vdu_engine import DiffusersBackend, UnlearnConfig, VDUError, unlearn

STEPS = 3


def _run(tiny_sd1, fast_config, **kw):
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    cfg = fast_config(steps=STEPS, batch_size=4, prior="fisher", stop_when_bounded=0, **kw)
    return unlearn(b, cfg), b


def _lora(tiny_sd1, fast_config, **kw):
    result, b = _run(tiny_sd1, fast_config, **kw)
    return result.lora, b


def _assert_same_lora(a, b, rel=1e-3):
    """Equal up to rounding: Adam's first steps divide by √v, which magnifies float32 rounding
    of tiny gradients to ~1e-4 of a factor's size; a wrong split of the batch moves it by O(1)."""
    assert a.keys() == b.keys()
    # the first step moves `up` away from zero: compare the learned deltas, not only the shapes
    assert max(v.abs().max() for k, v in a.items() if k.endswith("lora_up.weight")) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=rel * a[k].abs().max().item() + 1e-12, msg=k)


@pytest.mark.parametrize("objective", ["vdu", "esd"])
def test_micro_batches_and_checkpointing_learn_the_same_lora(objective, tiny_sd1, fast_config):
    ref, _ = _lora(tiny_sd1, fast_config, objective=objective)
    split, _ = _lora(tiny_sd1, fast_config, objective=objective, micro_batch_size=1)
    ckpt, b = _lora(tiny_sd1, fast_config, objective=objective, gradient_checkpointing=True)
    _assert_same_lora(ref, split)
    _assert_same_lora(ref, ckpt)
    # the wrappers are gone: every block runs its class's own forward again
    assert all("forward" not in vars(m) for m in b.unet.modules())


def test_half_precision_trains_float32_factors(tiny_sd1, fast_config):
    ref, _ = _run(tiny_sd1, fast_config)
    bf16, b = _run(tiny_sd1, fast_config, precision="bf16")
    assert all(v.dtype == torch.float32 for v in bf16.lora.values())
    assert b.unet.dtype == torch.float32  # the model itself is not converted
    # the first step's forward error is the same up to bf16 rounding (and is rounded: autocast ran)
    e32, e16 = ref.history[0]["forget_error"], bf16.history[0]["forget_error"]
    assert e32 != e16 and abs(e32 - e16) < 0.02 * e32


def test_memory_preset_sets_options_and_explicit_flags_win():
    low = UnlearnConfig(concept="x", memory="low").validate()
    assert (low.precision, low.gradient_checkpointing, low.micro_batch_size, low.offload_encoders) == \
        ("auto", True, 1, True)
    mine = UnlearnConfig(concept="x", memory="low", micro_batch_size=2, gradient_checkpointing=False).validate()
    assert (mine.micro_batch_size, mine.gradient_checkpointing, mine.offload_encoders) == (2, True, True)
    assert not UnlearnConfig(concept="x", memory="low", train_text_encoder=True).validate().offload_encoders
    with pytest.raises(VDUError, match="--memory: 'tiny' is not one of fast, balanced, low"):
        UnlearnConfig(concept="x", memory="tiny").validate()
    with pytest.raises(VDUError, match="--precision"):
        UnlearnConfig(concept="x", precision="fp8").validate()


def _cli_args(tiny_sd1, red_images, out, cache):
    return ["unlearn", str(tiny_sd1), "--images", str(red_images), "--concept", "a red circle", "--out", str(out),
            "--device", "cpu", "--steps", str(STEPS), "--batch-size", "4", "--resolution", "16",
            "--fisher-samples", "2", "--sample-steps", "2", "--stop-when-bounded", "0", "--cache-dir", str(cache)]


def test_two_processes_under_accelerate_learn_what_one_process_learns(tiny_sd1, red_images, tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate is a test dependency (requirements-dev.txt)"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "vdu_engine", *_cli_args(tiny_sd1, red_images, tmp_path / "one.safetensors", tmp_path / "c1")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    # accelerate's --cpu starts one process unless MPI is set up; --multi_gpu uses torchrun, which
    # on a machine without a GPU gives a gloo process group on the CPU.
    two = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "vdu_engine",
                          *_cli_args(tiny_sd1, red_images, tmp_path / "two.safetensors", tmp_path / "c2")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote ") == 1 and "2 processes" in two.stdout  # the main process alone writes
    a, b = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    _assert_same_lora(a, b)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["one.safetensors", "two.safetensors"]
