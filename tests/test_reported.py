"""The reported rows (suite/reported_results.csv) hold every published number docs/method.md lists
(the paper's CIFAR-10, ImageNet and Table 3 transfer results, MoCo's detection numbers), each once
per (task, method, metric), with its source and its table where method.md names one."""
import csv
import re
from pathlib import Path

from suite import results

ROOT = Path(__file__).resolve().parents[1]


def _rows():
    with open(results.REPORTED_FILE, newline="") as f:
        return list(csv.DictReader(f))


def _reported_section():
    text = (ROOT / "docs" / "method.md").read_text()
    return text.split("## Reported results")[1].split("Ablation,")[0]  # Tables 4-5: not rows here


def test_every_number_method_md_reports_is_a_row():
    rows = _rows()
    values = {float(r["value"]) for r in rows}
    numbers = {float(x) for x in re.findall(r"\b\d+\.\d\b", _reported_section())}
    assert numbers and numbers <= values, sorted(numbers - values)
    # Table 3 cell by cell: (method, column) -> the row of that method and task
    table = [ln for ln in _reported_section().splitlines() if ln.startswith("| ") and "---" not in ln]
    columns = [c.strip() for c in table[0].strip("|").split("|")][1:]
    where = {"VOC07 cls acc": ("imagenet", "VOC07 cls mAP"), "VOC07+12 det AP50": ("voc", "AP50"),
             "COCO AP": ("coco", "AP (bbox)")}
    table3 = {(r["task"], r["method"], r["metric"]): float(r["value"]) for r in rows if r["table"] == "Table 3"}
    for line in table[1:]:
        method, *cells = [c.strip() for c in line.strip("|").split("|")]
        for column, cell in zip(columns, cells):
            task, metric = where[column]
            assert table3[(task, method, metric)] == float(cell), (method, column)
    assert len(table3) == 3 * len(table[1:])


def test_each_row_once_with_a_source():
    rows = _rows()
    keys = [(r["task"], r["method"], r["metric"], r["source"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert all(r["source"] and set(r) >= {"table", "page"} for r in rows)
    assert all(r["table"] == "Table 3" for r in rows if "Table 3" in r["source"])
    assert all(r["page"] == "n/a (web page)" for r in rows if r["source"].startswith("MoCo repo"))
