"""The training step's speed levers change nothing but speed: same loss, same gradients, same update.

Logits at supervised positions only (split_at_head + supervised_positions), the fused cross-entropy
gradient (token_cross_entropy) and one batched Gram-Schmidt pass for every R (batched_rotations) are
each checked against the plain computation or an independent float64 reference.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten

from loreft import ReftConfig, TrainConfig, attach
from loreft.demo import build_tiny_model
from loreft.interventions import batched_rotations, orthonormalize
import loreft.loss
from loreft.loss import completion_loss, head_cross_entropy, split_at_head, supervised_positions, token_cross_entropy, unpack_supervised
from loreft.trainer import make_step

REFT = ReftConfig(layers="all", rank=3, positions="f2+l2", seed=1)


def batch(vocab: int, B=3, T=24, seed=0):
    """Random tokens (B, T) and a mask supervising a ragged tail of each row (targets after a prompt)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab, (B, T)).astype(np.int32)
    prompt = np.array([10, 14, 17])[:B]
    mask = (np.arange(T - 1)[None, :] >= prompt[:, None] - 1).astype(np.float32)
    mask[1, -3:] = 0.0  # a padded row
    return mx.array(tokens), mask, prompt


def grads_of(model, fn):
    _, g = nn.value_and_grad(model, fn)(model)
    return {k: np.array(v) for k, v in tree_flatten(g)}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed_models")
    return {
        "llama_tied": build_tiny_model(root / "llama_tied", model_type="llama", num_layers=3),
        "llama_lm_head": build_tiny_model(root / "llama_head", model_type="llama", num_layers=3, tie_word_embeddings=False),
        "gemma2_softcap": build_tiny_model(root / "gemma2", model_type="gemma2", num_layers=2),
        "cohere_scaled": build_tiny_model(root / "cohere", model_type="cohere", num_layers=2),
    }


@pytest.mark.parametrize("name", ["llama_tied", "llama_lm_head", "gemma2_softcap"])
def test_logits_at_supervised_positions_give_the_same_loss_and_gradients(model_dirs, name):
    model, _ = mlx_lm.load(str(model_dirs[name]))
    reft = attach(model, REFT)
    tokens, mask, prompt = batch(model.args.vocab_size)
    head = split_at_head(model)
    assert head is not None, "a plain mlx-lm layout must get the sparse path"
    body, lm_head = head
    seen = []
    counted = (body, lambda h: (seen.append(h.shape[0]), lm_head(h))[1])
    supervised = supervised_positions(mask, np.array(tokens)[:, 1:])
    assert supervised is not None
    n = len(unpack_supervised(supervised, mask.size)[0])
    assert n < mask.size
    reft.set_locations(reft.locations(prompt))
    m = mx.array(mask)
    full = completion_loss(model, tokens, m)
    sparse = completion_loss(model, tokens, m, mx.array(supervised), counted)
    # head_cross_entropy also calls the head on one row for its width (never evaluated) and again for its vjp
    assert n in seen and set(seen) <= {1, n}, "the LM head must run on the picked positions only"
    assert sparse[0].item() == pytest.approx(full[0].item(), rel=1e-6)
    assert sparse[1].item() == full[1].item() == mask.sum()
    g_full = grads_of(model, lambda mdl: completion_loss(mdl, tokens, m)[0])
    g_sparse = grads_of(model, lambda mdl: completion_loss(mdl, tokens, m, mx.array(supervised), head)[0])
    assert g_full.keys() == g_sparse.keys() and len(g_full) == len(model.layers) * 2 * 3  # layers x groups x (R, W, b)
    for k in g_full:
        np.testing.assert_allclose(g_sparse[k], g_full[k], rtol=1e-4, atol=1e-6, err_msg=k)
    reft.set_locations(None)


def test_unknown_head_layouts_fall_back_to_full_logits(model_dirs):
    model, _ = mlx_lm.load(str(model_dirs["cohere_scaled"]))  # cohere scales its logits after the head
    assert split_at_head(model) is None
    assert split_at_head(nn.Linear(4, 4)) is None  # not an mlx-lm causal LM at all


