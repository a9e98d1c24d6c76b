"""The HTML report's layout: its comparison tables fit a 1400 px window, and scatter-plot labels do not
overlap each other and stay with their points.

No browser renders the page here, so widths are estimates from text length, each assumption stated:
the page sets 15 px text (13 px under a variant's name); every character is counted at 0.70 em, the
widest glyphs in these cells (DejaVu Sans Bold digits: 0.70 em; DejaVu Sans averages 0.47-0.64 em on
these strings, and the fonts system-ui picks elsewhere are narrower); each cell adds 0.5rem padding on
both sides and a 1 px border. The page's own 1rem padding and a 17 px scrollbar come off the window.
"""

import copy
import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import pytest

from quantkit.evaluation.report_html import html_report
from quantkit.evaluation.report_md import table_rows, table_text
from quantkit.evaluation.svg import H, W, scatter_plot

XEON = Path(__file__).parents[2] / "eval" / "results" / "smollm2-135m-cpu-xeon" / "results.json"

WINDOW, PAGE_PADDING, SCROLLBAR = 1400, 16, 17
BODY_PX, SMALL_PX, EM_PER_CHAR, CELL_PADDING = 15, 13, 0.70, 2 * 8 + 1
MAX_COLUMNS = 10


class _Tables(HTMLParser):
    """The comparison tables (not the provenance one): per table, rows of cells, each cell a list of
    ``(text, small)`` lines (``<br>`` starts a line; ``small``: inside ``<small>``)."""

    def __init__(self):
        super().__init__()
        self.tables: list[list[list[list[tuple[str, bool]]]]] = []
        self.cell: list[tuple[str, bool]] | None = None
        self.small = False
        self.skip = 0  # inside a table that is not a comparison table

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            if dict(attrs).get("class") == "prov":
                self.skip += 1
            else:
                self.tables.append([])
        elif self.skip:
            return
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = [("", False)]
            self.tables[-1][-1].append(self.cell)
        elif tag == "br" and self.cell is not None:
            self.cell.append(("", False))
        elif tag == "small":
            self.small = True

    def handle_endtag(self, tag):
        if tag == "table" and self.skip:
            self.skip -= 1
        elif tag in ("td", "th"):
            self.cell = None
        elif tag == "small":
            self.small = False

    def handle_data(self, data):
        if self.cell is not None and not self.skip:
            text, small = self.cell[-1]
            self.cell[-1] = (text + data, small or self.small)


def _content_width(page: str) -> int:
    """The page's content width, from its CSS, checked to fit the window with padding and a scrollbar."""
    width = int(re.search(r"body\{[^}]*max-width:(\d+)px", page).group(1))
    assert width + 2 * PAGE_PADDING + SCROLLBAR <= WINDOW
    return width


def _small_cap(page: str) -> float:
    """How wide a line in <small> gets before it wraps (CSS ``max-width`` in em of its 13 px)."""
    return int(re.search(r"td small\{[^}]*max-width:(\d+)em", page).group(1)) * SMALL_PX


def _line_px(text: str, px: float) -> float:
    return len(text) * EM_PER_CHAR * px


def _table_px(table: list[list[list[tuple[str, bool]]]], small_cap: float) -> float:
    """Estimated width: per column, its widest line plus the cell padding."""
    columns = len(table[0])
    assert all(len(row) == columns for row in table)  # no colspans: one cell per column
    widest = [0.0] * columns
    for row in table:
        for i, cell in enumerate(row):
            for text, small in cell:
                w = min(_line_px(text, SMALL_PX), small_cap) if small else _line_px(text, BODY_PX)
                widest[i] = max(widest[i], w)
    return sum(w + CELL_PADDING for w in widest)


def _check_tables_fit(page: str, n_tables: int) -> None:
    parser = _Tables()
    parser.feed(page)
    width, cap = _content_width(page), _small_cap(page)
    assert len(parser.tables) == n_tables
    for table in parser.tables:
        assert len(table[0]) <= MAX_COLUMNS
        assert _table_px(table, cap) <= width, (_table_px(table, cap), [c[0][0] for c in table[0]])


@pytest.fixture(scope="module")
def xeon():
    return json.loads(XEON.read_text())


def test_comparison_tables_fit_a_1400px_window(xeon):
    _check_tables_fit(html_report([xeon], ["smollm2-135m"]), n_tables=2)  # accuracy and size; speed


