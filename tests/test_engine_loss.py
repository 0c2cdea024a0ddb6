"""The loss terms against a hand computation on a tiny model, and each prior mode."""

import pytest
import torch

from vdu_engine import DiffusersBackend
from vdu_engine.layers import select_targets
from vdu_engine.lora import LoRANetwork
from vdu_engine.objectives import denoising_error, esd_loss, score_align_loss, vdu_loss
from vdu_engine.prior import diagonal_fisher, ensemble_prior, fisher_prior, isotropic_prior


def _network(backend, preset="attention"):
    targets = select_targets(backend.targets(), preset)
    net = LoRANetwork(targets, rank=2, alpha=1.0, seed=0)
    with torch.no_grad():
        for layer in net.layers.values():
            layer.up.normal_(0, 0.1)  # a non-zero ΔW so the prior has something to weigh
    return targets, net


def _explicit_delta(target, layer):
    """ΔW written out the long way: scale · up @ down, reshaped like the layer's weight."""
    up, down = layer.up.detach().flatten(1), layer.down.detach().flatten(1)
    return (layer.alpha / layer.rank * up @ down).reshape(target.module.weight.shape)


def test_vdu_loss_matches_hand_computation(tiny_sd1):
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    targets, net = _network(b)
    sigma, gamma, n_forget = 0.05, 0.3, 7
    stability = isotropic_prior(sigma)(net.layers, {k: (l.down, l.up) for k, l in net.layers.items()})
    hand_stab = sum((_explicit_delta(t, net.layers[t.key]) ** 2).sum() / (2 * sigma ** 2) for t in targets)
    torch.testing.assert_close(stability, hand_stab, rtol=1e-4, atol=1e-6)

    torch.manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8)
    eps, t = torch.randn_like(x0), torch.tensor([10, 500, 990])
    cond = b.encode_text(["a red circle"] * 3)
    with net.attached(), torch.no_grad():
        pred = b.denoise(b.schedule.add_noise(x0, eps, t), t, cond)
    err = denoising_error(pred, eps)
    hand_err = torch.stack([((eps[i] - pred[i]) ** 2).mean() for i in range(3)])
    torch.testing.assert_close(err, hand_err)

    bound = torch.tensor([10.0, 10.0, 0.5])  # the third sample is capped
    dest = torch.tensor([0.3, 0.1, 0.2])
    loss = vdu_loss(stability, err, bound, dest, gamma, n_forget, plasticity=0.7)
    capped = torch.stack([min(e, c) for e, c in zip(hand_err, bound)])
    hand = gamma * hand_stab + (1 - gamma) * n_forget * (dest - 0.7 * capped).mean()
    torch.testing.assert_close(loss, hand, rtol=1e-4, atol=1e-6)
    # without a destination and at plasticity 1 it is the paper's objective
    paper = gamma * hand_stab - (1 - gamma) * n_forget * capped.mean()
    torch.testing.assert_close(vdu_loss(stability, err, bound, torch.zeros(3), gamma, n_forget, 1.0), paper,
                               rtol=1e-4, atol=1e-6)


def test_esd_and_score_align_targets():
    pred, fc, fu, fa = (torch.full((1, 4, 2, 2), v) for v in (0.0, 1.0, 0.5, 2.0))
    # ESD target: ε(∅) − η (ε(c) − ε(∅)) = 0.5 − 2 · 0.5 = −0.5 → error 0.25
    torch.testing.assert_close(esd_loss(pred, fc, fu, eta=2.0), torch.tensor(0.25))
    torch.testing.assert_close(score_align_loss(pred, fa), torch.tensor(4.0))


