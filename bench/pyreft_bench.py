"""pyreft 0.1.0's LoReFT training step, timed on the same shape, tokens and settings as the MLX runners.

Run by `python -m bench` in a process of its own, with the python that has torch + pyreft (its
transformers is older than mlx-lm's):  PYREFT_PYTHON bench/pyreft_bench.py SPEC.json RESULT.json
No MLX here. The model is a random-weight transformers model built from the same config dict.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.shapes import SHAPES, train_flops_per_token  # noqa: E402

LR = 1e-4


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, dtype: torch.dtype, n: int, iters: int) -> float:
    pairs = [(torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)) for _ in range(3)]
    for a, b in pairs:
        a @ b
    sync(device)
    times = []
    for i in range(iters):
        a, b = pairs[i % 3]
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / float(np.median(times))


def build(setting: dict, device: str):
    """(reft_model, params, ids, labels, unit_locations) for pyreft LoReFT on every layer, f7+l7 untied."""
    import pyreft
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(SHAPES[setting["shape"]])
    model_type = cfg.pop("model_type")
    dtype = getattr(torch, setting["dtype"])
    torch.manual_seed(setting.get("seed", 0))
    config = AutoConfig.for_model(model_type, **cfg)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=dtype).to(device)
    model.eval()  # no dropout in the base model, as in the MLX runners
    d, layers, rank = cfg["hidden_size"], cfg["num_hidden_layers"], setting.get("rank", 8)
    first_n, last_n = (int(p[1:]) for p in setting.get("positions", "f7+l7").split("+"))
    seq, batch = setting["seq"], setting["batch"]
    plen = seq if setting.get("data", "all") == "all" else (3 * seq) // 4
    first, last = list(range(first_n)), list(range(plen - last_n, plen))  # paper semantics, as loreft
    plan = [(layer, first) for layer in range(layers)] + [(layer, last) for layer in range(layers)]
    # pyreft's own default dtype for W, b is bfloat16, which it needs with a bf16 model; fp32 models need fp32
    reps = [{"layer": layer, "component": "block_output", "low_rank_dimension": rank,
             "intervention": pyreft.LoreftIntervention(embed_dim=d, low_rank_dimension=rank, dtype=dtype)}
            for layer, _ in plan]
    reft_model = pyreft.get_reft_model(model, pyreft.ReftConfig(representations=reps), set_device=True)
    reft_model.train()
    locations = [[pos for _ in range(batch)] for _, pos in plan]
    vocab = cfg["vocab_size"]
    tokens = np.random.default_rng(setting.get("seed", 0)).integers(0, vocab, (batch, seq + 1), dtype=np.int64)
    ids = torch.tensor(tokens[:, :-1], device=device)  # same model inputs as the MLX runners
    labels = ids.clone()
    if plen < seq:
        labels[:, :plen] = -100  # loss on the completion only (transformers shifts labels itself)
    params = [p for iv in reft_model.interventions.values() for p in iv.parameters() if p.requires_grad]
    return reft_model, params, ids, labels, locations


def run(spec: dict) -> dict:
    device = "cuda" if torch.cuda.is_available() and spec.get("device") != "cpu" else "cpu"
    setting = spec["setting"]
    out = {"device": device, "torch": torch.__version__}
    try:
        import pyreft
        import transformers

        out["pyreft"], out["transformers"] = getattr(pyreft, "__version__", "0.1.0"), transformers.__version__
    except ImportError as e:
        return {**out, "error": f"pyreft not importable: {e}"}
    peak_dtype = getattr(torch, spec.get("peak_dtype", "float32"))
    out["matmul_peak_flops"] = matmul_peak(device, peak_dtype, spec.get("peak_n", 1024), spec.get("peak_iters", 10))
    reft_model, params, ids, labels, locations = build(setting, device)
    opt = torch.optim.AdamW(params, lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        _, cf = reft_model(
            {"input_ids": ids, "attention_mask": torch.ones_like(ids)},
            unit_locations={"sources->base": (None, locations)}, labels=labels,
        )
        cf.loss.backward()
        opt.step()
        sync(device)

    for _ in range(setting.get("warmup", 2)):
        step()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(setting.get("rounds", 3) * setting.get("steps", 5)):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    t = float(np.median(times))
    tps = setting["batch"] * setting["seq"] / t
    flops = train_flops_per_token(SHAPES[setting["shape"]], setting["seq"])
    if device == "cuda":
        peak, peak_kind = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"
    out["row"] = {
        "method": "pyreft LoReFT", "note": f"pyreft {out['pyreft']}, torch {torch.__version__} eager, {peak_kind}",
        "step_s": t, "step_s_min": float(np.min(times)), "step_s_max": float(np.max(times)), "tokens_per_s": tps,
        "peak_memory_gb": peak / 1e9, "trainable_params": sum(p.numel() for p in params),
        "model_flops_per_token": flops, "utilization": tps * flops / out["matmul_peak_flops"], "timed_steps": len(times),
    }
    return out


if __name__ == "__main__":
    spec_path, result_path = sys.argv[1:]
    result = run(json.loads(Path(spec_path).read_text()))
    Path(result_path).write_text(json.dumps(result, indent=1))
    print(json.dumps(result.get("row", result))[:400], flush=True)
