"""``fsad report RUN_DIR|SWEEP_DIR``: one self-contained ``report.html`` to review a run or a sweep in a browser.

Everything is inside the file: images as base64 ``data:`` URIs, plots as inline SVG, style and the gallery filter
as inline CSS and JavaScript, and a Content-Security-Policy that forbids every fetch, so the file opens the same
offline, from an e-mail or from an archive. Links lead only to sibling reports of a sweep's cells.

* A **run** folder (``results.csv``): the metrics table, the image ROC and PR curves (``curves.json``), the k-shot
  support images (``support.txt``), the caption record's provenance (``captions.json``, where the method uses
  captions), the heatmap gallery (``heatmaps/heatmaps.json``) sorted by score with filters by defect type, ground
  truth and prediction (``report.html#defect=scratch&gt=anomalous`` opens with filters set), and the resolved
  ``config.yaml``.
* A **sweep** folder (``benchmark.csv``): the paper-style table of ``benchmark.md``, a chart of every metric per
  category, and one row per cell linking to its report (written here for each cell folder that has results).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2

from fsad.errors import FsadError
from fsad.run_folder import write_text_atomically

REPORT_NAME = "report.html"
THUMBNAIL_SIDE = 160
CHART_METRICS = (("image_AUROC", "I-AUROC"), ("pixel_AUROC", "P-AUROC"), ("pixel_AUPRO", "AUPRO"))
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.plots svg{margin-right:16px}.support img{height:120px;margin:4px;border:1px solid #ccc}
.gallery{display:flex;flex-wrap:wrap;gap:12px}.card{margin:0;border:1px solid #ccc;padding:4px;width:420px}
.card img{width:100%}.card figcaption{font-size:12px}.hidden{display:none}
pre{background:#f7f7f7;padding:8px;font-size:12px;overflow:auto;max-height:400px}
"""
GALLERY_SCRIPT = """
function filterGallery(){
  const defect=document.getElementById('defect').value, gt=document.getElementById('gt').value,
        pred=document.getElementById('pred').value;
  let shown=0;
  for(const card of document.querySelectorAll('.card')){
    const keep=(defect==='all'||card.dataset.defect===defect)&&(gt==='all'||card.dataset.gt===gt)
      &&(pred==='all'||card.dataset.pred===pred);
    card.classList.toggle('hidden',!keep); shown+=keep;
  }
  document.getElementById('shown').textContent=shown;
}
document.addEventListener('DOMContentLoaded',()=>{
  const preset=new URLSearchParams(location.hash.slice(1));  // e.g. report.html#defect=scratch&gt=anomalous
  for(const id of ['defect','gt','pred']){
    const select=document.getElementById(id);
    if(!select) return;
    if(preset.has(id)) select.value=preset.get(id);
    select.addEventListener('change',filterGallery);
  }
  filterGallery();
});
"""


class ReportError(FsadError):
    """The folder holds neither a finished run nor a sweep."""


# --------------------------------------------------------------------------- building blocks
def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def data_uri(path: Path, side: int | None = None) -> str | None:
    """``path`` as a PNG ``data:`` URI (shrunk to ``side`` pixels on its long edge when given); None if unreadable."""
    if side is None:
        try:
            return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        except OSError:
            return None
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        return None
    zoom = side / max(image.shape[:2])
    if zoom < 1:
        image = cv2.resize(image, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".png", image)
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode() if ok else None


def number(value: Any) -> str:
    """Numbers with 4 decimals, everything else as it is."""
    try:
        parsed = float(value)
    except (TypeError, ValueError):
        return escape(value)
    if math.isnan(parsed):
        return "–"
    return escape(value) if float(parsed).is_integer() and "." not in str(value) else f"{parsed:.4f}"


