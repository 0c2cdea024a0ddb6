"""Bad input: a one-line error naming the problem and the fix, exit status 2, nothing written."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from vdu_engine import DiffusersBackend, ForgetSet, UnlearnConfig, VDUError, unlearn
from vdu_engine.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "vdu_engine", *map(str, args)], capture_output=True, text=True)


def assert_clean_error(proc, needle, out_dir):
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(out_dir.glob("*.safetensors*")) and not list(out_dir.glob(".*.tmp"))


def test_image_folder_modes_sizes_and_captions(tmp_path):
    Image.new("RGBA", (40, 90), (255, 0, 0, 0)).save(tmp_path / "a.png")  # fully transparent
    Image.new("L", (100, 50), 128).save(tmp_path / "b.webp")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "c.jpg")
    (tmp_path / "c.txt").write_text("a blue thing\n")
    (tmp_path / "d.png").write_bytes(b"not a png")
    (tmp_path / "notes.md").write_text("ignored")
    fs = ForgetSet.from_folder(tmp_path)
    assert len(fs) == 3 and fs.skipped == ["d.png (UnidentifiedImageError)"]
    assert fs.captions == [None, None, "a blue thing"]
    px = fs.pixels(32)
    assert px.shape == (3, 3, 32, 32) and px.min() >= -1 and px.max() <= 1
    assert torch.allclose(px[0], torch.ones_like(px[0]))  # transparency composited on white
    assert torch.allclose(px[1], px[1][0:1].expand(3, -1, -1))  # greyscale → equal channels


@pytest.mark.parametrize("setup,needle", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: d, "no png/jpg/webp images"),
    (lambda d: (d / "x.png").write_bytes(b"junk") and d, "could be read"),
])
def test_bad_forget_folders(setup, needle, tmp_path, tiny_sd1):
    folder = tmp_path / "imgs"
    folder.mkdir()
    folder = setup(folder)
    proc = run_cli("unlearn", tiny_sd1, "--images", folder, "--concept", "x", "--out", tmp_path / "o.safetensors")
    assert_clean_error(proc, needle, tmp_path)


def test_not_a_model_and_unsupported_architecture(tmp_path, red_images):
    (tmp_path / "empty").mkdir()
    proc = run_cli("unlearn", tmp_path / "empty", "--concept", "x", "--images", red_images,
                   "--out", tmp_path / "o.safetensors")
    assert_clean_error(proc, "is not a Stable Diffusion model", tmp_path)
    flux = tmp_path / "flux"
    (flux / "unet").mkdir(parents=True)
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    proc = run_cli("unlearn", flux, "--concept", "x", "--images", red_images, "--out", tmp_path / "o.safetensors")
    assert_clean_error(proc, "unsupported architecture", tmp_path)
    ckpt = tmp_path / "empty" / "model.safetensors"
    ckpt.write_bytes(b"junk")
    proc = run_cli("unlearn", ckpt, "--concept", "x", "--images", red_images, "--out", tmp_path / "o2.safetensors")
    assert_clean_error(proc, "could not be read as a checkpoint", tmp_path)  # single files load without --config-dir


@pytest.mark.parametrize("flag,value,needle", [
    ("--gamma", "1.5", "--gamma"), ("--steps", "0", "--steps"), ("--lr", "-1", "--lr"),
    ("--prior", "laplace", "--prior"), ("--objective", "magic", "--objective"),
    ("--layers", "everything", "--layers"), ("--t-min", "1.0", "--t-min"), ("--resolution", "30", "--resolution"),
    ("--replay", "-1", "--replay"),
])
def test_out_of_range_settings(flag, value, needle, tmp_path, tiny_sd1, red_images):
    proc = run_cli("unlearn", tiny_sd1, "--concept", "x", "--images", red_images,
                   "--out", tmp_path / "o.safetensors", flag, value)
    assert_clean_error(proc, needle, tmp_path)


def test_output_directory_missing_and_existing_file(tmp_path, tiny_sd1, red_images):
    proc = run_cli("unlearn", tiny_sd1, "--concept", "x", "--images", red_images,
                   "--out", tmp_path / "nope" / "o.safetensors")
    assert_clean_error(proc, "does not exist", tmp_path)
    (tmp_path / "o.safetensors").write_bytes(b"keep me")
    assert main(["unlearn", str(tiny_sd1), "--concept", "x", "--images", str(red_images),
                 "--out", str(tmp_path / "o.safetensors")]) == 2
    assert (tmp_path / "o.safetensors").read_bytes() == b"keep me"


def test_nothing_to_forget(tiny_sd1, tmp_path):
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    with pytest.raises(VDUError, match="nothing to forget"):
        unlearn(b, UnlearnConfig())
    with pytest.raises(VDUError, match="needs the concept"):
        unlearn(b, UnlearnConfig(objective="esd"))


def test_forget_prompts_are_drawn_in_turn_and_must_name_the_concept(tiny_sd1, fast_config, red_images):
    """Prompt-only captions: the forget prompts in turn over --num-images, else the concept alone; a
    prompt without the concept's word, or forget prompts beside images, is refused before any work."""
    from vdu_engine.train import _prompt_only_captions
    two = ["a red circle", "a small red square on a white background"]
    assert _prompt_only_captions(UnlearnConfig(concept="red", forget_prompts=two, num_images=5)) == two * 2 + two[:1]
    assert _prompt_only_captions(UnlearnConfig(concept="red", num_images=2)) == ["red", "red"]
    with pytest.raises(VDUError, match="'a blue square' does not name the concept 'red'"):
        _prompt_only_captions(UnlearnConfig(concept="red", forget_prompts=["a red circle", "a blue square"]))
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    with pytest.raises(VDUError, match="forget prompts are for prompt-only runs"):
        unlearn(b, fast_config(concept="red", forget_prompts=two), ForgetSet.from_folder(red_images))
    result = unlearn(b, fast_config(concept="red", anchor="", forget_prompts=two, num_images=2, steps=2))
    assert result.metadata["vdu_num_forget_images"] == "2"
    assert json.loads(result.metadata["vdu_forget_prompts"]) == two


