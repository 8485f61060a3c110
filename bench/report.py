"""Tables and ratios from a bench record (see bench/__main__.py)."""

from __future__ import annotations

OURS = "LoReFT (ours)"
LORA = "mlx-lm LoRA"
PYREFT = "pyreft LoReFT"
SETTING_KEYS = ("shape", "batch", "seq", "dtype", "data")


def _key(setting: dict) -> tuple:
    return tuple(setting.get(k, "all") for k in SETTING_KEYS)


def _pyreft_row(record: dict, setting: dict) -> dict | None:
    """pyreft's row for this setting; one measured by an earlier process is marked in its note."""
    for r in record.get("pyreft", []):
        if "row" in r and _key(r["setting"]) == _key(setting):
            return r["row"] if "merged_from" not in r else {**r["row"], "note": r["row"]["note"] + ", earlier process"}
    return None


def device_peak(record: dict, dtype: str) -> float:
    """The device's matmul peak: the best any library reached on it in this run (MLX workers, torch)."""
    peaks = [w["matmul_peak_flops"] for w in record.get("workers", []) if w["matmul_peak"]["dtype"] == dtype]
    peaks += [r["matmul_peak_flops"] for r in record.get("pyreft", []) if "matmul_peak_flops" in r and r["setting"]["dtype"] == dtype]
    return max(peaks, default=0.0)


def sections(record: dict):
    """(title, setting, rows, decode, device peak FLOP/s) per worker comparison; pyreft's row joins its setting."""
    for w in record.get("workers", []):
        for comp in w["comparisons"]:
            s = comp["setting"]
            rows = list(comp["rows"])
            peak = device_peak(record, w["matmul_peak"]["dtype"])
            py = _pyreft_row(record, s)
            if py is not None and w["label"] != "mlx cpu, bundled BLAS":
                rows.append(py)
            title = (f"{w['label']} | {s['shape']} {s['dtype']} batch {s['batch']} x {s['seq']} | "
                     f"loss on {'every token' if s.get('data', 'all') == 'all' else 'the last quarter'}, "
                     f"{s.get('positions', 'f7+l7')} rank {s.get('rank', 8)} | matmul peak: this MLX "
                     f"{w['matmul_peak_flops'] / 1e12:.3f}, device {peak / 1e12:.3f} TFLOP/s")
            yield title, s, rows, comp.get("decode"), peak


def ratios(record: dict) -> list[dict]:
    """ours / LoRA and ours / pyreft (tokens/s and peak memory) for every comparison that has them."""
    out = []
    for title, s, rows, _, _ in sections(record):
        by = {r["method"]: r for r in rows}
        ours = by.get(OURS)
        if ours is None:
            continue
        item = {"section": title}
        for other, tag in ((LORA, "lora"), (PYREFT, "pyreft")):
            if other in by:
                item[f"tokens_per_s_ours_over_{tag}"] = ours["tokens_per_s"] / by[other]["tokens_per_s"]
                item[f"peak_memory_ours_over_{tag}"] = ours["peak_memory_gb"] / max(by[other]["peak_memory_gb"], 1e-12)
        out.append(item)
    return out


def _fmt_rows(rows: list[dict], peak: float) -> list[list[str]]:
    lora = next((r for r in rows if r["method"] == LORA), None)
    table = []
    for r in rows:
        util = r["tokens_per_s"] * r["model_flops_per_token"] / peak if peak else 0.0
        vs = f"{r['tokens_per_s'] / lora['tokens_per_s']:.2f}x" if lora else "-"
        table.append([
            r["method"], f"{r['tokens_per_s']:,.0f}", f"{r['step_s'] * 1e3:,.1f}", f"{r['peak_memory_gb']:.3f}",
            f"{r['trainable_params']:,}", f"{r['model_flops_per_token'] / 1e9:.3f}", f"{100 * util:.1f}%", vs,
        ])
    return table


HEADER = ["method", "tokens/s", "step ms", "peak GB", "trainable", "GFLOP/token", "util", "vs LoRA"]


def print_tables(record: dict) -> None:
    for title, _, rows, decode, peak in sections(record):
        table = [HEADER] + _fmt_rows(rows, peak)
        widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
        print(f"\n{title}")
        for row in table:
            print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if decode:
            print(f"  decode (prompt {decode['prompt_tokens']}, {decode['new_tokens']} new): base "
                  f"{decode['base_tokens_per_s']:.1f} tok/s, adapter {decode['adapter_tokens_per_s']:.1f} tok/s "
                  f"({100 * (decode['adapter_over_base'] - 1):+.1f}%)")
    for item in record.get("ratios", []):
        parts = [f"{k.replace('_', ' ')} {v:.2f}" for k, v in item.items() if k != "section"]
        print(f"ratios [{item['section'].split(' | ')[0]} {item['section'].split(' | ')[1]}]: " + ", ".join(parts))


def markdown_tables(record: dict) -> str:
    """The tables as markdown, headed by the command, machine, backend and date (for BENCHMARKS.md)."""
    m = record["machine"]
    lines = [f"Command: `{record['command']}` | date {record['date']} | machine: {m.get('gpu') or m['processor']}, "
             f"{m['cpus']} CPUs, {m['platform']}", ""]
    for title, _, rows, decode, peak in sections(record):
        lines += [f"**{title}**", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        lines += ["| " + " | ".join(r) + " |" for r in _fmt_rows(rows, peak)]
        if decode:
            lines.append(f"\nDecode (prompt {decode['prompt_tokens']}, {decode['new_tokens']} new tokens, greedy): base "
                         f"{decode['base_tokens_per_s']:.1f} tok/s, with adapter {decode['adapter_tokens_per_s']:.1f} tok/s "
                         f"({100 * (decode['adapter_over_base'] - 1):+.1f}%).")
        lines.append("")
    return "\n".join(lines)
