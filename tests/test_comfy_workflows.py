"""The pack in a headless ComfyUI: it loads, lists its nodes, and the shipped workflows run.

The API-format workflows run as shipped except for what a user would change or a CPU test must
shrink: the checkpoint (the small SD 1.5-shaped one built here), steps and image sizes.
"""

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_harness import PACK, ComfyServer, comfy_path

WORKFLOWS = PACK / "workflows"
NODES = {"VDUForgetImages", "VDUConcept", "VDUUnlearn", "VDUSaveLoRA"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    comfy_path()  # skips with the reason when ComfyUI is absent
    from comfy_harness import import_comfy
    import_comfy()
    from benchmarks.comfy_checkpoint import write_checkpoint
    base = tmp_path_factory.mktemp("comfy")
    srv = ComfyServer(base)
    write_checkpoint(base / "models" / "checkpoints" / "tiny_sd15.safetensors")
    srv.start()
    yield srv
    srv.stop()


def shipped(name: str, **changes) -> dict:
    """An API workflow with the test's changes: {class_type: {input: value}}."""
    wf = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    for node in wf.values():
        node["inputs"].update(changes.get(node["class_type"], {}))
    return wf


# The set-up draws the model's own images (32, 20 sampler steps, by default): most of a CPU run's time.
SMALL_SETUP = {"own_images": 4, "sample_steps": 4, "text_steps": 2}
SMALL = {"CheckpointLoaderSimple": {"ckpt_name": "tiny_sd15.safetensors"},
         "EmptyLatentImage": {"width": 128, "height": 128},
         "KSampler": {"steps": 3},
         "VDUUnlearn": {"steps": 3, "prior": "isotropic", **SMALL_SETUP},
         "VDUConcept": {"num_images": 2, "resolution": 128},
         "VDUForgetImages": {"resolution": 128}}


def run_ok(server, wf, timeout=900):
    entry = server.wait(server.queue(wf), timeout)
    assert entry["status"]["status_str"] == "success", (
        json.dumps(entry["status"], indent=1)[-3000:] + server.log()[-3000:])
    return entry


def test_pack_loads_and_lists_its_nodes(server):
    failed = [line for line in server.log().splitlines() if "IMPORT FAILED" in line and "vdu-unlearn" in line]
    assert not failed, server.log()[-3000:]
    info = server.get("/object_info")
    assert NODES <= set(info), sorted(NODES - set(info))
    assert info["VDUUnlearn"]["output"] == ["MODEL", "VDU_LORA", "IMAGE", "CLIP"]  # CLIP last: old links hold


def test_workflow_widgets_match_the_real_nodes(server):
    """Every node in every shipped UI workflow exists, with its widgets in ComfyUI's order."""
    import sys
    sys.path.insert(0, str(PACK))
    from workflows.build import SPECS, render
    info = server.get("/object_info")
    for rel, text in render().items():
        assert (WORKFLOWS / rel).read_text() == text, f"workflows/{rel} is stale: run python -m workflows.build"
    for node_type, (links, widgets, outputs) in SPECS.items():
        spec = info[node_type]["input"]
        declared = list(spec.get("required", {})) + list(spec.get("optional", {}))
        link_types = {n for n, (t, *_) in {**spec.get("required", {}), **spec.get("optional", {})}.items()
                      if not isinstance(t, list) and t not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")}
        assert [w.split("+")[0] for w in widgets] == [n for n in declared if n not in link_types], node_type
        assert [n for n, _ in links] == [n for n in declared if n in link_types], node_type
        assert [t for _, t in outputs] == info[node_type]["output"], node_type


def test_unlearn_from_prompt_then_apply_and_compare(server):
    loras = server.base / "models" / "loras"
    run_ok(server, shipped("unlearn_from_prompt", **SMALL))
    lora = loras / "unlearned" / "forget-from-prompt.safetensors"
    assert lora.exists()
    assert "lora key not loaded" not in server.log()

    mark = len(server.log())
    changes = {**SMALL, "LoraLoader": {"lora_name": "unlearned/forget-from-prompt.safetensors", "strength_model": 50.0}}
    entry = run_ok(server, shipped("apply_lora_and_compare", **changes))
    assert "lora key not loaded" not in server.log()[mark:]
    images = [img for out in entry["outputs"].values() for img in out.get("images", [])]
    assert len(images) == 4  # two samples without, two with the LoRA
    px = [np.asarray(Image.open(server.base / "output" / i["subfolder"] / i["filename"]), dtype=np.float32)
          for i in images]
    assert np.abs(px[0] - px[2]).mean() > 0.5  # the LoRA changes the samples


def test_unlearn_from_folder_runs_as_shipped(server):
    """The folder's captions name red in context, so VDU trains the CLIP's layers: the LoRA holds text-encoder
    keys only, and the "Unlearned" branch, which encodes its prompt with the node's CLIP, draws otherwise."""
    from safetensors import safe_open
    entry = run_ok(server, shipped("unlearn_from_folder", **SMALL))
    with safe_open(str(server.base / "models" / "loras" / "unlearned" / "forget-from-folder.safetensors"), "pt") as f:
        assert all(k.startswith("lora_te_") for k in f.keys()), sorted(f.keys())[:3]
        assert "read as" in f.metadata()["vdu_text_destination"], f.metadata()["vdu_text_destination"]
    images = [img for out in entry["outputs"].values() for img in out.get("images", []) if img["type"] == "output"]
    px = [np.asarray(Image.open(server.base / "output" / i["subfolder"] / i["filename"]), dtype=np.float32)
          for i in images]
    assert len(px) == 4 and np.abs(px[0] - px[2]).mean() > 0.5  # original | unlearned, on the same seed


def test_kept_concepts_reach_the_lora(server):
    from safetensors import safe_open
    keep = {"resolution": 128, "keep": "an orange circle, a blue circle"}
    wf = shipped("unlearn_from_folder", **{**SMALL, "VDUForgetImages": keep,
                                           "VDUUnlearn": {"steps": 3, "prior": "fisher", **SMALL_SETUP},
                                           "VDUSaveLoRA": {"filename": "kept/lora"}})
    run_ok(server, wf)
    with safe_open(str(server.base / "models" / "loras" / "kept" / "lora.safetensors"), "pt") as f:
        assert f.metadata()["vdu_keep"] == "an orange circle, a blue circle"
    wf = shipped("unlearn_from_folder", **{**SMALL, "VDUForgetImages": {**keep, "concept": ""}})
    with pytest.raises(AssertionError, match="keep needs the concept"):
        server.queue(wf)


def test_cancel_stops_training_and_writes_nothing(server):
    """Cancel during the set-up; the workflow is one saved before the set-up inputs existed (still valid)."""
    wf = shipped("unlearn_from_prompt", **{**SMALL, "VDUUnlearn": {"steps": 100000, "prior": "isotropic"},
                                           "VDUSaveLoRA": {"filename": "cancelled/never"}})
    unlearn = next(node for node in wf.values() if node["class_type"] == "VDUUnlearn")
    for name in SMALL_SETUP:
        del unlearn["inputs"][name]
    pid = server.queue(wf)
    deadline = time.time() + 300
    while not server.get("/queue")["queue_running"] and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(15)  # into the run: model loading, image generation, first steps
    server.interrupt()
    entry = server.wait(pid, 120)
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    assert not (server.base / "models" / "loras" / "cancelled").exists()


def test_bad_folder_is_a_plain_validation_error(server):
    wf = shipped("unlearn_from_folder", **{**SMALL, "VDUForgetImages": {"folder": "/nonexistent/forget"}})
    with pytest.raises(AssertionError, match="does not exist"):
        server.queue(wf)


def test_lora_names_that_escape_the_loras_folder_are_refused(server):
    wf = shipped("unlearn_from_prompt", **{**SMALL, "VDUSaveLoRA": {"filename": "../../escape"}})
    # Other outputs of the graph stay valid, so ComfyUI queues them and reports the node's error.
    reply = server.post("/prompt", {"prompt": wf, "client_id": "vdu-tests"})
    assert "escapes the loras folder" in json.dumps(reply.get("node_errors", {})), reply
    server.interrupt()
