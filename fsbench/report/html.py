"""The results page: one self-contained `report.html` (`fsbench report --format html`).

Everything is inlined (CSS, a little vanilla JavaScript, the figures as base64 PNG), so the page works
offline from a file:// URL, with no CDN and no server. It is built from the same frames and text as
report.md: the leaderboards from `summary` (few-shot) and `protocol_summary` (other protocols), the
statistics, protocol and paper sections from the very Markdown report.md holds (rendered here by a
small converter of the subset the report writes), the cost table from `cost_table`, and the figures
are the PNG files the report wrote. Each leaderboard cell opens a drill-down to its runs: seed,
value, config hash, identity hash and the path of its result file. Nothing here imports torch.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fsbench.report.cost import cost_table, human_count, human_seconds
from fsbench.report.protocols import (
    ProtocolView,
    cell_text,
    order_cocoop,
    present_protocols,
    protocol_label,
    protocol_rows,
    protocol_summary,
    protocol_view,
)
from fsbench.report.style import AVERAGE, dataset_label, method_label, order_datasets, order_methods
from fsbench.report.tables import main_runs, summary
from fsbench.results import canonical_dataset, read_result, result_path

FEWSHOT = "fewshot"


def protocol_name(protocol: str) -> str:
    """The display title of a protocol (its registered metadata; the name of an unregistered one)."""
    return "Few-shot" if protocol == FEWSHOT else protocol_view(protocol).title
# Method families for the page's filter (registry names; the CLIP-LoRA paper's grouping of its baselines).
FAMILIES = {
    "zero_shot": "zero-shot",
    **dict.fromkeys(["coop", "coop_4ctx", "cocoop", "plot_pp", "kgcoop", "maple", "prograd"], "prompt learning"),
    **dict.fromkeys(["tip_adapter", "tip_adapter_f", "clip_adapter", "taskres"], "adapter"),
    **dict.fromkeys(["linear_probe", "lp_plus_plus", "clap", "gda"], "linear probe"),
    **dict.fromkeys(["lora", "peft", "prolip"], "fine-tuning"),
}
OTHER_FAMILY = "other"
VARIANT = re.compile(r" \[cfg [^\]]*\]$")  # fsbench.results.separate_variants' label suffix
FILTERS = ("backbone", "shots", "protocol", "family")


def shots_text(shots: int) -> str:
    """"1 shot", "4 shots"."""
    return f"{shots} shot" + ("" if int(shots) == 1 else "s")


def base_method(method: str) -> str:
    """The registry name behind a report label: "lora [cfg 1a2b3c/s2]" -> "lora", "lora@qv-r4" -> "lora"."""
    return VARIANT.sub("", str(method)).split("@", 1)[0]


def method_family(method: str) -> str:
    """The family a method belongs to ("prompt learning", "adapter", ...); "other" when unknown."""
    return FAMILIES.get(base_method(method), OTHER_FAMILY)


# --- drill-down: the runs behind a cell ---------------------------------------------------------------

def _run_key(protocol, method, backbone, dataset, source, shots, seed, config_hash) -> tuple:
    """What identifies a stored run, as the store names it (the frame's "[cfg ...]" label suffix dropped)."""
    source = "" if source is None or source != source else canonical_dataset(str(source))
    return (str(protocol or FEWSHOT), VARIANT.sub("", str(method)), str(backbone), canonical_dataset(str(dataset)),
            source, int(shots), int(seed), str(config_hash or ""))


def result_paths(results_dir: str | Path | None) -> dict[tuple, str]:
    """Run key -> path of its result file, found by reading the store (aliases and labels resolved)."""
    if results_dir is None or not Path(results_dir).is_dir():
        return {}
    paths = {}
    for path in sorted(Path(results_dir).rglob("shots*_seed*.json")):
        r = read_result(path)
        if r is not None:
            paths[_run_key(r.protocol, r.method, r.backbone, r.dataset, r.source_dataset, r.shots, r.seed,
                           r.config_hash)] = str(path)
    return paths


def _path(row: dict, paths: dict[tuple, str]) -> str:
    """The row's result file: from the store when read, else the store layout (relative to the store)."""
    key = _run_key(row.get("protocol"), row["method"], row["backbone"], row["dataset"], row.get("source_dataset"),
                   row["shots"], row["seed"], row.get("config_hash"))
    if key in paths:
        return paths[key]
    protocol, source = key[0], key[4]
    folder = "" if protocol == FEWSHOT else (f"{protocol}-from-{source}" if source else protocol)
    return str(result_path("", key[1], row["backbone"], row["dataset"], int(row["shots"]),
                           int(row["seed"]), folder))


def _value_text(row: dict, protocol: str) -> str:
    """"72.30" (top-1) or "base 80.1, new 70.2, hm 74.8" (the protocol's metrics)."""
    metrics = row.get("metrics") if isinstance(row.get("metrics"), dict) else {}
    names = ("top1",) if protocol == FEWSHOT else tuple(m.name for m in protocol_view(protocol).metrics)
    values = {n: metrics.get(n, row.get("top1") if n == "top1" else None) for n in names}
    parts = [f"{n} {v:.2f}" if isinstance(v, (int, float)) and v == v else f"{n} n/a" for n, v in values.items()]
    return parts[0].split(" ", 1)[1] if names == ("top1",) else ", ".join(parts)


def run_record(row: dict, protocol: str, paths: dict[tuple, str]) -> dict:
    """What the drill-down shows of one run."""
    return {"seed": int(row["seed"]), "dataset": dataset_label(str(row["dataset"])),
            "value": _value_text(row, protocol),
            "config_hash": str(row.get("config_hash") or ""), "identity_hash": str(row.get("identity_hash") or ""),
            "train_seconds": human_seconds(pd.to_numeric(row.get("train_seconds"), errors="coerce")),
            "path": _path(row, paths)}


class Drill:
    """The drill-down data of a page: cell id -> title and runs (embedded as JSON, rendered by the page)."""

    def __init__(self, paths: dict[tuple, str]):
        self.paths, self.cells = paths, {}

    def add(self, title: str, rows: Iterable[dict], protocol: str) -> str:
        """Register a cell's runs; returns its id ("" when it has none)."""
        runs = sorted((run_record(r, protocol, self.paths) for r in rows), key=lambda r: (r["dataset"], r["seed"]))
        if not runs:
            return ""
        cell_id = f"c{len(self.cells)}"
        self.cells[cell_id] = {"title": title, "runs": runs}
        return cell_id


def _index(frame: pd.DataFrame, keys: list[str]) -> dict[tuple, list[dict]]:
    """Rows of `frame` as dicts grouped by `keys` (one pass)."""
    out: dict[tuple, list[dict]] = {}
    for row in frame.to_dict("records"):
        out.setdefault(tuple(row[k] for k in keys), []).append(row)
    return out


# --- leaderboards -------------------------------------------------------------------------------------

@dataclass
class Cell:
    """A rendered leaderboard cell: its text, its sort value, and what it links to."""

    text: str = "–"
    value: float | None = None
    best: bool = False
    title: str = ""
    drill: str = ""
    delta: float | None = None  # reproduced − published (--compare)
    published: str = ""


@dataclass
class Board:
    """One protocol's leaderboard: rows of (backbone, shots, method[, source]) and their cells."""

    protocol: str
    columns: list[tuple[str, str]]  # (key, header)
    rows: list[dict] = field(default_factory=list)  # backbone, shots, method, source, cells: {key: Cell}
    notes: list[str] = field(default_factory=list)


def _fewshot_cell(r, drill: Drill, runs: dict, deltas: dict) -> Cell:
    key = (r.backbone, int(r.shots), r.method)
    title = f"{method_label(r.method)}, {dataset_label(r.dataset)}, {r.backbone}, {shots_text(r.shots)}"
    if r.dataset == AVERAGE:
        rows = [x for (b, s, m, _d), xs in runs.items() if (b, s, m) == key for x in xs]
        text = f"{r.mean:.1f}" + ("†" if r.partial else "")
        hint = (f"Average over {r.n} of {r.n_datasets} datasets (missing "
                f"{', '.join(dataset_label(d) for d in r.missing)})" if r.partial else f"Average over {r.n} datasets")
    else:
        rows = runs.get(key + (r.dataset,), [])
        text = f"{r.mean:.1f}" + ("" if pd.isna(r.std) else f" ± {r.std:.1f}") + f" ({r.n})"
        hint = f"mean ± sample std over {r.n} seed{'s' if r.n != 1 else ''}"
    delta, published = deltas.get(key + (r.dataset,), (None, ""))
    return Cell(text, float(r.mean), bool(r.best), hint, drill.add(title, rows, FEWSHOT), delta, published)


def fewshot_board(df: pd.DataFrame, drill: Drill, comparison: pd.DataFrame | None = None) -> Board | None:
    """The few-shot leaderboard: a row per (backbone, shots, method), a column per dataset and Average
    (the cells of report.md's main tables, `summary`), with Δ vs the reference when compared."""
    cells = summary(df)
    if cells.empty:
        return None
    runs = _index(main_runs(df), ["backbone", "shots", "method", "dataset"])
    deltas = {}
    for c in (comparison if comparison is not None else pd.DataFrame()).itertuples(index=False):
        deltas[(c.backbone, int(c.shots), c.method, c.dataset)] = (
            float(c.delta), f"published {c.reference:.1f} ({c.source} {c.table})".replace(" nan", ""))
    datasets = order_datasets(cells["dataset"])
    board = Board(FEWSHOT, [(d, dataset_label(d)) for d in datasets] + [(AVERAGE, "Average")])
    for (backbone, shots, method), group in cells.groupby(["backbone", "shots", "method"], sort=False):
        row = {"backbone": backbone, "shots": int(shots), "method": method, "source": "", "cells": {}}
        for r in group.itertuples(index=False):
            row["cells"][r.dataset] = _fewshot_cell(r, drill, runs, deltas)
        board.rows.append(row)
    board.notes = ["Top-1 (%) on the test split: mean ± sample std (ddof=1) over seeds (seeds); bold = best "
                   "mean of its (backbone, shots) block; † = Average over fewer datasets than the block has."]
    if deltas:
        board.notes.append("Coloured badges: reproduced mean − published number (green: above, red: below).")
    return board


def _protocol_cell(row: dict | None, title: str, drill: Drill, rows: list[dict], protocol: str) -> Cell:
    if row is None:
        return Cell()
    value = None if row["na"] or pd.isna(row["mean"]) else float(row["mean"])
    hint = f"not applicable: {row['na']}" if row["na"] else (
        "from the few-shot run (‡)" if row["fallback"] else "")
    digits = protocol_view(protocol).metric(row["metric"]).digits
    return Cell(cell_text(row, digits=digits), value, False, hint, drill.add(title, rows, protocol))


def _protocol_columns(block: pd.DataFrame, view: ProtocolView) -> list[tuple[str, str, str]]:
    """(key, header, metric) per column, from the protocol's metadata: a table with a column per metric
    (CoCoOp's Table 1) shows the Average of every metric, then the headline metric per dataset; a table
    with a column per dataset (Tables 2, 3) the source (when results carry one), each dataset and the Average."""
    head_metric = view.metric(view.headline)
    datasets = [d for d in order_cocoop(block["dataset"]) if d != AVERAGE]
    if view.table.columns == "metrics":
        head = [(f"{AVERAGE}/{m.name}", f"{m.label} (Avg)", m.name) for m in view.metrics]
        return head + [(f"{d}/{head_metric.name}", f"{protocol_label(d)} {head_metric.label}", head_metric.name)
                       for d in datasets]
    has_source = view.source_result and bool((block["source"] != "").any())
    targets = [d for d in datasets if not has_source or d not in set(block["source"])]
    average = [] if view.table.average == "none" else [(f"{AVERAGE}/{head_metric.name}", "Average",
                                                        head_metric.name)]
    return ([("source/" + head_metric.name, "Source", head_metric.name)] if has_source else []) + [
        (f"{d}/{head_metric.name}", protocol_label(d), head_metric.name) for d in targets] + average


PROTOCOL_NOTES = {
    "base2new": "Base, New and H (%): mean ± sample std over seeds (seeds); the Average's Base and New are means "
                "over the datasets and its H is that of the Average Base and New (CoCoOp); n/a = the method cannot "
                "produce the number (hover for the reason); † = Average over fewer datasets.",
    "transfer": "Top-1 (%): mean ± sample std over seeds (seeds); Average over the targets (the source excluded); "
                "‡ = source cell from the few-shot run of the same method and shots; n/a = not applicable.",
    "other": "Mean ± sample std over seeds (seeds); n/a = the method cannot produce the number (hover for the "
             "reason).",
}


def protocol_board(others: pd.DataFrame, protocol: str, drill: Drill, fewshot: pd.DataFrame) -> Board | None:
    """A leaderboard of another protocol: a row per (backbone, shots, method, source), cells of
    `protocol_summary` (the numbers of report.md's protocol tables)."""
    block = protocol_summary(others, protocol)
    if block.empty:
        return None
    view = protocol_view(protocol, others)
    columns = _protocol_columns(block, view)
    board = Board(protocol, [(k, h) for k, h, _ in columns])
    lookup = {(r["backbone"], r["shots"], r["method"], r["source"], r["dataset"], r["metric"]): r
              for r in block.to_dict("records")}
    runs = _index(protocol_rows(others, protocol).assign(source_dataset=lambda f: f["source_dataset"].fillna("")),
                  ["backbone", "shots", "method", "source_dataset", "dataset"])
    fallback = _index(main_runs(fewshot), ["backbone", "shots", "method", "dataset"]) if not fewshot.empty else {}
    keys = block[["backbone", "shots", "method", "source"]].drop_duplicates()
    order = {m: i for i, m in enumerate(order_methods(keys["method"]))}
    keys = keys.assign(_m=keys["method"].map(order)).sort_values(["backbone", "shots", "source", "_m"])
    for backbone, shots, method, source in keys[["backbone", "shots", "method", "source"]].itertuples(index=False):
        row = {"backbone": backbone, "shots": int(shots), "method": method, "source": source, "cells": {}}
        for key, header, metric in columns:
            dataset = key.split("/")[0] if not key.startswith("source/") else source
            r = lookup.get((backbone, shots, method, source, dataset, metric))
            if dataset == AVERAGE:
                cell_runs = [x for (b, s, m, src, _d), xs in runs.items() if (b, s, m, src) == (backbone, shots, method,
                                                                                             source) for x in xs]
            elif r is not None and r["fallback"]:
                cell_runs = fallback.get((backbone, shots, method, dataset), [])
            else:
                cell_runs = runs.get((backbone, shots, method, source, dataset), [])
            title = f"{method_label(method)}, {header}, {backbone}, {shots_text(shots)}" + (
                f", fitted on {protocol_label(source)}" if source else "")
            row["cells"][key] = _protocol_cell(r, title, drill, cell_runs, FEWSHOT if r and r["fallback"] else protocol)
        board.rows.append(row)
    board.notes = [PROTOCOL_NOTES["base2new" if protocol == "base2new" else
                                  "transfer" if view.source_result else "other"]]
    return board


# --- HTML ------------------------------------------------------------------------------------------------

def esc(text) -> str:
    """HTML-escaped text (quotes too: safe inside attributes)."""
    return html.escape(str(text), quote=True)


def delta_badge(delta: float, title: str = "", text: str | None = None) -> str:
    """A coloured reproduced − published badge: green above, red below, grey within ±0.05; stronger
    colour for larger gaps (full at 5 points)."""
    sign = "pos" if delta > 0.05 else "neg" if delta < -0.05 else "zero"
    hint = f' title="{esc(title)}"' if title else ""
    return (f'<span class="delta {sign}" style="--s:{min(abs(delta) / 5.0, 1.0):.2f}"{hint}>'
            f"{esc(text if text is not None else f'{delta:+.1f}')}</span>")


PAPER_DELTA = re.compile(r"(<td[^>]*>[^<]*?)\(([+\u2212])(\d+(?:\.\d+)?)\)(</td>)")


def colour_paper_deltas(section: str) -> str:
    """The Δ-vs-paper section's table cells "71.2 (−0.3)" with the delta as a coloured badge."""
    def badge(m: re.Match) -> str:
        value = float(m.group(3)) * (-1 if m.group(2) == "\u2212" else 1)
        return m.group(1) + delta_badge(value, "reproduced − published", m.group(2) + m.group(3)) + m.group(4)

    return PAPER_DELTA.sub(badge, section)


def _cell_html(cell: Cell) -> str:
    value = "" if cell.value is None else f"{cell.value:.6g}"
    attrs = f' data-v="{value}"' + (f' title="{esc(cell.title)}"' if cell.title else "")
    classes = ["num"] + (["best"] if cell.best else []) + (["drill"] if cell.drill else [])
    body = re.sub(r" \((\d+)\)$", r' <span class="n">(\1)</span>', esc(cell.text))  # the seed count, muted
    if cell.delta is not None:
        body += " " + delta_badge(cell.delta, cell.published)
    if cell.drill:
        attrs += f' data-cell="{cell.drill}" tabindex="0"'
    return f'<td class="{" ".join(classes)}"{attrs}>{body}</td>'


def _row_attrs(row: dict, protocol: str) -> str:
    values = {"backbone": row["backbone"], "shots": row["shots"], "protocol": protocol,
              "family": method_family(row["method"]), "method": row["method"]}
    return " ".join(f'data-{k}="{esc(v)}"' for k, v in values.items())


def board_html(board: Board) -> str:
    """One leaderboard as a sortable, filterable table (rows carry their filter values)."""
    source = board.protocol not in (FEWSHOT, "base2new")
    head = ["Backbone", "Shots", "Method", "Family"] + (["Fitted on"] if source else [])
    ths = "".join(f'<th data-type="{"num" if h == "Shots" else "text"}">{esc(h)}</th>' for h in head)
    ths += "".join(f'<th data-type="num" data-col="{esc(k)}">{esc(h)}</th>' for k, h in board.columns)
    body = []
    for row in board.rows:
        tds = [f"<td>{esc(row['backbone'])}</td>", f'<td class="num" data-v="{row["shots"]}">{row["shots"]}</td>',
               f'<td class="method" title="{esc(row["method"])}">{esc(method_label(row["method"]))}</td>',
               f"<td>{esc(method_family(row['method']))}</td>"]
        tds += [f"<td>{esc(protocol_label(row['source']))}</td>"] if source else []
        tds += [_cell_html(row["cells"].get(k, Cell())) for k, _ in board.columns]
        body.append(f'<tr {_row_attrs(row, board.protocol)}>{"".join(tds)}</tr>')
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in board.notes)
    return (f'<section class="board" data-protocol="{esc(board.protocol)}">'
            f"<h3>{esc(protocol_name(board.protocol))}</h3>{notes}"
            f'<div class="scroll"><table class="sortable leaderboard" id="board-{esc(board.protocol)}">'
            f"<thead><tr>{ths}</tr></thead><tbody>{''.join(body)}</tbody></table></div></section>")


