"""The six interventions and orthonormalize, checked against float64 numpy written from the paper's formulas."""

import math

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from loreft import INTERVENTION_CLASSES, ReftConfig, attach, orthonormalize

D, R = 64, 4
KINDS = ["loreft", "noreft", "direft", "nodireft", "consreft", "lobireft"]
WITH_ACT = ["loreft", "noreft", "direft", "nodireft"]  # consreft / lobireft have no activation
WITH_DROPOUT = ["loreft", "noreft", "direft", "nodireft", "lobireft"]  # pyreft's ConsReFT has none

_erf = np.vectorize(math.erf)
NP_ACTS = {
    "linear": lambda x: x,
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
}


def np_orthonormal(a: np.ndarray) -> np.ndarray:
    """Orthonormal basis of a's columns with Gram-Schmidt's sign convention (QR with a positive diagonal)."""
    q, r = np.linalg.qr(np.asarray(a, np.float64))
    return q * np.sign(np.diag(r))


def p64(iv, name: str) -> np.ndarray:
    return np.array(getattr(iv, name), dtype=np.float64)


def reference(kind: str, iv, h: np.ndarray, act: str = "linear") -> np.ndarray:
    """The paper's intervention formulas in float64, rows of h as hidden states (R is stored d x r, as pyreft does)."""
    f = NP_ACTS[act]
    h = np.asarray(h, np.float64)
    if kind in ("loreft", "direft", "consreft", "lobireft"):
        Rm = np_orthonormal(np.array(iv.rotation))
    if kind == "loreft":
        W, b = p64(iv, "weight"), p64(iv, "bias")
        return h + (f(h @ W.T + b) - h @ Rm) @ Rm.T
    if kind == "noreft":
        W, b, W2, b2 = p64(iv, "weight"), p64(iv, "bias"), p64(iv, "proj_weight"), p64(iv, "proj_bias")
        return h + (f(h @ W.T + b) - (h @ W2.T + b2)) @ W2
    if kind == "direft":
        W, b = p64(iv, "weight"), p64(iv, "bias")
        return h + f(h @ W.T + b) @ Rm.T
    if kind == "nodireft":
        W, b, W2 = p64(iv, "weight"), p64(iv, "bias"), p64(iv, "proj_weight")
        return h + f(h @ W.T + b) @ W2
    if kind == "consreft":
        return h + (p64(iv, "bias") - h @ Rm) @ Rm.T
    if kind == "lobireft":
        return h + np.broadcast_to(p64(iv, "bias") @ Rm.T, h.shape)
    raise AssertionError(kind)


def make(kind, act_fn="linear", dropout=0.0, seed=1, d=D, r=R):
    iv = INTERVENTION_CLASSES[kind](d, r, act_fn=act_fn, dropout=dropout, key=mx.random.key(seed))
    # Perturb the raw rotation so R = orthonormalize(rotation) is a real computation, not a stored constant.
    if "rotation" in iv:
        iv.rotation = iv.rotation + 0.3 * mx.random.normal(iv.rotation.shape, key=mx.random.key(seed + 100))
    iv.eval()
    return iv


def hidden(shape=(2, 5, D), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_formula_matches_float64(kind):
    iv = make(kind)
    h = hidden()
    out = iv(mx.array(h))
    assert out.dtype == mx.float32 and out.shape == h.shape
    ref = reference(kind, iv, h)
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-5, atol=2e-5)
    assert np.abs(ref - h).max() > 1e-2  # the edit is not a no-op


@pytest.mark.parametrize("kind", WITH_ACT)
@pytest.mark.parametrize("act", ["relu", "gelu", "silu", "tanh"])
def test_activation_variants(kind, act):
    iv = make(kind, act_fn=act)
    h = hidden(seed=2)
    ref = reference(kind, iv, h, act)
    np.testing.assert_allclose(np.array(iv(mx.array(h))), ref, rtol=1e-5, atol=2e-5)
    # The activation really is applied: the linear formula gives a different answer.
    assert np.abs(ref - reference(kind, iv, h, "linear")).max() > 1e-3


