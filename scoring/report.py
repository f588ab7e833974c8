"""The score report: per-class counts beside the paper's Lynx row, as JSON, markdown and a bar chart."""

from scoring.mme import category_rank

# Counts of correct answers / questions per class, Lynx row of the paper's Open-VQA tables.
PAPER_LYNX = {
    "Open_VQA_images": {"OCR": (36, 53), "Counting": (25, 37), "Reasoning": (26, 31), "Place": (17, 22),
                        "Color": (21, 30), "Spatial": (9, 15), "Action": (17, 20), "Others": (79, 94)},
    "Open_VQA_videos": {"Action(Y/N)": (69, 108), "Others": (29, 40)},
}
PAPER_LYNX_MME = {"perception": 1373.23, "cognition": 215.71}
# The paper's column names for the annotation's class strings.
COLUMN_NAMES = {"Counting": "Count", "Reasoning": "Reason"}


def accuracy(correct, total):
    """Percent, rounded to 2 decimals as in the paper (76.16); 0.0 for an empty set."""
    return round(100 * correct / total, 2) if total else 0.0


def overall(correct, total):
    return {"correct": correct, "total": total, "accuracy": accuracy(correct, total)}


def class_order(categories, dataset):
    """The paper's column order where the dataset is one of its tables (MME: its tool's), then the rest sorted."""
    if dataset == "MME":
        return sorted(categories, key=category_rank)
    known = [name for name in PAPER_LYNX.get(dataset, ()) if name in categories]
    return known + sorted(set(categories) - set(known))


def summarise(records, dataset=None):
    """{"classes": {class: {correct, total}}, "overall": {correct, total, accuracy}}; a missing answer is wrong."""
    counts = {}
    for record in records:
        entry = counts.setdefault(record.category, {"correct": 0, "total": 0})
        entry["correct"] += bool(record.correct)
        entry["total"] += 1
    classes = {name: counts[name] for name in class_order(counts, dataset)}
    return {"classes": classes, "overall": overall(sum(c["correct"] for c in classes.values()), len(records))}


def paper_summary(dataset):
    paper = PAPER_LYNX.get(dataset)
    if paper is None:
        return None
    classes = {name: {"correct": correct, "total": total} for name, (correct, total) in paper.items()}
    return {"classes": classes, "overall": overall(sum(c for c, _ in paper.values()),
                                                   sum(t for _, t in paper.values()))}


def build_report(sets, extra, scoring, sections=None):
    """The JSON report: totals over all sets, then each set (annotation file) on its own with the paper's row.

    `sections` are what the scoring adds, e.g. {"mme": ...} or {"judge": ...}.
    """
    set_reports = [{"name": eval_set.name, "annotations": eval_set.annotations, "answers": eval_set.answers,
                    **summarise(eval_set.records, eval_set.name), "missing": eval_set.missing,
                    "extra": eval_set.extra, "warnings": eval_set.warnings,
                    "paper_lynx": paper_summary(eval_set.name)} for eval_set in sets]
    classes = {}
    for set_report in set_reports:
        for name, counts in set_report["classes"].items():
            entry = classes.setdefault(name, {"correct": 0, "total": 0})
            entry["correct"] += counts["correct"]
            entry["total"] += counts["total"]
    records = [record for eval_set in sets for record in eval_set.records]
    report = {
        "scoring": scoring,
        "classes": classes,
        "overall": overall(sum(s["overall"]["correct"] for s in set_reports), len(records)),
        "missing": [index for set_report in set_reports for index in set_report["missing"]],
        "extra": list(extra),
        "warnings": [line for eval_set in sets for line in eval_set.warnings],
        "sets": set_reports,
        "records": [{"dataset": record.dataset, "index": record.index, "class": record.category,
                     "prediction": record.prediction, "correct": bool(record.correct)} for record in records],
    }
    report.update(sections or {})
    return report


def overall_cell(summary):
    return f"{summary['accuracy']:.2f} ({summary['correct']}/{summary['total']})"


def markdown_row(cells):
    return "| " + " | ".join(cells) + " |"


