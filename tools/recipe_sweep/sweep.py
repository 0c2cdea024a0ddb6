"""The side sweep behind the mini model's training recipe (README, "The mini world").

One process trains one variant of miniworld.train's UNet phase (learning rate, steps, timestep
sampling, prediction type, latent size) on the same data and seeds, and appends its prompt
following (384 samples, DDIM 10, guidance 5, the world's evaluator) to $OUT/results.jsonl.
run1.sh and run2.sh ran eight and six variants side by side on one H100 on 2026-11-27
(results_2026-11-27_h100.jsonl); DEV=cpu runs one here. The 16×16 variants need a VAE with one
downsampling step in cache/mw16 (train one with miniworld.train after changing build_vae). Not
a test or a benchmark of the product: a record of how the recipe was picked.
"""
import argparse, copy, json, math, os, sys, time
import torch, torch.nn.functional as F
sys.path.insert(0, os.getcwd())
from miniworld import dataset, EVALUATOR_DIR
from miniworld.evaluator import Evaluator
from miniworld.model import MAX_TOKENS, build_text_encoder
from benchmarks.world_eval import _cells, expand
from vdu_engine import DiffusersBackend
from vdu_engine.sampling import ddim_sample
from diffusers import AutoencoderKL, UNet2DConditionModel, DDIMScheduler
from transformers import CLIPTokenizer

p = argparse.ArgumentParser()
p.add_argument("name"); p.add_argument("--latent", type=int, default=8); p.add_argument("--ch", default="64,128")
p.add_argument("--steps", type=int, default=2000); p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--batch", type=int, default=64); p.add_argument("--tmode", default="uniform")
p.add_argument("--pred", default="epsilon"); p.add_argument("--evals", default="")
p.add_argument("--deadline", type=float, default=400)
a = p.parse_args()
t0 = time.time(); dev = os.environ.get("DEV", "cuda")
torch.backends.cuda.matmul.allow_tf32 = True; torch.backends.cudnn.allow_tf32 = True
out = os.environ.get("OUT", "/tmp")
def rec(**kw):
    with open(f"{out}/results.jsonl", "a") as f: f.write(json.dumps({"name": a.name, **kw}) + "\n")
vae_dir = "models/miniworld" if a.latent == 8 else "cache/mw16"
vae = AutoencoderKL.from_pretrained(vae_dir, subfolder="vae").to(dev).eval()
tok = CLIPTokenizer.from_pretrained("models/miniworld/tokenizer")
samples = dataset.generate(int(os.environ.get("NIMG", 30000)), seed=0)
imgs = dataset.to_tensor(samples)
with torch.no_grad():
    lat = torch.cat([vae.encode((imgs[i:i+1000] * 2 - 1).to(dev)).latent_dist.mean for i in range(0, len(imgs), 1000)])
lat = lat * vae.config.scaling_factor
ch = tuple(int(c) for c in a.ch.split(","))
if a.latent == 8:
    kw = dict(sample_size=8, block_out_channels=ch, down_block_types=("CrossAttnDownBlock2D",) * 2,
              up_block_types=("CrossAttnUpBlock2D",) * 2)
else:
    kw = dict(sample_size=16, block_out_channels=ch,
              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
torch.manual_seed(0)
unet = UNet2DConditionModel(in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=64,
                            attention_head_dim=8, norm_num_groups=16, **kw).to(dev)
text = build_text_encoder(len(tok)).to(dev)
ema = copy.deepcopy(unet).requires_grad_(False)
sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=a.pred)
ac = sched.alphas_cumprod.to(dev)
ids = tok([s.caption for s in samples], padding="max_length", max_length=MAX_TOKENS, truncation=True,
          return_tensors="pt").input_ids.to(dev)
empty = tok([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids.to(dev)
params = list(unet.parameters()) + list(text.parameters())
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
lrs = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps, pct_start=0.05)
g = torch.Generator().manual_seed(1)
ev = Evaluator(EVALUATOR_DIR)
evals = sorted(set([int(x) for x in a.evals.split(",") if x] + [a.steps]))

def evaluate(step):
    be = DiffusersBackend(ema, vae, [text], [tok], dict(sched.config), device=dev)
    text.eval()
    cells = expand(_cells(list(dataset.SHAPES), list(dataset.COLOURS)), 384)
    with torch.no_grad():
        im = ddim_sample(be, [c.prompt for c in cells], 4321, steps=10, guidance=5.0, batch_size=128).cpu()
    shapes, colours = ev.classify(im)
    r = {"colour": sum(c == x.colour for c, x in zip(colours, cells)) / len(cells),
         "shape": sum(s == x.shape for s, x in zip(shapes, cells)) / len(cells)}
    for sh in dataset.SHAPES:
        mine = [s for s, x in zip(shapes, cells) if x.shape == sh]
        r[sh] = round(sum(s == sh for s in mine) / len(mine), 3)
    text.train()
    rec(step=step, secs=round(time.time() - t0), **{k: round(v, 3) for k, v in r.items()})

for step in range(a.steps):
    idx = torch.randint(0, len(lat), (a.batch,), generator=g).to(dev)
    x0 = lat[idx]; tk = ids[idx].clone()
    drop = (torch.rand(a.batch, generator=g) < 0.1).to(dev)
    tk[drop] = empty
    if a.tmode == "uniform":
        t = torch.randint(0, 1000, (a.batch,), generator=g)
    else:  # logit-normal: mid timesteps weighted up
        t = (torch.sigmoid(torch.randn(a.batch, generator=g)) * 1000).long().clamp(0, 999)
    t = t.to(dev)
    eps = torch.randn(x0.shape, generator=g).to(dev)
    al = ac[t].view(-1, 1, 1, 1)
    xt = al.sqrt() * x0 + (1 - al).sqrt() * eps
    target = eps if a.pred == "epsilon" else al.sqrt() * eps - (1 - al).sqrt() * x0
    loss = F.mse_loss(unet(xt, t, text(tk)[0]).sample, target)
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); lrs.step()
    d = min(0.998, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, pp in zip(ema.parameters(), unet.parameters()): pe.lerp_(pp, 1 - d)
    if step + 1 in evals:
        evaluate(step + 1)
    if time.time() - t0 > a.deadline:
        rec(step=step + 1, note="deadline"); evaluate(step + 1); break
print(a.name, "done", time.time() - t0, flush=True)
