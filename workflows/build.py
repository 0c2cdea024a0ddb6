"""The shipped workflows, defined once and written in both ComfyUI formats.

`python -m workflows.build` writes `workflows/<name>.json` (UI format: what people share and drag
into the browser) and `workflows/api/<name>.json` (API format: what `POST /prompt` takes). Both
come from the graphs below, so they cannot drift; a test checks the files are up to date and that
every node's sockets and widgets match what a real ComfyUI reports in /object_info.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

HERE = Path(__file__).resolve().parent
from vdu_engine.config import UnlearnConfig

D = UnlearnConfig()  # the workflows ship the engine's defaults
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"  # the user picks theirs in the loader node

# Per node type: link inputs [(name, type)], widgets [names, in order], outputs [(name, type)].
# A widget that the front end follows with a "control after generate" value is marked "+control".
SPECS: Dict[str, tuple] = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": ([("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                  ("latent_image", "LATENT")],
                 ["seed+control", "steps", "cfg", "sampler_name", "scheduler", "denoise"], [("LATENT", "LATENT")]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "ImageBatch": ([("image1", "IMAGE"), ("image2", "IMAGE")], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "PreviewImage": ([("images", "IMAGE")], [], []),
    "LoraLoader": ([("model", "MODEL"), ("clip", "CLIP")], ["lora_name", "strength_model", "strength_clip"],
                   [("MODEL", "MODEL"), ("CLIP", "CLIP")]),
    "VDUForgetImages": ([("images", "IMAGE")], ["folder", "concept", "resolution", "crop", "keep"],
                        [("VDU_FORGET", "VDU_FORGET")]),
    "VDUConcept": ([], ["concept", "anchor", "num_images", "resolution", "keep", "prompts"],
                   [("VDU_FORGET", "VDU_FORGET")]),
    "VDUUnlearn": ([("model", "MODEL"), ("clip", "CLIP"), ("vae", "VAE"), ("forget", "VDU_FORGET")],
                   ["objective", "steps", "rank", "learning_rate", "gamma", "prior", "prior_sigma", "layers",
                    "seed+control", "memory", "own_images", "sample_steps", "text_steps", "text_destination"],
                   [("model", "MODEL"), ("lora", "VDU_LORA"), ("loss_curve", "IMAGE"), ("clip", "CLIP")]),
    "VDUSaveLoRA": ([("lora", "VDU_LORA")], ["filename", "overwrite"], [("lora_name", "STRING")]),
}
OPTIONAL_LINKS = {("VDUForgetImages", "images")}


@dataclass
class Node:
    id: int
    type: str
    widgets: Dict[str, object]
    links: Dict[str, Tuple["Node", int]] = field(default_factory=dict)
    pos: Tuple[int, int] = (0, 0)
    title: str = ""


class Graph:
    def __init__(self):
        self.nodes: List[Node] = []

    def add(self, type_: str, pos, title="", **kw) -> Node:
        inputs, widgets, _ = SPECS[type_]
        names = {n for n, _ in inputs}
        node = Node(len(self.nodes) + 1, type_, {}, {}, pos, title)
        for k, v in kw.items():
            (node.links if k in names else node.widgets)[k] = v
        missing = [w.split("+")[0] for w in widgets if w.split("+")[0] not in node.widgets]
        assert not missing, f"{type_} lacks widgets {missing}"
        self.nodes.append(node)
        return node

    def api(self) -> dict:
        out = {}
        for n in self.nodes:
            inputs = dict(n.widgets)
            inputs.update({k: [str(src.id), slot] for k, (src, slot) in n.links.items()})
            out[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
        return out

    def ui(self) -> dict:
        links, nodes = [], []
        outgoing: Dict[Tuple[int, int], List[int]] = {}
        for n in self.nodes:
            for name, (src, slot) in n.links.items():
                lid = len(links) + 1
                in_names = [i for i, _ in SPECS[n.type][0]]
                links.append([lid, src.id, slot, n.id, in_names.index(name), SPECS[src.type][2][slot][1]])
                outgoing.setdefault((src.id, slot), []).append(lid)
        by_target = {(l[3], l[4]): l[0] for l in links}
        for order, n in enumerate(self.nodes):
            ins, widgets, outs = SPECS[n.type]
            values = []
            for w in widgets:
                name, control = w.split("+")[0], w.endswith("+control")
                values.append(n.widgets[name])
                if control:
                    values.append("fixed")
            nodes.append({
                "id": n.id, "type": n.type, "pos": list(n.pos), "size": [320, 60 + 26 * (len(ins) + len(values))],
                "flags": {}, "order": order, "mode": 0,
                "inputs": [{"name": nm, "type": tp, "link": by_target.get((n.id, i))} for i, (nm, tp) in enumerate(ins)
                           if (n.id, i) in by_target or (n.type, nm) not in OPTIONAL_LINKS],
                "outputs": [{"name": nm, "type": tp, "links": outgoing.get((n.id, i), []), "slot_index": i}
                            for i, (nm, tp) in enumerate(outs)],
                "properties": {"Node name for S&R": n.type}, "widgets_values": values,
                **({"title": n.title} if n.title else {}),
            })
        return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def _compare(g: Graph, ckpt: Node, after: Tuple[Node, int, int], prompts: str, y: int) -> None:
    """Sample the same prompt and seed with the original and the unlearned model, side by side. `after` is
    (node, MODEL slot, CLIP slot): the prompt is encoded again with its CLIP, where an unlearning LoRA may have
    taught the text encoder to read the concept's word as another word."""
    neg = g.add("CLIPTextEncode", (420, y + 200), "Negative", clip=(ckpt, 1), text="")
    latent = g.add("EmptyLatentImage", (420, y + 400), width=512, height=512, batch_size=2)
    decoded = []
    for i, (node, model_slot, clip_slot, label) in enumerate(((ckpt, 0, 1, "Original"), (*after, "Unlearned"))):
        pos = g.add("CLIPTextEncode", (420, y + 600 * i), f"Prompt naming the concept: {label}",
                    clip=(node, clip_slot), text=prompts)
        s = g.add("KSampler", (800, y + 300 * i), f"Sample: {label}", model=(node, model_slot), positive=(pos, 0),
                  negative=(neg, 0), latent_image=(latent, 0), seed=42, steps=20, cfg=7.0,
                  sampler_name="euler", scheduler="normal", denoise=1.0)
        decoded.append(g.add("VAEDecode", (1150, y + 300 * i), samples=(s, 0), vae=(ckpt, 2)))
    both = g.add("ImageBatch", (1400, y + 150), "Original | Unlearned", image1=(decoded[0], 0), image2=(decoded[1], 0))
    g.add("SaveImage", (1650, y + 150), filename_prefix="vdu/compare", images=(both, 0))


