"""Memory options change how a step is computed, never what it learns; several processes under
`accelerate launch` learn what one process learns."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

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
    of tiny gradients; a wrong split of the batch moves the factors by O(1) of their size. The
    tolerance is relative to the largest factor of each kind (up or down) over the whole network,
    not to each tensor's own largest value: a layer whose factors barely moved (the mid-block's
    value projection here) has near-zero gradients, whose rounding Adam turns into a large share
    of that layer's tiny size without meaning a different learning."""
    assert a.keys() == b.keys()
    # the first step moves `up` away from zero: compare the learned deltas, not only the shapes
    scale = {kind: max(v.abs().max().item() for k, v in a.items() if k.endswith(kind))
             for kind in ("lora_up.weight", "lora_down.weight")}
    assert scale["lora_up.weight"] > 0
    for k in a:
        kind = next((s for s in scale if k.endswith(s)), None)
        atol = rel * (scale[kind] if kind else a[k].abs().max().item()) + 1e-12
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _first_gradients(monkeypatch, tiny_sd1, fast_config, **kw):
    """The LoRA and the summed gradients of the run's first step (before Adam acts on them)."""
    from vdu_engine import distributed
    seen, original = [], distributed.Workers.sum_gradients

    def recording(self, params, stats):
        out = original(self, params, stats)
        if not seen:
            seen.append([p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params])
        return out
    monkeypatch.setattr(distributed.Workers, "sum_gradients", recording)
    lora, b = _lora(tiny_sd1, fast_config, **kw)
    return lora, seen[0], b


@pytest.mark.parametrize("objective", ["vdu", "esd"])
def test_micro_batches_and_checkpointing_learn_the_same_lora(objective, tiny_sd1, fast_config, monkeypatch):
    """The first step's summed gradients agree to float32 rounding (3e-5 of the largest: sums of this
    size in float32, taken in another order, differ by about 1e-5 of their largest term), which
    is what "the same step" means; after 3 Adam steps the factors agree to 1e-2 of the network's
    largest factor: Adam's division by √v turns the rounding of near-zero gradients into steps of
    the full learning rate, so the factors cannot agree more tightly, while a wrong split of the
    batch shows in the gradients already."""
    ref, g_ref, _ = _first_gradients(monkeypatch, tiny_sd1, fast_config, objective=objective)
    for option in (dict(micro_batch_size=1), dict(gradient_checkpointing=True)):
        other, g_other, b = _first_gradients(monkeypatch, tiny_sd1, fast_config, objective=objective, **option)
        top = max(g.abs().max().item() for g in g_ref)
        assert top > 0
        for x, y in zip(g_ref, g_other):
            torch.testing.assert_close(x, y, rtol=0, atol=3e-5 * top)
        _assert_same_lora(ref, other, rel=1e-2)
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
    assert (mine.micro_batch_size, mine.gradient_checkpointing, mine.offload_encoders) == (2, False, True)
    # an explicit value equal to the plain default wins too
    zero = UnlearnConfig(concept="x", memory="balanced", micro_batch_size=0, offload_encoders=False).validate()
    assert (zero.micro_batch_size, zero.offload_encoders) == (0, False)
    assert not UnlearnConfig(concept="x", memory="low", train_text_encoder=True).validate().offload_encoders
    with pytest.raises(VDUError, match="--memory: 'tiny' is not one of fast, balanced, low"):
        UnlearnConfig(concept="x", memory="tiny").validate()
    with pytest.raises(VDUError, match="--precision"):
        UnlearnConfig(concept="x", precision="fp8").validate()


def _cli_args(tiny_sd1, red_images, out, cache):
    return ["unlearn", str(tiny_sd1), "--images", str(red_images), "--concept", "a red circle", "--out", str(out),
            "--device", "cpu", "--steps", str(STEPS), "--batch-size", "4", "--resolution", "16",
            "--fisher-samples", "2", "--sample-steps", "2", "--stop-when-bounded", "0", "--cache-dir", str(cache)]


