"""The privacy report as a PDF: one section per part of the report document."""

import io
from typing import Any

from reportlab.lib.pagesizes import A4
from reportlab.platypus import SimpleDocTemplate

from privacy.reports.pdf_layout import CHART_MAX_NODES, PAGE_MARGIN, PDF_MAX_LEDGER_ROWS, PdfLayout, ReportFont, format_time, register_font


def render_pdf(document: dict[str, Any], *, font: ReportFont | None = None) -> bytes:
    """Render a sealed report document as an A4 PDF and return its bytes."""
    layout = PdfLayout(document, font or register_font())
    buffer = io.BytesIO()
    pdf = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=PAGE_MARGIN,
        rightMargin=PAGE_MARGIN,
        topMargin=PAGE_MARGIN,
        bottomMargin=PAGE_MARGIN * 1.5,
        title=document["report"]["title"],
        author=document["report"]["generator"],
        subject="Privacy report",
    )
    story = []
    for section in (_cover, _parties, _processing, _privacy, _budgets, _rounds, _ledger, _nodes, _aggregation, _security, _model_versions, _audit):
        story += section(layout, document)
    pdf.build(story, onFirstPage=layout.footer, onLaterPages=layout.footer)
    return buffer.getvalue()


def _cover(layout: PdfLayout, doc: dict) -> list:
    report, federation = doc["report"], doc["federation"]
    period = report["period"]
    rows = [
        ("Federation", f"{federation['name']} (id {federation['id']}, {federation['status']})"),
        ("Generated (UTC)", report["generated_at_utc"]),
        (f"Generated ({report['time_zone']})", report["generated_at_local"]),
        ("Generator", report["generator"]),
        ("Schema version", doc["schema_version"]),
        ("Period start", period["start"] or "from the first record"),
        ("Period end (exclusive)", period["end_exclusive"] or "up to the generation time"),
        ("SHA-256 of the JSON form", doc["integrity"]["json_sha256"]),
    ]
    flowables = [layout.paragraph(report["title"], layout.title), layout.key_values(rows), layout.spacer()]
    flowables.append(layout.paragraph(f"Integrity: the digest covers {doc['integrity']['covers']}. {report['pseudonymisation']}", layout.small))
    flowables.append(
        layout.paragraph("Numbers: integers are exact; other values have six decimals, or scientific notation below 0.001. CSV and JSON exports keep full precision.", layout.small)
    )
    if not layout.font.has_wide_coverage:
        flowables.append(
            layout.paragraph("Font: no font with wide Unicode coverage is installed, so characters outside Latin may show as empty boxes; the CSV and JSON exports keep them.", layout.small)
        )
    return flowables


def _parties(layout: PdfLayout, doc: dict) -> list:
    parties = doc["parties"]
    rows = [
        ("Organisation", parties["organisation"]),
        ("Controller", f"{parties['controller']['name']}\n{parties['controller']['contact']}"),
        ("Processor", f"{parties['processor']['name']}\n{parties['processor']['contact']}"),
        ("Data protection officer", parties["data_protection_officer"]),
    ]
    return [layout.paragraph("1. Parties", layout.heading), layout.key_values(rows)]


def _processing(layout: PdfLayout, doc: dict) -> list:
    processing = doc["processing"]
    rows = [
        ("Purpose", processing["purpose"]),
        ("Legal basis", processing["legal_basis_label"]),
        ("Further conditions", processing["legal_basis_detail"]),
        ("Data categories on the devices", processing["data_categories"]),
        ("Raw data", processing["raw_data_statement"]),
        ("What leaves the devices", processing["data_leaving_devices"]),
        ("Model", processing["model"]),
    ]
    return [layout.paragraph("2. Purpose, legal basis and data", layout.heading), layout.key_values(rows)]


