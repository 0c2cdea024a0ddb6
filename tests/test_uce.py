"""UCE: the closed form against least squares, the SVD export, and the edit on tiny real models."""

import math

import pytest
import torch

from vdu_engine import DiffusersBackend, VDUError
from vdu_engine.uce import _product_svd, closed_form, low_rank, uce_edit, uce_targets

ERASE, ANCHOR, PRESERVE = ["a red circle"], ["a circle"], ["a blue square"]


def test_closed_form_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    out, dim, n, m, lp, lamb = 7, 9, 5, 4, 0.7, 0.3
    W, c, c_star, p = rand(out, dim), rand(n, dim), rand(n, dim), rand(m, dim)
    # The objective is a stacked least-squares problem in X = W'ᵀ: each row block is one term.
    A = torch.cat([c, math.sqrt(lp) * p, math.sqrt(lamb) * torch.eye(dim, dtype=torch.float64)])
    B = torch.cat([c_star @ W.T, math.sqrt(lp) * p @ W.T, math.sqrt(lamb) * W.T])
    X = torch.linalg.lstsq(A, B).solution
    got = closed_form(W, c, c_star, p, lp, lamb)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.T, X, rtol=0, atol=1e-8)
    # No preserve rows at all is allowed and still the least-squares answer.
    X0 = torch.linalg.lstsq(A[[*range(n), *range(n + m, n + m + dim)]],
                            B[[*range(n), *range(n + m, n + m + dim)]]).solution
    torch.testing.assert_close(closed_form(W, c, c_star, p[:0], lp, lamb).T, X0, rtol=0, atol=1e-8)


def test_low_rank_factors_and_truncation_error():
    g = torch.Generator().manual_seed(1)
    delta = (torch.randn(6, 2, generator=g, dtype=torch.float64)
             @ torch.randn(2, 5, generator=g, dtype=torch.float64))
    alpha = 4.0
    down, up, err = low_rank(delta, 2, alpha)
    assert down.shape == (2, 5) and up.shape == (6, 2)
    torch.testing.assert_close(alpha / 2 * up @ down, delta, rtol=0, atol=1e-10)
    assert err < 1e-7

    s = torch.linalg.svdvals(delta)
    down1, up1, err1 = low_rank(delta, 1, alpha)
    expected = math.sqrt(s[1] ** 2 / (s[0] ** 2 + s[1] ** 2))
    assert err1 == pytest.approx(expected, rel=1e-9)
    direct = torch.linalg.norm(delta - alpha * up1 @ down1) / torch.linalg.norm(delta)
    assert float(direct) == pytest.approx(expected, rel=1e-9)
    # sqrt(S) on both sides: the two factors of each component are equally large.
    torch.testing.assert_close(up1.norm(dim=0), down1.norm(dim=1))

    # A rank above min(out, in) pads with zeros and still reconstructs exactly.
    down8, up8, err8 = low_rank(delta, 8, alpha)
    assert down8.shape == (8, 5) and up8.shape == (6, 8) and err8 < 1e-7
    torch.testing.assert_close(alpha / 8 * up8 @ down8, delta, rtol=0, atol=1e-10)
    assert low_rank(torch.zeros(3, 4, dtype=torch.float64), 2, 1.0)[2] == 0.0


@pytest.mark.parametrize("k", [3, 20])  # below min(out, in): QR core path; above: dense SVD
def test_product_svd_matches_dense(k):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(12, k, generator=g, dtype=torch.float64)
    b = torch.randn(10, k, generator=g, dtype=torch.float64)
    u, s, vh = _product_svd(a, b)
    torch.testing.assert_close(u @ torch.diag(s) @ vh, a @ b.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(s[:min(k, 10)], torch.linalg.svdvals(a @ b.T)[:min(k, 10)], rtol=0, atol=1e-10)
    torch.testing.assert_close(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), rtol=0, atol=1e-10)