def cost_html(df: pd.DataFrame) -> str:
    """The cost table (`cost_table`, medians) as a sortable table that the filters apply to."""
    table = cost_table(df)
    if table.empty:
        return '<p class="note">No cost recorded.</p>'
    head = [("Backbone", "text"), ("Method", "text"), ("Shots", "num"), ("Scope", "text"), ("Runs", "num"),
            ("Train time", "num"), ("Peak memory", "num"), ("Trainable params", "num"), ("Inference overhead", "num")]
    rows = []
    for r in table.itertuples(index=False):
        row = {"backbone": r.backbone, "shots": int(r.shots), "method": r.method}
        mem = "–" if pd.isna(r.peak_memory_gib) else f"{r.peak_memory_gib:.2f} GiB"
        values = [(r.train_seconds, human_seconds(r.train_seconds)), (r.peak_memory_gib, mem),
                  (r.trainable_params, human_count(r.trainable_params)),
                  (r.inference_overhead, human_count(r.inference_overhead))]
        tds = [f"<td>{esc(r.backbone)}</td>", f'<td class="method" title="{esc(r.method)}">'
               f"{esc(method_label(r.method))}</td>", f'<td class="num" data-v="{r.shots}">{r.shots}</td>',
               f"<td>{esc(r.dataset)}</td>", f'<td class="num" data-v="{r.runs}">{r.runs}</td>']
        tds += [f'<td class="num" data-v="{"" if pd.isna(v) else f"{v:.6g}"}">{esc(t)}</td>' for v, t in values]
        rows.append(f'<tr {_row_attrs(row, FEWSHOT)}>{"".join(tds)}</tr>')
    ths = "".join(f'<th data-type="{t}">{esc(h)}</th>' for h, t in head)
    return (f'<div class="scroll"><table class="sortable" id="cost"><thead><tr>{ths}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


# --- the Markdown that report.md holds, as HTML -------------------------------------------------------

IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)]+)\)")
HEADING = re.compile(r"(#{1,6}) (.*)")


