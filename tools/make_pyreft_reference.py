"""Record pyreft's own numbers on a tiny random Llama, as fixtures for tests/test_pyreft_parity.py.

Run it with the pyreft reference venv, never the project's (torch and pyreft are not dependencies):

    python3 -m venv /tmp/pyreft-venv
    /tmp/pyreft-venv/bin/pip install torch==2.13.0 transformers==4.45.1 accelerate datasets \
        matplotlib networkx sentencepiece protobuf numpy
    /tmp/pyreft-venv/bin/pip install --no-deps pyvene==0.1.8 pyreft==0.1.0
    /tmp/pyreft-venv/bin/python tools/make_pyreft_reference.py

It writes (about 1 MB in all):
  tests/fixtures/pyreft_base/      the base model: transformers LlamaConfig (hidden 64, 3 layers, 4 heads,
                                   initializer_range 0.2), seeded, float32, save_pretrained(safe_serialization=True),
                                   plus the tokenizer from loreft.demo.build_tokenizer (so mlx_lm.load reads it)
  tests/fixtures/pyreft_cases.npz  forward/backward cases, 5-step training runs and greedy generations;
                                   its "meta" entry is a JSON string describing every case and key.

What each case holds (keys "<case>.<name>"): input_ids (B, T) = B equal-length prompts of prompt_len
tokens followed by a completion; locations (n_interventions, B, n) = the unit_locations given to pyreft;
"w.layers.<i>.<group>.<param>" = every intervention weight in mlx-loreft's layout; logits (B, T, V) of
pyreft's intervened forward; loss = pyreft's (transformers') next-token cross-entropy on the completion
tokens (labels -100 on the prompt); "g.<same key>" = the gradient of that loss.

Layout bridge (pyreft -> mlx-loreft): rotate_layer.weight (the parametrized, orthonormal (d, r) R) ->
`rotation`; learned_source.weight / .bias -> `weight` / `bias` (consreft and lobireft: learned_source,
an (r,) parameter -> `bias`); proj_layer.weight / .bias -> `proj_weight` / `proj_bias`. The gradient for
`rotation` is pyreft's gradient w.r.t. the effective R (rotate_layer.weight computed once under
torch.nn.utils.parametrize.cached() and retain_grad()), not w.r.t. the Householder parameters behind it.

What differs from pyreft's own training pipeline, and how the fixture bridges it:
- Positions: pyreft's supervised datasets place "l1" on the second-to-last prompt token (an off-by-one);
  mlx-loreft uses the paper's semantics, "l1" = the last prompt token. So this script never uses pyreft's
  datasets: it computes unit_locations itself with the paper's semantics (first n = 0..n-1, last n =
  prompt_len-n..prompt_len-1) and passes them explicitly. Prompts are never short enough for clamping.
- Groups: untied "fN+lN" is two pyreft representations per layer (all layers for the first positions,
  then all layers again for the last ones; groups 'first' and 'last'); tied is one representation per
  layer whose locations are the first then the last positions (group 'shared'); a one-sided spec ("l1")
  is one representation per layer (group 'first' or 'last').
- dtype: dtype=torch.float32 is passed to every intervention (pyreft's default, bfloat16, breaks fp32
  models); noreft/nodireft get add_bias=True (mlx-loreft always keeps proj_bias; nodireft never uses it).
- Dropout 0 everywhere (pyreft's default), so forward passes are deterministic.
- Training: torch.optim.AdamW(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0), no schedule, no
  clipping, full batch, losses recorded before each of 5 updates plus the loss after the last one. pyreft
  optimizes R through torch's orthogonal parametrization (a Householder map), mlx-loreft through
  Gram-Schmidt of an unconstrained (d, r) matrix, so only the non-orthogonal types (noreft, nodireft)
  and loreft with R frozen ("train_loreft_frozen_R") can follow the same Adam trajectory exactly.
- Generation: pyreft's generate with intervene_on_prompt=True (edit on the prompt during prefill only),
  greedy, 8 new tokens; the base model's greedy tokens are recorded too, to show the edit matters.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.utils.parametrize as parametrize
from transformers import LlamaConfig, LlamaForCausalLM

import pyreft

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
BASE = FIXTURES / "pyreft_base"
OUT = FIXTURES / "pyreft_cases.npz"

HIDDEN, LAYERS, HEADS, VOCAB_TARGET = 64, 3, 4, 320
LR, STEPS, NEW_TOKENS = 1e-2, 5, 8

PYREFT_CLASS = {
    "loreft": pyreft.LoreftIntervention,
    "noreft": pyreft.NoreftIntervention,
    "direft": pyreft.DireftIntervention,
    "nodireft": pyreft.NodireftIntervention,
    "consreft": pyreft.ConsreftIntervention,
    "lobireft": pyreft.LobireftIntervention,
}

# name, intervention, rank, layers, positions, share_weights, act_fn, batch, prompt_len, completion_len
CASES = [
    ("loreft_r4_l1", "loreft", 4, [1], "l1", False, "linear", 1, 6, 4),
    ("loreft_r2_f1l1_relu_b2", "loreft", 2, [0, 2], "f1+l1", False, "relu", 2, 6, 3),
    ("loreft_r3_f2l2_tied", "loreft", 3, [0, 1, 2], "f2+l2", True, "linear", 2, 7, 3),
    ("noreft_r4_f1l1_b2", "noreft", 4, [1], "f1+l1", False, "linear", 2, 5, 4),
    ("noreft_r1_l1_relu", "noreft", 1, [0, 2], "l1", False, "relu", 1, 6, 4),
    ("direft_r2_f2l2_tied_relu_b2", "direft", 2, [2], "f2+l2", True, "relu", 2, 6, 3),
    ("direft_r4_f1", "direft", 4, [0, 1], "f1", False, "linear", 1, 5, 3),
    ("nodireft_r4_f1l1", "nodireft", 4, [0, 1], "f1+l1", False, "linear", 1, 6, 4),
    ("nodireft_r3_l2_relu_b2", "nodireft", 3, [2], "l2", False, "relu", 2, 6, 3),
    ("consreft_r1_l1", "consreft", 1, [1], "l1", False, "linear", 1, 6, 3),
    ("consreft_r2_f2l2_tied_b2", "consreft", 2, [0, 2], "f2+l2", True, "linear", 2, 6, 4),
    ("lobireft_r4_f1l1_b2", "lobireft", 4, [1], "f1+l1", False, "linear", 2, 6, 3),
    ("lobireft_r3_l2", "lobireft", 3, [0, 2], "l2", False, "linear", 1, 5, 4),
]
TRAIN_CASES = [  # 5 AdamW steps on one fixed batch of 2
    ("train_noreft", "noreft", 4, [0, 2], "f1+l1", False, "linear", 2, 6, 4),
    ("train_nodireft", "nodireft", 4, [0, 2], "f1+l1", False, "linear", 2, 6, 4),
    ("train_loreft", "loreft", 4, [0, 2], "f1+l1", False, "linear", 2, 6, 4),
]
# The same loreft run (same seed: same weights and batch) with R frozen: only W and b train, so the Adam
# trajectory is exactly comparable; the gap of the full run is then down to R's parametrization.
FROZEN_R_CASE = ("train_loreft_frozen_R",) + TRAIN_CASES[-1][1:]
GEN_CASE = ("gen_loreft", "loreft", 4, [1, 2], "f1+l1", False, "linear", 1, 6, 0)


def load_demo_module():
    """loreft/demo.py by path: its build_tokenizer needs only tokenizers + transformers (no MLX here)."""
    spec = importlib.util.spec_from_file_location("loreft_demo", ROOT / "loreft" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_base() -> tuple[LlamaForCausalLM, int]:
    """Tokenizer (the project's own builder) + a seeded random float32 Llama, saved side by side."""
    shutil.rmtree(BASE, ignore_errors=True)
    tokenizer = load_demo_module().build_tokenizer(BASE, vocab_size=VOCAB_TARGET)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
        initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float().eval()
    model.save_pretrained(BASE, safe_serialization=True)
    for extra in ("generation_config.json",):  # not needed by mlx_lm; keep the fixture minimal
        (BASE / extra).unlink(missing_ok=True)
    return model, len(tokenizer)


def paper_positions(prompt_len: int, positions: str) -> tuple[list[int], list[int]]:
    """First-n and last-n prompt positions with the paper's semantics ('l1' = last prompt token)."""
    first_n = last_n = 0
    for part in positions.split("+"):
        if part.startswith("f"):
            first_n = int(part[1:])
        else:
            last_n = int(part[1:])
    assert first_n + last_n <= prompt_len, "fixture prompts are long enough never to clamp"
    return list(range(first_n)), list(range(prompt_len - last_n, prompt_len))


def make_reft(model, kind, rank, layers, positions, share, act_fn, prompt_len, batch):
    """pyreft model + the group name of each representation + unit_locations (n_iv, B, n)."""
    first, last = paper_positions(prompt_len, positions)
    if first and last and not share:
        plan = [(layer, "first", first) for layer in layers] + [(layer, "last", last) for layer in layers]
    elif first and last:
        plan = [(layer, "shared", first + last) for layer in layers]
    else:
        group = "first" if first else "last"
        plan = [(layer, group, first or last) for layer in layers]
    reps = []
    for layer, _, _ in plan:
        kwargs = dict(embed_dim=HIDDEN, low_rank_dimension=rank, dtype=torch.float32, dropout=0.0)
        if kind in ("loreft", "noreft", "direft", "nodireft"):
            kwargs["act_fn"] = None if act_fn == "linear" else act_fn
        if kind in ("noreft", "nodireft"):
            kwargs["add_bias"] = True
        reps.append({"layer": layer, "component": "block_output", "low_rank_dimension": rank,
                     "intervention": PYREFT_CLASS[kind](**kwargs)})
    reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), set_device=False)
    reft_model.eval()
    ivs = list(reft_model.interventions.values())
    assert len(ivs) == len(plan)
    locations = [[pos for _ in range(batch)] for _, _, pos in plan]
    return reft_model, [(layer, group) for layer, group, _ in plan], ivs, locations