def test_tables_fit_with_a_long_scheme_and_without_speed(xeon):
    results = copy.deepcopy(xeon)
    config = next(r for r in results["rows"] if r["name"] == "w8a8-smoothquant")["config"]
    config["w8a16_modules"] = config["modules"][:3]  # "..., 3/210 layers W8A16": wraps under the name
    page = html_report([results], ["long scheme"])
    assert "3/210 layers W8A16" in page
    _check_tables_fit(page, n_tables=2)
    for row in results["rows"]:
        del row["speed"]
    page = html_report([results], ["no speed"])
    assert "tok/s" not in page
    _check_tables_fit(page, n_tables=1)


def test_the_estimate_rejects_one_wide_table(xeon):
    """The check can fail: the one 16-column table the report had before does not fit by this estimate."""
    rows = table_rows(xeon)
    head, body = table_text(rows, memory_decimals=0)
    table = [[[(h, False)] for h in head]]
    table += [[[(r["name"], False)], *([(c, False)] for c in cells)] for r, cells in zip(rows, body, strict=True)]
    assert len(head) > MAX_COLUMNS and _table_px(table, small_cap=0) > 1200


# Point labels: 11 px text; the test's own estimate of a label's box is 0.6 em per character wide, from
# 0.8 em above its baseline to 0.2 em below (the plot places them with a wider one).
PT_PX, PT_EM = 11, 0.6


def _label_box(text: ET.Element) -> tuple[float, float, float, float]:
    x, y, w = float(text.get("x")), float(text.get("y")), len(text.text) * PT_EM * PT_PX
    x0 = x - w if text.get("text-anchor") == "end" else x
    return x0, y - 0.8 * PT_PX, x0 + w, y + 0.2 * PT_PX


def _overlaps(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _distance(x: float, y: float, box) -> float:
    """From the point ``(x, y)`` to the nearest point of ``box`` (0 inside it)."""
    dx, dy = max(box[0] - x, 0, x - box[2]), max(box[1] - y, 0, y - box[3])
    return (dx * dx + dy * dy) ** 0.5


def _check_labels(svg: str, n: int) -> int:
    """Every point has its label, no two labels overlap, no label covers a dot, each label sits beside
    its dot or has a leader line from the dot to it; returns how many labels were moved."""
    ns = {"s": "http://www.w3.org/2000/svg"}
    groups = ET.fromstring(svg).findall("s:g[@class='point']", ns)
    assert len(groups) == n
    dots, boxes, moved = [], [], 0
    for g in groups:
        circle, text = g.find("s:circle", ns), g.find("s:text", ns)
        cx, cy = float(circle.get("cx")), float(circle.get("cy"))
        assert circle.find("s:title", ns).text.startswith(f"{text.text}: ")  # the label is this point's
        box = _label_box(text)
        assert 0 <= box[0] and box[2] <= W and 0 <= box[1] and box[3] <= H  # inside the plot
        leader = g.find("s:line[@class='leader']", ns)
        if leader is None:
            assert _distance(cx, cy, box) <= 10  # beside the dot (radius 5)
        else:
            moved += 1
            assert (float(leader.get("x1")), float(leader.get("y1"))) == (cx, cy)
            assert _distance(float(leader.get("x2")), float(leader.get("y2")), box) <= 3
        dots.append((cx - 5, cy - 5, cx + 5, cy + 5))
        boxes.append(box)
    for i, a in enumerate(boxes):
        assert not any(_overlaps(a, b) for b in boxes[i + 1 :]), a
        assert not any(_overlaps(a, d) for j, d in enumerate(dots) if j != i)
    return moved


def test_labels_of_points_at_the_same_place_do_not_overlap():
    same = [(f"w8a8-variant-{i}", 129.4, 34.57, "#000") for i in range(6)]  # six at one spot
    near = [("float (float32)", 256.6, 34.332, "#888"), ("float (bfloat16)", 256.6, 34.339, "#888")]
    edge = [("w8a16", 129.1, 34.392, "#111"), ("w8a8-naive", 129.1, 35.355, "#222")]
    svg = scatter_plot(same + near + edge, "t", "x", "y")
    assert svg == scatter_plot(same + near + edge, "t", "x", "y")  # deterministic
    assert _check_labels(svg, n=10) >= 5  # at least all but one of the six moved, with leaders


def test_labels_in_a_crowded_column_and_in_the_real_report(xeon):
    column = [(f"variant {i}", 100.0, 34.0 + 0.001 * i, "#000") for i in range(12)] + [("far", 300.0, 36.0, "#000")]
    _check_labels(scatter_plot(column, "t", "x", "y"), n=13)
    page = html_report([xeon], ["smollm2-135m"])
    svg = re.search(r'<svg\b[^>]*aria-label="Perplexity vs checkpoint size".*?</svg>', page, flags=re.S).group(0)
    assert _check_labels(svg, n=6) == 1  # float (bfloat16) sits 1 px from float (float32): one label moved