def _worst_difference(a, b):
    """The largest difference between matching tensors, each relative to its own largest value.
    A tensor that is zero in `a` (a down factor's first gradient, while its up factor is zero)
    must be zero in `b`."""
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if not a[k].any())
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max()).item() for k in a if a[k].any())


ROUNDING = 1e-6  # tolerances' floor, ~8 float32 roundings: where the two orders of additions agree bit for bit


def test_two_processes_under_accelerate_learn_what_one_process_learns(tiny_sd1, red_images, tmp_path):
    """Two processes each train on half the batch and sum their gradients; one process does the
    same maths on the whole batch, in another order of float additions. How far an order alone
    moves the results is measured on this machine, not assumed: a one-process run that takes the
    batch an image at a time (`--micro-batch-size 1`) against the whole-batch run.

    - The first step's summed gradients, before the optimizer acts, are the test proper: they
      must equal the one-process gradients to within 3x that spread (here ~4e-6 of a tensor's
      largest value; two processes ~6e-7). A wrong slice, a missing or doubled sum, or a wrong
      share moves them by O(1) (a scale error too, which Adam would hide from the factors).
    - The LoRA after STEPS steps is not compared with the whole-batch run: Adam divides by the
      root of tiny second moments and turns rounding into differences of up to ~3e-3 of a
      factor (mid-block cross-attention up factors), varying 40-fold between seeds. It is
      compared with one process taking the same two halves as passes (`--micro-batch-size 2`),
      which differs only in who adds the two halves: equal here bit for bit, and allowed 3x the
      LoRA's spread (whole batch against one at a time) where not. This checks that the processes
      stay in step after the first step (batch, noise and replay draws, the optimizer's state) and
      that the main process writes what was learned.
    """
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    assert accelerate, "accelerate is a test dependency (requirements-dev.txt)"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}  # the checkout under test
    recorder = str(Path(__file__).with_name("first_gradients.py"))

    def run(name, *extra, launcher=(sys.executable,)):
        out, grads = tmp_path / f"{name}.safetensors", tmp_path / f"{name}.grads.safetensors"
        done = subprocess.run([*launcher, recorder, str(grads), *_cli_args(tiny_sd1, red_images, out, tmp_path / name),
                               *extra], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout, load_file(str(out)), load_file(str(grads))

    _, one, one_grads = run("one")
    _, singles, singles_grads = run("singles", "--micro-batch-size", "1")
    _, halves, _ = run("halves", "--micro-batch-size", "2")
    # accelerate's --cpu starts one process unless MPI is set up; --multi_gpu uses torchrun, which
    # on a machine without a GPU gives a gloo process group on the CPU.
    stdout, two, two_grads = run("two", launcher=(accelerate, "launch", "--multi_gpu", "--num_processes", "2",
                                                  "--num_machines", "1", "--mixed_precision", "no",
                                                  "--dynamo_backend", "no"))
    assert stdout.count("wrote ") == 1 and "2 processes" in stdout  # the main process alone writes

    spread = _worst_difference(one_grads, singles_grads)
    assert spread < 1e-4, f"the order of additions moved the gradients by {spread:.1e}: not rounding"
    off = _worst_difference(one_grads, two_grads)
    assert off <= 3 * spread + ROUNDING, f"first-step gradients: {off:.1e} off, rounding moves them {spread:.1e}"

    # the first step moves `up` away from zero: compare the learned deltas, not only the shapes
    assert max(v.abs().max() for k, v in two.items() if k.endswith("lora_up.weight")) > 0
    spread = _worst_difference(one, singles)
    off = _worst_difference(halves, two)
    assert off <= 3 * spread + ROUNDING, f"LoRA: {off:.1e} off the same halves in one process, rounding {spread:.1e}"
    names = [f"{n}{kind}.safetensors" for n in ("halves", "one", "singles", "two") for kind in (".grads", "")]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == names  # nothing else written
