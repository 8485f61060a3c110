"""Attach ReFT interventions to an mlx-lm causal LM by wrapping its transformer blocks."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import ReftConfig, parse_layers
from .interventions import Intervention, make_intervention, split_keys, stack_interventions
from .positions import Locations, group_names, prompt_locations


class _Context:
    """Per-call state shared by every wrapped block; a plain object, so never a model parameter."""

    def __init__(self):
        self._locations: Locations | None = None
        self.seen: dict[int, int] = {}  # tokens each block has processed, for caches without an offset
        self.apply = None  # how blocks apply their interventions (None: apply_interventions)
        self.recompute = False  # training: keep no activations inside the wrapped blocks (mx.checkpoint)

    @property
    def locations(self) -> Locations | None:
        return self._locations

    @locations.setter
    def locations(self, value: Locations | None) -> None:
        self._locations = value
        self.seen = {}


def _cache_of(args: tuple, kwargs: dict):
    return kwargs.get("cache", args[1] if len(args) > 1 else None)


class ReftBlock(nn.Module):
    """A transformer block whose output gets the layer's interventions at the current locations."""

    def __init__(self, block: nn.Module, interventions: dict[str, Intervention], context: _Context):
        super().__init__()
        # interventions before block: with block set, an inner ReftBlock's names would show through __getattr__
        self.interventions = interventions
        self.block = block
        self._context = context

    def __getattr__(self, key):
        # Models read flags from their blocks (e.g. layer.use_sliding): pass unknown names through.
        try:
            return super().__getattr__(key)
        except AttributeError:
            block = dict.get(self, "block")
            if block is None:
                raise
            return getattr(block, key)

    def __call__(self, x: mx.array, *args, **kwargs) -> mx.array:
        # absolute position of this call's first token: the KV cache's offset (0 without a cache); caches
        # that keep none (SSM state in hybrid models) are counted here, per block, since set_locations
        cache = _cache_of(args, kwargs)
        offset = 0 if cache is None else getattr(cache, "offset", None)
        if offset is None:
            offset = self._context.seen.get(id(self), 0)
            self._context.seen[id(self)] = offset + x.shape[1]
        # the wrapped block is frozen: checkpointing it needs no parameters passed in, only its inputs
        block = mx.checkpoint(self.block) if self._context.recompute and self.training else self.block
        h = block(x, *args, **kwargs)
        locations = self._context.locations
        if locations is None or (isinstance(offset, int) and offset >= locations.end):
            return h  # no edit here: decode steps after the prompt cost nothing extra
        return (self._context.apply or apply_interventions)(h, self.interventions, locations, offset)


def apply_interventions(
    h: mx.array, interventions: dict, locations: Locations, offset=0, stack_groups: bool = True
) -> mx.array:
    """Edit h (B, L, d) at each group's positions (absolute, shifted by the cache offset).

    The edited rows are picked and written back through a (B, L, n) 0/1 selection matrix: two small
    batched matmuls, exact (one nonzero per row; unused slots select nothing), with no gather/scatter
    kernels (as fast as take_along_axis + .at[].add on a GPU and on a CPU: BENCHMARKS.md).
    All groups share one selection (their valid positions never overlap: first and last are clamped
    apart); each group's intervention edits its own slice of the picked rows, all groups in one stacked pass
    when they have as many slots each (stack_groups; False: one pass per group, the benchmarks' lever).
    """
    L = h.shape[1]
    if isinstance(offset, mx.array) and offset.ndim == 1:
        offset = offset[:, None]  # batched caches (mlx-lm BatchKVCache) keep one offset per row
    names = list(interventions)
    groups = [locations.groups[n] for n in names]
    idx = groups[0][0] if len(groups) == 1 else mx.concatenate([g[0] for g in groups], axis=1)
    valid = groups[0][1] if len(groups) == 1 else mx.concatenate([g[1] for g in groups], axis=1)
    # (B, n) positions in this call; invalid or outside slots select nothing. Every op below works at the
    # full (B, L, n) shape, so MLX fuses the selection into one kernel (valid is 0/1)
    local = idx if isinstance(offset, int) and offset == 0 else idx - offset
    select = ((mx.arange(L)[None, :, None] == local[:, None, :]) * valid[:, None, :]).astype(h.dtype)  # (B, L, n)
    picked = mx.swapaxes(select, 1, 2) @ h  # (B, n, d): the edited rows (zeros for unused slots)
    counts = [g[0].shape[1] for g in groups]
    if stack_groups and len(groups) > 1 and len(set(counts)) == 1:
        # groups of equal size: one stacked edit, (B, G, n, d) rows against (G, ...) parameters
        rows = picked.reshape(h.shape[0], len(groups), counts[0], h.shape[-1])
        edited = stack_interventions([interventions[n] for n in names])(rows)
    else:
        rows, starts = picked, [0, *accumulate(counts)]
        parts = [interventions[n](picked[:, a:b]) for n, a, b in zip(names, starts, starts[1:])]
        edited = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
    delta = (edited.astype(mx.float32) - rows.astype(mx.float32)).astype(h.dtype).reshape(picked.shape)
    return h + select @ delta