def inline_html(text: str) -> str:
    """Escaped text with the report's inline Markdown: **bold**, `code`, \\* (a literal star)."""
    out = esc(text).replace("\\*", "&#42;")
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def _md_table(lines: list[str]) -> str:
    """A pipe table (header, alignment row, rows) as an HTML table."""
    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    header, rest = cells(lines[0]), lines[1:]
    aligns = ["left"] * len(header)
    if rest and set(rest[0].replace("|", "").strip()) <= set(":- "):
        spec = cells(rest[0])
        aligns = ["center" if s.startswith(":") and s.endswith(":") else "right" if s.endswith(":") else "left"
                  for s in spec] + aligns[len(spec):]
        rest = rest[1:]
    head = "".join(f'<th style="text-align:{a}">{inline_html(h)}</th>' for h, a in zip(header, aligns, strict=False))
    body = "".join("<tr>" + "".join(f'<td style="text-align:{a}">{inline_html(c)}</td>'
                                    for c, a in zip(cells(line), aligns, strict=False)) + "</tr>" for line in rest)
    return f'<div class="scroll"><table class="md"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def markdown_html(text: str, figures: dict[str, str]) -> str:
    """The subset of Markdown the report writes (headings, pipe tables, lists, images, paragraphs)
    as HTML; an image whose file name is in `figures` (name -> <figure> HTML) is inlined."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        take = 1
        if not line.strip():
            pass
        elif line.startswith("|"):
            block = _until(lines, i, lambda x: x.startswith("|"))
            out.append(_md_table(block))
            take = len(block)
        elif HEADING.fullmatch(line):
            level, title = HEADING.fullmatch(line).groups()
            out.append(f"<h{len(level)}>{inline_html(title)}</h{len(level)}>")
        elif IMAGE.fullmatch(line.strip()):
            alt, src = IMAGE.fullmatch(line.strip()).groups()
            out.append(figures.get(Path(src).name, f'<p class="note">Figure {esc(src)} was not written.</p>'))
        elif line.startswith("- "):
            items = _until(lines, i, lambda x: x.startswith("- "))
            out.append("<ul>" + "".join(f"<li>{inline_html(x[2:])}</li>" for x in items) + "</ul>")
            take = len(items)
        else:
            para = _until(lines, i, lambda x: bool(x.strip()) and not x.startswith(("|", "#", "- ", "![")))
            out.append(f"<p>{inline_html(' '.join(para))}</p>")
            take = max(1, len(para))
        i += take
    return "\n".join(out)


def _until(lines: list[str], start: int, keep) -> list[str]:
    """The run of lines from `start` for which `keep(line)` holds."""
    out = []
    for line in lines[start:]:
        if not keep(line):
            break
        out.append(line)
    return out


# --- figures ----------------------------------------------------------------------------------------

CAPTIONS = [  # file-stem prefix -> caption (the stem's tail names the backbone / block)
    ("fig2_shots_average", "Figure 2, last panels: Average top-1 vs shots per backbone"),
    ("fig2_shots_", "Figure 2: top-1 vs shots per dataset (band: ±1 sample std over seeds), {}"),
    ("fig3_ablation_", "Figure 3: LoRA ablations (4 shots), {}"),
    ("pareto_", "Average top-1 vs median training time, with the Pareto front"),
    ("cd_", "Critical-difference diagram, {}"),
    ("base2new_", "Base vs New accuracy, with curves of equal H, {}"),
]


def caption(stem: str) -> str:
    """A figure's caption from its file stem ("fig2_shots_ViT-B-16" -> "Figure 2: ..., ViT-B-16")."""
    for prefix, text in CAPTIONS:
        if stem.startswith(prefix):
            return text.format(stem[len(prefix):].replace("_", ", ").replace("shots", " shots"))
    return stem.replace("_", " ")


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) in pixels from a PNG's IHDR chunk; (0, 0) when `data` is not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24:
        return 0, 0
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def figure_html(path: Path, dpi: int = 200) -> str:
    """A <figure> with the PNG inlined as base64 (the page stays one file), shown at its size in inches
    (the report saves figures at 200 dpi; shown at 120 CSS px per inch), never wider than the page."""
    raw = Path(path).read_bytes()
    data, text = base64.b64encode(raw).decode("ascii"), caption(Path(path).stem)
    width, height = (round(v * 120 / dpi) for v in png_size(raw))
    size = f' width="{width}" height="{height}"' if width and height else ""
    return (f'<figure id="fig-{esc(Path(path).stem)}"><img alt="{esc(text)}"{size} '
            f'src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(text)} <span class=\"file\">({esc(Path(path).name)})</span></figcaption></figure>")


# --- the page ------------------------------------------------------------------------------------------

@dataclass
class Sections:
    """report.md's text sections (Markdown) and the figures the report wrote, for the page."""

    statistics: str = ""
    protocols: str = ""
    paper: str = ""  # `PaperSections.main`: coverage of the published cells, Figure 3's deltas
    paper_cost: str = ""  # `PaperSections.cost`: Table 1 beside fsbench's times
    notes: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)  # PNG files


