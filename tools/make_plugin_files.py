"""Write the files TransformerLab and readers see from the one parameter table (loreft/job.py PARAMETERS).

    python tools/make_plugin_files.py           rewrite index.json, task.yaml and README.md's parameter section
    python tools/make_plugin_files.py --check   exit 1 if any of them is out of date (tests run this)
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
from loreft.job import PARAMETERS
from loreft.transformerlab import EXTRA_FIELDS, FORM_PARAMETERS, MODEL_ARCHITECTURES

JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean"}
TITLES = {  # where name.title() reads badly
    "lr_schedule": "Learning Rate Schedule", "act_fn": "Activation Function", "dtype": "Base Model Dtype",
    "max_seq_length": "Max Sequence Length", "iters": "Iterations (0: use epochs)", "grad_clip": "Gradient Clipping",
    "grad_accumulation_steps": "Gradient Accumulation Steps", "max_eval_batches": "Max Validation Batches",
    "steps_per_eval": "Steps per Validation", "steps_per_report": "Steps per Report", "save_every": "Checkpoint Every N Steps",
    "share_weights": "Tie First/Last Interventions", "valid_fraction": "Validation Fraction",
    "resume": "Resume From Checkpoint", "preset": "Paper Preset", "dequantize": "Unpack a Quantized Base",
}
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
TASK_OVERRIDES = {"iters": 300, "steps_per_eval": 100, "max_eval_batches": 8}  # a first run of minutes, not hours
README = ROOT / "README.md"
BEGIN = "<!-- BEGIN GENERATED: parameters (tools/make_plugin_files.py) -->"
END = "<!-- END GENERATED: parameters -->"


def title(name: str) -> str:
    return TITLES.get(name, name.replace("_", " ").title())


def field_schema(p) -> dict:
    """One JSON-schema property of the Train tab's form."""
    schema = {"title": title(p.name), "type": JSON_TYPES[p.type], "default": p.default}
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


def task_parameters() -> dict:
    """task.yaml's parameters: the app's fields, then the form's, with their defaults."""
    params = dict(TASK_APP_DEFAULTS)
    params.update({name: spec["default"] for name, spec in EXTRA_FIELDS.items()})
    params.update({p.name: TASK_OVERRIDES.get(p.name, p.default) for p in FORM_PARAMETERS})
    return params


def task_yaml() -> str:
    """task.yaml of the task (TransformerLab from v0.31)."""
    spec = {
        "name": "mlx-loreft-train",
        "envs": {"PYTHONUNBUFFERED": "1", "HF_TOKEN": "{{secret._HF_TOKEN}}"},
        "setup": "bash setup.sh --task",
        "run": "python main.py",
        "parameters": task_parameters(),
    }
    header = ("# LoReFT training as a TransformerLab task: upload this folder (or point github_repo_url at it).\n"
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


def outputs() -> dict[Path, str]:
    """Every generated file and its expected content."""
    return {
        ROOT / "index.json": json.dumps(plugin_index(), indent=2, ensure_ascii=False) + "\n",
        ROOT / "task.yaml": task_yaml(),
        README: readme_with_table(README.read_text()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale files instead of writing them")
    args = parser.parse_args(argv)
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
