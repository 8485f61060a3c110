"""The six ReFT interventions (pyreft's formulas and parameter layout) and the orthonormal R."""

from __future__ import annotations

import contextlib
import math
from typing import Iterable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

ACT_FNS = {
    "linear": lambda x: x,
    "relu": nn.relu,
    "gelu": nn.gelu,  # exact erf form, as transformers' "gelu"
    "gelu_approx": nn.gelu_approx,  # tanh form, transformers' "gelu_new"
    "silu": nn.silu,
    "tanh": mx.tanh,
    "sigmoid": mx.sigmoid,
}


@mx.custom_function
def unstack(x: mx.array) -> list[mx.array]:
    """x[0], x[1], ...: the same slices, with one stack of their cotangents as the gradient.

    The gradient of plain slicing is a zero-filled copy per slice, added up: one kernel per number of slices
    (compiled separately on CUDA) and a pass over x per slice, where a stack is one copy. Range slices, not
    integer indices, which MLX turns into gather kernels.
    """
    return [x[i : i + 1].squeeze(0) for i in range(x.shape[0])]


@unstack.vjp
def _unstack_vjp(primals, cotangents, outputs):
    return mx.stack(cotangents)


def orthonormalize(a: mx.array) -> mx.array:
    """Orthonormal columns spanning a (d, r) matrix's columns: classical Gram-Schmidt run twice.

    Differentiable (plain ops, no QR), r sequential steps of O(d r) work; exact to float32 rounding,
    and the identity on a matrix whose columns are already orthonormal. A batch (..., d, r) is
    orthonormalized matrix by matrix in the same r steps (one pass for many interventions).
    Every step works on the full (..., d, r) width (columns not yet made are zeros), so all r steps
    and their gradients are the same few fused kernels: on CUDA each distinct kernel is compiled once.
    """
    a = a.astype(mx.float32)
    r = a.shape[-1]
    units = [mx.array(row) for row in np.eye(r, dtype=np.float32)]  # host constants: mx.eye is a scatter kernel
    q = mx.zeros_like(a)  # the orthonormal columns made so far, zeros after them
    for j, column in enumerate(unstack(mx.moveaxis(a, -1, 0))):
        v = column[..., None]  # (..., d, 1)
        for _ in range(2):  # second pass: "twice is enough" for float32 orthogonality
            # v - Q (Q^T v) as broadcast products and sums: tiny batched matmuls cost far more per op
            v = v - (q * (q * v).sum(axis=-2, keepdims=True)).sum(axis=-1, keepdims=True)
        q = q + (v / mx.sqrt(mx.sum(v * v, axis=-2, keepdims=True))) * units[j]
    return q


@contextlib.contextmanager
def batched_rotations(interventions: Iterable["Intervention"]):
    """Within the block, every R comes from one batched Gram-Schmidt pass over all the interventions.

    A training step then orthonormalizes all of them in r steps of a few batched ops, instead of r steps
    per intervention per call: on a GPU that is thousands of tiny kernels fewer. Same values as
    orthonormalize(rotation); the gradient reaches every `rotation` through the stack.
    """
    by_shape: dict[tuple, list] = {}
    for iv in interventions:
        if iv.has_rotation:
            by_shape.setdefault(tuple(iv.rotation.shape), []).append(iv)
    done = []
    try:
        for ivs in by_shape.values():
            rs = orthonormalize(mx.stack([iv.rotation for iv in ivs]))
            for iv, r in zip(ivs, unstack(rs)):
                object.__setattr__(iv, "_cached_rotation", r)  # a plain attribute: never a parameter
                done.append(iv)
        yield
    finally:
        for iv in done:
            iv.__dict__.pop("_cached_rotation", None)


def _uniform(key: mx.array, shape: tuple[int, ...], bound: float) -> mx.array:
    return mx.random.uniform(-bound, bound, shape, key=key)


# The stored `rotation` starts as an orthonormal basis scaled by this. R = orthonormalize(rotation) ignores
# the scale, but an Adam step of ~lr per entry then turns R by ~lr / scale: at 0.5 R moves as far per step as
# under pyreft's Householder parametrization, so the paper's learning rates carry over (tests/test_pyreft_parity).
ROTATION_INIT_SCALE = 0.5