def html_table(rows: Sequence[dict[str, Any]], links: Sequence[str | None] | None = None) -> str:
    """An HTML table of ``rows``; ``links`` make the first cell of each row a link."""
    if not rows:
        return "<p>(no rows)</p>"
    columns = list(rows[0])
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for number_, row in enumerate(rows):
        cells = [number(row.get(c, "")) for c in columns]
        if links and links[number_]:
            cells[0] = f'<a href="{escape(links[number_])}">{cells[0]}</a>'
        body.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def curve_svg(x: Sequence[float], y: Sequence[float], title: str, x_label: str, y_label: str, chance: bool) -> str:
    """A 300×300 line plot of a curve on the unit square (``chance`` adds the diagonal)."""
    size, pad = 300, 40
    inner = size - 2 * pad

    def at(u: float, v: float) -> str:
        return f"{pad + u * inner:.1f},{size - pad - v * inner:.1f}"

    points = " ".join(at(u, v) for u, v in zip(x, y, strict=True))
    ticks = "".join(
        f'<text x="{pad + t * inner:.0f}" y="{size - pad + 14}" font-size="10" text-anchor="middle">{t:g}</text>'
        f'<text x="{pad - 6}" y="{size - pad - t * inner + 3:.0f}" font-size="10" text-anchor="end">{t:g}</text>'
        for t in (0, 0.5, 1)
    )
    diagonal = (
        f'<polyline points="{at(0, 0)} {at(1, 1)}" stroke="#aaa" stroke-dasharray="4" fill="none"/>' if chance else ""
    )
    return (
        f'<svg width="{size}" height="{size}" role="img" aria-label="{escape(title)}">'
        f'<rect x="{pad}" y="{pad}" width="{inner}" height="{inner}" fill="none" stroke="#444"/>{ticks}{diagonal}'
        f'<polyline points="{points}" fill="none" stroke="#c0392b" stroke-width="2"/>'
        f'<text x="{size / 2}" y="16" font-size="13" text-anchor="middle">{escape(title)}</text>'
        f'<text x="{size / 2}" y="{size - 6}" font-size="11" text-anchor="middle">{escape(x_label)}</text>'
        f'<text x="12" y="{size / 2}" font-size="11" text-anchor="middle" transform="rotate(-90 12 {size / 2})">'
        f"{escape(y_label)}</text></svg>"
    )


def bar_chart_svg(title: str, labels: Sequence[str], values: Sequence[float]) -> str:
    """Horizontal bars of values in [0,1] (percent labels), one per category."""
    row, left, width = 18, 140, 300
    height = row * len(labels) + 30
    bars = []
    for number_, (label, value) in enumerate(zip(labels, values, strict=True)):
        y = 24 + number_ * row
        shown = 0.0 if math.isnan(value) else max(0.0, min(1.0, value))
        text = "–" if math.isnan(value) else f"{100 * value:.1f}"
        bars.append(
            f'<text x="{left - 6}" y="{y + 12}" font-size="11" text-anchor="end">{escape(label)}</text>'
            f'<rect x="{left}" y="{y + 2}" width="{shown * width:.1f}" height="{row - 4}" fill="#2e86c1"/>'
            f'<text x="{left + shown * width + 4:.1f}" y="{y + 12}" font-size="11">{text}</text>'
        )
    return (
        f'<svg width="{left + width + 50}" height="{height}" role="img" '
        f'aria-label="{escape(title)}"><text x="4" y="14" font-size="13">{escape(title)}</text>{"".join(bars)}</svg>'
    )


def page(title: str, body: str, script: str = "") -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
        f"<title>{escape(title)}</title><style>{STYLE}</style>"
        + (f"<script>{script}</script>" if script else "")
        + f"</head><body><h1>{escape(title)}</h1>{body}</body></html>\n"
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- run
def caption_provenance(record: Any) -> list[dict[str, str]]:
    """Every ``provenance`` block found in a caption record (any nesting) as display rows: where it sits, its kind,
    source, date, generator and the images it names."""
    found: list[dict[str, str]] = []

    def describe(where: str, block: Any) -> dict[str, str]:
        if not isinstance(block, dict):
            return {"record": where, "kind": str(block)}
        generator = block.get("generator") or {}
        images = block.get("images") or []
        return {
            "record": where,
            "kind": str(block.get("kind", "")),
            "source": str(block.get("source", "")),
            "date": str(block.get("date", "")),
            "generator": " / ".join(str(v) for v in generator.values())
            if isinstance(generator, dict)
            else str(generator),
            "images": ", ".join(str(i.get("name", i)) if isinstance(i, dict) else str(i) for i in images),
        }

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            if "provenance" in node:
                label = "/".join(str(node[k]) for k in ("dataset", "category") if k in node) or where or "record"
                found.append(describe(label, node["provenance"]))
            for key, value in node.items():
                if key != "provenance":
                    walk(value, f"{where}.{key}" if where else str(key))
        elif isinstance(node, list):
            for number_, value in enumerate(node):
                walk(value, f"{where}[{number_}]")

    walk(record, "")
    return found


def run_file(folders: Sequence[Path], name: str) -> Path:
    """``name`` (a top-level file or folder of a run) in the first of ``folders`` that holds it, else in the last."""
    return next((folder / name for folder in folders if (folder / name).exists()), folders[-1] / name)


