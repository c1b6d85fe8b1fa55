"""Countdown data: file loaders, the problem key and the seed-free hash train/eval partition."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from eslora.tasks.base import DatasetError
from eslora.tasks.expr import to_fraction


def problem_key(numbers: Sequence[int], target: Any) -> str:
    return f"{sorted(int(n) for n in numbers)}|{to_fraction(target)}"


def is_eval_problem(numbers: Sequence[int], target: Any, eval_fraction: float) -> bool:
    """The fixed train/eval partition: a hash of the problem (numbers as a multiset, target).

    Independent of any seed, so the held-out set never meets a train problem, whatever
    `data_seed` or generation draws it, and is the same for every run on the same data.
    """
    h = hashlib.blake2b(("eslora-countdown|" + problem_key(numbers, target)).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "big") % 1_000_000 < eval_fraction * 1_000_000



def _normalize_row(row: Any, where: str) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise DatasetError(f"{where}: expected an object, got {type(row).__name__}")
    numbers = row.get("numbers", row.get("nums"))
    if numbers is None:
        raise DatasetError(f"{where}: missing 'numbers' (ES paper) or 'nums' (TinyZero)")
    if isinstance(numbers, (str, bytes)) or not hasattr(numbers, "__iter__"):
        raise DatasetError(f"{where}: numbers must be a list of integers, got {numbers!r}")
    nums = list(numbers)
    if not nums:
        raise DatasetError(f"{where}: numbers is empty")
    clean = []
    for n in nums:
        ok = not isinstance(n, (bool, str, bytes))
        try:
            ok = ok and int(n) == n and n >= 0
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise DatasetError(f"{where}: numbers must be non-negative integers, got {nums!r}")
        clean.append(int(n))
    if "target" not in row:
        raise DatasetError(f"{where}: missing 'target'")
    try:
        value = to_fraction(row["target"])
    except ValueError:
        raise DatasetError(f"{where}: target must be a number, got {row['target']!r}") from None
    target: Any = int(value) if value.denominator == 1 else float(value)
    out: dict[str, Any] = {"numbers": clean, "target": target}
    solution = row.get("solution")
    if solution is not None:
        out["solution"] = str(solution)
    if row.get("id") is not None:
        out["id"] = str(row["id"])
    return out


def load_countdown_file(path: str | Path) -> list[dict[str, Any]]:
    """Rows {"numbers", "target", ["solution", "id"]} from a Countdown data file.

    * `.json`: a list of objects, the ES paper's format (id, context, numbers, target as a
      string, solution); objects with TinyZero's `nums` are accepted too.
    * `.jsonl`: one object per line (TinyZero's Countdown-Tasks-3to4 exported as JSON lines).
    * `.parquet`: TinyZero's Countdown-Tasks-3to4 files (columns `nums`, `target`), via pyarrow.

    A malformed row raises DatasetError naming the file and the row (0-based; JSONL also
    gives the line).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]] = []
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DatasetError(f"{path}: not valid JSON: {err}") from None
        if isinstance(data, Mapping) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        rows = [_normalize_row(r, f"{path}: row {i}") for i, r in enumerate(data)]
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}: row {len(rows)} (line {line_no})"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DatasetError(f"{where}: not valid JSON: {err}") from None
                rows.append(_normalize_row(obj, where))
    elif suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:  # pragma: no cover - pyarrow is a test dependency
            raise DatasetError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types
            raise DatasetError(f"{path}: not a readable parquet file: {err}") from None
        rows = [_normalize_row(r, f"{path}: row {i}") for i, r in enumerate(table.to_pylist())]
    else:
        raise DatasetError(f"{path}: unknown Countdown data format {suffix!r}; use .json, .jsonl or .parquet")
    if not rows:
        raise DatasetError(f"{path}: no rows")
    return rows
