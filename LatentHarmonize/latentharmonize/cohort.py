"""The cohort table: one row per scan, used by train, evaluate, batch and survival.

Contract (a CSV file):

- required columns ``image`` (path of the CT: file or DICOM folder), ``patient``, ``acquisition``;
- optional ``mask`` and ``truth`` (paths of label maps on the CT's grid), ``time`` (follow-up,
  any unit, >= 0) and ``event`` (1 = event observed, 0 = censored); any other column is kept as is;
- paths are relative to the CSV's folder unless absolute; ``read_cohort`` returns them absolute;
- each (patient, acquisition) pair appears once. Scans of one patient share the patient's
  coordinate frame, so their voxels correspond by physical position.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd

from .errors import InputError

REQUIRED = ("image", "patient", "acquisition")
PATH_COLUMNS = ("image", "mask", "truth")
SHOW = 5  # how many offending rows or files an error message lists


def optional_path(row: pd.Series, column: str) -> Optional[str]:
    """The path in an optional column of one cohort row, or None where the column is absent or empty."""
    value = row[column] if column in row.index else None
    return str(value) if isinstance(value, (str, Path)) and str(value).strip() else None


def read_cohort(csv_path) -> pd.DataFrame:
    """Read and validate a cohort CSV; path columns come back absolute, ``time``/``event`` numeric."""
    csv_path = Path(csv_path)
    table = _read_csv(csv_path)
    _check_required(table, csv_path)
    for column in PATH_COLUMNS:
        if column in table:
            table[column] = _resolve_paths(table[column], csv_path.parent)
    _check_files_exist(table, csv_path)
    _check_unique_scans(table, csv_path)
    for column in ("time", "event"):
        if column in table:
            table[column] = _numeric(table, column, csv_path)
    _check_survival_values(table, csv_path)
    return table


def _read_csv(csv_path: Path) -> pd.DataFrame:
    if not csv_path.is_file():
        raise InputError(f"Cohort table {csv_path} does not exist. Give the path of a CSV file "
                         f"with at least the columns {', '.join(REQUIRED)}.")
    try:
        # patient and acquisition are identifiers: keep "007" as "007", not 7
        table = pd.read_csv(csv_path, dtype={"patient": str, "acquisition": str}, skipinitialspace=True,
                            encoding="utf-8-sig")  # utf-8-sig: spreadsheet exports often start with a BOM
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"Cohort table {csv_path} is not a readable CSV file ({exc}).") from exc
    table.columns = [str(c).strip() for c in table.columns]
    if table.empty:
        raise InputError(f"Cohort table {csv_path} has no rows; add one row per scan.")
    return table


def _check_required(table: pd.DataFrame, csv_path: Path) -> None:
    missing = [c for c in REQUIRED if c not in table]
    if missing:
        hint = " The file seems to use ';' between columns: save it as comma-separated." \
            if len(table.columns) == 1 and ";" in table.columns[0] else ""
        raise InputError(f"Cohort table {csv_path} lacks the column(s) {', '.join(missing)} "
                         f"(found: {', '.join(table.columns)}). Required: {', '.join(REQUIRED)}.{hint}")
    for column in REQUIRED:
        empty = table[column].isna() | (table[column].astype(str).str.strip() == "")
        if empty.any():
            raise InputError(f"Cohort table {csv_path}: column '{column}' is empty in row(s) "
                             f"{_rows(table.index[empty])}; every scan needs an image, a patient and an acquisition.")


def _resolve_paths(column: pd.Series, base: Path) -> pd.Series:
    """Absolute path strings; empty cells of optional columns stay missing (NaN)."""
    def resolve(value):
        if pd.isna(value) or str(value).strip() == "":
            return None
        path = Path(str(value).strip()).expanduser()
        return str((path if path.is_absolute() else base / path).resolve())
    return column.map(resolve).astype(object)


def _check_files_exist(table: pd.DataFrame, csv_path: Path) -> None:
    missing = [(column, path) for column in PATH_COLUMNS if column in table
               for path in table[column].dropna() if not Path(path).exists()]
    if missing:
        shown = "; ".join(f"{column} {path}" for column, path in missing[:SHOW])
        more = f" and {len(missing) - SHOW} more" if len(missing) > SHOW else ""
        raise InputError(f"Cohort table {csv_path} names {len(missing)} file(s) that do not exist: {shown}{more}. "
                         "Paths are relative to the CSV's folder unless absolute.")


def _check_unique_scans(table: pd.DataFrame, csv_path: Path) -> None:
    duplicated = table.duplicated(subset=["patient", "acquisition"], keep=False)
    if duplicated.any():
        pairs = table.loc[duplicated, ["patient", "acquisition"]].drop_duplicates().head(SHOW)
        shown = ", ".join(f"({p}, {a})" for p, a in pairs.itertuples(index=False))
        raise InputError(f"Cohort table {csv_path} lists the same (patient, acquisition) more than once: {shown} "
                         f"(rows {_rows(table.index[duplicated])}). Each scan must appear once.")


def _numeric(table: pd.DataFrame, column: str, csv_path: Path) -> pd.Series:
    values = pd.to_numeric(table[column], errors="coerce")
    given = table[column].notna() & (table[column].astype(str).str.strip() != "")
    bad = given & values.isna()
    if bad.any():
        examples = ", ".join(repr(v) for v in table.loc[bad, column].head(SHOW))
        raise InputError(f"Cohort table {csv_path}: column '{column}' must be numeric; "
                         f"row(s) {_rows(table.index[bad])} hold {examples}.")
    return values


def _check_survival_values(table: pd.DataFrame, csv_path: Path) -> None:
    if "time" in table:
        bad = table["time"] < 0
        if bad.any():
            raise InputError(f"Cohort table {csv_path}: 'time' is negative in row(s) {_rows(table.index[bad])}; "
                             "follow-up time must be >= 0.")
    if "event" in table:
        bad = table["event"].notna() & ~table["event"].isin([0, 1])
        if bad.any():
            raise InputError(f"Cohort table {csv_path}: 'event' must be 1 (event observed) or 0 (censored); row(s) "
                             f"{_rows(table.index[bad])} hold other values.")


def _rows(index) -> str:
    """Row numbers as a spreadsheet shows them (header is row 1, first scan row 2)."""
    rows = [str(i + 2) for i in list(index)[:SHOW]]
    return ", ".join(rows) + (" ..." if len(index) > SHOW else "")
