"""Write the files TransformerLab and readers see from the one parameter table (loreft/job.py PARAMETERS).

    python tools/make_plugin_files.py           rewrite index.json, task.yaml, info.md and README.md's parameter section
    python tools/make_plugin_files.py --check   exit 1 if any of them is out of date (tests run this)
    python tools/make_plugin_files.py --task-folder DIR   the folder to upload as a TransformerLab task
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from loreft import __version__
from loreft.config import PRESETS
from loreft.job import APP_OVERRIDES, PARAMETERS, TASK_OVERRIDES, TITLES
from loreft.transformerlab import EXTRA_FIELDS, FORM_PARAMETERS, MODEL_ARCHITECTURES

JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}
TEXTAREAS = ("prompt_template", "completion_template")

DESCRIPTION = ("Representation finetuning (LoReFT and the ReFT family, Wu et al. 2024) with Apple MLX: learns "
               "low-rank edits of hidden states at a few prompt positions, training 10-50x fewer parameters than "
               "LoRA. Runs on Apple silicon, NVIDIA GPUs (mlx[cuda]) and CPUs.")
TRAINING_DATA_INSTRUCTIONS = (
    "Each row needs a prompt and a completion: columns instruction/output (Alpaca; input is optional), "
    "prompt/completion, or a chat column of messages whose last assistant turn is the completion. With a "
    "formatting template, end it with the completion column (e.g. '{{instruction}}\\n### Response:\\n{{output}}'): "
    "interventions edit the prompt's tokens only, so the completion must be the template's last field.")
# A task runs with these unless the launcher changes them: a small real model and dataset from the Hub.
TASK_APP_DEFAULTS = {"model_name": "mlx-community/Qwen2.5-0.5B-Instruct-4bit", "dataset": "tatsu-lab/alpaca"}
# The task's sweep example; the metric is one of the score's keys (the metric names main.py reports).
TASK_SWEEPS = {"sweep_config": {"learning_rate": [0.002, 0.004], "rank": [4, 8]}, "sweep_metric": "eval/loss",
               "lower_is_better": True}
# The task's launch form in the app's schema style (api schemas: type, default, min, max, options, ui_widget).
TASK_TYPES = {str: "string", int: "int", float: "float", bool: "bool"}
TASK_WIDGETS = {"model_name": ("Base Model", "lab_model_select"), "dataset": ("Dataset", "lab_dataset_select")}
# The task's files: everything the plugin lists but its index.json, which the app's upload would copy over
# the task's own metadata file (<task>/index.json).
TASK_FOLDER_FILES = ("task.yaml",)
README = ROOT / "README.md"
BEGIN = "<!-- BEGIN GENERATED: parameters (tools/make_plugin_files.py) -->"
END = "<!-- END GENERATED: parameters -->"


def title(name: str) -> str:
    return TITLES.get(name, name.replace("_", " ").title())


def app_default(p, overrides: dict):
    return overrides.get(p.name, p.default)


def field_schema(p) -> dict:
    """One JSON-schema property of the Train tab's form."""
    schema = {"title": title(p.name), "type": JSON_TYPES[p.type], "default": app_default(p, APP_OVERRIDES)}
    for key in ("minimum", "maximum"):
        if getattr(p, key) is not None:
            schema[key] = p.type(getattr(p, key))
    if p.enum is not None:
        schema["enum"] = list(p.enum)
    return schema


