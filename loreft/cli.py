"""The `loreft` command: train, generate, eval, serve and demo.

    loreft train --model M --data D [--config job.yaml] [--rank 8 ...]   every PARAMETERS entry is a flag
    loreft generate --adapter A --prompt "..."                            the adapter's base model by default
    loreft eval --adapter A --data D                                      loss, perplexity, exact match
    loreft serve --model M --adapter A [--adapter NAME=B ...]               an OpenAI-compatible server
    loreft demo [--tiny]                                                  SmolLM2 (or the tiny random model), end to end
    loreft convert MODEL.gguf OUT_DIR                                     a GGUF file as an mlx-lm model folder

Bad input (a parameter, a data file, an adapter or model folder) is reported on one line naming the field,
file or line, with exit code 2, before any model loads where it can be known then; --debug shows the traceback.
main() applies loreft.backend.setup() first; this module imports nothing that loads MLX before that.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from .config import ConfigError, check_number
from .data import DataError
from .job import PARAMETERS, PARAMS_BY_NAME, job_from_params

PROG = "loreft"


# ---------------------------------------------------------------------------------------------------
# Parameters as flags and YAML


def _flag_help(p) -> str:
    extra = []
    if p.enum is not None:
        extra.append("one of: " + ", ".join(repr(v) if v == "" else str(v) for v in p.enum))
    if p.default not in (None, ""):
        extra.append(f"default: {p.default}")
    text = p.help + (f" ({'; '.join(extra)})" if extra else "")
    return text.replace("%", "%%")  # argparse formats help strings with %


def add_parameter_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per PARAMETERS entry (--learning-rate and --learning_rate); unset flags stay None."""
    groups = {g: parser.add_argument_group(title) for g, title in
              (("job", "job"), ("reft", "interventions (ReftConfig)"), ("train", "training (TrainConfig)"))}
    for p in PARAMETERS:
        names = [f"--{p.name.replace('_', '-')}"] + ([f"--{p.name}"] if "_" in p.name else [])
        group = groups[p.group]
        if p.type is bool:
            group.add_argument(*names, dest=p.name, action=argparse.BooleanOptionalAction, default=None, help=_flag_help(p))
        else:
            # values stay strings here: job_from_params coerces them and names the parameter on error
            group.add_argument(*names, dest=p.name, default=None, metavar=p.type.__name__.upper(), help=_flag_help(p))


def read_yaml_params(path: str) -> dict:
    """A YAML file of `parameter: value` pairs (dashes or underscores in names)."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError("config", path, "no such file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError:
        raise ConfigError("config", path, "not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as e:
        raise ConfigError("config", path, f"not valid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError("config", path, "expected a mapping of parameter: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def params_from_args(args: argparse.Namespace) -> dict:
    """YAML values first, then every flag given on the command line (flags win)."""
    params = read_yaml_params(args.config) if args.config else {}
    params.update({name: getattr(args, name) for name in PARAMS_BY_NAME if getattr(args, name) is not None})
    return params


# ---------------------------------------------------------------------------------------------------
# Commands


def cmd_train(args: argparse.Namespace) -> int:
    """Validate everything, then load, train and save; one summary line per result."""
    import mlx.core as mx

    from .job import run_job
    from .reporting import ProgressBar, StopOnSignal

    job = job_from_params(params_from_args(args))  # fails here, before any model or data loads
    quiet_datasets()
    main_process = mx.distributed.init().rank() == 0  # under mlx.launch, rank 0 speaks for all
    if main_process:
        print(f"Training {job.reft.intervention} (rank {job.reft.rank}, layers {job.reft.layers}, positions "
              f"{job.reft.positions}) on {job.model} with {job.data} -> {job.adapter_dir}")
    # Ctrl-C or SIGTERM (kill, a scheduler's stop) ends training at the next step with the adapter saved
    stop = StopOnSignal((signal.SIGINT, signal.SIGTERM)).install()
    try:
        summary = run_job(job, callbacks=[ProgressBar(), stop])
    finally:
        stop.restore()  # also when training fails
    if main_process:
        print_summary(summary)
    return 0


def quiet_datasets() -> None:
    """No per-file 'Generating train split' progress bars from datasets: the CLI prints its own lines."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach the user as loreft's one line


