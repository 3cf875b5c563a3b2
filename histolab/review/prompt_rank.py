"""The Prompt-to-Polyp rating protocol (2025): per prompt, rank the real image among the models' images.

A study with ``prompt_ranking: true`` gets, beside its usual tasks (and the global ranking of anonymised
models), one *rank group* per prompt and index: one image of every rated source for the same class (the study's
one rated real source among them), e.g. three models' images and the real image. Every rater ranks each group
1..N (1 = best), each rank exactly once. What a rater sees is blinded like every other task: the clean PNGs
under per-rater opaque ids, in an order shuffled per rater and group from the study *secret* (the published
seed would let a rater recompute which position holds the real image), the prompt text and nothing else.

Submits follow the rest of the store's rules (histolab.review.session): idempotent by submission id, a
revision supersedes the earlier ranks (kept as history), committed before the ack, and incomplete or duplicate
ranks are refused before anything is written (and by a unique index on (group, rater, rank) underneath).

Analysis (mean rank per source, how often the real image comes first, metrics by rank tier) is in
histolab.review.prompt_rank_analysis.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any

from histolab.errors import StudyError
from histolab.review.blinding import is_opaque_id, opaque_id
from histolab.review.store import Store, now

SUBMISSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,80}$")
MAX_TIME_MS = 24 * 3600 * 1000
INSTRUCTIONS = (
    "Rank these {n} images for the prompt from 1 (best: most realistic and most faithful to the prompt) "
    "to {n} (worst). Give each rank to exactly one image."
)


# ------------------------------------------------------------------ planning (inside create_study's transaction)


def plan_groups(
    items: list[dict[str, Any]], sources: list[str], seed: int, per_prompt: int | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rank groups from the rated items (dicts with item_id, source, class, prompt_shown, pixel_sha256).

    Per class, each source's images in a seeded order; group k holds the k-th image of every source, so a
    class gives as many groups as its scarcest source has images (at most ``per_prompt``). Returns the groups
    (class, prompt_shown, members [(source, item_id)]) and a note per class left out because a source has
    none of it."""
    by: dict[tuple[str | None, str], list[dict[str, Any]]] = {}
    for it in items:
        by.setdefault((it["class"], it["source"]), []).append(it)
    classes = sorted({c for c, _ in by}, key=lambda c: (c is None, c or ""))
    groups, notes = [], []
    for cls in classes:
        lists = []
        for src in sources:
            imgs = sorted(by.get((cls, src), []), key=lambda it: it["pixel_sha256"])
            random.Random(f"{seed}|prank|{src}|{cls}").shuffle(imgs)
            lists.append(imgs)
        n = min(len(x) for x in lists)
        if n == 0:
            lacking = [s for s, x in zip(sources, lists, strict=True) if not x]
            notes.append(f"class {cls!r} left out of the per-prompt ranking: no image from {', '.join(lacking)}")
            continue
        for k in range(min(n, per_prompt) if per_prompt else n):
            members = [(src, x[k]["item_id"]) for src, x in zip(sources, lists, strict=True)]
            groups.append({"class": cls, "prompt_shown": lists[0][k]["prompt_shown"], "members": members})
    # Codes follow a seeded shuffle, as the units' do: a code says nothing about class or position.
    random.Random(f"{seed}|prank-codes").shuffle(groups)
    for i, g in enumerate(groups):
        g["code"] = f"G{i + 1:04d}"
    return groups, notes


def insert_groups(db, study_id: str, groups: list[dict[str, Any]]) -> None:
    for g in groups:
        gid = (
            db["prompt_rank_groups"]
            .insert({"study_id": study_id, "class": g["class"], "prompt_shown": g["prompt_shown"], "code": g["code"]})
            .last_pk
        )
        db["prompt_rank_members"].insert_all(
            {"group_id": gid, "item_id": item_id, "source": src} for src, item_id in g["members"]
        )


