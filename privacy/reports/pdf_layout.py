"""Building blocks of the privacy report PDF with ReportLab: fonts, number format, tables and plots.

Text uses a TrueType font with wide Unicode coverage when one is installed
(DejaVu Sans covers Latin, Greek, Cyrillic, Hebrew and Arabic letters);
otherwise ReportLab's bundled Bitstream Vera, which covers Latin only, and
the report states that.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import reportlab
from bidi import get_display
from reportlab.graphics.charts.barcharts import VerticalBarChart
from reportlab.graphics.charts.legends import Legend
from reportlab.graphics.charts.lineplots import LinePlot
from reportlab.graphics.shapes import Drawing, String
from reportlab.graphics.widgets.markers import makeMarker
from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle
from reportlab.lib.units import mm
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.ttfonts import TTFont
from reportlab.platypus import Paragraph, Spacer, Table, TableStyle

# Regular and bold faces tried in order; the first pair that exists is used.
UNICODE_FONT_CANDIDATES = (
    ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"),
    ("/usr/share/fonts/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans-Bold.ttf"),
    ("/usr/share/fonts/TTF/DejaVuSans.ttf", "/usr/share/fonts/TTF/DejaVuSans-Bold.ttf"),
)
BUNDLED_FONTS = (Path(reportlab.__file__).parent / "fonts" / "Vera.ttf", Path(reportlab.__file__).parent / "fonts" / "VeraBd.ttf")
# Ledger rows printed in the PDF; the CSV and JSON exports always hold all of them.
PDF_MAX_LEDGER_ROWS = 2000
# Nodes drawn in the budget-use chart, those with the highest use first.
CHART_MAX_NODES = 40
PAGE_MARGIN = 15 * mm
TEXT_WIDTH = A4[0] - 2 * PAGE_MARGIN


@dataclass(frozen=True)
class ReportFont:
    regular: str
    bold: str
    has_wide_coverage: bool


def register_font(candidates: Sequence[tuple[str, str]] = UNICODE_FONT_CANDIDATES) -> ReportFont:
    """Register the first installed font pair of `candidates` with ReportLab, or the bundled Vera."""
    for regular, bold in candidates:
        if Path(regular).is_file() and Path(bold).is_file():
            return _register("FLOSans", regular, bold, has_wide_coverage=True)
    return _register("FLOVera", str(BUNDLED_FONTS[0]), str(BUNDLED_FONTS[1]), has_wide_coverage=False)


def _register(name: str, regular: str, bold: str, *, has_wide_coverage: bool) -> ReportFont:
    if name not in pdfmetrics.getRegisteredFontNames():
        pdfmetrics.registerFont(TTFont(name, regular))
        pdfmetrics.registerFont(TTFont(name + "-Bold", bold))
    return ReportFont(regular=name, bold=name + "-Bold", has_wide_coverage=has_wide_coverage)


def format_number(value: Any) -> str:
    """Print integers exactly, floats to six decimals (scientific notation below 0.001 or from 1e6 up), None as "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.6f}"
        return f"{value:.6e}"
    return str(value)