def _filters(boards: list[Board]) -> str:
    """The filter bar: a select per filter with the values present, a method search, a row counter."""
    rows = [(r, b.protocol) for b in boards for r in b.rows]
    values = {"backbone": sorted({r["backbone"] for r, _ in rows}),
              "shots": sorted({r["shots"] for r, _ in rows}),
              "protocol": list(dict.fromkeys(b.protocol for b in boards if b.rows)),
              "family": sorted({method_family(r["method"]) for r, _ in rows})}
    labels = {"protocol": protocol_name}
    parts = []
    for name in FILTERS:
        options = "".join(f'<option value="{esc(v)}">{esc(labels.get(name, str)(v))}</option>' for v in values[name])
        parts.append(f'<label>{name.capitalize()} <select id="filter-{name}" data-filter="{name}">'
                     f'<option value="">all</option>{options}</select></label>')
    parts.append('<label>Method <input id="filter-method" type="search" placeholder="contains"></label>'
                 '<button type="button" id="filter-reset">Reset</button><span id="counter" aria-live="polite"></span>')
    return f'<div class="filters" role="search">{"".join(parts)}</div>'


def _meta(df: pd.DataFrame, others: pd.DataFrame) -> str:
    from fsbench import __version__

    runs = len(main_runs(df)) + len(others)
    backbones = sorted({str(b) for frame in (df, others) if "backbone" in frame.columns for b in frame["backbone"]})
    return (f"{runs} finished runs · backbones: {esc(', '.join(backbones)) or '–'} · made by fsbench {__version__} "
            "(open offline; click a cell for its runs, a column header to sort)")