def assign_rater(db, secret: str, study_id: str, seed: int, rater_id: str) -> int:
    """A rater's rank tasks (every group, their own seeded order); 0 when the study has no rank groups."""
    gids = [
        r[0] for r in db.execute("SELECT group_id FROM prompt_rank_groups WHERE study_id = ? ORDER BY code", [study_id])
    ]
    random.Random(f"{seed}|prank-order|{rater_id}").shuffle(gids)
    db["prompt_rank_assignments"].insert_all(
        {
            "study_id": study_id,
            "rater_id": rater_id,
            "position": pos + 1,
            "group_id": gid,
            "task_id": opaque_id(secret, "prank-task", rater_id, gid),
            "first_served_at": None,
            "done_at": None,
        }
        for pos, gid in enumerate(gids)
    )
    return len(gids)


# ------------------------------------------------------------------ what a rater sees


@dataclass(frozen=True)
class RankImage:
    image_id: str  # opaque, per rater and group
    png: bytes  # the study's metadata-free PNG


@dataclass(frozen=True)
class RankTask:
    task_id: str
    position: int  # 1-based, in this rater's rank tasks
    done: int
    total: int
    instructions: str
    prompt: str | None
    images: tuple[RankImage, ...]  # in this rater's order for this group
    ranks: tuple[int, ...]  # 1..N, each to be given once
    answers: dict[str, int] | None  # this rater's current ranks (image id -> rank) when revisiting

    def to_public_dict(self, images: str = "base64") -> dict[str, Any]:
        def img(t: RankImage) -> dict[str, Any]:
            d: dict[str, Any] = {"image_id": t.image_id}
            if images == "base64":
                d["src"] = "data:image/png;base64," + base64.b64encode(t.png).decode()
            return d

        return {
            "task_id": self.task_id,
            "kind": "prompt-rank",
            "position": self.position,
            "progress": {"done": self.done, "total": self.total},
            "instructions": self.instructions,
            "prompt": self.prompt,
            "images": [img(t) for t in self.images],
            "ranks": list(self.ranks),
            "answers": dict(self.answers) if self.answers else None,
        }


@dataclass(frozen=True)
class RankAck:
    submission_id: str
    task_id: str
    revision: int
    duplicate: bool
    done: int
    total: int


def _study(store: Store, study_id: str, rater_id: str) -> dict[str, Any]:
    rows = list(
        store.db.query("SELECT study_id, secret, status, show_prompt FROM studies WHERE study_id = ?", [study_id])
    )
    if not rows:
        raise StudyError(f"unknown study {study_id!r}")
    if not store.db.execute(
        "SELECT 1 FROM raters WHERE study_id = ? AND rater_id = ?", [study_id, rater_id]
    ).fetchone():
        raise StudyError(f"rater {rater_id!r} is not assigned to study {study_id!r}")
    return rows[0]


_COLS = ("task_id", "position", "group_id", "first_served_at", "done_at")


def _assignment(store: Store, study_id: str, rater_id: str, where: str, arg) -> dict[str, Any] | None:
    row = store.db.execute(
        f"SELECT {', '.join(_COLS)} FROM prompt_rank_assignments WHERE study_id = ? AND rater_id = ? AND {where}",
        [study_id, rater_id, *([arg] if arg is not None else [])],
    ).fetchone()
    return dict(zip(_COLS, row, strict=True)) if row else None


def _members(store: Store, study: dict[str, Any], rater_id: str, group_id: int) -> list[tuple[str, int, str, str]]:
    """(image id, item id, source, image file) in this rater's order for this group."""
    rows = [
        (opaque_id(study["secret"], "prank-image", rater_id, f"{group_id}.{iid}"), iid, src, f)
        for iid, src, f in store.db.execute(
            "SELECT m.item_id, m.source, i.image_file FROM prompt_rank_members m JOIN items i ON i.item_id = m.item_id "
            "WHERE m.group_id = ? ORDER BY m.item_id",
            [group_id],
        )
    ]
    # Shuffled from the secret, never the seed: the order must not be computable by a rater.
    random.Random(opaque_id(study["secret"], "prank-order", rater_id, group_id)).shuffle(rows)
    return rows


