"""`twotower.files` (atomic file and folder writes) and `twotower.tables` (Markdown, CSV)."""
import csv
import io

import pytest

from twotower.files import atomic_file, atomic_folder, write_json, write_text
from twotower.tables import csv_table, markdown_table, metrics_table


def test_a_failed_file_write_keeps_the_old_content_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "summary.json"
    write_json(path, {"b": 1, "a": 2})
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            assert tmp.parent == path.parent and tmp.suffix == ".json" and tmp != path
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n' and sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]
    write_text(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in path.parent.iterdir()) == ["summary.json"]


def test_a_folder_is_replaced_only_when_complete(tmp_path):
    out = tmp_path / "export"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("one")
        (tmp / "nested").mkdir()
        (tmp / "nested" / "b.txt").write_text("two")
        assert not out.exists()
    assert (out / "a.txt").read_text() == "one" and (out / "nested" / "b.txt").read_text() == "two"
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "a.txt").write_text("broken")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    with atomic_folder(out) as tmp:
        (tmp / "c.txt").write_text("three")
    assert sorted(p.name for p in out.iterdir()) == ["c.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_tables_format_cells_and_read_back():
    rows = [{"run": "a|b", "ndcg": 0.123456, "wall_s": 1234.56}, {"run": "c", "ndcg": float("nan")}]
    assert markdown_table(rows, ["run", "ndcg", "wall_s"]).splitlines() == [
        "| run | ndcg | wall_s |", "|---|---|---|", "| a\\|b | 0.1235 | 1234.6 |", "| c | nan | – |"]
    back = list(csv.DictReader(io.StringIO(csv_table(rows, ["run", "ndcg"]))))
    assert float(back[0]["ndcg"]) == 0.123456 and back[1]["run"] == "c"
    table = metrics_table({"id (test)": {f"{m}@10": v for m, v in zip(("hr", "ndcg", "mrr"), (0.5, 0.25, 0.125))}}, [10])
    assert table.splitlines() == ["|  | HR@10 | NDCG@10 | MRR@10 |", "|---|---|---|---|", "| id (test) | 0.5000 | 0.2500 | 0.1250 |"]
