"""`fsbench report --format html`: the self-contained results page.

Two kinds of test: plain Python reads the page's tables, drill-down data and escaping (no browser);
the browser tests load the page from disk (file://) in Debian's headless Chromium driven by Selenium,
as a user sees it: no console errors, sorting and filtering change the visible rows as expected,
every figure has a rendered size, and a screenshot lands in the test's tmp folder. The browser
tests skip only when /usr/bin/chromium or /usr/bin/chromedriver is absent (`.ci/run` installs them);
no browser or driver is ever downloaded.

Expected numbers are computed here with numpy from the raw values the store is built from.

`python tests/test_report_html.py RESULTS_DIR OUT.png` writes the README's screenshot
(docs/report-html.png from results/example/runs).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from fsbench.report import write_report
from fsbench.report.html import base_method, colour_paper_deltas, markdown_html, method_family
from fsbench.results import Result, load_results, write_result

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ODD = '<img src=x onerror="alert(1)">&amp;</script>'  # a method name that tries every escape
BACKBONES = ["ViT-B/16", "ViT-B/32"]
DATASETS = ["dtd", "eurosat", "oxford_flowers"]
METHODS = {"coop": 0.0, "tip_adapter": 12.0, ODD: 4.0, "lora": 8.0}  # method -> accuracy offset
SHOTS, SEEDS = [1, 4], [1, 2, 3]
REFERENCE = {("lora", "dtd"): 50.0, ("coop", "dtd"): 99.0}  # published ViT-B/16 4-shot numbers (made up)


def _seeds(backbone: str, method: str, dataset: str, shots: int) -> list[int]:
    """The gaps: the odd method lacks EuroSAT on ViT-B/32 at 4 shots (a partial Average), LoRA has one
    seed on Flowers at 1 shot."""
    if (backbone, method, dataset, shots) == ("ViT-B/32", ODD, "eurosat", 4):
        return []
    if (method, dataset, shots) == ("lora", "oxford_flowers", 1):
        return [1]
    return SEEDS


def _protocol_runs(root: Path) -> None:
    """Base-to-new (a linear probe whose New is n/a) and cross-dataset results beside the few-shot ones."""
    rng = random.Random(1)
    for method in ("coop", "lora", "linear_probe"):
        for dataset in ("dtd", "eurosat"):
            for seed in SEEDS:
                base, new = rng.uniform(70, 90), rng.uniform(50, 70)
                na = {"new": "one weight per training class", "hm": "one weight per training class"}
                metrics = ({"base": base, "new": None, "hm": None} if method == "linear_probe" else
                           {"base": base, "new": new, "hm": 2 * base * new / (base + new)})
                write_result(root, Result(method, "ViT-B/16", dataset, 16, seed, top1=metrics["hm"],
                                          protocol="base2new", metrics=metrics,
                                          not_applicable=na if method == "linear_probe" else {}))
    for target in ("dtd", "eurosat", "imagenet"):
        for seed in SEEDS:
            top1 = rng.uniform(40, 70)
            write_result(root, Result("lora", "ViT-B/16", target, 16, seed, top1=top1, protocol="cross_dataset",
                                      source_dataset="imagenet", metrics={"top1": top1}))


def build_store(root: Path) -> dict:
    """Write the store; return the raw top-1 lists keyed by (backbone, method, dataset, shots)."""
    rng = random.Random(0)
    raw: dict = {}
    for b in BACKBONES:
        for m, offset in METHODS.items():
            for d in DATASETS:
                for k in SHOTS:
                    for s in _seeds(b, m, d, k):
                        top1 = round(40 + 6 * k + offset + rng.uniform(-3, 3), 3)
                        write_result(root, Result(m, b, d, k, s, top1=top1, train_seconds=3.0 + offset + s,
                                                  config={"rank": 2} if m == "lora" else {},
                                                  config_hash=f"cfg-{m[:4]}", identity_hash=f"id-{b}-{d}-{k}-{s}"))
                        raw.setdefault((b, m, d, k), []).append(top1)
    _protocol_runs(root)
    return raw


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("runs")
    return root, build_store(root)


@pytest.fixture(scope="module")
def page(store, tmp_path_factory) -> tuple[Path, list[Path]]:
    """report.html (with --compare against `REFERENCE`) and everything write_report wrote."""
    out = tmp_path_factory.mktemp("report")
    reference = out / "reference.csv"
    lines = ["source,table,backbone,method,dataset,shots,top1"]
    lines += [f"test,T9,ViT-B/16,{m},{d},4,{v}" for (m, d), v in REFERENCE.items()]
    reference.write_text("\n".join(lines) + "\n")
    written = write_report(load_results(store[0]), out, "html", compare=reference, results_dir=store[0])
    return out / "report.html", written


class Page(HTMLParser):
    """The parts of the page the tests read: leaderboard rows (attributes and cell texts), tags, scripts."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.rows: list[dict] = []
        self.tags: list[tuple[str, dict]] = []
        self.scripts: list[str] = []
        self._row: dict | None = None
        self._cell: list | None = None
        self._script: list | None = None
        self._table: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._table.append(attrs.get("id", ""))
        elif tag == "tr" and "data-protocol" in attrs:
            self._row = {"attrs": attrs, "cells": [], "cell_attrs": [], "table": self._table[-1]}
        elif tag == "td" and self._row is not None:
            self._cell = []
            self._row["cell_attrs"].append(attrs)
        elif tag == "script":
            self._script = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._table.pop()
        elif tag == "td" and self._cell is not None and self._row is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag == "script" and self._script is not None:
            self.scripts.append("".join(self._script))
            self._script = None

    def handle_data(self, data):
        for buf in (self._cell, self._script):
            if buf is not None:
                buf.append(data)


