"""The embedded lynx–hare data and the CSV reader behind ``pyro-nsde fit``."""

import pytest
import torch

from pyro_nsde.zoo.datasets import MIN_ROWS, lynx_hare, read_csv

# The Hudson's Bay Company pelts (thousands), 1900-1920, as printed in the issue / Carpenter (2018).
HARE = [30, 47.2, 70.2, 77.4, 36.3, 20.6, 18.1, 21.4, 22, 25.4, 27.1, 40.3, 57, 76.6, 52.3,
        19.5, 11.2, 7.6, 14.6, 16.2, 24.7]  # fmt: skip
LYNX = [4, 6.1, 9.8, 35.2, 59.4, 41.7, 19, 13, 8.3, 9.1, 7.4, 8, 12.3, 19.5, 45.7, 51.1, 29.7,
        15.8, 9.7, 10.1, 8.6]  # fmt: skip


def write(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_lynx_hare_holds_the_published_pelt_counts():
    data = lynx_hare()
    assert data.columns == ("hare", "lynx")
    assert data.time_name == "year"
    assert data.times.tolist() == [float(year) for year in range(1900, 1921)]
    expected = torch.tensor([HARE, LYNX], dtype=torch.float64).T
    assert torch.equal(data.values.double(), expected.to(data.values.dtype).double())
    assert data.mask.all()
    assert len(data) == 21


def test_lynx_hare_follows_the_requested_dtype():
    data = lynx_hare(dtype=torch.float64)
    assert data.times.dtype == data.values.dtype == torch.float64
    assert data.values[3, 1].item() == 35.2


def test_read_csv_marks_empty_and_na_cells_as_missing(tmp_path):
    path = write(tmp_path, "t, a ,b\n0,1.5,\n1, NA ,2\n2.5,nan,3\n4,?,-1e2\n")
    series = read_csv(path, time="t")
    assert series.columns == ("a", "b")
    assert series.times.tolist() == [0.0, 1.0, 2.5, 4.0]
    assert series.mask.tolist() == [[True, False], [False, True], [False, True], [False, True]]
    assert series.values[0, 0].item() == 1.5
    assert series.values[3, 1].item() == -100.0
    assert torch.isnan(series.values[~series.mask]).all()


def test_read_csv_reads_only_the_requested_columns_in_their_order(tmp_path):
    path = write(tmp_path, "a,time,b,c\n1,0,2,3\n4,1,5,6\n7,2,8,9\n")
    series = read_csv(path, time="time", columns=["c", "a"])
    assert series.columns == ("c", "a")
    assert series.values.tolist() == [[3.0, 1.0], [6.0, 4.0], [9.0, 7.0]]


def test_read_csv_skips_blank_lines(tmp_path):
    path = write(tmp_path, "t,x\n\n0,1\n1,2\n\n2,3\n")
    assert read_csv(path, time="t").values.tolist() == [[1.0], [2.0], [3.0]]


@pytest.mark.parametrize(
    ("text", "kwargs", "message"),
    [
        ("t,x\n0,1\n1,2\n2,3\n", {"time": "year"}, "time column 'year' not found"),
        ("t,x\n0,1\n1,2\n2,3\n", {"time": "t", "columns": ["y"]}, "column 'y' not found"),
        ("t,x\n0,1\n1,abc\n2,3\n", {"time": "t"}, "non-numeric value 'abc' in column 'x' on line"),
        ("t,x\n0,1\n1,inf\n2,3\n", {"time": "t"}, "non-finite value 'inf' in column 'x' on line 3"),
        ("t,x\n0,1\n1,2\n1,3\n", {"time": "t"}, "duplicate time 1 in column 't' on lines 3 and 4"),
        ("t,x\n0,1\n2,2\n1,3\n", {"time": "t"}, "not sorted: line 4 (1) comes after line 3 (2)"),
        ("t,x\n0,1\n1,2\n", {"time": "t"}, f"2 data row(s); at least {MIN_ROWS} rows"),
        ("t,x\n0,1\n,2\n2,3\n", {"time": "t"}, "time column 't' has a missing value on line 3"),
        ("t,x,y\n0,1,\n1,2,\n2,3,NA\n", {"time": "t"}, "column 'y' of"),
        ("t,x\n0,1\n1,2,5\n2,3\n", {"time": "t"}, "line 3 of"),
        ("", {"time": "t"}, "is empty"),
        ("t\n0\n1\n2\n", {"time": "t"}, "no value column"),
        ("t,x\n0,1\n1,2\n2,3\n", {"time": "t", "columns": ["t"]}, "is the time column"),
    ],
    ids=[
        "missing-time-column",
        "missing-value-column",
        "non-numeric",
        "non-finite",
        "duplicate-times",
        "unsorted-times",
        "too-few-rows",
        "missing-time",
        "column-without-values",
        "ragged-row",
        "empty-file",
        "no-value-column",
        "time-as-value",
    ],
)
def test_read_csv_names_the_problem_with_bad_input(tmp_path, text, kwargs, message):
    path = write(tmp_path, text)
    with pytest.raises(ValueError) as error:
        read_csv(path, **kwargs)
    assert message in str(error.value)


def test_read_csv_reports_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_csv(tmp_path / "absent.csv", time="t")


def test_read_csv_values_are_parsed_as_python_floats(tmp_path):
    path = write(tmp_path, "t,x\n0.1,1e-3\n0.2,2.5E2\n0.30000000000000004,-0\n")
    series = read_csv(path, time="t", dtype=torch.float64)
    assert series.times.tolist() == [0.1, 0.2, 0.30000000000000004]
    assert series.values[:, 0].tolist() == [1e-3, 250.0, -0.0]
