"""The loss terms against a hand computation on a tiny model, and each prior mode."""

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
    loss = vdu_loss(stability, err, bound, gamma, n_forget)
    capped = torch.stack([min(e, c) for e, c in zip(hand_err, bound)])
    hand = gamma * hand_stab - (1 - gamma) * n_forget * capped.mean()
    torch.testing.assert_close(loss, hand, rtol=1e-4, atol=1e-6)


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


def test_replay_drift_is_the_mean_squared_change_of_the_models_predictions(tiny_sd1):
    """The function-space stability term, by hand: the pool holds the frozen model's predictions
    on noisy versions of the model's own images; the replay rows that ride in a step's forward
    pass add replay · N · E‖ε_θ − ε_θ*‖² to the stability term, split over passes by their share
    of the batch, and nothing while the deltas are zero."""
    from vdu_engine.backend import cond_index
    from vdu_engine.config import UnlearnConfig
    from vdu_engine.train import Terms, _replay_pool
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    targets, net = _network(b, "cross_attention")
    lat = torch.randn(3, 4, 8, 8)
    cond = b.encode_text(["a blue square", "", "a small circle"])
    pool = _replay_pool(b, (lat, cond), 0, None)
    assert set(pool["row"].tolist()) == {0, 1, 2}
    with torch.no_grad():
        torch.testing.assert_close(pool["ref"][:8], b.denoise(pool["x_t"][:8], pool["t"][:8],
                                                              cond_index(cond, pool["row"][:8])))
    cfg = UnlearnConfig(concept="red", batch_size=2, replay_batch=5, replay=10.0, gamma=0.5).validate()
    terms = Terms(b, cfg, net, isotropic_prior(10.0), torch.ones(10), {"replay": pool}, None, 3)
    rows = terms.draw_replay()
    assert rows.shape == (5,)
    torch.manual_seed(0)
    x0, eps, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    c = b.encode_text(["a red circle"] * 2)
    with net.attached(), torch.no_grad():
        with_replay, _ = terms(x0, eps, t, c, rows)
        without, _ = terms(x0, eps, t, c, None)
        halves = [terms(x0[s], eps[s], t[s], cond_index(c, s), rows[terms.replay_rows(s)])[0] -
                  terms(x0[s], eps[s], t[s], cond_index(c, s), None)[0] for s in (slice(0, 1), slice(1, 2))]
        adapted = b.denoise(pool["x_t"][rows], pool["t"][rows], cond_index(cond, pool["row"][rows]))
    hand = ((adapted - pool["ref"][rows]) ** 2).flatten(1).mean(1).mean()
    assert hand > 0
    torch.testing.assert_close(with_replay - without, 0.5 * 10.0 * 3 * hand, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sum(h / 2 for h in halves), with_replay - without, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        for layer in net.layers.values():
            layer.up.zero_()
    with net.attached(), torch.no_grad():
        torch.testing.assert_close(terms(x0, eps, t, c, rows)[0], terms(x0, eps, t, c, None)[0])