def _section(section_id: str, title: str, body: str) -> str:
    if not body.strip():
        return ""
    heading = f"<h2>{esc(title)}</h2>" if title else ""
    return f'<section id="{section_id}">{heading}{body}</section>'


def report_html(df: pd.DataFrame, others: pd.DataFrame | None = None, comparison: pd.DataFrame | None = None,
                sections: Sections | None = None, results_dir: str | Path | None = None) -> str:
    """The whole page as a string (see the module docstring).

    Args:
        df: few-shot rows (`clean`), as `write_report` passes them to the Markdown report.
        others: rows of the other protocols (base-to-new, cross-dataset, ...).
        comparison: `compare_to_reference`'s frame: coloured deltas in the few-shot leaderboard.
        sections: the Markdown sections and figure files of report.md.
        results_dir: the results store, to name each run's result file (else the store-relative layout path).
    """
    others = others if others is not None else df.iloc[:0]
    sections = sections or Sections()
    drill = Drill(result_paths(results_dir))
    boards = [b for b in [fewshot_board(df, drill, comparison)] + [protocol_board(others, p, drill, df)
                                                                    for p in present_protocols(others)]
              if b is not None]
    figures = {Path(p).name: figure_html(Path(p)) for p in sections.figures}
    placed = {name for text in (sections.statistics, sections.protocols, sections.paper)
              for name in (Path(src).name for _, src in IMAGE.findall(text))}

    def loose(prefix: str) -> str:
        names = [n for n in figures if n.startswith(prefix) and n not in placed]
        placed.update(names)
        return "".join(figures[n] for n in names)

    cost = cost_html(df) + markdown_html(sections.paper_cost, figures) + loose("pareto_")
    protocols = markdown_html(sections.protocols, figures) + loose("base2new_")
    body = [f'<header><h1>fsbench report</h1><p class="meta">{_meta(df, others)}</p></header>',
            _nav(sections, boards, bool(figures)),
            _section("leaderboards", "Leaderboards", (_filters(boards) + "".join(board_html(b) for b in boards))
                     if boards else '<p class="note">No finished runs.</p>'),
            _section("protocol-tables", "", protocols),
            _section("paper", "", colour_paper_deltas(markdown_html(sections.paper, figures))),
            _section("statistics", "", markdown_html(sections.statistics, figures)),
            _section("cost", "Cost", cost)]
    rest = loose("")
    body += [_section("figures", "Figures", rest),
             _section("notes", "Notes", "<ul>" + "".join(f"<li>{inline_html(n)}</li>" for n in sections.notes)
                      + "</ul>" if sections.notes else "")]
    return _document("".join(body), drill.cells)


