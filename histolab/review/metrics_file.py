"""Per-item and per-set metrics to correlate with expert scores (e.g. from the evaluation module).

Accepted files (a key is either an image's content hash or a source name):

- CSV, wide: a ``key`` column, then one column per metric::

      key,fid_local,sharpness
      3f9a...e1 (64 hex: sha256 of the image file, or its pixel hash),0.41,12.0
      lora-v3 (a source name in the study),23.5,

- CSV, long: exactly the columns ``key,metric,value``.
- JSON: ``{"items": {hash: {metric: value}}, "sets": {source: {metric: value}}}``, or
  a flat ``{key: {metric: value}}``, or ``{key: value}`` (the metric is then
  named after the file).

A 64-hex key names an item: it is matched against both the file sha256
(``sha256sum``, ``histolab.files.sha256_file``) and the pixel hash
(``histolab.review.ingest.pixel_sha256``). Any other key names a source. Empty
cells are missing values. Keys that match nothing in the study are reported,
never silently dropped.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from histolab.errors import StudyError

HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Metrics:
    items: dict[str, dict[str, float]] = field(default_factory=dict)  # content hash -> metric -> value
    sets: dict[str, dict[str, float]] = field(default_factory=dict)  # source name -> metric -> value

    @property
    def names(self) -> list[str]:
        out: set[str] = set()
        for d in (*self.items.values(), *self.sets.values()):
            out.update(d)
        return sorted(out)


def _value(where: str, v) -> float | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError) as exc:
        raise StudyError(f"{where}: {v!r} is not a number") from exc
    if not math.isfinite(x):
        return None
    return x


def _put(m: Metrics, key: str, metric: str, value: float | None) -> None:
    if value is None:
        return
    key = key.strip()
    target = m.items if HEX64.match(key.lower()) else m.sets
    target.setdefault(key.lower() if target is m.items else key, {})[metric] = value


def load_metrics(path: str | Path) -> Metrics:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"metrics file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    m = Metrics()
    if text.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StudyError(f"metrics file {path} is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise StudyError(f"metrics file {path}: expected a JSON object")
        if set(data) <= {"items", "sets"} and data:
            blocks = [(data.get("items") or {}, "items"), (data.get("sets") or {}, "sets")]
        else:
            blocks = [(data, None)]
        for block, level in blocks:
            if not isinstance(block, dict):
                raise StudyError(f"metrics file {path}: '{level}' must be an object")
            for key, vals in block.items():
                if not isinstance(vals, dict):
                    vals = {path.stem: vals}
                for metric, v in vals.items():
                    val = _value(f"{path} [{key}][{metric}]", v)
                    if val is None:
                        continue
                    if level == "items" and not HEX64.match(str(key).lower()):
                        raise StudyError(f"metrics file {path}: item key {key!r} is not a 64-hex content hash")
                    if level == "sets":
                        m.sets.setdefault(str(key), {})[str(metric)] = val
                    else:
                        _put(m, str(key), str(metric), val)
        return m
    rows = list(csv.reader(text.splitlines()))
    if not rows or not rows[0] or rows[0][0].strip() != "key":
        raise StudyError(f"metrics file {path}: a CSV must start with a header whose first column is 'key'")
    header = [h.strip() for h in rows[0]]
    long = header == ["key", "metric", "value"]
    for n, row in enumerate(rows[1:], 2):
        if not row or not any(c.strip() for c in row):
            continue
        if len(row) != len(header):
            raise StudyError(f"metrics file {path} line {n}: {len(row)} cells, the header has {len(header)}")
        if long:
            _put(m, row[0], row[1].strip(), _value(f"{path} line {n}", row[2]))
        else:
            for metric, cell in zip(header[1:], row[1:], strict=True):
                _put(m, row[0], metric, _value(f"{path} line {n} column {metric}", cell))
    return m