def print_summary(summary: dict) -> None:
    """The run's result in a few lines."""
    state = "stopped early" if summary.get("stopped") else "done"
    print(f"Training {state}: step {summary['steps']}/{summary['total_steps']}, "
          f"{summary['train_time_s']:.1f}s, train loss {_fmt(summary.get('train_loss'))}")
    if summary.get("stop_reason"):
        print(summary["stop_reason"])
    background = summary.get("background_compile")
    if background:
        print(f"{background['uncompiled_steps']} steps ran uncompiled while the GPU kernels compiled in the "
              f"background ({background['kernels_moved']} kernel modules kept for the next run"
              + (f"; the compile failed: {background['error']})" if background["error"] else ")"))
    for split in ("valid", "test"):
        m = summary.get(split)
        if m:
            print(f"{split}: loss {m['loss']:.4f}, perplexity {m['perplexity']:.3f}")
    best = summary.get("best")  # the trainable share was shown when training started
    if best and summary.get("adapter_step") != summary["steps"]:
        print(f"Adapter saved to {summary['adapter']}: the best by {best['metric']} ({best['value']:.4f}), from step "
              f"{best['step']}; the last state is under its checkpoints folder")
    else:
        print(f"Adapter saved to {summary['adapter']}")


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _load_with_adapter(adapters: str | list[str], model: str | None, dtype: str, dequantize: str = "auto"):
    """(model, tokenizer, reft, metadata of the first adapter): the base model is the adapter's own unless given.

    Several adapters load onto the one base model and edit together (a ReftStack).
    """
    from .adapter import AdapterError, base_model_warning, load_adapter, read_adapter_config, read_weights
    from .job import check_model, load_model, model_shape  # (the loader lives in models.py)
    from .model import ReftStack

    paths = [adapters] if isinstance(adapters, str) else list(adapters)
    metas = [read_adapter_config(p) for p in paths]  # each one is checked before the model loads
    for p in paths:
        read_weights(p)
    meta = metas[0]
    name = model or meta.get("base_model")
    if not name:
        raise ConfigError("model", name, "the adapter does not record its base model; pass --model")
    shape = model_shape(check_model(name))
    for p, m in zip(paths, metas):
        if shape and shape != (m["hidden_size"], m["num_layers"]):  # known from config.json: no need to load it
            raise AdapterError(f"adapter {p} was trained on a model with hidden size {m['hidden_size']} and "
                               f"{m['num_layers']} layers; {name} has hidden size {shape[0]} and {shape[1]} layers")
        warning = base_model_warning(m, name, p)
        if warning:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
    base, tokenizer = load_model(name, dtype, dequantize)
    refts = [load_adapter(base, p) for p in paths]
    return base, tokenizer, refts[0] if len(refts) == 1 else ReftStack(refts), meta