def _random_orthonormal(key: mx.array, d: int, r: int) -> mx.array:
    return ROTATION_INIT_SCALE * orthonormalize(mx.random.normal((d, r), key=key))


class Intervention(nn.Module):
    """Base: edit float32 copies of hidden states h (..., d), apply dropout to h + edit, cast back."""

    has_rotation = False  # True where a parameter is kept orthonormal
    has_dropout = True  # dropout on h + edit, as pyreft (all but ConsReFT)

    def __init__(self, d: int, r: int, act_fn: str = "linear", dropout: float = 0.0):
        super().__init__()
        self.d, self.r, self.act_name = d, r, act_fn
        self.act = ACT_FNS[act_fn]
        self.dropout = nn.Dropout(dropout)

    def edit(self, h: mx.array) -> mx.array:  # float32 in, float32 delta out
        raise NotImplementedError

    def __call__(self, h: mx.array) -> mx.array:
        h32 = h.astype(mx.float32)
        out = h32 + self.edit(h32)
        return (self.dropout(out) if self.has_dropout else out).astype(h.dtype)

    def rotation_matrix(self) -> mx.array:
        """The effective orthonormal R, stored (d, r) as pyreft does."""
        cached = self.__dict__.get("_cached_rotation")  # set by batched_rotations
        return orthonormalize(self.rotation) if cached is None else cached


def _t(w: mx.array) -> mx.array:
    """Transpose of the last two axes: of one matrix, or of each matrix in a stack (stack_interventions)."""
    return mx.swapaxes(w, -1, -2)


def _row(b: mx.array) -> mx.array:
    """A bias (r,) or a stack of them (G, r) as rows that broadcast over (..., n, r) / (..., G, n, r)."""
    return b[..., None, :]


def stack_interventions(interventions: list[Intervention]) -> Intervention:
    """One intervention whose parameters are these interventions' (same kind and shape) stacked on a first axis.

    Called on hidden states (..., G, n, d), it edits slice g with intervention g: a layer's groups then cost one
    set of small matmuls instead of one per group (on a GPU each small matmul costs the host ~10 us to queue,
    4x an elementwise kernel: BENCHMARKS.md). The edit formulas are written for one matrix or a stack alike.
    """
    first = interventions[0]
    stacked = type(first).__new__(type(first))  # no __init__: the parameters come from the stack below
    Intervention.__init__(stacked, first.d, first.r, first.act_name)
    stacked.dropout = first.dropout  # one config per layer: same rate, same train/eval mode
    for name, value in first.parameters().items():
        if isinstance(value, mx.array):  # not the dropout module's (empty) parameters
            stacked[name] = mx.stack([iv[name] for iv in interventions])
    rotations = [iv.__dict__.get("_cached_rotation") for iv in interventions]
    if first.has_rotation and all(r is not None for r in rotations):
        object.__setattr__(stacked, "_cached_rotation", mx.stack(rotations))
    return stacked


def split_keys(key: mx.array | None, n: int) -> list[mx.array]:
    """n random keys from one, as mx.random.split; taken apart on the host (indexing them is a gather kernel)."""
    return [mx.array(k) for k in np.array(mx.random.split(key if key is not None else mx.random.key(0), n))]


# Three parameter layouts, as pyreft has them; each formula below picks one.


class _RotationLinear(Intervention):
    """R (orthonormal, stored (d, r)) and a linear map W (r, d), b (r) initialized as torch's nn.Linear."""

    has_rotation = True

    def __init__(self, d, r, act_fn="linear", dropout=0.0, key=None):
        super().__init__(d, r, act_fn, dropout)
        k1, k2, k3 = split_keys(key, 3)
        self.rotation = _random_orthonormal(k1, d, r)
        self.weight = _uniform(k2, (r, d), 1 / math.sqrt(d))
        self.bias = _uniform(k3, (r,), 1 / math.sqrt(d))


