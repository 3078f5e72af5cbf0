"""Numerical and behavioural checks for the V, M and C networks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, Normal

from worldmodels.models import (
    MDNRNN,
    ConvVAE,
    LinearController,
    MDNOutput,
    batched_controller_actions,
    controller_param_count,
    frames_to_tensor,
    mdn_nll,
    mdnrnn_loss,
    sample_next_z,
    vae_loss,
)

# ---------------------------------------------------------------------------------------------
# VAE


def _blob_images(n: int, seed: int = 0) -> torch.Tensor:
    """A randomly coloured, randomly placed soft blob on a fixed grass-green background.

    Every image differs from the batch mean, so beating the mean image proves z carries
    per-image information (a black background lets a net "win" by predicting black).
    """
    g = torch.Generator().manual_seed(seed)
    coords = torch.linspace(0.0, 1.0, 64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
    colour = torch.rand(n, 3, generator=g)
    background = torch.tensor([0.4, 0.6, 0.4])
    d2 = (xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2
    blob = torch.exp(-d2 / (2 * 0.2**2))[:, None]  # (n, 1, 64, 64)
    return background[:, None, None] * (1 - blob) + colour[:, :, None, None] * blob


def test_frames_to_tensor_layout_and_range():
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8)
    for src in (frames, torch.from_numpy(frames)):
        x = frames_to_tensor(src)
        assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
        assert x[1, 2, 5, 7].item() == pytest.approx(frames[1, 5, 7, 2] / 255.0)
        assert x.min() >= 0.0 and x.max() <= 1.0


def test_full_size_vae_shapes():
    torch.manual_seed(0)
    vae = ConvVAE().eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        x_hat, mu, logvar = vae(x)
    assert x_hat.shape == (2, 3, 64, 64)
    assert mu.shape == (2, 32) and logvar.shape == (2, 32)
    assert vae.flat_dim == 1024
    with torch.no_grad():
        torch.testing.assert_close(vae.encode_mean(x), vae.encode(x)[0], atol=0, rtol=0)


def test_tiny_vae_overfits_one_batch():
    torch.manual_seed(0)
    x = _blob_images(16)
    mean_image_sse = (x - x.mean(dim=0, keepdim=True)).pow(2).sum(dim=(1, 2, 3)).mean().item()
    vae = ConvVAE(z_dim=8, channels=(8, 16, 16, 32))
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)

    def eval_sse() -> float:
        vae.eval()
        with torch.no_grad():
            x_hat, mu, logvar = vae(x)
        vae.train()
        return vae_loss(x, x_hat, mu, logvar)["sse"].item()

    initial = eval_sse()
    for _ in range(300):
        x_hat, mu, logvar = vae(x)
        loss = vae_loss(x, x_hat, mu, logvar)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = eval_sse()

    assert final < 0.3 * initial, (initial, final)
    assert final < 0.3 * mean_image_sse, (mean_image_sse, final)
    vae.eval()
    with torch.no_grad():
        x_hat, _, _ = vae(x)
    assert x_hat.shape == (16, 3, 64, 64)
    assert x_hat.min() >= 0.0 and x_hat.max() <= 1.0


def test_vae_loss_free_bits_and_figures():
    z_dim, free_bits = 16, 0.5
    x = torch.rand(4, 3, 64, 64)
    x_hat = torch.rand(4, 3, 64, 64)
    zeros = torch.zeros(4, z_dim)

    out = vae_loss(x, x_hat, zeros, zeros, free_bits=free_bits)
    assert out["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["kl_term"].item() == pytest.approx(z_dim * free_bits)
    sse = ((x_hat - x) ** 2).sum(dim=(1, 2, 3)).mean()
    assert out["sse"].item() == pytest.approx(sse.item(), rel=1e-5)
    assert out["mse"].item() == pytest.approx(sse.item() / (3 * 64 * 64), rel=1e-5)
    assert out["loss"].item() == pytest.approx(sse.item() + z_dim * free_bits, rel=1e-5)

    big_mu = torch.full((4, z_dim), 3.0)  # KL per dim = 4.5 nats, far above the floor
    out = vae_loss(x, x_hat, big_mu, zeros, free_bits=free_bits)
    assert out["kl"].item() == pytest.approx(z_dim * 4.5, rel=1e-6)
    assert out["kl_term"].item() == pytest.approx(out["kl"].item(), rel=1e-6)


def test_vae_loss_is_float32_for_bf16_inputs():
    x = torch.rand(2, 3, 64, 64).bfloat16()
    z = torch.zeros(2, 4).bfloat16()
    out = vae_loss(x, x.clone(), z, z)
    assert all(v.dtype == torch.float32 for v in out.values())


# ---------------------------------------------------------------------------------------------
# MDN-RNN


def _random_mixture(shape_bt: tuple[int, ...], k: int, z: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logpi = torch.log_softmax(torch.randn(*shape_bt, k, z, generator=g), dim=-2)
    mu = torch.randn(*shape_bt, k, z, generator=g)
    logsigma = torch.randn(*shape_bt, k, z, generator=g) * 0.5
    return logpi, mu, logsigma


def test_mdn_nll_matches_torch_distributions():
    b, k, z = 6, 5, 4
    logpi, mu, logsigma = _random_mixture((b,), k, z)
    target = torch.randn(b, z) * 2.0

    # torch wants the mixture axis last: move K behind the (B, Z) batch dims.
    mix = MixtureSameFamily(
        Categorical(logits=logpi.transpose(-1, -2)),
        Normal(mu.transpose(-1, -2), logsigma.exp().transpose(-1, -2)),
    )
    expected = -mix.log_prob(target)  # (B, Z)
    got = mdn_nll(logpi, mu, logsigma, target)
    assert got.shape == (b, z)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_mdn_nll_finite_far_from_every_component():
    logpi, mu, logsigma = _random_mixture((3,), 5, 4)
    target = torch.full((3, 4), 1e4)
    naive = -torch.log(
        (logpi.exp() * Normal(mu, logsigma.exp()).log_prob(target[:, None]).exp()).sum(-2)
    )
    assert torch.isinf(naive).all()  # the exp-then-log route underflows
    nll = mdn_nll(logpi, mu, logsigma, target)
    assert torch.isfinite(nll).all() and (nll > 1e6).all()


def test_mdnrnn_sequence_equals_step_by_step():
    torch.manual_seed(0)
    model = MDNRNN(z_dim=8, action_dim=3, hidden=16, n_gaussians=3).eval()
    b, t = 3, 7
    z = torch.randn(b, t, 8)
    a = torch.randn(b, t, 3)
    with torch.no_grad():
        seq, (h_seq, c_seq) = model(z, a)
        before = model.states_before(z, a)
        h, c = torch.zeros(b, 16), torch.zeros(b, 16)
        steps = []
        for i in range(t):  # the one way acting and dreaming step M
            torch.testing.assert_close(before[:, i], h, atol=1e-5, rtol=0)  # what C reads at i
            h, c = model.advance(z[:, i], a[:, i], h, c)
            steps.append(model.predict(h))

    assert seq.logpi.shape == (b, t, 3, 8) and seq.reward.shape == (b, t)
    for name in ("logpi", "mu", "logsigma", "reward", "done_logit"):
        stepped = torch.cat([getattr(o, name) for o in steps], dim=1)
        torch.testing.assert_close(stepped, getattr(seq, name), atol=1e-5, rtol=0)
    torch.testing.assert_close(h, h_seq[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(c, c_seq[0], atol=1e-5, rtol=0)
    assert torch.allclose(seq.logpi.exp().sum(dim=-2), torch.ones(b, t, 8), atol=1e-5)


def test_mdnrnn_loss_ignores_masked_positions():
    torch.manual_seed(0)
    model = MDNRNN(z_dim=4, action_dim=3, hidden=8, n_gaussians=2)
    b, t = 2, 5
    out, _ = model(torch.randn(b, t, 4), torch.randn(b, t, 3))
    z_next, reward = torch.randn(b, t, 4), torch.randn(b, t)
    done = torch.zeros(b, t)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 3:] = False
    mask[1, 4:] = False

    clean = mdnrnn_loss(out, z_next, reward, done, mask=mask)
    z_bad, r_bad, d_bad = z_next.clone(), reward.clone(), done.clone()
    z_bad[~mask] = 1e6
    r_bad[~mask] = -1e6
    d_bad[~mask] = 1.0
    garbage = mdnrnn_loss(out, z_bad, r_bad, d_bad, mask=mask)
    for key in ("loss", "nll", "nll_sum", "reward_mse", "done_bce"):
        assert garbage[key].item() == pytest.approx(clean[key].item(), rel=1e-6), key

    # nll is the per-dimension mean, nll_sum the sum over z: they differ by a factor of Z.
    assert clean["nll_sum"].item() == pytest.approx(4 * clean["nll"].item(), rel=1e-5)
    unmasked = mdnrnn_loss(out, z_bad, r_bad, d_bad)
    assert unmasked["loss"].item() > clean["loss"].item() + 1e3


def _step_output(logpi: torch.Tensor, mu: torch.Tensor, logsigma: torch.Tensor) -> MDNOutput:
    b = logpi.shape[0]
    return MDNOutput(logpi, mu, logsigma, torch.zeros(b, 1), torch.zeros(b, 1))


def test_sample_next_z_low_temperature_picks_dominant_mean():
    b, k, z = 4, 3, 5
    logpi = torch.full((b, 1, k, z), -30.0)
    logpi[:, :, 1] = 0.0
    mu = torch.randn(b, 1, k, z)
    logsigma = torch.full((b, 1, k, z), math.log(0.1))
    g = torch.Generator().manual_seed(0)
    for tau in (1e-3, 0.0):
        sample = sample_next_z(_step_output(logpi, mu, logsigma), temperature=tau, generator=g)
        assert sample.shape == (b, z) and torch.isfinite(sample).all()
        torch.testing.assert_close(sample, mu[:, 0, 1], atol=0.02, rtol=0)


def test_sample_next_z_picks_components_by_their_weights_and_temperature():
    """Far-apart component means tell which one was drawn: at τ = 1 as often as its weight,
    at τ = 0.5 as often as its weight squared, renormalised."""
    n, weights = 40_000, torch.tensor([0.2, 0.5, 0.3])
    logpi = weights.log().view(1, 3, 1).expand(n, 3, 2)
    mu = torch.tensor([0.0, 100.0, 200.0]).view(1, 3, 1).expand(n, 3, 2)
    logsigma = torch.full((n, 3, 2), -5.0)
    out = MDNOutput(logpi, mu, logsigma, torch.zeros(n), torch.zeros(n))
    for tau, expected in ((1.0, weights), (0.5, weights**2 / (weights**2).sum())):
        sample = sample_next_z(out, tau, torch.Generator().manual_seed(1))
        drawn = torch.round(sample / 100).long()
        freq = torch.stack([(drawn == k).float().mean() for k in range(3)])
        torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


def test_sample_next_z_unit_temperature_matches_sigma():
    n, z = 20000, 3
    sigma = torch.tensor([0.5, 1.0, 2.0])
    logpi = torch.zeros(n, 1, z)  # (B, K=1, Z): squeezed form without the T axis
    mu = torch.full((n, 1, z), 1.5)
    logsigma = sigma.log().expand(n, 1, z)
    out = MDNOutput(logpi, mu, logsigma, torch.zeros(n), torch.zeros(n))
    sample = sample_next_z(out, temperature=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample.std(dim=0), sigma, rtol=0.1, atol=0)
    torch.testing.assert_close(sample.mean(dim=0), torch.full((z,), 1.5), atol=0.05, rtol=0)


# ---------------------------------------------------------------------------------------------
# Controller


def test_controller_param_count():
    assert controller_param_count(288, 3) == 867
    assert LinearController(288).flat().numel() == 867


def test_batched_controller_matches_single_controllers():
    torch.manual_seed(0)
    p, input_dim = 4, 288
    params = torch.randn(p, controller_param_count(input_dim)) * 0.3
    inputs = torch.randn(p, input_dim)
    batched = batched_controller_actions(params, inputs)
    assert batched.shape == (p, 3)
    for i in range(p):
        ctrl = LinearController.from_flat(params[i])
        assert ctrl.input_dim == input_dim
        torch.testing.assert_close(ctrl.flat(), params[i])
        with torch.no_grad():
            single = ctrl(inputs[i : i + 1])
        torch.testing.assert_close(single[0], batched[i], atol=1e-5, rtol=0)

    steer, gas, brake = batched.unbind(-1)
    assert ((steer >= -1) & (steer <= 1)).all()
    assert ((gas >= 0) & (gas <= 1)).all()
    assert ((brake >= 0) & (brake <= 1)).all()


def test_squash_is_the_world_models_mapping():
    raw = torch.tensor([[0.0, 0.0, -2.0], [50.0, 50.0, 50.0], [-50.0, -50.0, 0.5]])
    # With input_dim 0 the flat vector is just the bias, so the raw outputs equal the params.
    batched = batched_controller_actions(raw, torch.zeros(3, 0))
    expected = torch.tensor([[0.0, 0.5, 0.0], [1.0, 1.0, 1.0], [-1.0, 0.0, math.tanh(0.5)]])
    torch.testing.assert_close(batched, expected)