def _outputs(targets, ctx):
    with torch.no_grad():
        return {t.key: t.module(ctx) for t in targets}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_uce_edit_on_tiny_model(kind, tiny_models):
    b = DiffusersBackend.load(tiny_models[kind], device="cpu")
    all_targets = b.targets()
    targets = uce_targets(all_targets)
    assert targets and all(t.path.endswith(("attn2.to_k", "attn2.to_v")) for t in targets)
    before = {k: v.clone() for m in (b.unet, *b.text_encoders) for k, v in m.state_dict().items()}

    # The tiny encoder's 32-wide tokens (norm √32) differ between prompts along directions with
    # singular values ~0.3, where the default λ = 0.1 still holds the edit back (gap ≈ 0.16 of the
    # original); SD's 768- to 2048-wide contexts are far longer, so λ weighs much less there.
    lamb = 1e-3
    result = uce_edit(b, all_targets, ERASE, ANCHOR, PRESERVE, rank=32, alpha=8.0, lamb=lamb)
    assert set(result.network.layers) == {t.key for t in targets}  # other layers are left out

    with torch.no_grad():
        c, c_star, p = (b.encode_text(x)["context"] for x in (ERASE, ANCHOR, PRESERVE))
    plain_c, plain_star, plain_p = _outputs(targets, c), _outputs(targets, c_star), _outputs(targets, p)
    with result.network.attached():
        edit_c, edit_p = _outputs(targets, c), _outputs(targets, p)
    for t in targets:
        k = t.key
        gap_before = (plain_c[k] - plain_star[k]).norm()
        gap_after = (edit_c[k] - plain_star[k]).norm()
        moved_erase, moved_keep = (edit_c[k] - plain_c[k]).norm(), (edit_p[k] - plain_p[k]).norm()
        assert gap_before > 1e-3, k  # the concept and anchor are different inputs to begin with
        assert gap_after < 0.1 * gap_before, (k, float(gap_after / gap_before))
        assert moved_keep < 0.1 * moved_erase, (k, float(moved_keep / moved_erase))
        # rank 32 ≥ rank ΔW (≤ the 16 token rows of one erase prompt): the LoRA is the closed form
        # itself, checked through the module.
        assert result.truncation_error[k] < 1e-6
        x = torch.randn(3, t.module.in_features, generator=torch.Generator().manual_seed(3))
        W = t.module.weight
        want = x.double() @ (closed_form(W, c[0], c_star[0], p[0], 1.0, lamb) - W.double()).T
        with torch.no_grad(), result.network.attached():
            got = t.module(x) - torch.nn.functional.linear(x, W, t.module.bias)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)

    after = {k: v for m in (b.unet, *b.text_encoders) for k, v in m.state_dict().items()}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    sd = result.network.kohya_state_dict()
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in sd)
    assert {k.split(".")[0] for k in sd} == {t.key for t in targets}
    assert all(k.split(".")[0].endswith(("_attn2_to_k", "_attn2_to_v")) for k in sd)
    assert len(sd) == 3 * len(targets)


def test_uce_truncation_and_kohya_file_in_diffusers(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    result = uce_edit(b, b.targets(), ERASE, ANCHOR, PRESERVE, rank=1, alpha=1.0)
    assert all(0 < e < 1 for e in result.truncation_error.values())  # rank 1 loses something, not all

    path = tmp_path / "uce.safetensors"
    save_file(result.network.kohya_state_dict(), str(path))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, local_files_only=True)
    pipe.load_lora_weights(str(path))
    n = sum(1 for _, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))
    assert n == len(result.network.layers)  # every key matched a diffusers layer
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([100, 700])
    cond = b.encode_text(ERASE + PRESERVE)
    with torch.no_grad(), result.network.attached():
        ours = b.denoise(x, t, cond)
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=cond["context"]).sample
        base = b.denoise(x, t, cond)
    assert (ours - base).abs().max() > 1e-5  # the edit changes the prediction for the concept
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_uce_input_errors(tiny_sd1):
    b = DiffusersBackend.load(tiny_sd1, device="cpu")
    with pytest.raises(VDUError, match="one anchor per erase prompt"):
        uce_edit(b, b.targets(), ["a red circle", "a dog"], ["a circle"], [], rank=4, alpha=4.0)
    with pytest.raises(VDUError, match="at least one erase prompt"):
        uce_edit(b, b.targets(), [], [], PRESERVE, rank=4, alpha=4.0)
    with pytest.raises(VDUError, match="attn2"):
        uce_edit(b, [t for t in b.targets() if t.component != "unet"], ERASE, ANCHOR, [], rank=4, alpha=4.0)
