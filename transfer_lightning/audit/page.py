"""``audit.html``: the findings to look at rather than read: leaks across splits first (the pair side by side), then
other duplicates, the likely wrong labels with their given and suggested label, and the outliers. One file, every
thumbnail embedded as a ``data:`` URI, nothing loaded from anywhere."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable

import torch
from torch import Tensor

from transfer_lightning.audit.findings import Findings
from transfer_lightning.interpretation.pictures import png_bytes

#: Findings shown per section (all of them are in the CSV files).
SHOWN = 60
#: Thumbnail side in CSS pixels (the images are embedded at their stored size).
THUMBNAIL = 96

STYLE = f"""
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }}
h1 {{ border-bottom: 2px solid #444; }} h2 {{ margin-top: 2em; border-bottom: 1px solid #aaa; }}
.cards {{ display: flex; flex-wrap: wrap; gap: 0.8em; }}
.card {{ border: 1px solid #ddd; border-radius: 6px; padding: 0.4em; font-size: 0.8em; width: {2 * THUMBNAIL + 16}px; }}
.card.single {{ width: {THUMBNAIL + 90}px; }}
.card img {{ width: {THUMBNAIL}px; height: {THUMBNAIL}px; image-rendering: pixelated; object-fit: contain; }}
.card .name {{ word-break: break-all; color: #555; }} .leak {{ border-color: #c33; }} .leak b {{ color: #c33; }}
pre {{ background: #f6f6f6; padding: 0.8em; }}
"""


def thumbnail(image: Tensor) -> str:
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")
    return f'<img src="{uri}" alt="">'


def page(findings: Findings, pixels: Callable[[list[int]], Tensor]) -> str:
    """The page; ``pixels`` gives the uint8 (N, 3, H, W) images of audited positions."""
    images = findings.images
    names, splits = images.names, images.splits

    def caption(index: int) -> str:
        return f'<div class="name">{html.escape(names[index])} ({splits[index]})</div>'

    sections = []
    pairs = findings.ranked_duplicates()
    leaks = [pair for pair in pairs if findings.is_leak(pair)]
    within = [pair for pair in pairs if not findings.is_leak(pair)]
    for title, chosen in (("Leaks: the same image in two splits", leaks), ("Duplicates within a split", within)):
        shown = pixels([index for pair in chosen[:SHOWN] for index in (pair.a, pair.b)])
        cards = [
            f'<div class="card{" leak" if title.startswith("Leaks") else ""}">{thumbnail(shown[2 * n])}'
            f"{thumbnail(shown[2 * n + 1])}<div><b>{pair.kind}</b>, similarity {pair.similarity:.3f} (features), "
            f"{pair.pixel_similarity:.3f} (pixels)</div>{caption(pair.a)}{caption(pair.b)}</div>"
            for n, pair in enumerate(chosen[:SHOWN])
        ]
        sections.append(section(title, cards, len(chosen)))
    flagged = [int(i) for i in torch.argsort(torch.as_tensor(findings.labels.quality)) if findings.labels.is_issue[i]]
    shown = pixels(flagged[:SHOWN])
    cards = [
        f'<div class="card single">{thumbnail(image)}<div>given <b>{html.escape(images.given(i))}</b>, likely '
        f"<b>{html.escape(images.label_text(findings.labels.suggested[i]))}</b> "
        f"(quality {findings.labels.quality[i]:.3f})</div>{caption(i)}</div>"
        for i, image in zip(flagged, shown, strict=False)
    ]
    sections.append(section("Likely wrong labels", cards, len(flagged)))
    far = torch.argsort(findings.outlier_scores, descending=True)
    outliers = [int(i) for i in far if findings.outliers[i]]
    shown = pixels(outliers[:SHOWN])
    cards = [
        f'<div class="card single">{thumbnail(image)}<div>score {float(findings.outlier_scores[i]):.3f}, '
        f"labelled {html.escape(images.given(i))}</div>{caption(i)}</div>"
        for i, image in zip(outliers, shown, strict=False)
    ]
    sections.append(section("Outliers: far from every other image", cards, len(outliers)))
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Data audit</title><style>{STYLE}</style>'
        f"</head><body><h1>Data audit: {len(names)} images</h1><pre>{html.escape(findings.summary())}</pre>"
        + "".join(sections)
        + "</body></html>\n"
    )


def section(title: str, cards: list[str], total: int) -> str:
    more = f" (the first {len(cards)}; all in the CSV file)" if total > len(cards) else ""
    body = f'<div class="cards">{"".join(cards)}</div>' if cards else "<p>None found.</p>"
    return f"<h2>{html.escape(title)}: {total}{more}</h2>{body}"