def plugin_index() -> dict:
    """index.json of the plugin."""
    parameters = {p.name: field_schema(p) for p in FORM_PARAMETERS}
    ui = {p.name: {"ui:help": p.help, **({"ui:widget": "textarea"} if p.name in TEXTAREAS else {})} for p in FORM_PARAMETERS}
    for name, spec in EXTRA_FIELDS.items():
        parameters[name] = {k: v for k, v in spec.items() if not k.startswith("ui:")}
        ui[name] = {k: v for k, v in spec.items() if k.startswith("ui:")}
    files = ["main.py", "setup.sh", "info.md", "pyproject.toml", "README.md"]
    files += sorted(str(f.relative_to(ROOT)) for f in (ROOT / "loreft").glob("*.py"))
    return {
        "name": "Apple MLX LoReFT Trainer",
        "uniqueId": "mlx_loreft_trainer",
        "description": DESCRIPTION,
        "plugin-format": "python",
        "type": "trainer",
        "version": __version__,
        "model_architectures": list(MODEL_ARCHITECTURES) + ["MLX"],
        "supported_hardware_architectures": ["mlx", "cuda", "cpu"],
        "supports": ["chat_template_formatting", "checkpoints", "sweeps"],
        "files": files,
        "setup-script": "setup.sh",
        "training_data_instructions": TRAINING_DATA_INSTRUCTIONS,
        "parameters": parameters,
        "parameters_ui": ui,
    }


def task_schema(p) -> dict:
    """One task parameter as the app's launch form reads it: an enum is a dropdown, a number has its bounds."""
    schema = {"title": title(p.name), "type": "enum" if p.enum is not None else TASK_TYPES[p.type],
              "default": app_default(p, TASK_OVERRIDES)}
    if p.enum is not None:
        schema["options"] = list(p.enum)
    for key, bound in (("min", p.minimum), ("max", p.maximum)):
        if bound is not None:
            schema[key] = p.type(bound)
    return schema


def task_parameters() -> dict:
    """task.yaml's parameters: the app's fields (with its model and dataset pickers), then the form's."""
    params = {name: {"title": TASK_WIDGETS[name][0], "type": "string", "default": default,
                     "ui_widget": TASK_WIDGETS[name][1]} for name, default in TASK_APP_DEFAULTS.items()}
    params.update({name: {"title": spec["title"], "type": TASK_TYPES[{"string": str, "boolean": bool}[spec["type"]]],
                          "default": spec["default"]} for name, spec in EXTRA_FIELDS.items()})
    params.update({p.name: task_schema(p) for p in FORM_PARAMETERS})
    return params


def task_yaml() -> str:
    """task.yaml of the task (TransformerLab from v0.31)."""
    spec = {
        "name": "mlx-loreft-train",
        "envs": {"PYTHONUNBUFFERED": "1"},
        "setup": "bash setup.sh --task",
        # exec: the app's Stop SIGTERMs every process of the job; a shell left waiting (dash) dies of it
        # with 143, which the app records as a crash (FAILED) even though training saved and stopped cleanly
        "run": "exec python main.py",
        "parameters": task_parameters(),
        "sweeps": TASK_SWEEPS,
    }
    header = ("# LoReFT training as a TransformerLab task: point the app's github_repo_url at this repository, or upload\n"
              "# the folder `python tools/make_plugin_files.py --task-folder DIR` writes (not the repository itself:\n"
              "# its index.json, the plugin's, would replace the task's own index.json in the app).\n"
              "# Generated by tools/make_plugin_files.py from loreft/job.py PARAMETERS; do not edit by hand.\n")
    return header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, width=1000)


def _cell(value) -> str:
    text = "''" if value == "" else "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return text.replace("|", "\\|").replace("\n", "\\n")