def weights_of(iv, kind) -> dict[str, torch.Tensor]:
    """One pyreft intervention's tensors under mlx-loreft's parameter names."""
    out = {}
    if hasattr(iv, "rotate_layer"):
        out["rotation"] = iv.rotate_layer.weight
    if kind in ("consreft", "lobireft"):
        out["bias"] = iv.learned_source
    else:
        out["weight"], out["bias"] = iv.learned_source.weight, iv.learned_source.bias
    if hasattr(iv, "proj_layer"):
        out["proj_weight"], out["proj_bias"] = iv.proj_layer.weight, iv.proj_layer.bias
    return out


def inputs_for(seed, vocab, batch, prompt_len, completion_len):
    """Fixed random token ids (no special tokens) and labels masking the prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(7, vocab, (batch, prompt_len + completion_len), generator=g)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    return ids, labels


def forward(reft_model, ids, labels, locations):
    _, cf = reft_model(
        {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
        unit_locations={"sources->base": (None, locations)},
        labels=labels,
    )
    return cf


def record_case(store, meta, model, vocab, seed, spec):
    name, kind, rank, layers, positions, share, act_fn, batch, plen, clen = spec
    torch.manual_seed(seed)
    reft_model, groups, ivs, locations = make_reft(model, kind, rank, layers, positions, share, act_fn, plen, batch)
    ids, labels = inputs_for(seed, vocab, batch, plen, clen)
    with parametrize.cached():  # R computed once: its .grad is the gradient w.r.t. the effective R
        tensors = {}
        for (layer, group), iv in zip(groups, ivs):
            for pname, t in weights_of(iv, kind).items():
                if pname == "rotation":
                    t.retain_grad()
                tensors[f"layers.{layer}.{group}.{pname}"] = t
        out = forward(reft_model, ids, labels, locations)
        out.loss.backward()
        for key, t in tensors.items():
            store[f"{name}.w.{key}"] = t.detach().numpy().astype(np.float32)
            grad = t.grad if t.grad is not None else torch.zeros_like(t)  # nodireft's unused proj bias
            store[f"{name}.g.{key}"] = grad.numpy().astype(np.float32)
    store[f"{name}.input_ids"] = ids.numpy().astype(np.int32)
    store[f"{name}.locations"] = np.array(locations, np.int32)
    store[f"{name}.logits"] = out.logits.detach().numpy().astype(np.float32)
    store[f"{name}.loss"] = np.float32(out.loss.item())
    meta["cases"][name] = dict(
        intervention=kind, rank=rank, layers=layers, positions=positions, share_weights=share, act_fn=act_fn,
        batch=batch, prompt_len=plen, completion_len=clen, groups=[f"layers.{l}.{g}" for l, g in groups],
    )
    print(f"{name}: loss {out.loss.item():.6f}")


def record_training(store, meta, model, vocab, seed, spec, train_rotation=True):
    name, kind, rank, layers, positions, share, act_fn, batch, plen, clen = spec
    torch.manual_seed(seed)
    reft_model, groups, ivs, locations = make_reft(model, kind, rank, layers, positions, share, act_fn, plen, batch)
    ids, labels = inputs_for(seed, vocab, batch, plen, clen)
    for (layer, group), iv in zip(groups, ivs):
        for pname, t in weights_of(iv, kind).items():
            store[f"{name}.w.layers.{layer}.{group}.{pname}"] = t.detach().numpy().astype(np.float32)
    params = [
        p for iv in ivs for n, p in iv.named_parameters() if train_rotation or not n.startswith("rotate_layer")
    ]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = forward(reft_model, ids, labels, locations).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(forward(reft_model, ids, labels, locations).loss.item())
    store[f"{name}.input_ids"] = ids.numpy().astype(np.int32)
    store[f"{name}.locations"] = np.array(locations, np.int32)
    store[f"{name}.losses"] = np.array(losses, np.float32)
    meta["cases"][name] = dict(
        intervention=kind, rank=rank, layers=layers, positions=positions, share_weights=share, act_fn=act_fn,
        batch=batch, prompt_len=plen, completion_len=clen, groups=[f"layers.{l}.{g}" for l, g in groups],
        optimizer=dict(name="AdamW", lr=LR, betas=[0.9, 0.999], eps=1e-8, weight_decay=0.0, steps=STEPS),
        train_rotation=train_rotation,
    )
    print(f"{name}: losses {np.round(losses, 6).tolist()}")


def record_generation(store, meta, model, vocab, seed, spec):
    name, kind, rank, layers, positions, share, act_fn, batch, plen, _ = spec
    torch.manual_seed(seed)
    reft_model, groups, ivs, locations = make_reft(model, kind, rank, layers, positions, share, act_fn, plen, batch)
    ids, _ = inputs_for(seed, vocab, batch, plen, 0)
    for (layer, group), iv in zip(groups, ivs):
        for pname, t in weights_of(iv, kind).items():
            store[f"{name}.w.layers.{layer}.{group}.{pname}"] = t.detach().numpy().astype(np.float32)
    gen = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        _, steered = reft_model.generate(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            unit_locations={"sources->base": (None, locations)}, intervene_on_prompt=True, **gen,
        )
        plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)
    steered, plain = steered[:, plen:].numpy(), plain[:, plen:].numpy()
    assert steered.shape[1] == NEW_TOKENS and not np.array_equal(steered, plain), "edit must change the tokens"
    store[f"{name}.input_ids"] = ids.numpy().astype(np.int32)
    store[f"{name}.locations"] = np.array(locations, np.int32)
    store[f"{name}.generated"] = steered.astype(np.int32)
    store[f"{name}.base_generated"] = plain.astype(np.int32)
    meta["cases"][name] = dict(
        intervention=kind, rank=rank, layers=layers, positions=positions, share_weights=share, act_fn=act_fn,
        batch=batch, prompt_len=plen, completion_len=0, groups=[f"layers.{l}.{g}" for l, g in groups],
        max_new_tokens=NEW_TOKENS,
    )
    print(f"{name}: steered {steered.tolist()} base {plain.tolist()}")


def main() -> None:
    torch.set_num_threads(1)  # deterministic float32 reductions
    model, vocab = build_base()
    for p in model.parameters():
        p.requires_grad_(False)
    meta = {
        "about": "pyreft 0.1.0 / pyvene 0.1.8 / transformers 4.45.1 reference; see tools/make_pyreft_reference.py",
        "keys": {
            "<case>.input_ids": "(B, T) int32: prompt_len prompt tokens then the completion",
            "<case>.locations": "(n_interventions, B, n) int32 unit_locations, in the order of 'groups'",
            "<case>.w.layers.<i>.<group>.<param>": "intervention weights in mlx-loreft's layout",
            "<case>.g.<same>": "gradient of loss w.r.t. that weight (rotation: w.r.t. the effective R)",
            "<case>.logits": "(B, T, V) float32 logits of pyreft's intervened forward",
            "<case>.loss": "mean next-token cross-entropy on the completion tokens",
            "<train case>.losses": "loss before each AdamW step, then after the last",
            "<gen case>.generated / base_generated": "(B, 8) greedy new tokens with / without the edit",
        },
        "cases": {},
    }
    store: dict[str, np.ndarray] = {}
    for seed, spec in enumerate(CASES, start=1):
        record_case(store, meta, model, vocab, seed, spec)
    for seed, spec in enumerate(TRAIN_CASES, start=100):
        record_training(store, meta, model, vocab, seed, spec)
    record_training(store, meta, model, vocab, 100 + len(TRAIN_CASES) - 1, FROZEN_R_CASE, train_rotation=False)
    record_generation(store, meta, model, vocab, 200, GEN_CASE)
    store["meta"] = np.array(json.dumps(meta))
    np.savez_compressed(OUT, **store)
    size = sum(f.stat().st_size for f in FIXTURES.rglob("pyreft*") if f.is_file())
    size += sum(f.stat().st_size for f in BASE.rglob("*") if f.is_file())
    print(f"wrote {OUT.relative_to(ROOT)} and {BASE.relative_to(ROOT)}/ ({size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