def _read(path: Path) -> tuple[str, Page]:
    text = path.read_text(encoding="utf-8")
    return text, Page(text)


def _board_rows(parsed: Page, protocol: str) -> list[dict]:
    return [r for r in parsed.rows if r["table"] == f"board-{protocol}"]


def _drill(parsed: Page) -> dict:
    return json.loads(parsed.scripts[0])


def _cell_text(values: list[float]) -> str:
    mean = float(np.mean(values))
    std = f" ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else ""
    return f"{mean:.1f}{std} ({len(values)})"


# --- plain Python: the page's content ---------------------------------------------------------------------

def test_leaderboard_holds_every_cell_with_its_seed_statistics(store, page):
    _, parsed = _read(page[0])
    raw, rows = store[1], _board_rows(parsed, "fewshot")
    assert len(rows) == len(BACKBONES) * len(METHODS) * len(SHOTS)
    header = ["eurosat", "oxford_flowers", "dtd", "average"]  # the paper's column order
    for row in rows:
        a = row["attrs"]
        key = (a["data-backbone"], a["data-method"], int(a["data-shots"]))
        cells = dict(zip(header, row["cells"][4:], strict=True))
        means = []
        for d in DATASETS:
            values = raw.get((key[0], key[1], d, key[2]))
            assert cells[d].startswith(_cell_text(values) if values else "–"), (key, d, cells[d])
            means += [np.mean(values)] if values else []
        partial = len(means) < len(DATASETS)
        assert cells["average"] == f"{np.mean(means):.1f}" + ("†" if partial else ""), key
        assert a["data-family"] == method_family(key[1]) and a["data-protocol"] == "fewshot"
    (odd,) = [r for r in rows if r["attrs"]["data-method"] == ODD and r["attrs"]["data-backbone"] == "ViT-B/32"
              and r["attrs"]["data-shots"] == "4"]
    assert "EuroSAT" in odd["cell_attrs"][-1]["title"] and "2 of 3" in odd["cell_attrs"][-1]["title"]


def test_drill_down_lists_seeds_hashes_and_each_result_file(store, page):
    _, parsed = _read(page[0])
    drill = _drill(parsed)
    (row,) = [r for r in _board_rows(parsed, "fewshot") if (r["attrs"]["data-method"], r["attrs"]["data-backbone"],
                                                             r["attrs"]["data-shots"]) == ("lora", "ViT-B/32", "4")]
    cell = drill[row["cell_attrs"][6]["data-cell"]]  # the DTD cell (EuroSAT, Flowers, DTD: the paper's order)
    assert "CLIP-LoRA" in cell["title"] and "DTD" in cell["title"]
    assert [r["seed"] for r in cell["runs"]] == SEEDS
    for run in cell["runs"]:
        stored = json.loads(Path(run["path"]).read_text())  # the real file, in the store
        assert Path(run["path"]).is_relative_to(store[0])
        assert (stored["method"], stored["seed"], stored["dataset"]) == ("lora", run["seed"], "dtd")
        assert run["config_hash"] == stored["config_hash"] == "cfg-lora"
        assert run["identity_hash"] == stored["identity_hash"] == f"id-ViT-B/32-dtd-4-{run['seed']}"
        assert float(run["value"]) == pytest.approx(stored["top1"], abs=0.005)
    average = drill[row["cell_attrs"][-1]["data-cell"]]  # the Average cell: every run of the row
    assert len(average["runs"]) == len(DATASETS) * len(SEEDS)