def readme_table() -> str:
    """The configuration reference: one row per parameter, as flag, YAML key and TransformerLab field."""
    rows = ["| parameter (`--flag`) | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for p in PARAMETERS:
        allowed = ", ".join(f"`{_cell(v)}`" for v in p.enum) if p.enum is not None else ""
        if p.minimum is not None or p.maximum is not None:
            lo = "" if p.minimum is None else f"{p.type(p.minimum)} ≤ "
            hi = "" if p.maximum is None else f" ≤ {p.type(p.maximum)}"
            allowed = f"{lo}x{hi}"
        rows.append(f"| `{p.name}` (`--{p.name.replace('_', '-')}`) | {p.type.__name__} | `{_cell(p.default)}` | "
                    f"{allowed} | {_cell(p.help)} |")
    presets = ["", "Presets (`--preset`; explicit parameters override them):", ""]
    for name, groups in PRESETS.items():
        values = ", ".join(f"`{k}={_cell(v)}`" for g in ("reft", "train") for k, v in groups.get(g, {}).items())
        presets.append(f"- `{name}`: {values}")
    return "\n".join(rows + presets)


def readme_with_table(text: str) -> str:
    """README text with the generated section between the markers replaced."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {BEGIN!r} ... {END!r}")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{readme_table()}\n{END}{tail}"


def info_md() -> str:
    """info.md: what the app shows on the plugin's page."""
    families = sorted({arch.removesuffix("ForCausalLM").removesuffix("ForConditionalGeneration")
                       for arch in MODEL_ARCHITECTURES})
    presets = ", ".join(f"`{name}`" for name in PRESETS)
    return f"""<!-- Generated by tools/make_plugin_files.py; do not edit by hand. -->
# Apple MLX LoReFT Trainer

Representation finetuning (LoReFT and the ReFT family, Wu et al., NeurIPS 2024) with Apple MLX.
Instead of updating weights, ReFT learns a low-rank edit of the hidden states at a few prompt positions
(`h + Rᵀ(Wh + b − Rh)`), which trains one to two orders of magnitude fewer parameters than LoRA. The
paper reports LoReFT matching or beating LoRA on commonsense reasoning and instruction following.

### Before you train
- Runs on Apple silicon (Metal), NVIDIA GPUs (`mlx[cuda]`) and CPUs; the setup script picks the right MLX.
- Models: mlx-lm checkpoints of these architectures: {", ".join(families)} (full precision or quantized).
- Data: {TRAINING_DATA_INSTRUCTIONS}
- Start from a preset: {presets}.

### While it trains
Loss, learning rate, tokens/s, validation loss and perplexity, the time left and the number of trainable
parameters are reported from inside the training loop, with one line per report in the job's output.
Checkpoints are written every {APP_OVERRIDES["save_every"]} steps by default. Stop saves the adapter of the
last finished step and ends the job as stopped.

### After training
The adapter (a `reft_config.json` and `adapter.safetensors`, with `loss.png` and `metrics.jsonl`) is saved
in the adaptor folder. TransformerLab's MLX server loads LoRA adapters only; generate with
`venv/bin/loreft generate --adapter <folder> --prompt "..."` in the plugin's folder.
"""


def outputs() -> dict[Path, str]:
    """Every generated file and its expected content."""
    return {
        ROOT / "index.json": json.dumps(plugin_index(), indent=2, ensure_ascii=False) + "\n",
        ROOT / "task.yaml": task_yaml(),
        ROOT / "info.md": info_md(),
        README: readme_with_table(README.read_text()),
    }


def task_folder_files() -> list[str]:
    """The files of the task's upload folder: the plugin's files and task.yaml, never index.json."""
    return plugin_index()["files"] + list(TASK_FOLDER_FILES)


def write_task_folder(dest: Path) -> Path:
    """Copy the task's files into dest (a new or empty folder) for uploading it as a task."""
    import shutil

    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"--task-folder: {dest} is not empty; give a new or empty folder")
    for name in task_folder_files():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    return dest


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale files instead of writing them")
    parser.add_argument("--task-folder", metavar="DIR", help="write the folder to upload as a TransformerLab task "
                        "(the task's files without the plugin's index.json) to DIR, and nothing else")
    args = parser.parse_args(argv)
    if args.task_folder:
        print(f"wrote the task folder {write_task_folder(Path(args.task_folder))}: upload this folder as a task")
        return 0
    stale = [path for path, text in outputs().items() if not path.is_file() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"out of date: {path.relative_to(ROOT)} (run python tools/make_plugin_files.py)")
        return 1 if stale else 0
    for path, text in outputs().items():
        path.write_text(text)
    print("wrote " + ", ".join(str(p.relative_to(ROOT)) for p in outputs()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