class _TwoLinear(Intervention):
    """Two unconstrained linear maps: W2 = proj_weight (r, d) with proj_bias, and W1 = weight with bias."""

    def __init__(self, d, r, act_fn="linear", dropout=0.0, key=None):
        super().__init__(d, r, act_fn, dropout)
        k1, k2, k3, k4 = split_keys(key, 4)
        bound = 1 / math.sqrt(d)
        self.proj_weight = _uniform(k1, (r, d), bound)
        self.proj_bias = _uniform(k2, (r,), bound)
        self.weight = _uniform(k3, (r, d), bound)
        self.bias = _uniform(k4, (r,), bound)


class _RotationBias(Intervention):
    """R (orthonormal) and a learned point b (r) in its subspace, initialized U(0, 1) as pyreft's torch.rand."""

    has_rotation = True

    def __init__(self, d, r, act_fn="linear", dropout=0.0, key=None):
        super().__init__(d, r, act_fn, dropout)
        k1, k2 = split_keys(key, 2)
        self.rotation = _random_orthonormal(k1, d, r)
        self.bias = mx.random.uniform(0, 1, (r,), key=k2)


class LoreftIntervention(_RotationLinear):
    """h + R^T (act(W h + b) - R h), R orthonormal."""

    def edit(self, h):
        R = self.rotation_matrix()
        if self.act_name == "linear":  # W h + b - R h = (W - R^T) h + b: one projection of h, nothing to split
            return (h @ (_t(self.weight) - R) + _row(self.bias)) @ _t(R)
        both = h @ mx.concatenate([_t(self.weight), R], axis=-1)  # W h and R h in one matmul
        return (self.act(both[..., : self.r] + _row(self.bias)) - both[..., self.r :]) @ _t(R)


class NoreftIntervention(_TwoLinear):
    """h + W2^T (act(W1 h + b) - (W2 h + b2)), no orthogonality."""

    def edit(self, h):
        if self.act_name == "linear":  # (W1 - W2) h + b - b2: one projection of h
            return (h @ _t(self.weight - self.proj_weight) + _row(self.bias - self.proj_bias)) @ self.proj_weight
        both = h @ _t(mx.concatenate([self.weight, self.proj_weight], axis=-2))  # W1 h and W2 h in one matmul
        proj = both[..., self.r :] + _row(self.proj_bias)
        return (self.act(both[..., : self.r] + _row(self.bias)) - proj) @ self.proj_weight


class DireftIntervention(_RotationLinear):
    """h + R^T act(W h + b), R orthonormal."""

    def edit(self, h):
        return self.act(h @ _t(self.weight) + _row(self.bias)) @ _t(self.rotation_matrix())


class NodireftIntervention(_TwoLinear):
    """h + W2^T act(W1 h + b); pyreft's W2 layer also carries a bias that the formula never uses (kept for parity)."""

    def edit(self, h):
        return self.act(h @ _t(self.weight) + _row(self.bias)) @ self.proj_weight


class ConsreftIntervention(_RotationBias):
    """h + R^T (b - R h), R orthonormal: pins the subspace coordinates to a learned constant."""

    has_dropout = False  # pyreft's ConsReFT has none

    def edit(self, h):
        R = self.rotation_matrix()
        return (_row(self.bias) - h @ R) @ _t(R)


class LobireftIntervention(_RotationBias):
    """h + R^T b, R orthonormal: a learned bias inside a low-rank subspace."""

    def edit(self, h):
        return mx.broadcast_to(_row(self.bias) @ _t(self.rotation_matrix()), h.shape)


INTERVENTION_CLASSES = {
    "loreft": LoreftIntervention,
    "noreft": NoreftIntervention,
    "direft": DireftIntervention,
    "nodireft": NodireftIntervention,
    "consreft": ConsreftIntervention,
    "lobireft": LobireftIntervention,
}

# pyreft's class names, recorded in adapters so a reader knows which formula a file holds.
PYREFT_NAMES = {
    "loreft": "LoreftIntervention",
    "noreft": "NoreftIntervention",
    "direft": "DireftIntervention",
    "nodireft": "NodireftIntervention",
    "consreft": "ConsreftIntervention",
    "lobireft": "LobireftIntervention",
}


def make_intervention(kind: str, d: int, r: int, act_fn: str, dropout: float, key: mx.array) -> Intervention:
    """Build one intervention of the named kind."""
    return INTERVENTION_CLASSES[kind](d, r, act_fn=act_fn, dropout=dropout, key=key)