def _progress(store: Store, study_id: str, rater_id: str) -> tuple[int, int]:
    total, done = store.db.execute(
        "SELECT COUNT(*), COALESCE(SUM(done_at IS NOT NULL), 0) FROM prompt_rank_assignments "
        "WHERE study_id = ? AND rater_id = ?",
        [study_id, rater_id],
    ).fetchone()
    return int(done), int(total)


def _task(store: Store, study: dict[str, Any], rater_id: str, asg: dict[str, Any]) -> RankTask:
    members = _members(store, study, rater_id, asg["group_id"])
    folder = store.study_dir(study["study_id"])
    images = []
    for image_id, _, _, f in members:
        try:
            images.append(RankImage(image_id, (folder / f).read_bytes()))
        except OSError as exc:
            raise StudyError(f"an image of study {study['study_id']!r} is missing from the store ({exc})") from exc
    prompt = store.db.execute(
        "SELECT prompt_shown FROM prompt_rank_groups WHERE group_id = ?", [asg["group_id"]]
    ).fetchone()[0]
    answers = None
    if asg["done_at"]:
        by_item = {iid: image_id for image_id, iid, _, _ in members}
        answers = {
            by_item[iid]: rank
            for iid, rank in store.db.execute(
                "SELECT item_id, rank FROM prompt_ranks WHERE study_id = ? AND group_id = ? AND rater_id = ? "
                "AND current = 1",
                [study["study_id"], asg["group_id"], rater_id],
            )
        }
    if asg["first_served_at"] is None:
        with store.write():
            store.db.execute(
                "UPDATE prompt_rank_assignments SET first_served_at = ? WHERE task_id = ? AND first_served_at IS NULL",
                [now(), asg["task_id"]],
            )
    done, total = _progress(store, study["study_id"], rater_id)
    n = len(images)
    return RankTask(
        task_id=asg["task_id"],
        position=asg["position"],
        done=done,
        total=total,
        instructions=INSTRUCTIONS.format(n=n),
        prompt=prompt if study["show_prompt"] else None,
        images=tuple(images),
        ranks=tuple(range(1, n + 1)),
        answers=answers,
    )


def next_rank_task(store: Store, study_id: str, rater_id: str) -> RankTask | None:
    """The rater's first unranked group in their order (None: all ranked)."""
    study = _study(store, study_id, rater_id)
    asg = _assignment(store, study_id, rater_id, "done_at IS NULL ORDER BY position LIMIT 1", None)
    return None if asg is None else _task(store, study, rater_id, asg)


def rank_task_at(store: Store, study_id: str, rater_id: str, position: int) -> RankTask:
    study = _study(store, study_id, rater_id)
    asg = _assignment(store, study_id, rater_id, "position = ?", position)
    if asg is None:
        raise StudyError(f"position {position!r} is outside this rater's rank tasks")
    return _task(store, study, rater_id, asg)


def get_rank_task(store: Store, study_id: str, rater_id: str, task_id: str) -> RankTask:
    study = _study(store, study_id, rater_id)
    asg = _assignment(store, study_id, rater_id, "task_id = ?", task_id) if is_opaque_id(task_id) else None
    if asg is None:
        raise StudyError(f"unknown rank task id {str(task_id)[:40]!r} for this rater")
    return _task(store, study, rater_id, asg)


# ------------------------------------------------------------------ submitting


def check_ranks(ranks: Any, image_ids: list[str]) -> dict[str, int]:
    """``ranks`` (image id -> rank) checked against the task's images: every image once, each of 1..N once."""
    n = len(image_ids)
    if not isinstance(ranks, dict):
        raise StudyError(f"ranks must map each image id to a rank from 1 to {n}")
    unknown = sorted(str(k)[:40] for k in ranks if k not in image_ids)
    if unknown:
        raise StudyError(f"ranks name image(s) not in this task: {unknown}")
    missing = [i for i in image_ids if i not in ranks]
    if missing:
        raise StudyError(f"incomplete ranking: {len(missing)} of the {n} images have no rank; rank every image 1..{n}")
    for k, v in ranks.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= n:
            raise StudyError(f"the rank of image {k} must be a whole number from 1 to {n} but is {v!r}")
    values = sorted(ranks.values())
    if values != list(range(1, n + 1)):
        twice = sorted({v for v in values if values.count(v) > 1})
        unused = [r for r in range(1, n + 1) if r not in values]
        raise StudyError(
            f"each rank 1..{n} must be given exactly once: rank(s) {twice} given more than once, "
            f"rank(s) {unused} not given"
        )
    return {k: int(v) for k, v in ranks.items()}


