"""The evaluation report: a metric | base | tuned | change table with examples, in the terminal,
as eval.json and eval.md, in the run's manifest, and a PNG of the loss curves beside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# Metrics where lower is better (their change is shown as an improvement when negative).
LOWER_IS_BETTER = {"loss", "perplexity", "logp_non_preferred", "grader_failed"}
ORDER = ["loss", "perplexity", "exact_match", "accuracy", "rouge1", "rouge2", "rougeL", "chrf", "bleu",
         "preference_rate", "logp_margin", "logp_preferred", "logp_non_preferred", "grader_score"]


def metric_rows(report: dict[str, Any]) -> list[tuple[str, list[float | None], float | None]]:
    """(metric, value per column, change from the first column to the last) in a fixed order."""
    cols = report["columns"]
    names = [m for m in ORDER if any(m in report["metrics"][c] for c in cols)]
    # An RFT report's named graders (grader_<name>), then the share the grader failed on.
    names += sorted({m for c in cols for m in report["metrics"][c]} - set(ORDER) - {"grader_failed"})
    names += ["grader_failed"] if any("grader_failed" in report["metrics"][c] for c in cols) else []
    rows = []
    for name in names:
        values = [report["metrics"][c].get(name) for c in cols]
        change = values[-1] - values[0] if len(values) > 1 and None not in values else None
        rows.append((name, values, change))
    return rows


def render(report: dict[str, Any], console: Console) -> None:
    cols = report["columns"]
    table = Table(title=f"evaluation on {report.get('test_data', 'test data')} ({report['rows']} rows)")
    table.add_column("metric")
    for c in cols:
        table.add_column(c, justify="right")
    if len(cols) > 1:
        table.add_column("change", justify="right")
    for name, values, change in metric_rows(report):
        cells = [_fmt(v) for v in values]
        if len(cols) > 1:
            better = change is not None and ((change < 0) if name in LOWER_IS_BETTER else (change > 0))
            colour = "green" if better else "red"
            cells.append(f"[{colour}]{change:+.4f}[/]" if change is not None else "-")
        table.add_row(name, *cells)
    console.print(table)
    line = forgetting_line(report)
    if line:
        console.print(line)
    if report["examples"]:
        ex = Table(title="examples", show_lines=True)
        pairs = report.get("format") == "preference"  # the reference is the preferred answer
        texts = ["prompt", "preferred", "non-preferred"] if pairs else ["prompt", "reference"]
        for c in [*texts, *cols]:
            ex.add_column(c, overflow="fold", max_width=60 if c == "prompt" else 40)
        for e in report["examples"]:
            cells = [_tail(e["prompt"]), e["reference"]] + ([e.get("non_preferred", "")] if pairs else [])
            ex.add_row(*cells, *[e.get(c, "") for c in cols])
        console.print(ex)


def to_markdown(report: dict[str, Any]) -> str:
    cols = report["columns"]
    head = ["metric", *cols] + (["change"] if len(cols) > 1 else [])
    lines = [f"# Evaluation on {report.get('test_data', 'test data')}", "",
             f"{report['rows']} rows, {report['format']}; settings: {json.dumps(report['settings'])}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, values, change in metric_rows(report):
        cells = [_fmt(v) for v in values] + ([f"{change:+.4f}" if change is not None else "-"] if len(cols) > 1 else [])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report.get("forgetting"):
        f = report["forgetting"]
        names = list(f["metrics"])
        lines += ["", "## What tuning cost", "",
                  f"On {f['general_texts']} paragraphs of general text and the base's own answers to "
                  f"{f['instructions']} general instructions (tunery.eval.forgetting).", "",
                  "| figure | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for key in ("general_text_loss", "base_answer_loss", "answer_agreement"):
            lines.append(f"| {key} | " + " | ".join(_fmt(f["metrics"][n].get(key)) for n in names) + " |")
    if report["examples"]:
        lines += ["", "## Examples", ""]
        for i, e in enumerate(report["examples"], 1):
            if "non_preferred" in e:
                lines += [f"### {i}", "", "```", e["prompt"], "```", "", f"- preferred: `{e['reference']}`",
                          f"- non-preferred: `{e['non_preferred']}`"]
            else:
                lines += [f"### {i}", "", "```", e["prompt"], "```", "", f"- reference: `{e['reference']}`"]
            lines += [f"- {c}: `{e.get(c, '')}`" for c in cols]
            lines.append("")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], run) -> None:
    """eval.json + eval.md in `run` (an artifacts.Run, or a folder); when it is a trained run,
    also the manifest's "eval" and loss.png (training and validation loss over steps)."""
    from tunery.artifacts.run import EVAL_JSON, EVAL_MD, LOSS_PLOT, MANIFEST, Run

    if not isinstance(run, Run):
        run = Run(run)
    run.write_bytes(EVAL_JSON, json.dumps(report, indent=2).encode())
    run.write_bytes(EVAL_MD, to_markdown(report).encode())
    if run.exists(MANIFEST):
        manifest = run.read_manifest()
        manifest["eval"] = summary(report)
        run.write_manifest(manifest)
        plot = plot_losses(manifest.get("metrics", {}).get("history", []), run.work / LOSS_PLOT)
        if plot is not None:
            run.push(LOSS_PLOT)


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the manifest (and the service's training.metrics) keep of a report: metrics per column
    (and the forgetting figures per column, where measured)."""
    out = {"test_data": report.get("test_data"), "rows": report["rows"], "metrics": report["metrics"]}
    if report.get("forgetting"):
        out["forgetting"] = report["forgetting"]["metrics"]
    return out


def forgetting_line(report: dict[str, Any]) -> str | None:
    """The report's "what tuning cost: ..." line, where the forgetting measure ran."""
    from tunery.eval.forgetting import summary_line

    return summary_line(report["forgetting"]) if report.get("forgetting") else None


def plot_losses(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss (and validation loss, where measured) against the step, as a PNG."""
    steps = [(h["step"], h["loss"]) for h in history if h.get("loss") is not None]
    vals = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*steps, strict=True), label="train loss", linewidth=1.2)
    if vals:
        ax.plot(*zip(*vals, strict=True), "o-", label="validation loss", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if min(v for _, v in steps + vals) > 0:  # a GRPO loss hovers around 0, on either side
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _tail(prompt: str, limit: int = 300) -> str:
    return prompt if len(prompt) <= limit else "…" + prompt[-limit:]