def _privacy(layout: PdfLayout, doc: dict) -> list:
    dp = doc["differential_privacy"]
    flowables = [layout.paragraph("3. Differential privacy", layout.heading)]
    flowables.append(layout.key_values([("Modes", dp["modes"]), ("Delta", dp["delta"]), ("Reporting", dp["epsilon_reported_at"])]))
    if dp["statement"]:
        flowables.append(layout.paragraph(dp["statement"]))
    for title, settings in (("Record-level DP (devices)", dp["record_level"]), ("User-level central DP (server)", dp["central"])):
        if settings:
            flowables += [layout.spacer(), layout.paragraph(title, layout.body), layout.key_values(list(settings.items()))]

    series = {}
    if doc["ledger"]["central"]:
        series["federation (central DP)"] = [(row["round"], row["epsilon_after"]) for row in doc["ledger"]["central"]]
    if doc["ledger"]["record_level"]:
        series["highest node (record-level DP)"] = _highest_node_epsilon(doc["ledger"]["record_level"])
    if series:
        flowables += [layout.spacer(), layout.paragraph("Cumulative epsilon over rounds"), layout.epsilon_plot(series)]
    budgeted = [row for row in doc["nodes"] if row["epsilon_allocated"]]
    if budgeted:
        top = sorted(budgeted, key=lambda row: -(row["epsilon_spent_now"] / row["epsilon_allocated"]))[:CHART_MAX_NODES]
        caption = "Budget use per node" + (f" ({CHART_MAX_NODES} highest of {len(budgeted)})" if len(budgeted) > CHART_MAX_NODES else "")
        flowables += [
            layout.paragraph(caption),
            layout.budget_chart([row["node"] for row in top], [100 * row["epsilon_spent_now"] / row["epsilon_allocated"] for row in top]),
        ]
    return flowables


def _highest_node_epsilon(entries: list[dict]) -> list[tuple[int, float]]:
    """Return (round, highest cumulative epsilon of any node up to that round) for each round with a ledger entry."""
    per_round: dict[int, float] = {}
    for entry in entries:
        per_round[entry["round"]] = max(per_round.get(entry["round"], 0.0), entry["epsilon_after"])
    points, highest = [], 0.0
    for round_number in sorted(per_round):
        highest = max(highest, per_round[round_number])
        points.append((round_number, highest))
    return points


def _budgets(layout: PdfLayout, doc: dict) -> list:
    budgets = doc["budgets"]
    flowables = [layout.paragraph("4. Budgets by sensitivity class and exhaustion", layout.heading)]
    columns = ("sensitivity_class", "epsilon_allocated", "nodes", "nodes_exhausted", "max_epsilon_spent")
    flowables.append(layout.table(columns, [[row[column] for column in columns] for row in budgets["by_sensitivity_class"]]))
    events = budgets["exhaustion_events"]
    flowables.append(layout.spacer())
    if events:
        flowables.append(layout.table(("at (UTC)", "scope", "node", "detail"), [[format_time(event["at"]), event["scope"], event["node"], event["detail"]] for event in events], widths=(0.2, 0.1, 0.2, 0.5)))
    else:
        flowables.append(layout.paragraph("No budget was exhausted in the period."))
    return flowables


def _rounds(layout: PdfLayout, doc: dict) -> list:
    columns = ("round", "state", "opened_at", "selected", "accepted", "rejected", "result_version", "record_level_entries", "central_epsilon_after")
    headers = ("round", "state", "opened (UTC)", "selected", "accepted", "rejected", "model version", "ledger entries", "central epsilon")
    rows = [[format_time(row[column]) if column == "opened_at" else row[column] for column in columns] for row in doc["rounds"]]
    return [layout.paragraph("5. Rounds", layout.heading), layout.table(headers, rows) if rows else layout.paragraph("No round opened in the period.")]


def _ledger(layout: PdfLayout, doc: dict) -> list:
    flowables = [layout.paragraph("6. Privacy ledger", layout.heading)]
    record_level = doc["ledger"]["record_level"]
    if record_level:
        columns = ("round", "node", "sensitivity_class", "noise_multiplier", "sampling_rate", "steps", "delta", "epsilon_after")
        printed_rows = record_level[:PDF_MAX_LEDGER_ROWS]
        flowables.append(layout.paragraph(f"Record-level DP: {len(record_level)} entries; epsilon_after is the node's cumulative epsilon after the entry."))
        flowables.append(layout.table(columns, [[row[column] for column in columns] for row in printed_rows], widths=(0.07, 0.21, 0.14, 0.12, 0.11, 0.07, 0.13, 0.15)))
        if len(record_level) > len(printed_rows):
            flowables.append(layout.paragraph(f"The first {len(printed_rows)} of {len(record_level)} entries are shown; the CSV and JSON exports hold all of them."))
    central = doc["ledger"]["central"]
    if central:
        central_columns = ("round", "noise_multiplier", "sampling_rate", "steps", "delta", "accountant", "epsilon_after")
        flowables.append(layout.paragraph(f"User-level central DP: {len(central)} releases; epsilon_after is the federation's cumulative epsilon."))
        flowables.append(layout.table(central_columns, [[row[column] for column in central_columns] for row in central[:PDF_MAX_LEDGER_ROWS]]))
    if not record_level and not central:
        flowables.append(layout.paragraph("No privacy was spent in the period."))
    return flowables


