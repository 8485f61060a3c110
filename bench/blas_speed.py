"""Fast BLAS vs MLX's bundled BLAS: 1024^3 float32 matmul GFLOP/s and tiny-llama training tokens/s.

Usage: python bench/blas_speed.py            (alternates both modes ROUNDS=3 times, each in a fresh interpreter)
       python bench/blas_speed.py child DIR  (one mode; LOREFT_NO_FAST_BLAS picks it)
"""
import json, os, subprocess, sys, tempfile, time

def child(model_dir):
    from loreft.backend import setup

    fast_blas = setup()["fast_blas"]  # first: loads the fast BLAS unless LOREFT_NO_FAST_BLAS=1
    import numpy as np
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm import load

    n = 1024
    x, y = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(x @ y)
    times = []
    for _ in range(5):
        t = time.perf_counter(); mx.eval(x @ y); times.append(time.perf_counter() - t)
    gflops = 2 * n**3 / min(times) / 1e9

    model, _ = load(model_dir)
    model.unfreeze()  # all parameters (plain full finetuning step, no LoRA/ReFT)
    batch, seq = 8, 128
    tokens = mx.array(np.random.default_rng(0).integers(0, 500, size=(batch, seq + 1)))
    opt = optim.AdamW(learning_rate=1e-4)
    def loss_fn(model):
        return nn.losses.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], reduction="mean")
    step = nn.value_and_grad(model, loss_fn)
    losses = []
    for i in range(8):
        if i == 2:
            t = time.perf_counter()
        loss, grads = step(model)
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)
        losses.append(round(float(loss), 4))
    tps = 6 * batch * seq / (time.perf_counter() - t)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(json.dumps({"fast_blas": fast_blas, "matmul_gflops": round(gflops, 1),
                      "train_tokens_per_s": round(tps), "params": n_params, "losses": losses}))

def main():
    from loreft.demo import build_tiny_model  # imports mlx in this parent only; children are fresh
    d = tempfile.mkdtemp()
    build_tiny_model(d, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512, seed=0)
    rounds = int(os.environ.get("ROUNDS", "3"))  # alternate the two modes: the machine may be shared
    for label, env in [("fast", {}), ("stock", {"LOREFT_NO_FAST_BLAS": "1"})] * rounds:
        e = {k: v for k, v in os.environ.items() if k != "LOREFT_NO_FAST_BLAS"}; e.update(env)
        out = subprocess.run([sys.executable, __file__, "child", d], env=e, capture_output=True, text=True)
        print(label, out.stdout.strip() or out.stderr[-2000:], flush=True)

if __name__ == "__main__":
    child(sys.argv[2]) if sys.argv[1:2] == ["child"] else main()