def run_sections(folders: Sequence[Path]) -> tuple[str, str]:
    """(title, body) of the report of the run whose files lie in ``folders``, each read from the first holding it."""
    row = read_csv(run_file(folders, "results.csv"))[0]
    identity = " ".join(str(row.get(k, "")) for k in ("method", "dataset", "category"))
    title = f"fsad run: {identity} k={row.get('k', '')} seed={row.get('seed', '')}"
    parts = ["<h2>Metrics</h2>", html_table([row])]

    curves_file = run_file(folders, "curves.json")
    if curves_file.is_file():
        image = json.loads(curves_file.read_text()).get("image", {})
        if image:
            parts += [
                '<h2>Image ROC and PR curves</h2><div class="plots">',
                curve_svg(image["fpr"], image["tpr"], "ROC", "false positive rate", "true positive rate", True),
                curve_svg(image["recall"], image["precision"], "Precision–recall", "recall", "precision", False),
                "</div><p>The exact points the image AUROC and AP were computed from.</p>",
            ]

    support_file = run_file(folders, "support.txt")
    if support_file.is_file():
        paths = [Path(line) for line in support_file.read_text().splitlines() if line.strip() and line[0] != "#"]
        images = []
        for path in paths:
            uri = data_uri(path, THUMBNAIL_SIDE)
            images.append(f'<img src="{uri}" alt="{escape(path.name)}" title="{escape(path)}">' if uri else
                          f"<span>{escape(path)} (not readable here)</span>")  # fmt: skip
        parts += [f'<h2>Support images (k={len(paths)})</h2><div class="support">{"".join(images)}</div>']

    captions_file = run_file(folders, "captions.json")
    if captions_file.is_file():
        try:
            provenance = caption_provenance(json.loads(captions_file.read_text()))
            shown = html_table(provenance) if provenance else "<p>captions.json records no provenance</p>"
        except json.JSONDecodeError as err:
            shown = f"<p>captions.json is not valid JSON ({escape(err)})</p>"
        parts += [f"<h2>Caption record provenance</h2>{shown}"]

    parts.append(gallery(run_file(folders, "heatmaps")))
    config_file = run_file(folders, "config.yaml")
    if config_file.is_file():
        parts.append(f"<h2>Config</h2><details><summary>config.yaml</summary><pre>{escape(config_file.read_text())}"
                     "</pre></details>")  # fmt: skip
    return title, "".join(parts)


def gallery(heatmaps_dir: Path) -> str:
    """The heatmap cards, highest score first, with the three filters."""
    index_file = heatmaps_dir / "heatmaps.json"
    if not index_file.is_file():
        return "<h2>Heatmaps</h2><p>(no heatmaps/heatmaps.json in this run)</p>"
    index = json.loads(index_file.read_text())
    records = sorted(index["images"], key=lambda r: -float(r["score"]))
    cards = []
    for record in records:
        uri = data_uri(heatmaps_dir / record["file"])
        if uri is None:
            continue
        gt = {0: "normal", 1: "anomalous"}.get(record["gt_label"], "unknown")
        pred = {0: "normal", 1: "anomalous"}.get(record["pred_label"], "unknown")
        cards.append(
            f'<figure class="card" data-defect="{escape(record["defect_type"])}" data-gt="{gt}" data-pred="{pred}" '
            f'data-score="{float(record["score"])!r}">'
            f'<img src="{uri}" alt="{escape(record["file"])}"><figcaption>{escape(record["file"])}: score '
            f"{float(record['score']):.4g}, gt {gt}, pred {pred} ({escape(record.get('chosen_as', ''))})"
            "</figcaption></figure>"
        )
    defects = sorted({r["defect_type"] for r in records})

    def select(name: str, label: str, options: Sequence[str]) -> str:
        choices = "".join(f'<option value="{escape(o)}">{escape(o)}</option>' for o in ["all", *options])
        return f'<label>{label} <select id="{name}">{choices}</select></label> '

    controls = (
        select("defect", "defect type", defects) + select("gt", "ground truth", ["normal", "anomalous"])
        + select("pred", "prediction", ["normal", "anomalous", "unknown"])
    )  # fmt: skip
    note = f"{escape(index.get('scale', ''))}; predictions by {escape(index.get('decisions', ''))}"
    return (
        f"<h2>Heatmaps, highest score first</h2><p>{note}</p><p>{controls}"
        f'<span id="shown">{len(cards)}</span> of {len(cards)} shown</p><div class="gallery">{"".join(cards)}</div>'
    )