def _nodes(layout: PdfLayout, doc: dict) -> list:
    columns = ("node", "sensitivity_class", "status", "epsilon_allocated", "epsilon_at_period_end", "participations_in_period", "updates_accepted", "updates_rejected", "budget_exhausted")
    headers = ("node", "class", "status", "epsilon allocated", "epsilon at period end", "participations", "accepted", "rejected", "exhausted")
    rows = [[row[column] for column in columns] for row in doc["nodes"]]
    return [layout.paragraph("7. Nodes (pseudonymised)", layout.heading), layout.table(headers, rows, widths=(0.2, 0.12, 0.1, 0.11, 0.11, 0.1, 0.09, 0.08, 0.09)) if rows else layout.paragraph("No node is enrolled.")]


def _aggregation(layout: PdfLayout, doc: dict) -> list:
    aggregation = doc["aggregation"]
    rows = [
        ("Secure aggregation", doc["secure_aggregation"]["statement"]),
        ("Aggregation rule", f"{aggregation['rule_label']} ({aggregation['rule']})"),
        ("Rule parameters", aggregation["rule_params"] or "none"),
        ("Server optimizer", aggregation["server_optimizer"]),
        ("Quarantine threshold", aggregation["quarantine_threshold"]),
        ("Updates received / accepted / rejected", f"{aggregation['updates_received']} / {aggregation['updates_accepted']} / {aggregation['updates_rejected']}"),
    ]
    flowables = [layout.paragraph("8. Aggregation, rejected and quarantined updates", layout.heading), layout.key_values(rows), layout.spacer()]
    if aggregation["rejections_by_reason"]:
        flowables.append(layout.table(("rejection reason", "updates"), [[row["reason"], row["count"]] for row in aggregation["rejections_by_reason"]], widths=(0.85, 0.15)))
    events = aggregation["quarantine_events"]
    if events:
        columns = ("at", "action", "node", "round", "score", "threshold", "reason", "actor")
        event_rows = [[format_time(event["at"]), *[event[column] for column in columns[1:]]] for event in events]
        flowables += [layout.spacer(), layout.table(columns, event_rows, widths=(0.15, 0.13, 0.2, 0.06, 0.08, 0.08, 0.18, 0.12))]
    if aggregation["nodes_quarantined_now"]:
        flowables += [layout.spacer(), layout.table(("quarantined now", "reason"), [[row["node"], row["status_reason"]] for row in aggregation["nodes_quarantined_now"]], widths=(0.25, 0.75))]
    return flowables


def _security(layout: PdfLayout, doc: dict) -> list:
    retention = doc["retention"]
    rows = [
        ("Update payloads", retention["update_policy"]),
        ("Updates stored with payload", retention["updates_stored_with_payload"]),
        ("Updates with payload cleared", retention["updates_payload_cleared"]),
        ("Model versions", retention["model_versions"]),
        ("Privacy ledger", retention["privacy_ledger"]),
        ("Last retention run", retention["last_retention_run"] or "never"),
    ]
    return [
        layout.paragraph("9. Security measures", layout.heading),
        *[layout.paragraph("• " + measure) for measure in doc["security_measures"]],
        layout.paragraph("10. Retention", layout.heading),
        layout.key_values(rows),
    ]


def _model_versions(layout: PdfLayout, doc: dict) -> list:
    rows = [[row["version"], format_time(row["created_at"]), row["num_updates"], row["total_examples"], row["weights_sha256"]] for row in doc["model_versions"]]
    table = layout.table(("version", "created (UTC)", "updates", "examples", "weights SHA-256"), rows, widths=(0.08, 0.17, 0.08, 0.1, 0.57))
    return [layout.paragraph("11. Model versions produced", layout.heading), table if rows else layout.paragraph("No model version in the period.")]


def _audit(layout: PdfLayout, doc: dict) -> list:
    audit = doc["audit_log"]
    rows = [[format_time(entry["at"]), entry["actor"], entry["action"], entry["target"], entry["details"]] for entry in audit["entries"]]
    return [
        layout.paragraph("12. Audit log excerpt", layout.heading),
        layout.paragraph(f"{audit['entries_in_period']} entries in the period; shown: {audit['statement']}."),
        layout.table(("at (UTC)", "actor", "action", "target", "details"), rows, widths=(0.15, 0.16, 0.17, 0.17, 0.35)) if rows else layout.paragraph("No audit entry in the period."),
    ]