def test_nan_loss_stops_the_run(tiny_sd1, fast_config):
    """The last resort: every input finite, the training itself diverges (here from step 2 on). A model
    that makes nan before training is named by its own check instead (test_nonfinite.py)."""
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    real, trained = b.denoise, []
    b.denoise = lambda x, t, c: real(x, t, c) * (float("nan") if trained else 1.0)
    with pytest.raises(VDUError, match="the loss became nan at step 2: the training diverged; lower --lr"):
        unlearn(b, fast_config(prior="isotropic", steps=20), progress=lambda step, total, terms: trained.append(step))


def test_cli_end_to_end(tmp_path, tiny_sd1, red_images):
    out = tmp_path / "forget.safetensors"
    proc = run_cli("unlearn", tiny_sd1, "--images", red_images, "--concept", "a red circle", "--out", out,
                   "--steps", "3", "--resolution", "16", "--prior", "isotropic", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and "wrote" in proc.stdout and "vdu" in proc.stderr  # tqdm bar on stderr
    assert "where the concept goes: the caption" in proc.stdout and "held: " in proc.stdout  # what the run chose
    grid = tmp_path / "grid.png"
    proc = run_cli("sample", tiny_sd1, "--lora", out, "--prompts", "a red circle", "a blue square",
                   "--out", grid, "--steps", "2", "--resolution", "16", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    img = Image.open(grid)
    assert img.size[0] > 2 * 64 and img.size[1] > 2 * 64
    help_text = run_cli("unlearn", "--help").stdout
    for flag in ("--gamma", "--prior", "--variational", "--bound", "--layers", "--objective", "--anchor"):
        assert flag in help_text
    assert "(default: 0.5)" in help_text