def _nav(sections: Sections, boards: list[Board], figures: bool) -> str:
    links = [("leaderboards", "Leaderboards", bool(boards)), ("protocol-tables", "Protocol tables",
                                                              bool(sections.protocols)),
             ("paper", "Δ vs paper", bool(sections.paper)), ("statistics", "Statistics", bool(sections.statistics)),
             ("cost", "Cost", True), ("figures", "Figures", figures), ("notes", "Notes", bool(sections.notes))]
    return "<nav>" + " ".join(f'<a href="#{i}">{esc(t)}</a>' for i, t, on in links if on) + "</nav>"


def _json_script(data) -> str:
    """JSON safe inside <script>: every "<", ">" and "&" escaped, so no name can close the element."""
    text = json.dumps(data, ensure_ascii=False, sort_keys=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _document(body: str, cells: dict) -> str:
    dialog = ('<dialog id="drill" aria-labelledby="drill-title"><form method="dialog"><button class="close" '
              'aria-label="Close">×</button></form><h3 id="drill-title"></h3>'
              '<div class="scroll"><table id="drill-runs">'
              "<thead><tr><th>Dataset</th><th>Seed</th><th>Value</th><th>Train time</th><th>Config hash</th>"
              "<th>Identity hash</th><th>Result file</th></tr></thead><tbody></tbody></table></div></dialog>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>fsbench report</title><style>{CSS}</style></head><body><main>{body}</main>{dialog}"
            f'<script type="application/json" id="drill-data">{_json_script(cells)}</script>'
            f"<script>{JS}</script></body></html>\n")


def write_html(path: str | Path, df: pd.DataFrame, others: pd.DataFrame | None = None,
               comparison: pd.DataFrame | None = None, sections: Sections | None = None,
               results_dir: str | Path | None = None) -> Path:
    """Write `report_html(...)` to `path` atomically; returns the path."""
    from fsbench.io import atomic_write

    text = report_html(df, others, comparison, sections, results_dir)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#d8dee4;--head:#f6f8fa;--accent:#b2182b;--pos:26,127,55;--neg:207,34,46}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
color:var(--fg);background:#fff}
main{max-width:1280px;margin:0 auto;padding:12px 24px 48px}
header h1{margin:8px 0 2px;font-size:24px}
.meta{color:var(--muted);margin:0 0 6px}
nav{position:sticky;top:0;z-index:2;background:rgba(255,255,255,.96);border-bottom:1px solid var(--line);padding:6px 0}
nav a{margin-right:16px;color:var(--accent);text-decoration:none;font-weight:600}
nav a:hover{text-decoration:underline}
section,h2,h3{scroll-margin-top:44px}
h2{font-size:20px;border-bottom:1px solid var(--line);padding-bottom:4px;margin:28px 0 8px}
h3{font-size:16px;margin:18px 0 4px}
.filters{display:flex;flex-wrap:wrap;gap:8px 12px;align-items:center;background:var(--head);
border:1px solid var(--line);border-radius:6px;padding:8px 12px;margin:8px 0 4px}
.filters label{font-weight:600;color:var(--muted)}
select,input,button{font:inherit;margin-left:4px}
#counter{margin-left:auto;color:var(--muted)}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:4px 0 10px;font-variant-numeric:tabular-nums}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);white-space:nowrap}
thead th{background:var(--head);text-align:left;border-bottom:2px solid var(--line)}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th::after{content:" \\2195";color:#afb8c1;font-weight:400}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2";color:var(--fg)}
table.sortable th[aria-sort=descending]::after{content:" \\25BC";color:var(--fg)}
td.num{text-align:right}
td.best{font-weight:700}
td.drill{cursor:pointer}
td.drill:hover,td.drill:focus{background:#fff3cd;outline:none}
tbody tr:hover{background:#f6f8fa}
.delta{display:inline-block;min-width:3.2em;text-align:center;border-radius:4px;padding:0 4px;margin-left:4px;
font-size:12px;font-weight:600}
.delta.pos{background:rgba(var(--pos),calc(.12 + .45*var(--s)))}
.delta.neg{background:rgba(var(--neg),calc(.12 + .45*var(--s)))}
.delta.zero{background:#eaeef2}
figure{margin:12px 0 20px}
figure img{max-width:100%;height:auto;border:1px solid var(--line);border-radius:4px;background:#fff}
figcaption,.note{color:var(--muted);font-size:13px}
.note{margin:2px 0 4px}
.file,.n{color:#8c959f}
select{max-width:14em}
input[type=search]{width:9em}
code{background:var(--head);padding:0 3px;border-radius:3px;font-size:90%}
dialog{border:1px solid var(--line);border-radius:8px;max-width:min(1150px,95vw);padding:14px 20px;
box-shadow:0 8px 30px rgba(0,0,0,.2)}
dialog::backdrop{background:rgba(0,0,0,.25)}
dialog .close{float:right;border:0;background:none;font-size:22px;line-height:1;cursor:pointer}
#drill-runs td:nth-child(n+5){font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
[hidden]{display:none!important}
"""

JS = r"""
(function () {
  "use strict";
  var FILTERS = ["backbone", "shots", "protocol", "family"];
  var DATA = JSON.parse(document.getElementById("drill-data").textContent);
  function all(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }
  function sortKey(td, type) {
    if (!td) { return null; }
    if (type === "num") {
      var v = td.getAttribute("data-v");
      if (v === null || v === "") { return null; }
      var x = parseFloat(v);
      return isNaN(x) ? null : x;
    }
    return td.textContent.trim().toLowerCase();
  }
  function sortBy(th) {
    var table = th.closest("table"), body = table.tBodies[0];
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var type = th.getAttribute("data-type") || "text", now = th.getAttribute("aria-sort");
    var dir = now === "descending" ? 1 : now === "ascending" ? -1 : (type === "num" ? -1 : 1);
    all("th", table).forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    var rows = Array.prototype.slice.call(body.rows).map(function (r, i) {
      return {row: r, i: i, k: sortKey(r.cells[col], type)};
    });
    rows.sort(function (a, b) {  // missing values last in both directions; ties keep their order
      if (a.k === null || b.k === null) { return a.k === b.k ? a.i - b.i : (a.k === null ? 1 : -1); }
      return a.k < b.k ? -dir : a.k > b.k ? dir : a.i - b.i;
    });
    rows.forEach(function (r) { body.appendChild(r.row); });
  }
  function applyFilters() {
    var want = {};
    FILTERS.forEach(function (f) { want[f] = document.getElementById("filter-" + f).value; });
    var q = document.getElementById("filter-method").value.trim().toLowerCase();
    var shown = 0, total = 0;
    all("tr[data-protocol]").forEach(function (tr) {
      var label = (tr.querySelector(".method") || tr).textContent.toLowerCase();
      var ok = FILTERS.every(function (f) { return !want[f] || tr.getAttribute("data-" + f) === want[f]; }) &&
        (!q || label.indexOf(q) >= 0 || tr.getAttribute("data-method").toLowerCase().indexOf(q) >= 0);
      tr.hidden = !ok;
      if (tr.closest("table.leaderboard")) { total += 1; shown += ok ? 1 : 0; }
    });
    all("section.board").forEach(function (s) { s.hidden = all("tbody tr:not([hidden])", s).length === 0; });
    document.getElementById("counter").textContent = shown + " of " + total + " rows";
  }
  function openDrill(id) {
    var cell = DATA[id], dialog = document.getElementById("drill");
    if (!cell) { return; }
    document.getElementById("drill-title").textContent = cell.title;
    var body = document.querySelector("#drill-runs tbody");
    body.replaceChildren();
    cell.runs.forEach(function (run) {
      var tr = document.createElement("tr");
      ["dataset", "seed", "value", "train_seconds", "config_hash", "identity_hash", "path"].forEach(function (k) {
        var td = document.createElement("td");
        td.textContent = run[k] === "" || run[k] === null ? "\u2013" : String(run[k]);
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    if (typeof dialog.showModal === "function") { dialog.showModal(); } else { dialog.setAttribute("open", ""); }
  }
  document.addEventListener("click", function (e) {
    var th = e.target.closest("table.sortable th");
    if (th) { sortBy(th); return; }
    var td = e.target.closest("td[data-cell]");
    if (td) { openDrill(td.getAttribute("data-cell")); }
  });
  document.addEventListener("keydown", function (e) {
    var td = e.target.closest && e.target.closest("td[data-cell]");
    if (td && e.key === "Enter") { openDrill(td.getAttribute("data-cell")); }
  });
  if (document.getElementById("counter")) {
    all("[data-filter], #filter-method").forEach(function (el) {
      el.addEventListener("input", applyFilters);
      el.addEventListener("change", applyFilters);
    });
    document.getElementById("filter-reset").addEventListener("click", function () {
      all("[data-filter], #filter-method").forEach(function (el) { el.value = ""; });
      applyFilters();
    });
    applyFilters();
  }
}());
"""
