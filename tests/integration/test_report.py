"""report.html of a run and of a sweep: self-contained, and rendered by headless Chromium; the sweep's legend,
AP/AUPRO option and W&B group."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import cv2
import pytest
import yaml

from fsad.benchmark import build_table, read_rows
from fsad.cli import main

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.filterwarnings(
    "ignore:backbone.pretrained is null", "ignore:.*does not have many workers", "ignore:paper protocol"
)


class Elements(HTMLParser):
    """Tags with their attributes, and the text of <title> and of the element with id ``shown``."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.texts: dict[str, str] = {}
        self._inside: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attributes))
        self._inside = "title" if tag == "title" else attributes.get("id")

    def handle_data(self, data: str) -> None:
        if self._inside in ("title", "shown"):
            self.texts[self._inside] = self.texts.get(self._inside, "") + data

    def handle_endtag(self, tag: str) -> None:
        self._inside = None

    def count(self, tag: str, **attributes: str) -> int:
        return sum(t == tag and all(a.get(k) == v for k, v in attributes.items()) for t, a in self.tags)


def parse(text: str) -> Elements:
    elements = Elements()
    elements.feed(text)
    return elements


def assert_self_contained(text: str) -> None:
    """No address a browser would fetch: every src a data: URI, no http(s) URL, no CSS url()."""
    elements = parse(text)
    assert all(a["src"].startswith("data:") for _, a in elements.tags if "src" in a)
    assert all(not re.match(r"[a-z]+:", a["href"]) for _, a in elements.tags if "href" in a)  # only relative links
    assert "http://" not in text and "https://" not in text and "url(" not in text
    assert "default-src 'none'" in text  # and the page's own policy forbids fetching anything


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    return path


def render(page: Path, screenshot: Path | None = None, fragment: str = "") -> Elements:
    """The DOM Chromium builds for ``page`` (scripts run), and optionally a screenshot of it kept as an artefact."""
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,2400"]
    url = page.resolve().as_uri() + fragment
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    if screenshot is not None:
        subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True)
        shot = cv2.imread(str(screenshot))
        assert shot is not None and shot.shape[:2] == (2400, 1400) and shot.std() > 20  # something was drawn
    return parse(dom)


def test_fsad_test_writes_a_run_report_that_chromium_renders(tmp_path: Path) -> None:
    assert main(["test", "-c", str(REPO / "configs/demo.yaml"), "--run_root", str(tmp_path / "runs")]) == 0
    run_dir = tmp_path / "runs/membank/synthetic/disc/k4_s0"
    page = run_dir / "report.html"
    text = page.read_text()
    assert_self_contained(text)
    records = json.loads((run_dir / "heatmaps/heatmaps.json").read_text())["images"]
    support = (run_dir / "support.txt").read_text().split()
    source = parse(text)
    assert source.count("img") == len(records) + len(support) == 8 + 4
    scores = [float(a["data-score"]) for tag, a in source.tags if tag == "figure"]
    assert scores == sorted((r["score"] for r in records), reverse=True) and len(scores) == 8  # highest first

    dom = render(page, tmp_path / "run_report.png")
    assert dom.texts["title"] == "fsad run: membank synthetic disc k=4 seed=0"
    assert dom.count("table") == 1 and dom.count("th") >= 8 and dom.count("svg") == 2  # metrics; ROC and PR
    assert dom.count("img") == 12 and dom.count("figure", **{"class": "card"}) == 8
    assert dom.texts["shown"] == "8"  # the gallery script ran
    good = sum(r["defect_type"] == "good" for r in records)
    filtered = render(page, fragment="#defect=good")
    assert filtered.texts["shown"] == str(good) and 0 < good < 8
    assert filtered.count("figure", **{"class": "card hidden"}) == 8 - good

    assert main(["test", "-c", str(REPO / "configs/demo.yaml"), "--run_root", str(tmp_path / "off"),
                 "--report", "false"]) == 0  # fmt: skip
    assert not (tmp_path / "off/membank/synthetic/disc/k4_s0/report.html").exists()
    assert (tmp_path / "off/membank/synthetic/disc/k4_s0/results.csv").is_file()