def submit_ranks(
    store: Store,
    study_id: str,
    rater_id: str,
    task_id: str,
    ranks: dict[str, int],
    submission_id: str,
    time_ms: int | None = None,
) -> RankAck:
    """Store one group's ranks; return only after they are committed."""
    if not isinstance(submission_id, str) or not SUBMISSION_ID.match(submission_id):
        raise StudyError(
            f"submission_id must be 8-80 letters, digits, '-' or '_' (e.g. a UUID) but is {str(submission_id)[:90]!r}"
        )
    if time_ms is not None and (
        isinstance(time_ms, bool) or not isinstance(time_ms, int) or not 0 <= time_ms <= MAX_TIME_MS
    ):
        raise StudyError(f"time_ms must be an integer from 0 to {MAX_TIME_MS} but is {time_ms!r}")
    study = _study(store, study_id, rater_id)
    if study["status"] != "open":
        raise StudyError(f"study {study_id!r} is closed; no more answers are taken")
    asg = _assignment(store, study_id, rater_id, "task_id = ?", task_id) if is_opaque_id(task_id) else None
    if asg is None:
        raise StudyError(f"unknown rank task id {str(task_id)[:40]!r} for this rater")
    members = _members(store, study, rater_id, asg["group_id"])
    checked = check_ranks(ranks, [m[0] for m in members])
    by_image = {image_id: iid for image_id, iid, _, _ in members}
    rows = sorted((by_image[k], r) for k, r in checked.items())
    payload = hashlib.sha256(json.dumps({"task": task_id, "ranks": rows}).encode()).hexdigest()
    gid, db = asg["group_id"], store.db
    with store.write():
        prior = db.execute(
            "SELECT study_id, rater_id, task_id, payload_sha256, revision FROM prompt_rank_submissions "
            "WHERE submission_id = ?",
            [submission_id],
        ).fetchone()
        if prior is not None:
            if tuple(prior[:4]) != (study_id, rater_id, task_id, payload):
                raise StudyError(
                    f"submission id {submission_id!r} was already used for other answers; send a new id for new answers"
                )
            duplicate, revision = True, prior[4]
        else:
            duplicate, ts = False, now()
            revision = (
                1
                + db.execute(
                    "SELECT COUNT(*) FROM prompt_rank_submissions WHERE study_id = ? AND rater_id = ? AND group_id = ?",
                    [study_id, rater_id, gid],
                ).fetchone()[0]
            )
            db.execute(
                "INSERT INTO prompt_rank_submissions (submission_id, study_id, rater_id, group_id, task_id, "
                "payload_sha256, revision, time_ms, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [submission_id, study_id, rater_id, gid, task_id, payload, revision, time_ms, ts],
            )
            db.execute(
                "UPDATE prompt_ranks SET current = 0, superseded_at = ? "
                "WHERE study_id = ? AND group_id = ? AND rater_id = ? AND current = 1",
                [ts, study_id, gid, rater_id],
            )
            db.conn.executemany(
                "INSERT INTO prompt_ranks (submission_id, study_id, group_id, rater_id, item_id, rank) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                [[submission_id, study_id, gid, rater_id, iid, r] for iid, r in rows],
            )
            db.execute(
                "UPDATE prompt_rank_assignments SET done_at = COALESCE(done_at, ?) WHERE task_id = ?", [ts, task_id]
            )
    done, total = _progress(store, study_id, rater_id)
    return RankAck(submission_id, task_id, revision, duplicate, done, total)
