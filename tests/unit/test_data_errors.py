"""How error messages name a place in the input (meddr_ray.data.errors.where, sample_where), and the driver's sum
of the stages' per-batch count rows (meddr_ray.stages.parts.sum_stats)."""

import pyarrow as pa

from meddr_ray.data.errors import sample_where, where
from meddr_ray.stages.parts import sum_stats


def test_where_with_the_full_path_and_a_row_id():
    assert where("/data/a.csv", 5, full_path=True) == "/data/a.csv row 5"
    assert where(row_id="x1") == "row id x1"
    assert where(row=3) == "row 3"


def test_sample_where_names_the_source_file_or_else_the_dataset():
    row = {"source_file": "/data/labels.csv", "dataset": "breast", "source_index": 2}
    assert sample_where(row) == "labels.csv row 2"
    assert sample_where(row, full_path=True) == "/data/labels.csv row 2"
    assert sample_where({"dataset": "breast", "source_index": 0}) == "breast row 0"


class _CountRows:
    """Stands in for a Ray Dataset of count rows."""

    def __init__(self, *tables):
        self.tables = tables

    def iter_batches(self, batch_size=None, batch_format="pyarrow"):
        return iter(self.tables)


def test_sum_stats_sums_each_key_and_counts_a_missing_one_as_zero():
    stats = _CountRows(pa.table({"written": [2, 3], "failed": [1, 0]}), pa.table({"written": [4]}))
    seen = []
    totals, seconds = sum_stats(stats, ("written", "failed"), each=lambda row, t, s: seen.append(dict(t)))
    assert totals == {"written": 9, "failed": 1} and seconds >= 0
    assert [t["written"] for t in seen] == [2, 5, 9]