class PdfLayout:
    """Styles and flowable builders (paragraphs, tables, plots) of one report."""

    def __init__(self, document: dict[str, Any], font: ReportFont):
        self.doc = document
        self.font = font
        self.body = ParagraphStyle("body", fontName=font.regular, fontSize=9, leading=12)
        self.small = ParagraphStyle("small", parent=self.body, fontSize=7, leading=9)
        self.heading = ParagraphStyle("heading", parent=self.body, fontName=font.bold, fontSize=13, leading=17, spaceBefore=10, spaceAfter=4)
        self.title = ParagraphStyle("title", parent=self.body, fontName=font.bold, fontSize=17, leading=22, spaceAfter=6)

    def footer(self, canvas, pdf) -> None:
        canvas.saveState()
        canvas.setFont(self.font.regular, 7)
        digest = self.doc["integrity"]["json_sha256"]
        canvas.drawString(PAGE_MARGIN, PAGE_MARGIN / 2, f"FLO privacy report, federation {self.doc['federation']['id']}; JSON SHA-256 {digest}")
        canvas.drawRightString(A4[0] - PAGE_MARGIN, PAGE_MARGIN / 2, f"page {pdf.page}")
        canvas.restoreState()

    def paragraph(self, text: Any, style: ParagraphStyle | None = None) -> Paragraph:
        """Build a paragraph of plain text: escape markup characters, keep newlines and reorder right-to-left runs.

        ReportLab draws characters in the order given, so each line passes
        through the Unicode bidirectional algorithm (python-bidi) first.
        NOTE: Arabic letters are drawn in their isolated forms, because no
        shaping engine joins them; the text stays readable and extractable.
        """
        lines = [escape(get_display(line)) for line in str(text).split("\n")]
        return Paragraph("<br/>".join(lines), style or self.body)

    def key_values(self, rows: Sequence[tuple[str, Any]]) -> Table:
        data = [[self.paragraph(key, self.small), self.paragraph(_cell_text(value), self.small)] for key, value in rows]
        return self._styled(Table(data, colWidths=[0.3 * TEXT_WIDTH, 0.7 * TEXT_WIDTH]), header=False)

    def table(self, columns: Sequence[str], rows: Sequence[Sequence[Any]], widths: Sequence[float] | None = None) -> Table:
        data = [[self.paragraph(column, self.small) for column in columns]]
        data += [[self.paragraph(_cell_text(value), self.small) for value in row] for row in rows]
        col_widths = [TEXT_WIDTH * share for share in widths] if widths else None
        return self._styled(Table(data, colWidths=col_widths, repeatRows=1), header=True)

    def _styled(self, table: Table, *, header: bool) -> Table:
        commands = [
            ("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
            ("VALIGN", (0, 0), (-1, -1), "TOP"),
            ("LEFTPADDING", (0, 0), (-1, -1), 2),
            ("RIGHTPADDING", (0, 0), (-1, -1), 2),
        ]
        if header:
            commands.append(("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#dde4ee")))
        table.setStyle(TableStyle(commands))
        return table

    def spacer(self) -> Spacer:
        return Spacer(1, 3 * mm)

    def epsilon_plot(self, series: dict[str, list[tuple[int, float]]]) -> Drawing:
        """Line plot of cumulative epsilon (y) over round numbers (x), one line per series."""
        drawing = Drawing(TEXT_WIDTH, 70 * mm)
        plot = LinePlot()
        plot.x, plot.y = 14 * mm, 12 * mm
        plot.width, plot.height = TEXT_WIDTH - 60 * mm, 52 * mm
        names = [name for name, points in series.items() if points]
        plot.data = [series[name] for name in names]
        palette = [colors.HexColor("#1f5fa8"), colors.HexColor("#c0392b")]
        for index in range(len(names)):
            plot.lines[index].strokeColor = palette[index % len(palette)]
            plot.lines[index].symbol = makeMarker("FilledCircle", size=2)
        for axis in (plot.xValueAxis, plot.yValueAxis):
            axis.labels.fontName = self.font.regular
            axis.labels.fontSize = 7
        plot.yValueAxis.valueMin = 0
        # Whole rounds on the x axis: ReportLab would otherwise label 1.5, 2.5, ...
        last_round = max((point[0] for name in names for point in series[name]), default=1)
        plot.xValueAxis.valueMin = 0
        plot.xValueAxis.valueMax = max(last_round, 1)
        plot.xValueAxis.valueStep = max(1, round(last_round / 10))
        drawing.add(plot)
        drawing.add(String(plot.x, plot.y + plot.height + 4, "cumulative epsilon", fontName=self.font.regular, fontSize=7))
        drawing.add(String(plot.x + plot.width / 2, 2, "round", fontName=self.font.regular, fontSize=7, textAnchor="middle"))
        legend = Legend()
        legend.x, legend.y = plot.x + plot.width + 6 * mm, plot.y + plot.height
        legend.fontName, legend.fontSize = self.font.regular, 7
        legend.colorNamePairs = [(palette[index % len(palette)], name) for index, name in enumerate(names)]
        drawing.add(legend)
        return drawing

    def budget_chart(self, labels: list[str], used_percent: list[float]) -> Drawing:
        """Bar chart of each node's spent epsilon as a percentage of its allocation."""
        drawing = Drawing(TEXT_WIDTH, 75 * mm)
        chart = VerticalBarChart()
        chart.x, chart.y = 14 * mm, 24 * mm
        chart.width, chart.height = TEXT_WIDTH - 20 * mm, 45 * mm
        chart.data = [used_percent]
        chart.bars[0].fillColor = colors.HexColor("#1f5fa8")
        chart.valueAxis.valueMin, chart.valueAxis.valueMax, chart.valueAxis.valueStep = 0, 100, 20
        chart.valueAxis.labels.fontName = self.font.regular
        chart.valueAxis.labels.fontSize = 7
        chart.categoryAxis.categoryNames = labels
        chart.categoryAxis.labels.fontName = self.font.regular
        chart.categoryAxis.labels.fontSize = 5
        chart.categoryAxis.labels.angle = 60
        chart.categoryAxis.labels.boxAnchor = "ne"
        drawing.add(chart)
        drawing.add(String(chart.x, chart.y + chart.height + 4, "epsilon spent, % of allocation", fontName=self.font.regular, fontSize=7))
        return drawing


def format_time(iso: str | None) -> str:
    """Shorten an ISO 8601 UTC time to seconds ("2026-03-09 15:59:00"), so table rows stay on one line."""
    if not iso:
        return "n/a"
    return iso[:19].replace("T", " ")


def _cell_text(value: Any) -> str:
    if isinstance(value, list):
        return "; ".join(_cell_text(item) for item in value)
    if isinstance(value, dict):
        return ", ".join(f"{key}: {_cell_text(item)}" for key, item in value.items())
    return format_number(value)