def write_run_report(run_dir: Path, staging: Path | None = None) -> Path:
    """Write ``<run_dir>/report.html``; returns the path written.

    With ``staging`` (the staged outputs of a finishing ``fsad test``), the report describes the folder as it will be
    once they are published (each file from ``staging`` where the run staged it, else from ``run_dir``) and is
    written into ``staging``, so it is published in the same swap: a failure leaves the previous report beside the
    previous outputs.
    """
    folders = [run_dir] if staging is None else [staging, run_dir]
    if not run_file(folders, "results.csv").is_file():
        raise ReportError(f"{run_dir}: no results.csv, so no finished test run to report on")
    title, body = run_sections(folders)
    target = folders[0] / REPORT_NAME
    write_text_atomically(target, page(title, body, GALLERY_SCRIPT))
    return target


# --------------------------------------------------------------------------- sweep
def write_sweep_report(sweep_dir: Path) -> Path:
    """Write ``<sweep_dir>/report.html`` (and a report in every cell folder with results); returns its path."""
    from fsad.benchmark import KEY_COLUMNS, TABLE_METRICS, read_rows

    rows = read_rows(sweep_dir)
    if not rows:
        raise ReportError(f"{sweep_dir}: no benchmark.csv rows, so no finished cell to report on")
    first = rows[0]
    title = f"fsad sweep: {first['method']} on {first['dataset']} ({len(rows)} cells)"
    parts = []
    markdown = sweep_dir / "benchmark.md"
    if markdown.is_file():
        parts.append(f"<h2>Table</h2>{markdown_tables(markdown.read_text())}")
    categories = sorted({r["category"] for r in rows})
    charts = []
    for name, label in CHART_METRICS:
        if not any(r.get(name) not in (None, "") for r in rows):
            continue
        for k in sorted({int(r["k"]) for r in rows}):
            means = []
            for category in categories:
                values = [float(r[name]) for r in rows if r["category"] == category and int(r["k"]) == k
                          and r.get(name) not in (None, "")]  # fmt: skip
                means.append(statistics.fmean(values) if values else math.nan)
            charts.append(bar_chart_svg(f"{label} (%), k={k}, mean over seeds", categories, means))
    parts.append(f'<h2>Per category</h2><div class="plots">{"".join(charts)}</div>')
    metric_names = [n for n, _ in TABLE_METRICS if any(r.get(n) not in (None, "") for r in rows)]
    cell_rows, links = [], []
    for row in sorted(rows, key=lambda r: (r["category"], int(r["k"]), int(r["seed"]))):
        cell_rows.append({c: row[c] for c in KEY_COLUMNS} | {n: row.get(n, "") for n in metric_names})
        run_dir = (sweep_dir / "runs" / row.get("config_hash", "") / row["method"] / row["dataset"] / row["category"]
                   / f"k{row['k']}_s{row['seed']}")  # fmt: skip
        if (run_dir / "results.csv").is_file():
            write_run_report(run_dir)
            links.append((run_dir / REPORT_NAME).relative_to(sweep_dir).as_posix())
        else:
            links.append(None)
    parts.append("<h2>Cells</h2>" + html_table(cell_rows, links))
    target = sweep_dir / REPORT_NAME
    write_text_atomically(target, page(title, "".join(parts)))
    return target


def markdown_tables(markdown: str) -> str:
    """The pipe tables and paragraphs of ``benchmark.md`` as HTML (headings and legend lines as text)."""
    blocks, table = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                table.append(cells)
            continue
        if table:
            head, *body = table
            blocks.append(html_table([dict(zip(head, r, strict=False)) for r in body]))
            table = []
        if line.strip():
            blocks.append(f"<p>{escape(line.lstrip('# '))}</p>")
    return "".join(blocks)


def write_report(folder: Path) -> Path:
    """The report of a run folder or a sweep folder, whichever ``folder`` is."""
    if not folder.is_dir():
        raise ReportError(f"{folder}: no such folder")
    if (folder / "benchmark.csv").is_file() or (folder / "cells").is_dir():
        return write_sweep_report(folder)
    return write_run_report(folder)


def main(argv: list[str]) -> int:
    """``fsad report``: write ``report.html`` into a run or sweep folder and print its path."""
    parser = argparse.ArgumentParser(prog="fsad report", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a run folder (results.csv) or a sweep output (benchmark.csv)")
    args = parser.parse_args(argv)
    print(write_report(args.folder))
    return 0