def test_fisher_prior_weights_by_squared_gradients(tiny_sd1):
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    targets, net = _network(b, "cross_attention")
    lat = torch.randn(3, 4, 8, 8)
    cond = b.encode_text(["a red circle", "a blue square", ""])
    fisher = diagonal_fisher(b, targets, lat, cond, seed=0)
    assert set(fisher) == {t.key for t in targets}
    assert all(f.shape == t.module.weight.shape and (f >= 0).all() for t, f in zip(targets, fisher.values()))
    assert all(not t.module.weight.requires_grad for t in targets)
    # Hand computation for one layer: the mean of per-sample squared gradients.
    g = torch.Generator().manual_seed(0)
    w = targets[0].module.weight
    w.requires_grad_(True)
    hand = torch.zeros_like(w)
    for i in range(3):
        t0 = torch.randint(0, 1000, (1,), generator=g)
        eps = torch.randn(lat[i:i + 1].shape, generator=g)
        pred = b.denoise(b.schedule.add_noise(lat[i:i + 1], eps, t0), t0, {k: v[i:i + 1] for k, v in cond.items()})
        (gw,) = torch.autograd.grad(denoising_error(pred, eps).sum(), [w])
        hand += gw.pow(2) / 3
    w.requires_grad_(False)
    torch.testing.assert_close(fisher[targets[0].key], hand.detach())
    assert fisher[targets[0].key].abs().sum() > 0

    sigma = 0.1
    prior = fisher_prior(fisher, sigma)
    mean_f = torch.cat([f.flatten() for f in fisher.values()]).mean()
    factors = {k: (l.down, l.up) for k, l in net.layers.items()}
    hand = sum((_explicit_delta(t, net.layers[t.key]) ** 2 * (fisher[t.key] / mean_f + 0.01)).sum()
               / (2 * sigma ** 2) for t in targets)
    torch.testing.assert_close(prior(net.layers, factors), hand, rtol=1e-4, atol=1e-6)


def test_ensemble_prior_uses_mean_and_variance(tiny_sd1):
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    targets, net = _network(b, "cross_attention")
    others = [{t.key: t.module.weight.detach() + 0.1 * (i + 1) for t in targets} for i in range(2)]
    prior = ensemble_prior(targets, others, sigma=0.01)
    factors = {k: (l.down, l.up) for k, l in net.layers.items()}
    hand = 0.0
    for t in targets:
        w = t.module.weight.detach()
        stack = torch.stack([w, others[0][t.key], others[1][t.key]])
        mu, var = stack.mean(0), stack.var(0)
        theta = w + _explicit_delta(t, net.layers[t.key])
        hand = hand + ((theta - mu) ** 2 / (2 * (var + 0.01 ** 2))).sum()
    torch.testing.assert_close(prior(net.layers, factors), hand, rtol=1e-4, atol=1e-4)


def _vdu_run(b, **kw):
    from vdu_engine import ForgetSet
    from vdu_engine.config import UnlearnConfig
    from vdu_engine.train import Run
    # own_forget_images off: the hand computations below count the 3 images as N; concept_prefix off: they
    # name each row's caption (the prefixes have their own test)
    kw = {"own_forget_images": False, "fisher_samples": 3, "concept_prefix": False, **kw}
    cfg = UnlearnConfig(concept="red", batch_size=2, prior="isotropic", neighbours=0, sample_steps=2, **kw).validate()
    forget = ForgetSet.from_tensor(torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)),
                                   ["a red circle", "a small red square", "red"],
                                   channels_last=False)
    return Run(b, cfg).setup(forget)


def test_replay_drift_is_the_mean_squared_change_of_the_models_predictions(tiny_sd1):
    """The function-space stability term, by hand: the pool holds the frozen model's predictions
    on noisy versions of the model's own images; the replay rows that ride in a step's forward
    pass add replay · N · E‖ε_θ − ε_θ*‖² to the stability term, split over passes by their share
    of the batch, and nothing while the deltas are zero."""
    from vdu_engine.backend import cond_index
    from vdu_engine.objectives import VDU
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    run = _vdu_run(b, replay_batch=4, replay=10.0, gamma=0.5, hold_unconditional=False)
    obj = VDU(run)
    pool = obj.replay
    lat, cond = run.images()
    assert set(pool.caption.tolist()) == {0, 1, 2}
    with torch.no_grad():
        direct = b.denoise(pool.x_t[:8], pool.t[:8], cond_index(cond, pool.caption[:8]))
        torch.testing.assert_close(pool.ref[:8], direct)
    with torch.no_grad():
        for layer in run.network.layers.values():
            layer.up.normal_(0, 0.1)
    batch = obj.draw(torch.Generator().manual_seed(0))
    assert batch["replay"].shape == (4,)
    whole = slice(0, 2)

    def loss(part):
        with run.network.attached(), torch.no_grad():
            return obj.loss(batch, part)[0]
    with_replay = loss(whole)
    obj.replay = None
    without, halves_without = loss(whole), [loss(s) for s in (slice(0, 1), slice(1, 2))]
    obj.replay = pool
    halves = [loss(s) - w for s, w in zip((slice(0, 1), slice(1, 2)), halves_without)]
    rows = batch["replay"]
    with run.network.attached(), torch.no_grad():
        adapted = b.denoise(pool.x_t[rows], pool.t[rows], cond_index(cond, pool.caption[rows]))
    hand = ((adapted - pool.ref[rows]) ** 2).flatten(1).mean(1).mean()
    assert hand > 0
    torch.testing.assert_close(with_replay - without, 0.5 * 10.0 * 3 * hand, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sum(h / 2 for h in halves), with_replay - without, rtol=1e-4, atol=1e-6)