@pytest.mark.parametrize(
    "kind,count", [("loreft", 516), ("noreft", 520), ("direft", 516), ("nodireft", 520), ("consreft", 260), ("lobireft", 260)]
)
def test_parameter_counts_match_pyreft(kind, count):
    iv = INTERVENTION_CLASSES[kind](D, R)
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(iv.parameters())}
    assert sum(math.prod(s) for s in shapes.values()) == count
    if "rotation" in shapes:
        assert shapes["rotation"] == (D, R)  # pyreft's rotate_layer.weight layout
    if "weight" in shapes:
        assert shapes["weight"] == (R, D) and shapes["bias"] == (R,)


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_is_identity_in_eval_mode(kind):
    iv = make(kind, dropout=0.5)
    h = hidden(seed=3)
    np.testing.assert_allclose(np.array(iv(mx.array(h))), reference(kind, iv, h), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("kind", WITH_DROPOUT)
def test_dropout_in_train_mode_drops_h_plus_edit(kind):
    p = 0.5
    iv = make(kind, dropout=p)
    iv.train()
    h = hidden((8, 16, D), seed=4)
    mx.random.seed(0)
    out = np.array(iv(mx.array(h)))
    ref = reference(kind, iv, h)
    dropped = out == 0.0
    # pyreft: dropout(h + edit), so a dropped element is 0 (not h) and a kept one is (h + edit) / (1 - p).
    assert 0.4 < dropped.mean() < 0.6
    np.testing.assert_allclose(out[~dropped], ref[~dropped] / (1 - p), rtol=1e-5, atol=5e-5)


def test_consreft_has_no_dropout():
    iv = make("consreft", dropout=0.5)
    iv.train()
    h = hidden(seed=5)
    np.testing.assert_allclose(np.array(iv(mx.array(h))), reference("consreft", iv, h), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_input_edited_in_float32_and_cast_back(kind):
    iv = make(kind)
    hb = mx.array(hidden((4, 8, D), seed=6)).astype(mx.bfloat16)
    out = iv(hb)
    assert out.dtype == mx.bfloat16
    got = np.array(out.astype(mx.float32), dtype=np.float64)
    ref = reference(kind, iv, np.array(hb.astype(mx.float32)))
    np.testing.assert_allclose(got, ref, rtol=2**-8, atol=1e-5)
    # Computed in float32, only the final result is rounded: nearly every element is ref rounded to bf16.
    ref_bf16 = np.array(mx.array(ref.astype(np.float32)).astype(mx.bfloat16).astype(mx.float32))
    assert (got == ref_bf16).mean() > 0.97


# ---------------------------------------------------------------- orthonormalize


def test_orthonormalize_is_identity_on_orthonormal_input():
    q = np_orthonormal(np.random.default_rng(0).standard_normal((D, R))).astype(np.float32)
    np.testing.assert_allclose(np.array(orthonormalize(mx.array(q))), q, atol=1e-6)


@pytest.mark.parametrize("shape", [(64, 4), (32, 8), (128, 1)])
def test_orthonormalize_random_input(shape):
    a = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    q = np.array(orthonormalize(mx.array(a)), np.float64)
    assert np.abs(q.T @ q - np.eye(shape[1])).max() < 1e-6
    np.testing.assert_allclose(q, np_orthonormal(a), atol=1e-5)  # same basis (span and signs) as QR


def test_orthonormalize_ill_conditioned_input_stays_orthonormal():
    rng = np.random.default_rng(2)
    base = rng.standard_normal((D, 1))
    a = (base + 1e-3 * rng.standard_normal((D, R))).astype(np.float32)  # nearly parallel columns
    q = np.array(orthonormalize(mx.array(a)), np.float64)
    assert np.abs(q.T @ q - np.eye(R)).max() < 1e-5


def test_orthonormalize_gradient_matches_float64_finite_differences():
    d, r = 16, 3
    rng = np.random.default_rng(3)
    a = rng.standard_normal((d, r))
    c = rng.standard_normal((d, r))
    g = mx.grad(lambda x: mx.sum(orthonormalize(x) * mx.array(c, dtype=mx.float32)))(mx.array(a, dtype=mx.float32))
    g = np.array(g)
    assert np.isfinite(g).all()

    def f(x):
        return float(np.sum(np_orthonormal(x) * c))

    eps = 1e-6
    num = np.zeros_like(a)
    for i in range(d):
        for j in range(r):
            e = np.zeros_like(a)
            e[i, j] = eps
            num[i, j] = (f(a + e) - f(a - e)) / (2 * eps)
    np.testing.assert_allclose(g, num, rtol=1e-3, atol=1e-4)


def test_rotation_stays_orthonormal_through_training(tmp_path):
    from mlx_lm import load

    from loreft.demo import build_tiny_model

    model, _ = load(str(build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)))
    reft = attach(model, ReftConfig(layers="all", rank=4, positions="f2+l2", intervention="loreft"))
    rng = np.random.default_rng(0)
    tokens = mx.array(rng.integers(10, 200, (4, 10)))
    targets = mx.array(rng.integers(10, 200, (4, 10)))
    reft.set_locations(reft.locations([10, 8, 9, 10]))

    def loss_fn(m):
        return nn.losses.cross_entropy(m(tokens), targets).mean()

    step = nn.value_and_grad(model, loss_fn)
    opt = optim.Adam(learning_rate=1e-2)
    first = None
    for _ in range(300):
        loss, grads = step(model)
        opt.update(model, grads)
        mx.eval(model.trainable_parameters(), opt.state, loss)
        first = loss.item() if first is None else first
    assert loss.item() < first - 0.5  # it trained
    raw = max(
        np.abs(np.array(iv.rotation.T @ iv.rotation) - np.eye(4)).max() for iv in reft.interventions().values()
    )
    assert raw > 1e-2  # the stored parameter drifted far from orthonormal ...
    assert reft.max_orthogonality_error() < 1e-5  # ... but the R used in the edit did not


def test_unstack_same_slices_and_gradient_as_indexing():
    """unstack's one-stack gradient equals plain indexing's, unused slices included (zeros), also compiled."""
    from loreft.interventions import unstack

    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal((5, 4, 3)).astype(np.float32))
    w = [mx.array(rng.standard_normal((4, 3)).astype(np.float32)) for _ in range(5)]
    for a, b in zip(unstack(x), [x[i] for i in range(5)]):
        np.testing.assert_array_equal(np.array(a), np.array(b))

    def loss(parts):
        return (parts[0] * w[0]).sum() + (parts[3] ** 2 * w[3]).sum()  # slices 1, 2 and 4 unused

    want = mx.grad(lambda x: loss([x[i] for i in range(5)]))(x)
    for fn in (lambda x: loss(unstack(x)), mx.compile(lambda x: loss(unstack(x)))):
        got = mx.grad(fn)(x)
        np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-6, atol=1e-7)
    assert not np.array(want)[[1, 2, 4]].any()


