"""Invitations: each rater's id, one-time sign-in code and the link to the rater page, as CSV or text.

The codes are shown once when a study is made (the store keeps only their hashes), so the owner copies or
downloads them all at once, ready to mail-merge. The link carries the study id only (it pre-fills the
sign-in form); the code itself never goes into a URL, where it would end up in browser histories and logs.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from urllib.parse import quote

from histolab.errors import StudyError
from histolab.review.config import SLUG

RATER_PATH = "/review"
CSV_HEADER = ("rater_id", "code", "link")


def rater_link(base_url: str, study_id: str) -> str:
    """The rater page's address for ``study_id`` (``base_url``: where the app is served, e.g. http://host:7860/)."""
    if not SLUG.match(str(study_id)):
        raise StudyError(f"unknown study {study_id!r}")
    return f"{str(base_url).rstrip('/')}{RATER_PATH}?study={quote(study_id)}"


def invitation_rows(base_url: str, study_id: str, codes: Iterable[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(rater id, code, link) per rater, in the order given."""
    link = rater_link(base_url, study_id)
    rows = []
    for rater_id, code in codes:
        if not SLUG.match(str(rater_id)) or not str(code):
            raise StudyError(f"an invitation needs a rater id and a code, got {rater_id!r}")
        rows.append((str(rater_id), str(code), link))
    return rows


def invitations_csv(rows: Iterable[tuple[str, str, str]]) -> str:
    """The rows as CSV with a header line (RFC 4180 quoting, ``\\r\\n`` line ends as spreadsheets expect)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_HEADER)
    writer.writerows(rows)
    return out.getvalue()


def invitations_text(title: str, rows: Iterable[tuple[str, str, str]]) -> str:
    """One short message per rater, to paste into a mail: the link, their id and their code."""
    parts = [
        f"{title}\nOpen {link}\nRater id: {rater_id}\nCode: {code}\n(The code works for you only; keep it private.)"
        for rater_id, code, link in rows
    ]
    return "\n\n".join(parts)