def cmd_generate(args: argparse.Namespace) -> int:
    """Stream a completion for each prompt, formatted as the adapter's training prompts were."""
    from .generate import check_sampling, format_prompt, stream_generate

    check_sampling(args.max_tokens, args.temp, args.top_p)
    model, tokenizer, reft, meta = _load_with_adapter(args.adapter, args.model, args.dtype, args.dequantize)
    formatting = None if args.raw else meta.get("formatting")
    options = {"max_tokens": args.max_tokens, "temp": args.temp, "top_p": args.top_p, "seed": args.seed}
    for text in args.prompt:
        prompt = format_prompt(tokenizer, text, formatting)
        runs = [("base", None), ("adapter", reft)] if args.base else [(None, reft)]
        for label, edit in runs:
            if label:
                print(f"[{label}] ", end="", flush=True)
            for piece in stream_generate(model, tokenizer, prompt, edit, **options):
                print(piece, end="", flush=True)
            print()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate an adapter on one split and write eval.json into the adapter folder."""
    import tempfile

    from .data import Formatter, load_splits
    from .evaluate import evaluate, write_eval

    if len(args.adapter) > 1:
        raise ConfigError("adapter", args.adapter, "eval scores one adapter at a time; run eval once per adapter")
    adapter = args.adapter[0]
    check_number("batch_size", args.batch_size, 1, integer=True)
    check_number("max_examples", args.max_examples, 0, integer=True)
    if args.max_tokens is not None:
        check_number("max_tokens", args.max_tokens, 1, integer=True)
    if Path(adapter).is_dir():
        try:  # eval.json goes into the adapter folder: find out now, not after the evaluation
            tempfile.TemporaryFile(dir=adapter).close()
        except OSError as e:
            raise ConfigError("adapter", adapter, f"cannot write eval.json there ({e.strerror or e})") from None
    quiet_datasets()
    sources: dict = {}
    splits = load_splits(args.data, valid_fraction=0.0, sources=sources)  # before the model: bad data fails fast
    name = args.split if args.split != "auto" else next(s for s in ("test", "valid", "train") if s in splits)
    if name not in splits:
        raise DataError(f"{args.data} has no {name!r} split; it has: {', '.join(splits)}")
    model, tokenizer, reft, meta = _load_with_adapter(adapter, args.model, args.dtype, args.dequantize)
    rows = splits[name]
    if args.max_examples:
        rows = rows.select(range(min(args.max_examples, len(rows)))) if hasattr(rows, "select") else rows[: args.max_examples]
    fmt = meta.get("formatting") or {}
    formatter = Formatter(tokenizer, prompt_template=fmt.get("prompt_template"),
                          completion_template=fmt.get("completion_template"), chat_column=fmt.get("chat_column"))
    results = evaluate(model, tokenizer, reft, rows, formatter=formatter, batch_size=args.batch_size,
                       generate=not args.no_generate, max_tokens=args.max_tokens, base=args.base,
                       source=sources.get(name), split=name)
    results["split"], results["data"] = name, str(args.data)
    path = write_eval(adapter, results)
    print(f"{name}: {results['num_examples']} examples")
    for label in ("adapter", "base"):
        m = results.get(label)
        if m:
            scores = "".join(f", {k} {m[k]:.3f}" for k in ("exact_match", "normalized_exact_match") if k in m)
            print(f"{label}: loss {m['loss']:.4f}, perplexity {m['perplexity']:.3f}{scores}")
    print(f"Results written to {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the base model and every adapter, then serve them over HTTP until interrupted."""
    from .adapter import read_adapter_config
    from .job import load_model

    try:
        from .serve import Served, adapter_name, serve
    except ImportError as e:
        print(f"{PROG}: error: loreft serve needs {e.name}: pip install 'mlx-loreft[serve]'", file=sys.stderr)
        return 2
    specs = [adapter_name(spec) for spec in args.adapter or []]
    names = [name for name, _ in specs]
    metas = []
    for _, path in specs:  # every adapter is checked before the model loads
        try:
            metas.append(read_adapter_config(path))
        except ValueError as e:
            raise ConfigError("adapter", path, str(e)) from None
    if len(set(names)) != len(names):
        raise ConfigError("adapter", names, "two adapters have the same name; name them with NAME=PATH")
    model_name = args.model or (metas[0].get("base_model") if metas else None)
    if not model_name:
        raise ConfigError("model", model_name, "pass --model (or an adapter that records its base model)")
    if model_name in names:
        raise ConfigError("adapter", model_name, "an adapter may not have the base model's name")
    for option, low in (("port", 0), ("max_batch", 1), ("max_tokens", 1), ("temp", 0), ("context_length", 2)):
        if getattr(args, option) is not None and getattr(args, option) < low:
            raise ConfigError(option, getattr(args, option), f"must be at least {low}")

    import mlx.core as mx

    model, tokenizer = load_model(model_name, args.dtype, args.dequantize)
    mx.eval(model.parameters())  # materialized here, before the batcher's thread uses them
    served = Served(model, tokenizer, model_name, max_batch=args.max_batch, context_length=args.context_length,
                    default_max_tokens=args.max_tokens, default_temperature=args.temp)
    for name, path in specs:
        try:
            served.add_adapter(name, path)
        except ValueError as e:  # e.g. trained on a model of another size
            raise ConfigError("adapter", path, str(e)) from None
    print(f"Serving {model_name}" + (f" with adapters {', '.join(names)}" if names else "")
          + f" at http://{args.host}:{args.port}/v1", flush=True)
    api_key = args.api_key or os.environ.get("LOREFT_API_KEY")
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"{PROG}: warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    serve(served, host=args.host, port=args.port, api_key=api_key)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The persona demo on SmolLM2, or with --tiny on the embedded random model (see loreft.demo)."""
    from .demo import run_demo, run_tiny_demo

    run = run_tiny_demo if args.tiny else run_demo
    run(out_dir=args.out, cache_dir=args.cache_dir, epochs=args.epochs)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Write an mlx-lm model folder for a GGUF file."""
    from .gguf import convert

    out = convert(args.gguf, args.out_dir)
    print(f"Wrote {out} (config.json, model.safetensors, tokenizer.json, tokenizer_config.json)")
    return 0


# ---------------------------------------------------------------------------------------------------
# Parser and entry point


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree of the `loreft` command."""
    parser = argparse.ArgumentParser(prog=PROG, description="Representation finetuning (LoReFT) for mlx-lm models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,generate,eval,serve,demo,convert}")

    train = sub.add_parser("train", help="train a ReFT adapter",
                           description="Train a ReFT adapter. Every parameter is a flag; --config reads them from "
                                       "YAML and flags given on the command line win.")
    train.add_argument("--config", help="YAML file of parameter: value pairs")
    add_parameter_flags(train)
    train.set_defaults(func=cmd_train)

    def adapter_args(p, several=False):
        # always collected as a list: several edit together (generate), or a second one is an error (eval)
        p.add_argument("--adapter", required=True, action="append",
                       help="adapter folder (written by loreft train)" + ("; repeat to apply several at once (the "
                            "first one's prompt format and base model are used)" if several else ""))
        p.add_argument("--model", help="base model (default: the one the adapter was trained on)")
        p.add_argument("--dtype", default="auto", choices=PARAMS_BY_NAME["dtype"].enum, help="base model dtype")
        p.add_argument("--dequantize", default="auto", choices=PARAMS_BY_NAME["dequantize"].enum,
                       help=_flag_help(PARAMS_BY_NAME["dequantize"]))

    gen = sub.add_parser("generate", help="generate with an adapter")
    adapter_args(gen, several=True)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="use the prompt as given, without the adapter's template")
    gen.add_argument("--base", action="store_true", help="also show the base model's completion")
    gen.set_defaults(func=cmd_generate)

    ev = sub.add_parser("eval", help="evaluate an adapter (writes eval.json into the adapter folder)")
    adapter_args(ev)
    ev.add_argument("--data", required=True, help="dataset file, folder or Hugging Face id")
    ev.add_argument("--split", default="auto", choices=("auto", "train", "valid", "test"),
                    help="split to evaluate (auto: test, else valid, else train)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-examples", type=int, default=0, help="evaluate the first N rows only (0: all)")
    ev.add_argument("--max-tokens", type=int, default=None, help="generation budget (default: reference length + 8)")
    ev.add_argument("--no-generate", action="store_true", help="loss and perplexity only")
    ev.add_argument("--base", action="store_true", help="also evaluate the base model without the adapter")
    ev.set_defaults(func=cmd_eval)

    srv = sub.add_parser("serve", help="serve the base model and adapters over an OpenAI-compatible HTTP API",
                         description="An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models). "
                                     "A request's model picks the base model (--model) or an adapter by name.")
    srv.add_argument("--model", help="base model (default: the first adapter's base model)")
    srv.add_argument("--adapter", action="append", metavar="[NAME=]PATH",
                     help="adapter folder to serve, named NAME or after its folder; repeat for several")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $LOREFT_API_KEY, "
                                                     "else no key)")
    srv.add_argument("--dtype", default="auto", choices=PARAMS_BY_NAME["dtype"].enum, help="base model dtype")
    srv.add_argument("--dequantize", default="auto", choices=PARAMS_BY_NAME["dequantize"].enum,
                     help=_flag_help(PARAMS_BY_NAME["dequantize"]))
    srv.add_argument("--max-batch", type=int, default=32, help="requests generated together (default: 32)")
    srv.add_argument("--max-tokens", type=int, default=512, help="completion budget when a request sets none")
    srv.add_argument("--temp", type=float, default=0.0, help="temperature when a request sets none (default: 0, greedy)")
    srv.add_argument("--context-length", type=int, default=None,
                     help="longest prompt + completion (default: the model config's max_position_embeddings)")
    srv.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="teach SmolLM2 to answer in emoji; base vs adapter answers to new prompts")
    demo.add_argument("--tiny", action="store_true", help="the embedded tiny random model instead (no package needed)")
    demo.add_argument("--out", default=None, help="adapter folder (default: runs/demo)")
    demo.add_argument("--cache-dir", default=None, help="where the demo model is cached (default: $LOREFT_CACHE "
                                                        "or ~/.cache/mlx-loreft)")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's setting)")
    demo.set_defaults(func=cmd_demo)

    conv = sub.add_parser("convert", help="write an mlx-lm model folder for a GGUF file (llama family)",
                          description="Convert a GGUF file (llama architecture; F32, F16, Q8_0, Q4_0 or Q4_1 "
                                      "tensors) into an mlx-lm model folder, keeping its quantization.")
    conv.add_argument("gguf", help="the .gguf file")
    conv.add_argument("out_dir", help="the model folder to write")
    conv.set_defaults(func=cmd_convert)
    for command in sub.choices.values():  # every command, including ones added above this line
        command.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def error_line(e: BaseException) -> tuple[str, int]:
    """(one-line message, exit code) for an error that ended a command: 2 for bad input, 1 for a fault."""
    from .adapter import AdapterError
    from .trainer import NonFiniteLossError

    text = " ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    if isinstance(e, (ConfigError, DataError, AdapterError, FileNotFoundError, NotADirectoryError, IsADirectoryError)):
        return text, 2
    if isinstance(e, NonFiniteLossError):
        return text, 1
    if isinstance(e, PermissionError):
        return f"{text} (check the folder's permissions)", 2
    if isinstance(e, OSError):
        return f"{type(e).__name__}: {text}", 1
    return f"{type(e).__name__}: {text} (run again with --debug to see where)", 1


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit code (2: bad input, 1: training or another failure)."""
    from .backend import setup

    setup()  # before anything imports mlx.core
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" advisory: MLX needs none
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        message, code = error_line(e)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