def test_odd_method_names_are_escaped_everywhere(store, page):
    text, parsed = _read(page[0])
    assert ODD not in text and "<img src=x" not in text  # never raw HTML
    assert [t for t, a in parsed.tags if t == "img" and not a.get("src", "").startswith("data:image/png;base64,")] == []
    assert [t for t, _ in parsed.tags].count("script") == 2  # the drill-down JSON and the page's own code
    rows = [r for r in _board_rows(parsed, "fewshot") if r["attrs"]["data-method"] == ODD]
    assert rows and all(r["cells"][2] == ODD for r in rows)  # shown as text, exactly
    titles = [c["title"] for c in _drill(parsed).values() if ODD in c["title"]]
    assert titles  # the JSON round-trips the name
    assert base_method(f"{ODD} [cfg 1a2b3c/s2]") == ODD and base_method("lora@qv-r4-all-both") == "lora"


def test_compare_shows_coloured_deltas(store, page):
    text, parsed = _read(page[0])
    raw = store[1]
    for (method, dataset), published in REFERENCE.items():
        delta = np.mean(raw[("ViT-B/16", method, dataset, 4)]) - published
        sign = "pos" if delta > 0 else "neg"
        assert re.search(rf'<span class="delta {sign}" style="--s:[0-9.]+" title="published {published:.1f} '
                         rf'\(test T9\)">{re.escape(f"{delta:+.1f}")}</span>', text), (method, dataset)
    assert text.count('class="delta ') == len(REFERENCE)


def test_figure3_deltas_are_coloured_in_the_paper_section():
    rows = ["| Variant | ImageNet |", "|:---|:---:|", "| lora@qv | 71.2 (−0.3) |", "| lora@q | 70.0 (+2.5) |",
            "| lora@v | – |"]
    out = colour_paper_deltas(markdown_html("\n".join(rows), {}))
    assert re.search(r'71\.2 <span class="delta neg" style="--s:0\.06" title="[^"]+">−0\.3</span></td>', out)
    assert re.search(r'70\.0 <span class="delta pos" style="--s:0\.50" title="[^"]+">\+2\.5</span></td>', out)
    assert out.count('class="delta') == 2


def test_protocol_leaderboards_and_sections(page):
    text, parsed = _read(page[0])
    b2n = _board_rows(parsed, "base2new")
    assert {r["attrs"]["data-method"] for r in b2n} == {"coop", "lora", "linear_probe"}
    (probe,) = [r for r in b2n if r["attrs"]["data-method"] == "linear_probe"]
    assert probe["cells"][5:7] == ["n/a", "n/a"]  # New and H of the Average: n/a, never a number
    assert "not applicable: one weight per training class" in probe["cell_attrs"][5]["title"]
    (cross,) = _board_rows(parsed, "cross_dataset")
    assert cross["cells"][4] == "ImageNet" and not cross["cells"][5].endswith("‡")  # its own source result
    for heading in ("Base-to-new generalisation", "Cross-dataset transfer", "Statistics", "Cost"):
        assert f">{heading}" in text, heading
    assert any(r["table"] == "cost" for r in parsed.rows)


def test_every_figure_is_inlined_and_nothing_is_fetched(page):
    text, parsed = _read(page[0])
    pngs = [p for p in page[1] if p.suffix == ".png"]
    assert {p.name for p in pngs} >= {"fig2_shots_ViT-B-16.png", "fig2_shots_ViT-B-32.png", "fig2_shots_average.png",
                                      "pareto_accuracy_vs_time.png", "base2new_ViT-B-16_16shots.png"}
    imgs = [a for t, a in parsed.tags if t == "img"]
    assert len(imgs) == len(pngs) and len({a["src"] for a in imgs}) == len(pngs)
    for tag, attrs in parsed.tags:
        for name in ("src", "href"):
            assert not re.match(r"(https?:)?//", attrs.get(name) or ""), (tag, attrs)
    assert tag_count(parsed, "link") == 0 and "@import" not in text


def tag_count(parsed: Page, tag: str) -> int:
    return sum(1 for t, _ in parsed.tags if t == tag)