def model_dims(model: nn.Module) -> tuple[int, int]:
    """(hidden_size, number of transformer blocks) of an mlx-lm model."""
    num_layers = len(model.layers)
    args = getattr(model, "args", None)
    hidden = getattr(args, "hidden_size", None)
    if hidden is None and args is not None:
        text = getattr(args, "text_config", None)
        hidden = text.get("hidden_size") if isinstance(text, dict) else getattr(text, "hidden_size", None)
    if hidden is None:
        for _, m in model.named_modules():
            if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding)):
                hidden = m.weight.shape[1] * (32 // m.bits if isinstance(m, nn.QuantizedEmbedding) else 1)
                break
    if hidden is None:
        raise ValueError("cannot find the model's hidden size (no args.hidden_size and no embedding)")
    return int(hidden), num_layers


def count_parameters(module: nn.Module) -> int:
    """Number of weights, counting a quantized matrix by its unpacked size."""
    total = sum(v.size for _, v in tree_flatten(module.parameters()))
    for _, m in module.named_modules():
        bits = getattr(m, "bits", None)
        if bits and "scales" in m:  # packed uint32 weight plus scales / biases: count what it stands for
            extra = m.scales.size + (m.biases.size if m.get("biases") is not None else 0)
            total += m.weight.size * 32 // bits - m.weight.size - extra
    return total


@dataclass
class ParameterStats:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"Trainable parameters: {self.trainable:,} of {self.total:,} ({self.percent:.4f}%)"


class Reft:
    """Handle on a model with interventions attached: locations, parameters, statistics."""

    def __init__(self, model: nn.Module, config: ReftConfig, blocks: dict[int, ReftBlock], context: _Context):
        self.model, self.config, self.blocks, self._context = model, config, blocks, context
        self.layers = sorted(blocks)
        first_n, last_n = config.first_last
        self.first_n, self.last_n = first_n, last_n
        self.groups = group_names(first_n, last_n, config.share_weights)
        self.hidden_size, self.num_layers = model_dims(model)

    def interventions(self) -> dict[str, Intervention]:
        """Every intervention by key 'layers.<i>.<group>'."""
        return {f"layers.{i}.{g}": b.interventions[g] for i, b in self.blocks.items() for g in self.groups}

    def locations(self, prompt_lengths, offsets=None, host: bool = False) -> Locations:
        """Locations for a batch of prompts of these lengths (offsets: left padding per row; host: numpy arrays)."""
        return prompt_locations(prompt_lengths, self.first_n, self.last_n, self.config.share_weights, offsets, host)

    def set_locations(self, locations: Locations | None) -> None:
        """Edit at these locations on the next calls; None turns the edit off (plain base model)."""
        self._context.locations = locations

    def set_apply(self, apply=None) -> None:
        """Compute the edit with apply(h, interventions, locations, offset) instead of apply_interventions (None: back)."""
        self._context.apply = apply

    def recompute_blocks(self, on: bool) -> None:
        """Training only: recompute each intervened block's activations in the backward pass (less memory, more time)."""
        self._context.recompute = on

    def parameters(self) -> dict[str, mx.array]:
        """Flat dict of every intervention parameter, e.g. 'layers.3.first.weight'."""
        return {f"{k}.{p}": v for k, iv in self.interventions().items() for p, v in tree_flatten(iv.parameters())}

    def load_parameters(self, weights: dict[str, mx.array]) -> None:
        """Set intervention parameters from a flat dict; names and shapes must match exactly."""
        own = self.parameters()
        missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        if missing or extra:
            raise ValueError(f"adapter weights do not match the interventions: missing {missing[:5]}, unexpected {extra[:5]}")
        for k, v in weights.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ValueError(f"adapter weight {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        for key, iv in self.interventions().items():
            prefix = key + "."
            iv.load_weights([(k[len(prefix):], v.astype(mx.float32)) for k, v in weights.items() if k.startswith(prefix)])
        mx.eval(self.model.trainable_parameters())

    def stats(self) -> ParameterStats:
        """Exact trainable-parameter count and its share of the base model."""
        trainable = sum(v.size for v in self.parameters().values())
        every_adapter = sum(count_parameters(m) for _, m in self.model.named_modules() if isinstance(m, Intervention))
        return ParameterStats(trainable, count_parameters(self.model) - every_adapter)

    def max_orthogonality_error(self) -> float:
        """max |R^T R - I| over every orthonormal R (0.0 when none has one)."""
        err = 0.0
        for iv in self.interventions().values():
            if iv.has_rotation:
                R = iv.rotation_matrix()
                err = max(err, mx.abs(R.T @ R - mx.eye(R.shape[1])).max().item())
        return err


def _block_list(model: nn.Module) -> list:
    """The list that really holds the blocks: model.layers may be a fresh slice (mlx-lm's PipelineMixin, e.g. qwen2)."""
    layers = model.layers
    for _, module in model.named_modules():
        for value in module.values():
            if isinstance(value, list) and len(value) == len(layers) and all(a is b for a, b in zip(value, layers)):
                return value  # assigning into this list replaces the block in place
    raise ValueError(f"cannot find the list holding {type(model).__name__}'s transformer blocks")


def attach(model: nn.Module, config: ReftConfig) -> Reft:
    """Freeze the model and wrap the configured blocks with fresh interventions; returns the handle.

    Attaching to a model that already carries adapters wraps their blocks again (they are frozen too), so
    several adapters can edit one base model at once: see ReftStack.
    """
    hidden, num_layers = model_dims(model)
    config.validate(hidden_size=hidden, num_layers=num_layers)
    layers = parse_layers(config.layers, num_layers)
    first_n, last_n = config.first_last
    groups = group_names(first_n, last_n, config.share_weights)
    blocks = _block_list(model)
    model.freeze()
    context = _Context()
    keys = split_keys(mx.random.key(config.seed), len(layers) * len(groups))
    for li, layer in enumerate(layers):
        ivs = {
            g: make_intervention(config.intervention, hidden, config.rank, config.act_fn, config.dropout, keys[li * len(groups) + gi])
            for gi, g in enumerate(groups)
        }
        blocks[layer] = ReftBlock(blocks[layer], ivs, context).train(model.training)  # eval model: no dropout
    mx.eval(model.trainable_parameters())
    return Reft(model, config, {i: blocks[i] for i in layers}, context)


class ReftStack:
    """Several adapters on one base model at once (pyreft's composition): each edits its own layers and
    positions, in its own subspace, at the same time. Use it wherever a Reft is taken for generation."""

    def __init__(self, refts: list[Reft]):
        if not refts or any(r.model is not refts[0].model for r in refts):
            raise ValueError("a ReftStack needs one or more adapters attached to the same model")
        self.refts = list(refts)
        self.model = refts[0].model

    def locations(self, prompt_lengths, offsets=None) -> list[Locations]:
        """Each adapter's locations for these prompts."""
        return [r.locations(prompt_lengths, offsets) for r in self.refts]

    def set_locations(self, locations: list[Locations] | None) -> None:
        """Edit with every adapter at its locations; None turns every edit off."""
        for r, loc in zip(self.refts, locations or [None] * len(self.refts)):
            r.set_locations(loc)
