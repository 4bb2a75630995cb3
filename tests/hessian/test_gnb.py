"""Gauss-Newton-Bartlett estimator: labels sampled from the model's softmax, gradients of the mean
sampled-label cross-entropy, LM-shaped logits, ``valid_mask``, errors for non-categorical outputs.

The models below add a learnable zero ``delta`` to their logits. Since
d CE / d logits = softmax - onehot(yhat), the gradient w.r.t. ``delta`` reveals the labels the
estimator sampled, without reaching into its sampling code.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flatsophia.hessian import GaussNewtonBartlett, Hutchinson

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _labels_from_logit_grad(grad: torch.Tensor, logits: torch.Tensor, n: int) -> torch.Tensor:
    """Recover yhat from grad = (softmax - onehot(yhat)) / n, checking it has exactly that form."""
    onehot = torch.softmax(logits.detach(), -1) - grad * n
    yhat = onehot.argmax(-1)
    torch.testing.assert_close(onehot, F.one_hot(yhat, logits.shape[-1]).to(onehot.dtype), rtol=0, atol=1e-9)
    return yhat


def test_label_frequencies_match_softmax():
    n, z0 = 20000, torch.tensor([1.5, -0.5, 0.0, 0.7, -2.0], dtype=F64)
    z = nn.Parameter(z0.repeat(n, 1))
    (g,) = GaussNewtonBartlett(seed=0)(lambda: z, None, [z])
    yhat = _labels_from_logit_grad(g, z, n)
    freq = torch.bincount(yhat, minlength=5).double() / n
    p = torch.softmax(z0, -1)
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * se).all(), (freq, p)
    assert (freq > 0).all()  # every class, even the 1.3% one, is drawn


class Classifier(nn.Module):
    def __init__(self, batch=16, classes=4):
        super().__init__()
        self.fc = nn.Linear(6, classes)
        self.delta = nn.Parameter(torch.zeros(batch, classes))
        self.unused = nn.Parameter(torch.zeros(3))

    def forward(self, x):
        return self.fc(x) + self.delta


def test_gradients_match_manual_computation():
    torch.manual_seed(0)
    model = Classifier().to(F64)
    x = torch.randn(16, 6, dtype=F64)
    params = [model.fc.weight, model.fc.bias, model.delta, model.unused]
    training_loss = lambda out: F.cross_entropy(out, torch.zeros(16, dtype=torch.long))  # unused by GNB
    ghat = GaussNewtonBartlett(seed=1)(lambda: model(x), training_loss, params)
    assert ghat[3] is None  # model.unused
    yhat = _labels_from_logit_grad(ghat[2], model(x), 16)
    assert len(yhat.unique()) > 1
    manual = torch.autograd.grad(F.cross_entropy(model(x), yhat), params[:2])
    for a, b in zip(ghat[:2], manual, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


class TinyLM(nn.Module):
    def __init__(self, batch=3, seq=7, vocab=11, dim=5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        self.delta = nn.Parameter(torch.zeros(batch, seq, vocab))

    def forward(self, tokens):
        return self.head(torch.tanh(self.embed(tokens))) + self.delta


@pytest.mark.parametrize("masked", [False, True])
def test_lm_shaped_logits_and_valid_mask(masked):
    torch.manual_seed(1)
    model = TinyLM().to(F64)
    tokens = torch.randint(0, 11, (3, 7))
    valid = torch.rand(3, 7) > 0.3 if masked else torch.ones(3, 7, dtype=torch.bool)
    params = [model.embed.weight, model.head.weight, model.head.bias, model.delta]
    kwargs = {"valid_mask": valid} if masked else {}
    ghat = GaussNewtonBartlett(seed=2)(lambda: model(tokens), None, params, **kwargs)
    logits = model(tokens)
    n_valid = int(valid.sum())
    assert 0 < n_valid <= 21
    g_delta = ghat[3]
    assert g_delta.shape == (3, 7, 11)
    # Excluded positions get exactly zero gradient; the others are (softmax - onehot) / n_valid.
    assert torch.equal(g_delta[~valid], torch.zeros_like(g_delta[~valid]))
    yhat = _labels_from_logit_grad(g_delta[valid], logits[valid], n_valid)
    manual = torch.autograd.grad(F.cross_entropy(logits[valid], yhat), params[:3])
    for a, b in zip(ghat[:3], manual, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_valid_mask_forms_and_errors():
    torch.manual_seed(2)
    model = TinyLM().to(F64)
    tokens = torch.randint(0, 11, (3, 7))
    params = list(model.parameters())
    mask = torch.rand(3, 7) > 0.5
    est = lambda **kw: GaussNewtonBartlett(seed=3)(lambda: model(tokens), None, params, **kw)
    ref = est(valid_mask=mask)
    for form in (mask.long(), mask.double(), mask.reshape(-1)):
        for a, b in zip(est(valid_mask=form), ref, strict=True):
            assert torch.equal(a, b)
    none_valid = est(valid_mask=torch.zeros(3, 7, dtype=torch.bool))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in none_valid)  # not NaN
    with pytest.raises(ValueError, match="20 entries for 21"):
        est(valid_mask=torch.ones(20, dtype=torch.bool))


@pytest.mark.parametrize(
    "output",
    [
        torch.randn(8, dtype=F64),  # regression-style 1-D output
        torch.randint(0, 3, (8, 3)),  # integer "logits"
        torch.tensor(1.0),  # a scalar
        (torch.randn(4, 3),),  # not a tensor
    ],
    ids=["1d", "integer", "scalar", "tuple"],
)
def test_non_categorical_output_raises(output):
    w = nn.Parameter(torch.ones(()))

    def forward():
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return output * w
        return output

    with pytest.raises(ValueError, match="Hutchinson"):
        GaussNewtonBartlett()(forward, None, [w])


def test_seed_and_state_dict():
    torch.manual_seed(3)
    model = Classifier().to(F64)
    x = torch.randn(16, 6, dtype=F64)
    params = [model.fc.weight, model.fc.bias]
    run = lambda e: torch.cat([g.flatten() for g in e(lambda: model(x), None, params)])
    a, b = GaussNewtonBartlett(seed=11), GaussNewtonBartlett(seed=11)
    assert torch.equal(run(a), run(b))
    sd = copy.deepcopy(a.state_dict())
    assert sd["name"] == "gnb"
    first, second = run(a), run(a)
    assert not torch.equal(first, second)
    c = GaussNewtonBartlett(seed=0)
    c.load_state_dict(sd)
    assert torch.equal(run(c), first)
    with pytest.raises(ValueError, match="hutchinson"):
        GaussNewtonBartlett().load_state_dict(Hutchinson().state_dict())


def test_feeds_sophia_g():
    """ghat from the estimator, folded by SophiaG.update_hessian(estimates), equals b2-EMA of ghat^2."""
    from flatsophia.optim import SophiaG

    torch.manual_seed(4)
    model = Classifier()
    x = torch.randn(16, 6)
    opt = SophiaG(model.parameters(), betas=(0.9, 0.9))
    ghat = GaussNewtonBartlett(seed=5)(lambda: model(x), None, opt.hessian_params())
    assert opt.update_hessian(ghat)
    for p, g in zip(opt.hessian_params(), ghat, strict=True):
        if g is None:
            assert p not in opt.state
        else:
            torch.testing.assert_close(opt.state[p]["hessian"], 0.1 * g * g)


@pytest.mark.parametrize("masked", [False, True])
def test_from_loss_shares_the_training_forward(masked):
    """One forward: the training gradient and the sampled-label gradient equal the two-forward path."""
    torch.manual_seed(3)
    model = Classifier().to(F64)
    x = torch.randn(16, 6, dtype=F64)
    y = torch.randint(0, 4, (16,))
    params = list(model.parameters())
    valid = (torch.arange(16) % 3 != 0) if masked else None
    separate_est = GaussNewtonBartlett(seed=11)
    expected = separate_est(lambda: model(x), None, params, valid_mask=valid)
    expected_grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, allow_unused=True)

    fused_est = GaussNewtonBartlett(seed=11)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    grads, estimates = fused_est.from_loss(loss, params, logits=logits, valid_mask=valid)
    for e, f in zip(expected, estimates):
        assert (e is None) == (f is None)
        if e is not None:
            assert torch.equal(e, f)
    for e, g in zip(expected_grads, grads):
        assert (e is None) == (g is None)
        if e is not None:
            assert torch.equal(e, g) and not g.requires_grad
    # Both estimators advanced their generators identically: the next draws agree too.
    assert torch.equal(separate_est.generator("cpu").get_state(), fused_est.generator("cpu").get_state())
    with pytest.raises(ValueError, match="needs the logits"):
        fused_est.from_loss(F.cross_entropy(model(x), y), params)


def _exact_inverse_cdf(row: list[float], u: float) -> int:
    """The class k with cdf[k-1] <= u * total < cdf[k], in exact rational arithmetic."""
    from fractions import Fraction

    weights = [Fraction(w) for w in row]
    target, cdf = Fraction(u) * sum(weights), Fraction(0)
    for k, w in enumerate(weights):
        cdf += w
        if target < cdf:
            return k
    raise AssertionError("u * total >= total")


def test_inverse_cdf_is_exact_at_the_edges():
    """Dyadic weights (exact in float64) with zeros first, inside and last, rows that do not sum to
    one, and u on every boundary, between them, at 0 and just below 1: the exact rational answer."""
    from flatsophia.hessian.gnb import inverse_cdf

    rows = [
        [0.0, 0.5, 0.0, 0.25, 0.25, 0.0],
        [0.0, 0.0, 0.125, 0.0, 0.375, 0.0],  # sums to 1/2
        [0.25, 0.25, 0.5, 0.25, 0.0, 0.0],  # sums to 5/4
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ]
    us = [k / 64 for k in range(64)] + [1 - 2**-53, 2**-60]
    probs = torch.tensor([r for r in rows for _ in us], dtype=torch.float32)
    u = torch.tensor(us * len(rows), dtype=F64)
    labels = inverse_cdf(probs, u)
    expected = torch.tensor([_exact_inverse_cdf(r, x) for r in rows for x in us])
    assert torch.equal(labels, expected)
    assert (probs[torch.arange(len(labels)), labels] > 0).all()
    near_one = labels.view(len(rows), -1)[:, -2]
    assert near_one.tolist() == [4, 4, 3, 5, 0]  # the last class of positive weight


def test_zero_weight_never_drawn_when_the_scan_rounds(monkeypatch):
    """A GPU's parallel scan may round cdf[k] above (or below) cdf[k-1] where the weight is zero.
    Simulated here (+-1e-9 alternating): a u inside every such sliver still draws a positive class."""
    from flatsophia.hessian import gnb

    row = torch.tensor([0.0, 0.25, 0.0, 0.0, 0.25, 0.0, 0.25, 0.0, 0.0, 0.25], dtype=F64)
    wobble = 1e-9 * (-1.0) ** torch.arange(row.numel(), dtype=F64)
    exact_cumsum = torch.cumsum
    monkeypatch.setattr(torch, "cumsum", lambda t, dim: exact_cumsum(t, dim=dim) + wobble)
    rounded = exact_cumsum(row, dim=0) + wobble
    slivers = [k for k in range(1, row.numel()) if row[k] == 0 and rounded[k] > rounded[k - 1]]
    assert len(slivers) >= 2
    total = rounded[row > 0].max()
    u = torch.stack([(rounded[k] + rounded[k - 1]) / 2 / total for k in slivers])
    labels = gnb.inverse_cdf(row.repeat(len(slivers), 1), u)
    assert (row[labels] > 0).all(), labels


def test_chunks_draw_as_one(monkeypatch):
    from flatsophia.hessian import gnb

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(50, 7, generator=g), -1)
    u = torch.rand(50, generator=g, dtype=F64)
    whole = gnb.inverse_cdf(probs, u)
    monkeypatch.setattr(gnb, "_CHUNK", 3 * 7 + 2)  # 3 rows a chunk, the last one shorter
    assert torch.equal(gnb.inverse_cdf(probs, u), whole)


def test_nan_logits_skip_the_refresh_instead_of_failing():
    """A NaN in the forward gives a non-finite estimate, which the optimizer rejects (skipped), not an
    error from the sampler (torch.multinomial raises on NaN probabilities)."""
    import warnings

    from flatsophia.hessian import HessianRefresher
    from flatsophia.optim import SophiaG

    torch.manual_seed(5)
    model = nn.Linear(6, 4)
    x = torch.randn(8, 6)
    x[3, 0] = float("nan")
    refresher = HessianRefresher(SophiaG(model.parameters()), every_k=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ghat = refresher.estimate(lambda: model(x), None)
        refresher.apply(ghat)
    assert not torch.isfinite(ghat[0]).all()
    assert (refresher.refreshes, refresher.skipped) == (0, 1)