def _unlearn(g: Graph, ckpt: Node, forget: Node, filename: str) -> Node:
    un = g.add("VDUUnlearn", (420, 0), model=(ckpt, 0), clip=(ckpt, 1), vae=(ckpt, 2), forget=(forget, 0),
               objective=D.objective, steps=D.steps, rank=D.rank, learning_rate=D.lr, gamma=D.gamma,
               prior=D.prior, prior_sigma=D.prior_sigma, layers=D.layers, seed=D.seed, memory="fast",
               own_images=D.fisher_samples, sample_steps=D.sample_steps, text_steps=D.text_steps,
               text_destination=D.text_destination)
    g.add("VDUSaveLoRA", (800, 0), lora=(un, 1), filename=filename, overwrite=True)
    g.add("PreviewImage", (800, 180), "Loss curve", images=(un, 2))
    return un


def _unlearn_workflow(forget_type: str, filename: str, **forget_widgets) -> Graph:
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=CHECKPOINT)
    forget = g.add(forget_type, (0, 200), **forget_widgets)
    un = _unlearn(g, ckpt, forget, filename)
    _compare(g, ckpt, (un, 0, 3), "a red circle", 500)
    return g


def unlearn_from_folder() -> Graph:
    return _unlearn_workflow("VDUForgetImages", "unlearned/forget-from-folder", folder="examples/red_shapes",
                             concept="red", resolution=0, crop="center", keep="")


def unlearn_from_prompt() -> Graph:
    return _unlearn_workflow("VDUConcept", "unlearned/forget-from-prompt", concept="a red circle",
                             anchor="a grey circle", num_images=8, resolution=0, keep="", prompts="")


def apply_and_compare() -> Graph:
    """An artist's graph: apply a shared unlearning LoRA with the stock LoraLoader and compare."""
    g = Graph()
    ckpt = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=CHECKPOINT)
    lora = g.add("LoraLoader", (0, 250), "Unlearning LoRA", model=(ckpt, 0), clip=(ckpt, 1),
                 lora_name="unlearned/forget-from-folder.safetensors", strength_model=1.0, strength_clip=1.0)
    _compare(g, ckpt, (lora, 0, 1), "a red circle", 0)
    return g


WORKFLOWS = {"unlearn_from_folder": unlearn_from_folder, "unlearn_from_prompt": unlearn_from_prompt,
             "apply_lora_and_compare": apply_and_compare}


def render() -> Dict[str, str]:
    """Relative path → file text, for every shipped workflow in both formats."""
    out = {}
    for name, make in WORKFLOWS.items():
        g = make()
        out[f"{name}.json"] = json.dumps(g.ui(), indent=2) + "\n"
        out[f"api/{name}.json"] = json.dumps(g.api(), indent=2) + "\n"
    return out


def main() -> None:
    for rel, text in render().items():
        path = HERE / rel
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"wrote workflows/{rel}")


if __name__ == "__main__":
    main()
