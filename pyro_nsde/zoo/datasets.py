"""Time series for the examples and the command line: the embedded lynx–hare data and a CSV reader.

A :class:`TimeSeries` holds ``N`` observation times ``t_1 < ... < t_N`` and an ``(N, D)`` table
of values with ``NaN`` where a value is missing. :func:`read_csv` checks a user's file and says
in its error message which column, line and value is wrong.
"""

import csv
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

#: Cells read as missing values (compared case-insensitively, after stripping blanks).
MISSING = ("", "na", "n/a", "nan", "null", "none", "?")

#: The fewest rows :func:`read_csv` accepts: a latent SDE needs at least three observations.
MIN_ROWS = 3


@dataclass(frozen=True)
class TimeSeries:
    """Observations of ``D`` quantities at ``N`` strictly increasing times.

    :param torch.Tensor times: ``(N,)`` observation times.
    :param torch.Tensor values: ``(N, D)`` values, ``NaN`` where missing.
    :param tuple columns: the ``D`` column names.
    :param str time_name: the name of the time column.
    """

    times: torch.Tensor
    values: torch.Tensor
    columns: tuple[str, ...]
    time_name: str

    @property
    def mask(self) -> torch.Tensor:
        """``(N, D)`` boolean, ``True`` where a value was observed."""
        return ~torch.isnan(self.values)

    def __len__(self) -> int:
        return self.times.shape[0]


def lynx_hare(dtype: torch.dtype | None = None) -> TimeSeries:
    """The Hudson's Bay Company lynx and snowshoe hare pelts, 1900–1920, in thousands.

    Yearly numbers of pelts traded, a classic predator–prey series with a cycle of about ten
    years: columns ``("hare", "lynx")``, times are years ``1900.0, ..., 1920.0`` (21 rows, no
    missing values).

    Source: the table in Howard (2009), reproduced in Carpenter (2018), after the Hudson's Bay
    Company records analysed by Hewitt (1921).

    **References:**

    [1] C. Gordon Hewitt (1921), "The Conservation of the Wild Life of Canada", Scribner.
    [2] Paul Howard (2009), "Modeling Basics", lecture notes, Texas A&M University,
        http://www.math.tamu.edu/~phoward/m442/modbasics.pdf.
    [3] Bob Carpenter (2018), "Predator-Prey Population Dynamics: the Lotka-Volterra model in
        Stan", https://mc-stan.org/users/documentation/case-studies/lotka-volterra-predator-prey.html.

    :param torch.dtype dtype: floating point dtype of the tensors (default: torch's default).
    """
    source = resources.files("pyro_nsde.zoo") / "data" / "lynx_hare.csv"
    with resources.as_file(source) as path:
        return read_csv(path, time="year", dtype=dtype)


def read_csv(
    path: str | Path,
    *,
    time: str,
    columns: list[str] | tuple[str, ...] | None = None,
    dtype: torch.dtype | None = None,
) -> TimeSeries:
    """Read a time series from a CSV file with a header row.

    Empty cells and ``NA``, ``N/A``, ``NaN``, ``null``, ``None``, ``?`` are missing values
    (``NaN`` in :attr:`TimeSeries.values`); times must all be present.

    :param path: the file.
    :param str time: the name of the time column (numeric).
    :param columns: the value columns to read (default: every column but ``time``).
    :param torch.dtype dtype: floating point dtype of the tensors (default: torch's default).
    :raises ValueError: naming the problem: a missing column, a non-numeric or non-finite value
        (with its line), a missing, duplicate or decreasing time, fewer than
        :data:`MIN_ROWS` rows, or a column without any value.
    :raises OSError: if the file cannot be read.
    """
    path = Path(path)
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    # Line numbers are 1-based and count the header, as an editor shows them.
    lines = [(number, row) for number, row in enumerate(rows, 1) if any(c.strip() for c in row)]
    if not lines:
        raise ValueError(f"{path} is empty: expected a header row naming the columns")
    (_, header), body = lines[0], lines[1:]
    header = [name.strip() for name in header]
    if time not in header:
        raise ValueError(
            f"time column {time!r} not found in {path}; the columns are {', '.join(header)}"
        )
    if columns is None:
        columns = [name for name in header if name != time]
        if not columns:
            raise ValueError(f"{path} has no value column besides the time column {time!r}")
    else:
        columns = list(columns)
        missing = [name for name in columns if name not in header]
        if missing:
            raise ValueError(
                f"column {missing[0]!r} not found in {path}; the columns are {', '.join(header)}"
            )
        if time in columns:
            raise ValueError(f"column {time!r} is the time column; it cannot also be a value")
        if len(set(columns)) != len(columns):
            raise ValueError(f"columns must be distinct, but got {', '.join(columns)}")
    if len(body) < MIN_ROWS:
        raise ValueError(
            f"{path} has {len(body)} data row(s); at least {MIN_ROWS} rows are needed to fit "
            f"a latent SDE"
        )
    index = {name: header.index(name) for name in [time, *columns]}
    times, table = [], []
    for number, row in body:
        if len(row) != len(header):
            raise ValueError(
                f"line {number} of {path} has {len(row)} fields, but the header has {len(header)}"
            )
        t = _parse(row[index[time]], time, number)
        if math.isnan(t):
            raise ValueError(f"time column {time!r} has a missing value on line {number}")
        if times and t == times[-1][0]:
            raise ValueError(
                f"duplicate time {row[index[time]].strip()} in column {time!r} on lines "
                f"{times[-1][1]} and {number}; each time may appear once"
            )
        if times and t < times[-1][0]:
            raise ValueError(
                f"times in column {time!r} are not sorted: line {number} ({t:g}) comes after "
                f"line {times[-1][1]} ({times[-1][0]:g}); sort the rows by time"
            )
        times.append((t, number))
        table.append([_parse(row[index[name]], name, number) for name in columns])
    for j, name in enumerate(columns):
        if all(math.isnan(row[j]) for row in table):
            raise ValueError(f"column {name!r} of {path} has no values, only missing ones")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    return TimeSeries(
        times=torch.tensor([t for t, _ in times], dtype=dtype),
        values=torch.tensor(table, dtype=dtype),
        columns=tuple(columns),
        time_name=time,
    )


def _parse(cell: str, column: str, line: int) -> float:
    """A float, ``NaN`` for a missing cell; a ``ValueError`` naming the cell otherwise."""
    text = cell.strip()
    if text.lower() in MISSING:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"non-numeric value {text!r} in column {column!r} on line {line}; expected a "
            f"number or an empty cell for a missing value"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"non-finite value {text!r} in column {column!r} on line {line}")
    return value


__all__ = ["MIN_ROWS", "MISSING", "TimeSeries", "lynx_hare", "read_csv"]