def test_supervised_positions_cover_every_target_once():
    rng = np.random.default_rng(0)
    for fraction in (0.01, 0.1, 0.3, 0.6, 0.74):
        mask = (rng.random((4, 63)) < fraction).astype(np.float32)
        mask[0, 0] = 1.0
        targets = rng.integers(1, 1000, mask.shape)
        supervised = supervised_positions(mask, targets)
        if supervised is None:
            assert mask.mean() > 0.6  # only when bucketing up passes 3/4 of the grid
            continue
        positions, picked, inverse = unpack_supervised(supervised, mask.size)
        flat, n = mask.reshape(-1), int(mask.sum())
        assert positions[:n].tolist() == np.flatnonzero(flat).tolist()  # each supervised target once, first
        assert (flat[positions[n:]] == 0).all()  # then padding that is never supervised
        assert picked[:n].tolist() == targets.reshape(-1)[positions[:n]].tolist()  # the targets there
        assert len(positions) == len(picked) <= 3 * flat.size // 4
        assert len(positions) in {flat.size // 64, flat.size // 32, flat.size // 16, *[flat.size * k // 8 for k in range(1, 7)]}
        # inverse: each flat target's slot (positions[slot] == index), the slot after the last where unsupervised
        assert len(inverse) == flat.size
        for index in range(flat.size):
            assert positions[inverse[index]] == index if flat[index] else inverse[index] == len(positions)
    ones = np.ones((2, 9), np.int32)
    assert supervised_positions(np.ones((2, 9), np.float32), ones) is None
    assert supervised_positions(np.concatenate([np.ones((2, 8)), np.zeros((2, 1))], 1).astype(np.float32), ones) is None


def test_supervised_rows_gradient_is_the_scatter_it_replaces():
    """The picked rows' gradient, a gather through the inverse index, equals MLX's own gradient of take (a
    scatter-add) wherever the loss weights the rows, and is zero at unsupervised rows, padding's included."""
    from loreft.loss import _take_rows

    rng = np.random.default_rng(5)
    mask = (rng.random((3, 21)) < 0.3).astype(np.float32)
    supervised = supervised_positions(mask, rng.integers(1, 50, mask.shape))
    positions, _, inverse = (mx.array(a) for a in unpack_supervised(supervised, mask.size))
    n = int(mask.sum())
    hidden = mx.array(rng.standard_normal((mask.size, 6)).astype(np.float32))
    weights = mx.array((np.arange(positions.shape[0]) < n).astype(np.float32))[:, None]  # padding slots weigh 0
    cot = mx.array(rng.standard_normal((positions.shape[0], 6)).astype(np.float32))

    def loss(take):
        return lambda h: (take(h) * cot * weights).sum()

    ours = mx.grad(loss(lambda h: _take_rows(h, positions, inverse)))(hidden)
    plain = mx.grad(loss(lambda h: mx.take(h, positions, axis=0)))(hidden)
    np.testing.assert_array_equal(np.array(ours), np.array(plain))
    assert np.array_equal(np.array(_take_rows(hidden, positions, inverse)), np.array(hidden)[np.array(positions)])
    unsupervised = np.flatnonzero(mask.reshape(-1) == 0)
    assert (np.array(ours)[unsupervised] == 0).all() and np.abs(np.array(ours)[np.flatnonzero(mask)]).min() > 0


@pytest.mark.parametrize("flat_index_limit", [2**31, 1])  # the target logits by flat index, and take_along_axis
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_token_cross_entropy_matches_float64(dtype, flat_index_limit, monkeypatch):
    monkeypatch.setattr(loreft.loss, "FLAT_INDEX_LIMIT", flat_index_limit)
    rng = np.random.default_rng(1)
    logits = mx.array((rng.standard_normal((2, 5, 37)) * 4).astype(np.float32)).astype(dtype)
    targets = mx.array(rng.integers(0, 37, (2, 5)).astype(np.int32))
    weights = mx.array(rng.random((2, 5)).astype(np.float32))
    x = np.array(logits.astype(mx.float32), dtype=np.float64)
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    t = np.array(targets)
    ref = lse - np.take_along_axis(x, t[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.array(token_cross_entropy(logits, targets)), ref, rtol=1e-6, atol=1e-5)
    grad = mx.grad(lambda lg: (token_cross_entropy(lg, targets) * weights).sum())(logits)
    assert grad.dtype == dtype
    soft = np.exp(x - lse[..., None])
    ref_grad = (soft - np.eye(37)[t]) * np.array(weights)[..., None]
    tol = 1e-6 if dtype == mx.float32 else 1e-2
    np.testing.assert_allclose(np.array(grad.astype(mx.float32)), ref_grad, atol=tol)


def _head(kind: str, d: int, vocab: int):
    """An LM head of each kind split_at_head can return: a Linear, a tied embedding, a softcapped one, 4-bit."""
    mx.random.seed(3)
    if kind == "tied":
        emb = nn.Embedding(vocab, d)
        return emb.as_linear, lambda h: np.asarray(h, np.float64) @ np.array(emb.weight, np.float64).T
    lin = nn.Linear(d, vocab, bias=False)
    if kind == "4bit":
        lin = nn.QuantizedLinear.from_linear(lin, group_size=32, bits=4)
        w = np.array(mx.dequantize(lin.weight, lin.scales, lin.biases, group_size=32, bits=4), np.float64)
    else:
        w = np.array(lin.weight, np.float64)
    if kind == "softcap":
        return (lambda h: mx.tanh(lin(h) / 3.0) * 3.0), lambda h: np.tanh(np.asarray(h, np.float64) @ w.T / 3.0) * 3.0
    return lin, lambda h: np.asarray(h, np.float64) @ w.T


@pytest.mark.parametrize("chunk_elements", [1 << 27, 2 * 37 * 3])  # one chunk; 8 chunks of 3 rows (24 = 8 x 3)
@pytest.mark.parametrize("kind", ["linear", "tied", "softcap", "4bit"])
def test_head_cross_entropy_matches_float64_loss_and_input_gradient(kind, chunk_elements, monkeypatch):
    monkeypatch.setattr(loreft.loss, "HEAD_CHUNK_ELEMENTS", chunk_elements)
    d, vocab, n = 64, 37, 24
    head, ref_logits = _head(kind, d, vocab)
    rng = np.random.default_rng(2)
    hidden = mx.array(rng.standard_normal((n, d)).astype(np.float32))
    targets = mx.array(rng.integers(0, vocab, n).astype(np.int32))
    weights = mx.array(rng.random(n).astype(np.float32))  # a cotangent per row, as the loss mask gives
    x = ref_logits(np.array(hidden))
    lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    t = np.array(targets)
    np.testing.assert_allclose(np.array(head_cross_entropy(head, hidden, targets)), lse - x[np.arange(n), t], rtol=1e-5, atol=1e-5)
    # d/dh of sum_i w_i ce_i, by float64 central differences through the reference head
    grad = np.array(mx.grad(lambda h: (head_cross_entropy(head, h, targets) * weights).sum())(hidden), np.float64)
    h64, w64, eps = np.array(hidden, np.float64), np.array(weights, np.float64), 1e-6

    def total(h):
        xs = ref_logits(h)
        return (w64 * (np.log(np.exp(xs - xs.max(-1, keepdims=True)).sum(-1)) + xs.max(-1) - xs[np.arange(n), t])).sum()

    for i, j in [(0, 0), (5, 17), (23, 63), (11, 40)]:
        up, down = h64.copy(), h64.copy()
        up[i, j] += eps
        down[i, j] -= eps
        assert grad[i, j] == pytest.approx((total(up) - total(down)) / (2 * eps), rel=1e-3, abs=1e-5), (i, j)


def test_head_cross_entropy_makes_the_logits_a_chunk_at_a_time(monkeypatch):
    """The head sees chunks of rows only, and a compiled loss-and-gradient peaks lower by more than the logits."""
    d, vocab, n = 64, 8192, 1024
    monkeypatch.setattr(loreft.loss, "HEAD_CHUNK_ELEMENTS", n * vocab // 32)
    head = nn.Linear(d, vocab, bias=False)
    head.freeze()
    proj = nn.Linear(d, d)
    h0 = mx.random.normal((n, d))
    t = mx.random.randint(0, vocab, (n,))
    mx.eval(head.parameters(), proj.parameters(), h0, t)
    seen = []
    head_cross_entropy(lambda h: (seen.append(h.shape[0]), head(h))[1], h0, t)
    assert set(seen) == {1, n // 32}  # a one-row probe for the width (never evaluated), then 32 chunks of 32 rows

    def peak(loss):
        step = mx.compile(nn.value_and_grad(proj, lambda h0, t: loss(proj(h0), t).sum()),
                          inputs=[proj.state, head.state], outputs=[proj.state])
        mx.eval(step(h0, t))
        mx.synchronize()
        mx.reset_peak_memory()
        value, grad = step(h0, t)
        mx.eval(value, grad)
        return value.item(), mx.get_peak_memory()

    plain = peak(lambda h, t: token_cross_entropy(head(h), t))
    chunked = peak(lambda h, t: head_cross_entropy(head, h, t))
    assert chunked[0] == pytest.approx(plain[0], rel=1e-6)
    assert chunked[1] < plain[1] - n * vocab * 4, (chunked[1], plain[1])  # at least one float32 logits array less


def test_batched_rotations_same_values_and_gradients(tiny_model_dir):
    model, _ = mlx_lm.load(str(tiny_model_dir))
    reft = attach(model, REFT)
    ivs = list(reft.interventions().values())
    with batched_rotations(ivs):
        for iv in ivs:
            np.testing.assert_allclose(np.array(iv.rotation_matrix()), np.array(orthonormalize(iv.rotation)), atol=1e-6)
    assert all("_cached_rotation" not in iv.__dict__ for iv in ivs)  # cleared on exit
    assert not any("cached" in k for k in reft.parameters())  # never a parameter
    tokens, mask, prompt = batch(model.args.vocab_size)
    reft.set_locations(reft.locations(prompt))
    m = mx.array(mask)

    def batched(mdl):
        with batched_rotations(ivs):
            return completion_loss(mdl, tokens, m)[0]

    g_plain = grads_of(model, lambda mdl: completion_loss(mdl, tokens, m)[0])
    g_batched = grads_of(model, batched)
    for k in g_plain:
        np.testing.assert_allclose(g_batched[k], g_plain[k], rtol=1e-4, atol=1e-6, err_msg=k)
    reft.set_locations(None)


def test_compiled_step_makes_the_plain_update(tiny_model_dir):
    """One step of the trainer's compiled step (all levers on) == value_and_grad of the plain loss + Adam."""
    tokens, mask, prompt = batch(300)
    results = []
    for fast in (True, False):
        model, _ = mlx_lm.load(str(tiny_model_dir))
        reft = attach(model, REFT)
        opt = optim.Adam(learning_rate=1e-2)
        opt.init(model.trainable_parameters())
        locs = reft.locations(prompt)
        if fast:
            step, state = make_step(reft, opt, TrainConfig(learning_rate=1e-2))
            supervised = supervised_positions(mask, np.array(tokens)[:, 1:])
            loss, *_ = step([(tokens, mx.array(mask), locs.as_arrays(), mx.array(supervised), mx.array(tokens.size))], None, True)
            mx.eval(state, loss)
        else:
            reft.set_locations(locs)

            def mean_loss(mdl):
                total, count = completion_loss(mdl, tokens, mx.array(mask))
                return total / count

            loss, grads = nn.value_and_grad(model, mean_loss)(model)
            opt.update(model, grads)
            reft.set_locations(None)
        results.append((loss.item(), {k: np.array(v) for k, v in reft.parameters().items()}))
    (loss_fast, p_fast), (loss_plain, p_plain) = results
    assert loss_fast == pytest.approx(loss_plain, rel=1e-6)
    for k in p_plain:
        # Adam's first update is about lr * g / |g|: an element whose gradient is near zero turns float32
        # rounding (the step divides the summed gradient by the count, the plain loss divides first) into
        # ~1e-6; a wrong update would be off by about lr = 1e-2
        np.testing.assert_allclose(p_fast[k], p_plain[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_the_step_indexes_nothing_by_integer(tiny_model_dir, tmp_path):
    """The step's only gathers are the embedding lookup, the pick of supervised rows and of their target logits,
    and the rows' gradient, all the same kernel on CUDA.

    On CUDA each distinct gather/scatter kernel is compiled on first use, and every integer index (x[i]) is
    a gather: counts, keys, rotations and targets must travel as slices or host arrays, whatever the number
    of layers and interventions.
    """
    from loreft.data import Batch
    from loreft.loss import batch_arrays
    from loreft.trainer import LoopOptions

    model, _ = mlx_lm.load(str(tiny_model_dir))
    reft = attach(model, REFT)
    opt = optim.Adam(learning_rate=1e-2)
    opt.init(model.trainable_parameters())
    tokens = np.random.default_rng(0).integers(4, 300, (3, 64)).astype(np.int32)
    arrays = batch_arrays(reft, Batch(tokens, np.array([40, 44, 50], np.int32), np.array([64, 61, 64], np.int32)))
    assert arrays[3] is not None  # the supervised-rows path is the one checked
    step, state = make_step(reft, opt, TrainConfig(learning_rate=1e-2), options=LoopOptions(compiled=False))
    loss, *_ = step([arrays], None, True)
    graph = tmp_path / "step.dot"
    mx.export_to_dot(str(graph), loss, *[v for _, v in tree_flatten(model.trainable_parameters())])
    ops = __import__("re").findall(r'label ="(\w+)', graph.read_text())
    assert ops.count("Matmul") > 20  # a whole step was traced
    # embedding lookup, supervised rows, their target logits, the rows' gradient: all gathers by int32 of the
    # model's dtype, one CUDA kernel module; no scatter (the embedding is frozen) and no take_along_axis
    assert ops.count("Gather") == 4, ops.count("Gather")
    assert ops.count("Scatter") == ops.count("GatherAxis") == ops.count("ScatterAxis") == 0


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_bias_corrected_adam_is_mlx_adam(weight_decay):
    """BiasCorrectedAdam (corrections in one kernel) makes MLX's own Adam / AdamW(bias_correction=True) updates."""
    from loreft.trainer import BiasCorrectedAdam

    rng = np.random.default_rng(0)
    params = {"w": mx.array(rng.normal(size=(6, 5)).astype(np.float32)), "b": mx.array(rng.normal(size=(5,)).astype(np.float32))}
    schedule = optim.cosine_decay(1e-2, 7)
    ours = BiasCorrectedAdam(learning_rate=schedule, weight_decay=weight_decay)
    theirs = (optim.AdamW(learning_rate=schedule, weight_decay=weight_decay, bias_correction=True) if weight_decay
              else optim.Adam(learning_rate=schedule, bias_correction=True))
    a, b = dict(params), dict(params)
    for t in range(6):
        grads = {k: mx.array(rng.normal(size=v.shape).astype(np.float32)) for k, v in params.items()}
        a, b = ours.apply_gradients(grads, a), theirs.apply_gradients(grads, b)
        for k in params:
            np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-6, atol=1e-7, err_msg=f"{k} step {t}")
    assert not np.allclose(np.array(a["w"]), np.array(params["w"]))
