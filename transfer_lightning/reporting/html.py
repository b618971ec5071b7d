"""``report RUN_DIR ... --html FILE``: one self-contained HTML page of finished runs, to read offline or send.

Every picture is embedded as a ``data:`` URI and the style is inline, so the file loads nothing from
anywhere: it opens the same from a disk, a mail attachment or a chat. For several runs the comparison
table and their curves come first; then, per run, its settings, curves, classification report, confusion
matrix, top losses with their activation maps, the most confused pairs and the first training batch.
"""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import matplotlib.pyplot as plt

from transfer_lightning.reporting.runs import Run, duration, markdown_table, plot_runs

#: (heading, file in the run folder, TensorBoard image tag), in page order; the file wins when both exist.
PICTURES = [
    ("Confusion matrix", None, "test/confusion_matrix"),
    ("Reliability: accuracy against confidence, before and after the temperature", None, "test/reliability_diagram"),
    ("Top losses: true / predicted / probability", "top_losses.png", "test/top_losses"),
    ("Where it looked: the maps of the predicted and of the true class", "top_losses_cam.png", "test/top_losses_cam"),
    ("Most confused classes", "most_confused.png", "test/most_confused"),
    ("The first training batch, as the network saw it", "train_batch.png", "train/batch"),
]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #aaa; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; } th { background: #eee; }
td.number { text-align: right; } img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.missing { color: #777; font-style: italic; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def picture(png: bytes, alt: str) -> str:
    return f'<img src="{data_uri(png)}" alt="{html.escape(alt)}">'


def figure_png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=80)
    plt.close(figure)
    return buffer.getvalue()


def _inline(text: str) -> str:
    """Escape text and turn markdown's **bold** and `code` into HTML."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def markdown_to_html(markdown: str) -> str:
    """The markdown this project writes (headings, pipe tables, paragraphs) as HTML; a heading's level goes
    down by ``2`` so that a report's ``#`` sits under the run's ``<h2>``."""
    out, table = [], []

    def flush_table() -> None:
        if not table:
            return
        header, *rows = [[cell.strip() for cell in row.strip().strip("|").split("|")] for row in table]
        rows = [row for row in rows if not all(set(cell) <= set("-: ") for cell in row)]
        out.append("<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in header) + "</tr>")
        for row in rows:
            cells = [(" class='number'" if re.fullmatch(r"[\d.,%—-]+", c) else "", c) for c in row]
            out.append("<tr>" + "".join(f"<td{cls}>{_inline(c)}</td>" for cls, c in cells) + "</tr>")
        out.append("</table>")
        table.clear()

    for line in markdown.splitlines():
        if line.lstrip().startswith("|"):
            table.append(line)
            continue
        flush_table()
        heading = re.match(r"(#+)\s+(.*)", line)
        if heading:
            level = min(len(heading.group(1)) + 2, 6)
            out.append(f"<h{level}>{_inline(heading.group(2))}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush_table()
    return "\n".join(out)


def run_section(run: Run, folder: Path) -> str:
    """One run: settings, curves, report and pictures; a missing part says why it is missing."""
    parts = [f"<h2>{html.escape(run.name)}</h2>"]
    summary = {
        "backbone": run.hparams.get("backbone", "?"),
        "mode": run.mode,
        "optimizer": run.optimizer,
        "learning rate": run.hparams.get("lr", "?"),
        "epochs": run.epochs,
        "image size": run.hparams.get("image_size", "?"),
        "batch size": run.hparams.get("batch_size", "?"),
        "wall time": duration(run.wall_seconds),
    }
    parts.append("<h3>Settings</h3>" + _table(summary))
    if run.hparams:
        parts.append(
            f"<details><summary>every hyperparameter</summary>{_table(dict(sorted(run.hparams.items())))}</details>"
        )
    config = folder / "config.yaml"
    if config.is_file():
        parts.append(f"<details><summary>config.yaml</summary><pre>{html.escape(config.read_text())}</pre></details>")
    parts.append("<h3>Curves</h3>")
    parts.append(
        picture(figure_png(plot_runs([run])), "loss and accuracy per epoch")
        if run.epochs
        else _missing("no finished epoch")
    )
    report = folder / "classification_report.md"  # its own "# ..." heading becomes an <h3>
    parts.append(
        markdown_to_html(report.read_text())
        if report.is_file()
        else "<h3>Classification report</h3>" + _missing("not tested")
    )
    for heading, file_name, tag in PICTURES:
        parts.append(f"<h3>{html.escape(heading)}</h3>")
        path = folder / file_name if file_name else None
        png = path.read_bytes() if path is not None and path.is_file() else run.images.get(tag)
        parts.append(picture(png, heading) if png else _missing("not in this run (written by test and fit)"))
    return "\n".join(parts)


def _table(values: dict[str, object]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in values.items())
    return f"<table>{rows}</table>"


def _missing(why: str) -> str:
    return f'<p class="missing">{html.escape(why)}</p>'


def write_html(runs: list[Run], folders: list[Path]) -> str:
    """The whole page for ``runs`` (read from ``folders``), comparison first when there are several."""
    body = [f"<h1>transfer_lightning report: {len(runs)} run{'s' if len(runs) > 1 else ''}</h1>"]
    if len(runs) > 1:
        body += ["<h2>Comparison</h2>", markdown_to_html(markdown_table(runs))]
        body.append(picture(figure_png(plot_runs(runs)), "curves of all runs"))
    body += [run_section(run, folder) for run, folder in zip(runs, folders, strict=True)]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>transfer_lightning report</title><style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