def test_cli_writes_the_page_without_torch(store, tmp_path):
    code = (
        "import sys\n"
        "from fsbench.cli import main\n"
        f"rc = main(['report', '--results', {str(store[0])!r}, '--out', {str(tmp_path)!r}, '--format', 'html'])\n"
        "assert rc == 0, rc\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "report.html").stat().st_size > 0 and (tmp_path / "fig2_shots_ViT-B-16.png").exists()
    assert not (tmp_path / "report.md").exists()  # only what was asked (and the PNGs the page inlines)


# --- in a real browser ---------------------------------------------------------------------------------------

def chromium_driver(width: int = 1280, height: int = 1000):
    """Selenium's Chrome driver on Debian's /usr/bin/chromium and /usr/bin/chromedriver (never downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                f"--user-data-dir={tempfile.mkdtemp(prefix='fsbench-chromium-')}", f"--window-size={width},{height}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))


@pytest.fixture(scope="module")
def browser():
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"headless browser test needs Debian's chromium and chromium-driver ({', '.join(missing)} "
                    "absent; `apt-get install chromium chromium-driver`, as .ci/run does)")
    driver = chromium_driver()
    yield driver
    driver.quit()


def _visible(driver, table_id: str) -> list[dict]:
    """The visible rows of a table: filter attributes and cell texts."""
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#' + CSS.escape(arguments[0]) + ' tbody tr'))"
        ".filter(r => r.offsetParent !== null).map(r => ({method: r.dataset.method, backbone: r.dataset.backbone,"
        " shots: r.dataset.shots, family: r.dataset.family, avg: r.lastElementChild.dataset.v}))", table_id)


def _select(driver, name: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", f"filter-{name}")).select_by_value(value)


def _severe(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_page_in_chromium(browser, page, store, tmp_path):
    browser.get(page[0].as_uri())
    assert browser.title == "fsbench report"
    assert _severe(browser) == []
    total = len(BACKBONES) * len(METHODS) * len(SHOTS) + 3 + 1  # few-shot, base-to-new, cross-dataset rows
    assert browser.find_element("id", "counter").text == f"{total} of {total} rows"

    _select(browser, "backbone", "ViT-B/16")
    _select(browser, "shots", "4")
    rows = _visible(browser, "board-fewshot")
    assert {(r["backbone"], r["shots"]) for r in rows} == {("ViT-B/16", "4")} and len(rows) == len(METHODS)
    assert [r["method"] for r in rows] == ["coop", "tip_adapter", ODD, "lora"]  # the paper's order
    raw = store[1]
    average = {m: np.mean([np.mean(raw[("ViT-B/16", m, d, 4)]) for d in DATASETS]) for m in METHODS}
    header = browser.find_element("css selector", '#board-fewshot th[data-col="average"]')
    header.click()  # numbers: best first
    assert [r["method"] for r in _visible(browser, "board-fewshot")] == sorted(average, key=average.get, reverse=True)
    assert header.get_attribute("aria-sort") == "descending"
    header.click()
    assert [r["method"] for r in _visible(browser, "board-fewshot")] == sorted(average, key=average.get)

    _select(browser, "family", "prompt learning")
    assert [r["method"] for r in _visible(browser, "board-fewshot")] == ["coop"]
    assert [r["method"] for r in _visible(browser, "board-base2new")] == []  # filtered to ViT-B/16, 4 shots
    browser.find_element("id", "filter-reset").click()
    _select(browser, "protocol", "base2new")
    assert _visible(browser, "board-fewshot") == [] and len(_visible(browser, "board-base2new")) == 3
    browser.find_element("id", "filter-reset").click()
    browser.find_element("id", "filter-method").send_keys("onerror")
    assert {r["method"] for r in _visible(browser, "board-fewshot")} == {ODD}
    browser.find_element("id", "filter-reset").click()
    assert len(_visible(browser, "board-fewshot")) == len(BACKBONES) * len(METHODS) * len(SHOTS)

    cell = browser.find_element("css selector", '#board-fewshot tbody tr[data-method="lora"] td[data-cell]')
    cell.click()
    dialog = browser.find_element("id", "drill")
    assert dialog.is_displayed() and len(dialog.find_elements("css selector", "tbody tr")) >= 1
    browser.save_screenshot(str(tmp_path / "drill-down.png"))
    browser.find_element("css selector", "#drill button.close").click()
    assert not dialog.is_displayed()

    sizes = browser.execute_script("return Array.from(document.images).map(i => [i.naturalWidth, "
                                   "i.getBoundingClientRect().width, i.getBoundingClientRect().height, i.alt])")
    assert len(sizes) == len([p for p in page[1] if p.suffix == ".png"])
    for natural, width, height, alt in sizes:
        assert natural > 0 and width > 0 and height > 0, alt
    assert _severe(browser) == []
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0


def screenshot(results: Path, png: Path, width: int = 1100) -> None:
    """The README's picture: the top of the page of `results`, down to the few-shot leaderboard sorted
    by Average (Chromium's own PNG, clipped by the DevTools protocol)."""
    import base64

    with tempfile.TemporaryDirectory() as out:
        write_report(load_results(results), out, "html", results_dir=results)
        driver = chromium_driver(width, 1000)
        try:
            driver.get((Path(out) / "report.html").as_uri())
            driver.find_element("css selector", '#board-fewshot th[data-col="average"]').click()
            bottom = driver.execute_script("return document.getElementById('board-fewshot')"
                                           ".getBoundingClientRect().bottom + window.scrollY")
            clip = {"x": 0, "y": 0, "width": width, "height": int(bottom) + 12, "scale": 1}
            shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"clip": clip, "captureBeyondViewport": True})
            png.write_bytes(base64.b64decode(shot["data"]))
        finally:
            driver.quit()


if __name__ == "__main__":
    screenshot(Path(sys.argv[1]), Path(sys.argv[2]))