@pytest.mark.parametrize("kind,act", [(k, "linear") for k in KINDS] + [(k, "relu") for k in WITH_ACT])
def test_stacked_interventions_edit_each_slice_with_its_own(kind, act):
    """stack_interventions: slice g of (B, G, n, d) gets intervention g's edit (float64 formula), and each
    intervention's gradient is the one it gets alone (a linear act folds LoReFT's and NoReFT's two projections
    into one, another act keeps them apart: both forms)."""
    from loreft.interventions import stack_interventions

    ivs = [make(kind, act_fn=act, seed=s) for s in (1, 2, 3)]
    h = hidden((2, 3, 5, D), seed=4)
    out = np.array(stack_interventions(ivs)(mx.array(h)))
    for g, iv in enumerate(ivs):
        np.testing.assert_allclose(out[:, g], reference(kind, iv, h[:, g], act), rtol=1e-5, atol=2e-5)

    weights = mx.array(hidden((2, 3, 5, D), seed=5))
    params = [iv.trainable_parameters() for iv in ivs]

    def stacked_loss(params):
        for iv, p in zip(ivs, params):
            iv.update(p)
        return (stack_interventions(ivs)(mx.array(h)) * weights).sum()

    def separate_loss(params):
        for iv, p in zip(ivs, params):
            iv.update(p)
        return sum((iv(mx.array(h[:, g])) * weights[:, g]).sum() for g, iv in enumerate(ivs))

    got, want = mx.grad(stacked_loss)(params), mx.grad(separate_loss)(params)
    for g in range(3):
        for name, value in tree_flatten(want[g]):
            ours = np.array(dict(tree_flatten(got[g]))[name])
            assert np.abs(np.array(value)).max() > 0 or (kind, name) == ("nodireft", "proj_bias"), name  # unused, as pyreft's
            np.testing.assert_allclose(ours, np.array(value), rtol=1e-4, atol=1e-5 * np.abs(np.array(value)).max())


@pytest.mark.parametrize("kind", KINDS)
def test_layer_edit_same_stacked_or_per_group(kind, tmp_path):
    """A model's first and last groups edited in one stacked pass give the values and gradients of one pass per
    group (the path pyreft's parity cases check for every kind), with ragged prompts leaving slots unused."""
    from functools import partial

    from mlx_lm import load

    from loreft.demo import build_tiny_model
    from loreft.model import apply_interventions

    model, _ = load(str(build_tiny_model(tmp_path / "m", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)))
    act = "relu" if kind in WITH_ACT else "linear"
    reft = attach(model, ReftConfig(layers="all", rank=4, positions="f3+l3", intervention=kind, act_fn=act))
    for iv in reft.interventions().values():  # away from the initial state, where some gradients vanish
        if "rotation" in iv:
            iv.rotation = iv.rotation + 0.3 * mx.random.normal(iv.rotation.shape, key=mx.random.key(7))
    tokens = mx.array(np.random.default_rng(0).integers(10, 200, (3, 12)))
    reft.set_locations(reft.locations([12, 4, 9]))  # the 4-token prompt fills 2 of each group's 3 slots

    def loss(m):
        return (m(tokens).astype(mx.float32)[..., :40] ** 2).mean()

    results = []
    for stack in (True, False):
        reft.set_apply(partial(apply_interventions, stack_groups=stack))
        value, grads = nn.value_and_grad(model, loss)(model)
        results.append((value.item(), dict(tree_flatten(grads))))
    reft.set_apply(None)
    (v1, g1), (v2, g2) = results
    assert v1 == pytest.approx(v2, rel=1e-6)
    assert set(g1) == set(g2) and len(g1) == 2 * 2 * (3 if kind in ("loreft", "direft") else 4 if "no" in kind else 2)
    for name in g1:
        scale = np.abs(np.array(g2[name])).max()
        assert scale > 0 or (kind == "nodireft" and name.endswith("proj_bias")), name  # unused, as pyreft's
        np.testing.assert_allclose(np.array(g1[name]), np.array(g2[name]), rtol=1e-4, atol=1e-5 * scale)