def test_a_sweep_has_a_legend_a_wandb_group_and_a_report_linking_its_cells(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = tmp_path / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "method_config": [str(REPO / "configs/demo.yaml"), str(REPO / "configs/logger/wandb.yaml")],
        "categories": ["disc"], "shots": [1], "seeds": [0, 1], "output": str(tmp_path / "sweep"),
        "wandb_project": "fsad-test", "ap_aupro_columns": True,
        "extra_args": ["--trainer.logger.init_args.offline", "true"],
    }))  # fmt: skip
    assert main(["benchmark", "-c", str(config)]) == 0
    sweep = tmp_path / "sweep"
    rows = read_rows(sweep)
    assert len(rows) == 2

    markdown = (sweep / "benchmark.md").read_text()
    header = next(line for line in markdown.splitlines() if line.startswith("| category"))
    assert header == "| category | k=1 I-AUROC | k=1 P-AUROC | k=1 AUPRO | k=1 I-F1 | k=1 P-F1 | k=1 I-AP | k=1 P-AP |"
    assert "n = 2 seeds (0, 1)" in markdown and "population standard deviation" in markdown
    assert "AUPRO, area under the per-region-overlap curve" in markdown and "Protocol: honest" in markdown
    disc = next(line for line in markdown.splitlines() if line.startswith("| disc"))
    ap = [float(r["image_AP"]) for r in rows if r["category"] == "disc"]
    mean, std = 100 * sum(ap) / 2, 100 * abs(ap[0] - ap[1]) / 2  # population std of two values: half their gap
    assert disc.split(" | ")[6] == f"{mean:.2f} ± {std:.2f}"
    assert "| k=1 I-AP" not in build_table(rows)  # without the option: no AP columns

    group = f"membank-synthetic-{rows[0]['config_hash']}"
    runs = list(sweep.rglob("run-*.wandb"))  # the cells' runs in their run folders, the table's in the sweep's
    grouped = {r for r in runs if group.encode() in r.read_bytes()}  # the run record carries the group
    assert len(grouped) == 2 + 1  # the two cells' runs and the table's run

    assert main(["report", str(sweep)]) == 0
    page = sweep / "report.html"
    text = page.read_text()
    assert_self_contained(text)
    links = [a["href"] for tag, a in parse(text).tags if tag == "a"]
    assert len(links) == 2 and all((sweep / link).is_file() for link in links)  # each cell's own report
    dom = render(page, tmp_path / "sweep_report.png")
    assert dom.texts["title"] == "fsad sweep: membank on synthetic (2 cells)"
    assert dom.count("table") == 2 and dom.count("svg") == 2 and dom.count("a") == 2  # I- and P-AUROC (no AUPRO ran)


def test_report_of_a_folder_without_results_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: no results.csv, so no finished test run to report on"


def test_the_caption_records_provenance_is_in_the_report(tmp_path: Path) -> None:
    record = json.loads((REPO / "lightning_modules/finegrainedad/captions/mvtec/bottle.json").read_text())
    (tmp_path / "captions.json").write_text(json.dumps(record))
    (tmp_path / "results.csv").write_text(
        "method,dataset,category,k,seed,image_AUROC\nfinegrainedad,mvtec,bottle,1,0,0.9\n"
    )
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "report.html").read_text()
    assert_self_contained(text)
    section = text[text.index("Caption record provenance") :]
    provenance = record["provenance"]
    for fact in ("mvtec/bottle", provenance["kind"], provenance["date"], provenance["images"][0]["name"]):
        assert html.escape(fact) in section
    assert html.escape(provenance["source"], quote=True) in section