def set_table(report_set, scoring):
    """One set in the paper's layout: a column per class headed "name /total", counts of correct answers."""
    classes = report_set["classes"]
    lines = [markdown_row(["", *(f"{COLUMN_NAMES.get(name, name)} /{c['total']}" for name, c in classes.items()),
                           "Overall"]),
             markdown_row(["---"] * (len(classes) + 2)),
             markdown_row([f"this run ({scoring})", *(str(c["correct"]) for c in classes.values()),
                           overall_cell(report_set["overall"])])]
    paper = report_set.get("paper_lynx")
    if paper:
        cells = []
        for name, counts in classes.items():
            known = paper["classes"].get(name)
            if known is None:
                cells.append("-")
            elif known["total"] == counts["total"]:
                cells.append(str(known["correct"]))
            else:  # the run covers other records than the paper's table: show the paper's own total
                cells.append(f"{known['correct']}/{known['total']}")
        lines.append(markdown_row(["paper, Lynx", *cells, overall_cell(paper["overall"])]))
    return lines


def listed(indices):
    return ", ".join(str(index) for index in indices)


def mme_table(mme):
    lines = [markdown_row(["category", "acc", "acc+", "score"]), markdown_row(["---"] * 4)]
    for name, scores in mme.items():
        if name not in PAPER_LYNX_MME:
            lines.append(markdown_row([name, f"{scores['acc']:.2f}", f"{scores['acc_plus']:.2f}",
                                       f"{scores['score']:.2f}"]))
    lines += ["", markdown_row(["MME", "this run", "paper, Lynx"]), markdown_row(["---"] * 3)]
    for part in ("perception", "cognition"):
        lines.append(markdown_row([part, f"{mme[part]:.2f}", f"{PAPER_LYNX_MME[part]:.2f}"]))
    return lines


def render_markdown(report):
    """The report as markdown: a table per set (MME: its score table instead) and the missing and extra answers."""
    lines = []
    for report_set in report["sets"]:
        lines += [f"## {report_set['name']}", ""]
        if "mme" not in report:
            lines += [*set_table(report_set, report["scoring"]), ""]
        if report_set["missing"]:
            lines += [f"Missing answers, counted wrong ({len(report_set['missing'])}): "
                      f"{listed(report_set['missing'])}", ""]
        if report_set["extra"]:
            lines += [f"Answers with no record, ignored ({len(report_set['extra'])}): "
                      f"{listed(report_set['extra'])}", ""]
    if len(report["sets"]) > 1:
        lines += [f"All sets: {overall_cell(report['overall'])}", ""]
        if report["extra"] and not any(s["extra"] for s in report["sets"]):
            lines += [f"Answers with no record, ignored ({len(report['extra'])}): {listed(report['extra'])}", ""]
    if "mme" in report:
        lines += [*mme_table(report["mme"]), ""]
    if report.get("judge", {}).get("unparsed"):
        unparsed = [f"{dataset}:{index}" for dataset, index in report["judge"]["unparsed"]]
        lines += [f"Judge replies with no verdict, counted wrong ({len(unparsed)}): {', '.join(unparsed)}", ""]
    return "\n".join(lines)


def write_chart(report, path):
    """A PNG bar chart of per-class accuracy, one panel per set, the paper's Lynx bars beside where known.

    matplotlib is imported here so that scoring itself does not need it; the Agg canvas of a bare Figure
    renders without touching pyplot's global backend.
    """
    from matplotlib.figure import Figure

    sets = report["sets"]
    widest = max(len(report_set["classes"]) for report_set in sets) + 1
    figure = Figure(figsize=(max(6.0, 0.8 * widest + 2), 3.8 * len(sets)))
    axes = figure.subplots(len(sets), 1, squeeze=False)[:, 0]
    for axis, report_set in zip(axes, sets):
        names = list(report_set["classes"])
        labels = [COLUMN_NAMES.get(name, name) for name in names] + ["Overall"]
        run = [accuracy(c["correct"], c["total"]) for c in report_set["classes"].values()]
        run.append(report_set["overall"]["accuracy"])
        positions = list(range(len(labels)))
        paper = report_set.get("paper_lynx")
        width = 0.4 if paper else 0.6
        shift = width / 2 if paper else 0.0
        axis.bar([x - shift for x in positions], run, width, label=f"this run ({report['scoring']})")
        if paper:
            paper_values = [accuracy(**paper["classes"][name]) if name in paper["classes"] else 0.0
                            for name in names] + [paper["overall"]["accuracy"]]
            axis.bar([x + shift for x in positions], paper_values, width, label="paper, Lynx")
        axis.set_xticks(positions)
        axis.set_xticklabels(labels, rotation=30 if len(labels) > 8 else 0, ha="right" if len(labels) > 8 else "center")
        axis.set_ylim(0, 118)  # headroom above 100 % for the legend
        axis.set_yticks(range(0, 101, 20))
        axis.set_ylabel("accuracy (%)")
        axis.set_title(report_set["name"])
        axis.legend(loc="upper right", ncol=2, fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