def test_destination_pulls_the_concepts_caption_to_the_frozen_destination_prompt_on_its_own_images(tiny_sd1):
    """The destination by hand: the frozen model draws images for the captions with the concept
    taken out ("a red circle" → "a circle"; "red" alone → the unconditional prompt), drawn plainly
    (no neighbours to check against, so no fallback); on noisy
    versions of them the goal is ε*(x_t, c⁻) − η (ε*(x_t, c) − ε*(x_t, c⁻)), and the loss adds
    destination · (1 − γ) · N · E‖ε_θ(x_t, c) − goal‖² over the step's destination rows."""
    from vdu_engine.objectives import VDU
    from vdu_engine.sampling import ddim_latents
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    run = _vdu_run(b, destination=2.0, anchor_guidance=2.0, replay=0.0, gamma=0.5)
    obj = VDU(run)
    dest, pool = run.destination, obj.dest
    removed = {"a red circle": "a circle", "a small red square": "a small square", "red": ""}
    assert dest.mode == "remove" and dest.share is None  # no neighbours: nothing to check against
    assert dest.prompts == [removed[run.all_captions[s]] for s in dest.sources]
    assert set(dest.prompts) == {"a circle", "a small square", ""}
    with torch.no_grad():
        again = ddim_latents(b, dest.prompts, 20_000, 2, run.cfg.guidance, run.resolution)  # drawn plainly
    torch.testing.assert_close(dest.latents, again, rtol=1e-4, atol=1e-4)
    rows = torch.arange(6)
    caps = [run.all_captions[i] for i in pool.caption[rows].tolist()]
    with torch.no_grad():
        x_t, t = pool.x_t[rows], pool.t[rows]
        named = b.denoise(x_t, t, b.encode_text(caps))
        toward = b.denoise(x_t, t, b.encode_text([removed[c] for c in caps]))
    torch.testing.assert_close(obj.goal[rows], toward - 2.0 * (named - toward), rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # the term in the loss, with a non-zero delta
        for layer in run.network.layers.values():
            layer.up.normal_(0, 0.1)
    batch = obj.draw(torch.Generator().manual_seed(0))
    with run.network.attached(), torch.no_grad():
        total = obj.loss(batch, slice(0, 2))[0]
        obj.dest = None
        without_dest = obj.loss(batch, slice(0, 2))[0]
        obj.dest = pool
        d = batch["dest"]
        adapted = b.denoise(pool.x_t[d], pool.t[d], b.encode_text([run.all_captions[i] for i in pool.caption[d]]))
    hand = ((adapted - obj.goal[d]) ** 2).flatten(1).mean(1).mean()
    assert hand > 0
    torch.testing.assert_close(total - without_dest, 0.5 * 3 * 2.0 * hand, rtol=1e-4, atol=1e-6)


def test_a_neighbour_destination_is_its_prompts_own_prediction_not_pushed_past(tiny_sd1):
    """With the nearest neighbour in the concept's place ("a red circle" → "a blue circle"), the goal is
    ε*(x_t, c_w) itself: the neighbour does not draw the concept, so --anchor-guidance does not push past it."""
    from vdu_engine.neighbours import Vicinity
    from vdu_engine.objectives import VDU
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    run = _vdu_run(b, destination_mode="neighbours", anchor_guidance=2.0, replay=0.0)
    run.vicinity = Vicinity(neighbours=["green", "blue"], ratios={"green": 3.0, "blue": 1.5})
    obj = VDU(run)
    assert run.destination.mode == "neighbours" and run.destination.neighbour == "blue"
    assert set(run.destination.prompts) == {"a blue circle", "a small blue square", "blue"}
    rows = torch.arange(6)
    caps = [run.all_captions[i] for i in obj.dest.caption[rows].tolist()]
    with torch.no_grad():
        swapped = b.encode_text([c.replace("red", "blue") for c in caps])
        toward = b.denoise(obj.dest.x_t[rows], obj.dest.t[rows], swapped)
    torch.testing.assert_close(obj.goal[rows], toward, rtol=1e-4, atol=1e-5)


def test_one_negative_prompt_per_prompt_guides_each_image_away_from_its_own(tiny_sd1):
    """ε(c_neg) + w (ε(c) − ε(c_neg)) with each prompt's own negative: the same latents as drawing each
    prompt alone with its negative; a list of the wrong length is refused."""
    from vdu_engine.sampling import ddim_latents
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    prompts, negatives = ["a circle", "a small square"], ["a red circle", "a small blue square"]
    with torch.no_grad():
        both = ddim_latents(b, prompts, 3, 2, 5.0, negative=negatives)
        alone = torch.cat([ddim_latents(b, [p], 3, 2, 5.0, negative=n, seeds=[3 + i])
                           for i, (p, n) in enumerate(zip(prompts, negatives))])
        plain = ddim_latents(b, prompts, 3, 2, 5.0)
    torch.testing.assert_close(both, alone, rtol=1e-4, atol=1e-4)  # batched vs alone: float noise
    assert not torch.allclose(both, plain, atol=1e-3)
    with pytest.raises(ValueError, match="1 negative prompts for 2 prompts"):
        ddim_latents(b, prompts, 3, 2, 5.0, negative=negatives[:1])


def test_neighbour_destinations_put_the_nearest_neighbour_in_every_caption():
    """In neighbours mode every caption takes the same neighbour in the concept's place: the one whose
    swap changes the frozen model's prediction least (the smallest ratio). Different neighbours per
    caption would blend, between captions, into a mixture of far-apart concepts."""
    from types import SimpleNamespace
    from vdu_engine.config import UnlearnConfig
    from vdu_engine.destination import destination_prompts
    from vdu_engine.neighbours import word_pattern
    run = SimpleNamespace(all_captions=["a red circle", "a small red square", "a red one"],
                          concept_words=word_pattern(["red"]), cfg=UnlearnConfig(concept="red"),
                          vicinity=SimpleNamespace(neighbours=["blue", "orange", "green"],
                                                   ratios={"blue": 2.8, "orange": 1.1, "green": 6.0}))
    got = destination_prompts(run, [0, 1, 2, 0, 1], "neighbours")
    first = ["a orange circle", "a small orange square"]
    assert got == first + ["a orange one"] + first
    assert destination_prompts(run, [0, 1], "remove") == ["a circle", "a small square"]


def test_held_neighbours_replay_the_forget_rows_under_a_neighbours_caption(tiny_sd1):
    """Protection on the forget images by hand: forget row r is held under its caption with neighbour
    r mod K in the concept's place ("a red circle" → "a blue circle" / "a green circle"), at the
    frozen model's prediction, and the loss adds γ · replay · N · E‖ε_θ(x_t, c_w) − ε*(x_t, c_w)‖²
    over the pass's rows."""
    from vdu_engine.neighbours import Vicinity
    from vdu_engine.objectives import VDU
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    run = _vdu_run(b, replay=10.0, gamma=0.5, destination=0.0)
    run.vicinity = Vicinity(neighbours=["blue", "green"])
    obj = VDU(run)
    cond, index, ref, named = obj.held
    pool = obj.pool
    swapped = {"a red circle": "a {} circle", "a small red square": "a small {} square", "red": "{}"}
    rows = torch.arange(8)
    prompts = [swapped[run.all_captions[c]].format(["blue", "green"][r % 2])
               for r, c in enumerate(pool.caption[rows].tolist())]
    with torch.no_grad():
        direct = b.denoise(pool.x_t[rows], pool.t[rows], b.encode_text(prompts))
    torch.testing.assert_close(ref[rows], direct, rtol=1e-4, atol=1e-5)
    assert bool(named.all())  # every caption names the concept
    with torch.no_grad():
        for layer in run.network.layers.values():
            layer.up.normal_(0, 0.1)
    batch = obj.draw(torch.Generator().manual_seed(0))
    part = slice(0, 2)
    with run.network.attached(), torch.no_grad():
        total = obj.loss(batch, part)[0]
        held, obj.held = obj.held, None
        without = obj.loss(batch, part)[0]
        obj.held = held
        r = batch["rows"][part]
        mine = [swapped[run.all_captions[c]].format(["blue", "green"][i % 2])
                for i, c in zip(r.tolist(), pool.caption[r].tolist())]
        adapted = b.denoise(pool.x_t[r], pool.t[r], b.encode_text(mine))
    hand = ((adapted - ref[r]) ** 2).flatten(1).mean(1).mean()
    assert hand > 0
    torch.testing.assert_close(total - without, 0.5 * 10.0 * 3 * hand, rtol=1e-4, atol=1e-6)


def test_plasticity_bound_is_a_multiple_of_each_rows_own_frozen_error(tiny_sd1):
    """Each forget row's cap, by hand: `bound` × ‖target − ε*(x_t, c)‖² on that row (its image, noise,
    timestep and caption), so rows the frozen model finds easy get a small cap and hard ones a large one;
    a row's error counts only up to its cap, and the share of rows at their cap is what the stop rule reads."""
    from vdu_engine.objectives import VDU
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    run = _vdu_run(b, bound=1.5, replay=0.0, destination=0.0)
    obj = VDU(run)
    pool = obj.pool
    rows = torch.arange(8)
    with torch.no_grad():
        frozen = b.denoise(pool.x_t[rows], pool.t[rows], b.encode_text([run.all_captions[c]
                                                                       for c in pool.caption[rows].tolist()]))
    hand = 1.5 * ((pool.target[rows] - frozen) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(obj.bound[rows], hand, rtol=1e-4, atol=1e-7)
    batch = obj.draw(torch.Generator().manual_seed(0))
    with run.network.attached(), torch.no_grad():
        _, terms = obj.loss(batch, slice(0, 2))
    assert float(terms["bounded"]) == 0.0  # the deltas are zero: every row at its frozen error, below 1.5 × it
    obj.bound = obj.bound * 0.5  # 0.75 × the frozen error: every row is past its cap
    with run.network.attached(), torch.no_grad():
        assert float(obj.loss(batch, slice(0, 2))[1]["bounded"]) == 1.0


def test_replay_holds_the_unconditional_prediction_on_every_replayed_image(tiny_sd1):
    """With --hold-unconditional the replay term is replay · N · E[‖δ(c')‖² + ‖δ(∅)‖²]: on each
    replayed x'_t the drift of ε_θ under the row's own prompt c' and under the empty prompt, which
    guidance evaluates for every prompt; ε*(x'_t, ∅) comes from the frozen model."""
    from vdu_engine.backend import cond_index
    from vdu_engine.objectives import VDU
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    run = _vdu_run(b, replay_batch=4, replay=10.0, gamma=0.5, hold_unconditional=True)
    obj = VDU(run)
    pool, (_, cond) = obj.replay, run.images()
    empty = cond_index(b.encode_text([""]), torch.zeros_like(pool.caption))
    with torch.no_grad():
        frozen_empty = b.denoise(pool.x_t, pool.t, empty)
        torch.testing.assert_close(obj.replay_empty.ref, frozen_empty)
        for layer in run.network.layers.values():
            layer.up.normal_(0, 0.1)
    batch = obj.draw(torch.Generator().manual_seed(0))

    def loss():
        with run.network.attached(), torch.no_grad():
            return obj.loss(batch, slice(0, 2))[0]
    with_replay = loss()
    obj.replay = None
    without = loss()
    rows = batch["replay"]
    with run.network.attached(), torch.no_grad():
        adapted = b.denoise(pool.x_t[rows], pool.t[rows], cond_index(cond, pool.caption[rows]))
        adapted_empty = b.denoise(pool.x_t[rows], pool.t[rows], cond_index(empty, rows))
    own = ((adapted - pool.ref[rows]) ** 2).flatten(1).mean(1)
    unconditional = ((adapted_empty - frozen_empty[rows]) ** 2).flatten(1).mean(1)
    assert own.min() > 0 and unconditional.min() > 0
    torch.testing.assert_close(with_replay - without, 0.5 * 10.0 * 3 * (own + unconditional).mean(),
                               rtol=1e-4, atol=1e-6)


def test_score_align_pulls_each_caption_to_its_own_caption_without_the_concept(tiny_sd1):
    """The score-alignment baseline's anchor, by hand: without --anchor, each forget row's goal is the
    frozen model's prediction for its caption with the concept taken out (the bare word's: the empty
    prompt); a user's anchor replaces them all."""
    from vdu_engine.objectives import ScoreAlign
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    removed = {"a red circle": "a circle", "a small red square": "a small square", "red": ""}
    for anchor in ("", "a dog"):
        run = _vdu_run(b, objective="score_align", anchor=anchor)
        obj = ScoreAlign(run)
        rows = torch.arange(8)
        caps = [run.all_captions[i] for i in obj.pool.caption[rows].tolist()]
        assert set(caps) <= set(removed)
        goals = [anchor or removed[c] for c in caps]
        with torch.no_grad():
            hand = b.denoise(obj.pool.x_t[rows], obj.pool.t[rows], b.encode_text(goals))
        torch.testing.assert_close(obj.goal[rows], hand, rtol=1e-4, atol=1e-5)


def test_the_forget_set_adds_the_models_own_images_of_its_captions(tiny_sd1):
    """Image runs forget the user's images and, beside them, what the frozen model draws for their captions:
    --fisher-samples images spread evenly over the captions (more than the user's images here), from their own seed;
    they count in N. Not for the baselines, whose forget set is the user's images."""
    from vdu_engine.sampling import ddim_latents
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    user = _vdu_run(b)
    run = _vdu_run(b, own_forget_images=True, fisher_samples=5)
    caps = ["a red circle", "a small red square", "red"]
    own_caps = [caps[0], caps[0], caps[1], caps[1], caps[2]]
    assert user.captions == caps and run.captions == caps + own_caps
    assert run.n_forget == 8 and run.n_own == 5
    torch.testing.assert_close(run.latents[:3], user.latents)
    with torch.no_grad():
        own = ddim_latents(b, own_caps, run.cfg.seed + 30_000, 2, run.cfg.guidance, run.resolution)
    torch.testing.assert_close(run.latents[3:], own.float(), rtol=1e-4, atol=1e-4)
    assert _vdu_run(b, own_forget_images=True, objective="esd").n_forget == 3


def test_each_caption_is_also_trained_cut_after_the_concept(tiny_sd1):
    """`--concept-prefix`: a forget image's caption that goes on after the concept is also trained up to it
    ("a small red square" → "a small red"), beside its own and its synonyms' versions. The destination draws
    for whole captions only, a prefix that is itself some image's whole caption stays one, and other
    objectives (baselines as their papers define them) get no prefixes."""
    from vdu_engine import ForgetSet
    from vdu_engine.config import UnlearnConfig
    from vdu_engine.destination import plan
    from vdu_engine.neighbours import Vicinity
    from vdu_engine.train import Run
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    captions = ["a red circle on grey", "a small red square", "red", "a red"]
    forget = ForgetSet.from_tensor(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)), captions,
                                   channels_last=False)

    def run_for(**kw):
        kw = {"fisher_samples": 4, **kw}
        cfg = UnlearnConfig(concept="red", batch_size=2, prior="isotropic", neighbours=0, sample_steps=2,
                            own_forget_images=False, **kw).validate()
        return Run(b, cfg).setup(forget)

    run = run_for()
    versions = [[run.all_captions[i] for i in v] for v in run.variants]
    assert versions == [["a red circle on grey", "a red"], ["a small red square", "a small red"], ["red"], ["a red"]]
    assert run.prefixes == {"a small red"}  # "a red" is also the fourth image's own caption
    assert run.n_prefixes == 2
    dest = plan(run)
    assert "a small red" not in [run.all_captions[i] for i in dest.sources]
    drawn_for = sorted({run.all_captions[i] for i in dest.sources})
    assert drawn_for == ["a red", "a red circle on grey", "a small red square", "red"]
    assert run_for(concept_prefix=False).variants == [[0], [1], [2], [3]]
    # the prefix is held as its caption is: "a small red" → "a small", after the whole captions' prompts
    assert run_for(fisher_samples=5).image_prompts == ["", "a", "a circle on grey", "a small square", "a small"]
    assert "a small" not in run_for(fisher_samples=5, concept_prefix=False).image_prompts
    assert run_for(objective="esd").prefixes == set() and run_for(objective="esd").n_prefixes == 0
    synonym = run_for()
    synonym.vicinity = Vicinity(synonyms=["crimson"])
    synonym._caption_variants()
    assert [synonym.all_captions[i] for i in synonym.variants[1]] == ["a small red square", "a small crimson square",
                                                                       "a small red"]
