"""The rater-facing API: the next task, a task again, submit, progress.

Everything a function here returns is safe to show a rater: opaque ids, the
clean PNG bytes, the aspects and the checklist, the prompt text (which the
study checked is shared across sources), the anonymous set label (set studies)
and progress. Nothing names a source, a model, a file or real vs synthetic.

Every call checks that the rater belongs to the study, and a rater only ever
sees their own answers.

Submits are idempotent and durable:

- the client sends a ``submission_id`` (a fresh UUID per task view, reused on
  retry); the same id with the same answers returns the first ack again and
  writes nothing; the same id with other answers is refused;
- answering a task already answered is a *revision*: the earlier answers are
  kept as history (``current = 0``, ``superseded_at``) and the new ones count;
- the function returns only after the transaction has committed (WAL,
  ``synchronous=FULL``), so an ack is a promise that the answer is on disk;
- any invalid part (score outside 0-10, unknown aspect, tampered id, ...)
  raises ``StudyError`` before the transaction, and nothing is written.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from histolab.errors import StudyError
from histolab.review.blinding import is_opaque_id, opaque_id
from histolab.review.config import SLUG
from histolab.review.store import Store, now
from histolab.review.study import StudyInfo, load_study

SUBMISSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,80}$")
JUDGEMENTS = ("real", "synthetic")
CONFIDENCE_MIN, CONFIDENCE_MAX = 1, 5  # 1: a guess ... 5: certain
MAX_COMMENT = 5000  # characters: a paragraph or two, not a file
MAX_TIME_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class AspectView:
    key: str
    label: str
    description: str
    type: str  # "scale": integers; "continuous": any value
    minimum: int
    maximum: int
    step: float | None  # 1 for "scale", None for "continuous"
    anchors: tuple[tuple[int, str], ...]
    required: bool = True  # the task cannot be submitted without it (the study's config says which)


@dataclass(frozen=True)
class ArtefactView:
    key: str
    label: str
    description: str


@dataclass(frozen=True)
class TaskImage:
    image_id: str  # opaque, per rater
    png: bytes  # metadata-free PNG at the study's fixed size


@dataclass(frozen=True)
class Answers:
    """One task's answers. ``scores`` has every required aspect (an unset one is absent or None); ``artefacts``
    the keys seen."""

    scores: dict[str, float] = field(default_factory=dict)
    artefacts: tuple[str, ...] = ()
    judgement: str | None = None  # "real" or "synthetic" (Turing-test studies)
    confidence: int | None = None  # 1..5, with the judgement
    comment: str = ""
    ranking: tuple[str, ...] = ()  # ranking task: the model labels, best first
    time_ms: int | None = None  # time the rater spent, measured by the client

    def to_dict(self) -> dict[str, Any]:
        return {
            "scores": dict(self.scores),
            "artefacts": list(self.artefacts),
            "judgement": self.judgement,
            "confidence": self.confidence,
            "comment": self.comment,
            "ranking": list(self.ranking),
            "time_ms": self.time_ms,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Answers:
        if not isinstance(d, dict):
            raise StudyError("answers must be a mapping with scores, artefacts, judgement, ...")
        allowed = {"scores", "artefacts", "judgement", "confidence", "comment", "ranking", "time_ms"}
        extra = sorted(set(d) - allowed)
        if extra:
            raise StudyError(f"answers have unknown field(s) {extra}")
        return cls(
            scores=dict(d.get("scores") or {}),
            artefacts=tuple(d.get("artefacts") or ()),
            judgement=d.get("judgement"),
            confidence=d.get("confidence"),
            comment=d.get("comment") or "",
            ranking=tuple(d.get("ranking") or ()),
            time_ms=d.get("time_ms"),
        )


@dataclass(frozen=True)
class Progress:
    done: int
    total: int

    @property
    def finished(self) -> bool:
        return self.done >= self.total


@dataclass(frozen=True)
class Task:
    """Exactly what a rater's client needs to show one task."""

    task_id: str
    kind: str  # "item" (one image), "set" (a panel of one model's images) or "ranking"
    position: int  # 1-based place in this rater's sequence
    progress: Progress
    instructions: str
    prompt: str | None  # the text to judge prompt faithfulness against (None: not shown)
    set_label: str | None  # "Model B" in set studies; None for single images
    images: tuple[TaskImage, ...]
    references: tuple[TaskImage, ...]  # known-real examples of the same prompt, shown first
    aspects: tuple[AspectView, ...]
    artefacts: tuple[ArtefactView, ...]
    ask_judgement: bool  # ask "real or synthetic?" with a confidence
    ranking_options: tuple[str, ...]  # ranking task: the model labels to order
    answers: Answers | None  # this rater's current answers, when revisiting
    judgement_required: bool = True  # with ask_judgement: the judgement (and how sure) must be given

    def to_public_dict(self, images: str = "base64") -> dict[str, Any]:
        """JSON-ready form; ``images="base64"`` inlines the PNGs as data URLs, ``"omit"`` leaves them out."""

        def img(t: TaskImage) -> dict[str, Any]:
            d: dict[str, Any] = {"image_id": t.image_id}
            if images == "base64":
                d["src"] = "data:image/png;base64," + base64.b64encode(t.png).decode()
            return d

        return {
            "task_id": self.task_id,
            "kind": self.kind,
            "position": self.position,
            "progress": {"done": self.progress.done, "total": self.progress.total},
            "instructions": self.instructions,
            "prompt": self.prompt,
            "set_label": self.set_label,
            "images": [img(t) for t in self.images],
            "references": [img(t) for t in self.references],
            "aspects": [
                {
                    "key": a.key,
                    "label": a.label,
                    "description": a.description,
                    "type": a.type,
                    "minimum": a.minimum,
                    "maximum": a.maximum,
                    "step": a.step,
                    "anchors": [[k, v] for k, v in a.anchors],
                    "required": a.required,
                }
                for a in self.aspects
            ],
            "artefacts": [{"key": a.key, "label": a.label, "description": a.description} for a in self.artefacts],
            "ask_judgement": self.ask_judgement,
            "judgement_options": list(JUDGEMENTS) if self.ask_judgement else [],
            "judgement_required": self.ask_judgement and self.judgement_required,
            "ranking_options": list(self.ranking_options),
            "answers": self.answers.to_dict() if self.answers else None,
        }


@dataclass(frozen=True)
class Ack:
    """A submit's receipt: returned only after the answers are committed."""

    submission_id: str
    task_id: str
    revision: int  # 1 for the first answer to this task, 2 for its first revision, ...
    duplicate: bool  # True: this submission id was already stored; nothing new written
    progress: Progress


def _open_study(store: Store, study_id: str, rater_id: str) -> StudyInfo:
    info = load_study(store, study_id)
    if not isinstance(rater_id, str) or not SLUG.match(rater_id):
        raise StudyError(f"rater {rater_id!r} is not assigned to study {study_id!r}")
    row = store.db.execute("SELECT 1 FROM raters WHERE study_id = ? AND rater_id = ?", [study_id, rater_id]).fetchone()
    if row is None:
        raise StudyError(f"rater {rater_id!r} is not assigned to study {study_id!r}")
    return info


def progress(store: Store, study_id: str, rater_id: str) -> Progress:
    _open_study(store, study_id, rater_id)
    return _progress(store, study_id, rater_id)


def _progress(store: Store, study_id: str, rater_id: str) -> Progress:
    total, done = store.db.execute(
        "SELECT COUNT(*), COALESCE(SUM(done_at IS NOT NULL), 0) FROM assignments WHERE study_id = ? AND rater_id = ?",
        [study_id, rater_id],
    ).fetchone()
    return Progress(done=int(done), total=int(total))


def rater_studies(store: Store, rater_id: str) -> list[dict[str, Any]]:
    """The open studies a rater is in, with their progress (what a sign-in page lists)."""
    rows = store.db.query(
        """SELECT s.study_id, s.title, COUNT(a.unit_id) AS total, COALESCE(SUM(a.done_at IS NOT NULL), 0) AS done
           FROM raters r JOIN studies s ON s.study_id = r.study_id
           LEFT JOIN assignments a ON a.study_id = r.study_id AND a.rater_id = r.rater_id
           WHERE r.rater_id = ? AND s.status = 'open' GROUP BY s.study_id ORDER BY s.created_at""",
        [rater_id],
    )
    return [dict(r) for r in rows]


def _aspect_views(info: StudyInfo) -> tuple[AspectView, ...]:
    return tuple(
        AspectView(
            key=a.key,
            label=a.label,
            description=a.description,
            type=a.type,
            minimum=0,
            maximum=10,
            step=1.0 if a.type == "scale" else None,
            anchors=a.anchors,
            required=a.required,
        )
        for a in info.aspects
    )


def _current_answers(store: Store, study_id: str, rater_id: str, unit_id: int, info: StudyInfo) -> Answers | None:
    db = store.db
    args = [study_id, unit_id, rater_id]
    sub = db.execute(
        "SELECT submission_id, time_ms FROM submissions WHERE study_id = ? AND unit_id = ? AND rater_id = ? "
        "ORDER BY revision DESC LIMIT 1",
        args,
    ).fetchone()
    if sub is None:
        return None
    where = "WHERE study_id = ? AND unit_id = ? AND rater_id = ? AND current = 1"
    scores = {a: v for a, v in db.execute(f"SELECT aspect, value FROM ratings {where}", args)}
    marks = [a for (a,) in db.execute(f"SELECT artefact FROM artefact_marks {where} AND present = 1", args)]
    j = db.execute(f"SELECT says_synthetic, confidence FROM judgements {where}", args).fetchone()
    c = db.execute(f"SELECT text FROM comments {where}", args).fetchone()
    labels = info.labels
    ranks = sorted(db.execute(f"SELECT rank, source FROM rankings {where}", args).fetchall())
    order = {a.key: i for i, a in enumerate(info.artefacts)}
    return Answers(
        scores=scores,
        artefacts=tuple(sorted(marks, key=lambda k: order.get(k, 0))),
        judgement=None if j is None else JUDGEMENTS[j[0]],
        confidence=None if j is None else j[1],
        comment=c[0] if c else "",
        ranking=tuple(labels[s] for _, s in ranks),
        time_ms=sub[1],
    )


def _build_task(store: Store, info: StudyInfo, rater_id: str, asg: dict[str, Any]) -> Task:
    db = store.db
    unit = db.execute("SELECT kind, class FROM units WHERE unit_id = ?", [asg["unit_id"]]).fetchone()
    kind, cls = unit
    folder = store.study_dir(info.study_id)

    def load(item_id: int, image_file: str) -> TaskImage:
        path = folder / image_file
        try:
            png = path.read_bytes()
        except OSError as exc:
            raise StudyError(
                f"an image of study {info.study_id!r} is missing from the store ({exc}); restore {folder}"
            ) from exc
        return TaskImage(image_id=opaque_id(info.secret, "image", rater_id, item_id), png=png)

    images = tuple(
        load(iid, f)
        for iid, f in db.execute(
            "SELECT i.item_id, i.image_file FROM unit_items ui JOIN items i ON i.item_id = ui.item_id "
            "WHERE ui.unit_id = ? ORDER BY ui.position",
            [asg["unit_id"]],
        )
    )
    prompt = None
    if kind != "ranking":
        row = db.execute(
            "SELECT i.prompt_shown FROM unit_items ui JOIN items i ON i.item_id = ui.item_id WHERE ui.unit_id = ? LIMIT 1",
            [asg["unit_id"]],
        ).fetchone()
        prompt = row[0] if row else None
    references: tuple[TaskImage, ...] = ()
    if kind != "ranking":
        references = tuple(
            load(iid, f)
            for iid, f in db.execute(
                "SELECT i.item_id, i.image_file FROM items i JOIN sources s ON s.study_id = i.study_id AND s.name = i.source "
                "WHERE i.study_id = ? AND s.role = 'reference' AND i.class IS ? ORDER BY i.pixel_sha256",
                [info.study_id, cls],
            )
        )
    set_label = None
    if kind == "set":
        src = db.execute("SELECT source FROM units WHERE unit_id = ?", [asg["unit_id"]]).fetchone()[0]
        set_label = info.labels[src]
    ranking_options: tuple[str, ...] = ()
    if kind == "ranking":
        opts = sorted(info.labels.values())
        ranking_options = tuple(opts)
    answers = _current_answers(store, info.study_id, rater_id, asg["unit_id"], info) if asg["done_at"] else None
    return Task(
        task_id=asg["task_id"],
        kind=kind,
        position=asg["position"],
        progress=_progress(store, info.study_id, rater_id),
        instructions=info.instructions,
        prompt=prompt,
        set_label=set_label,
        images=images,
        references=references,
        aspects=_aspect_views(info) if kind != "ranking" else (),
        artefacts=tuple(ArtefactView(a.key, a.label, a.description) for a in info.artefacts)
        if kind != "ranking"
        else (),
        ask_judgement=info.turing_test and kind != "ranking",
        ranking_options=ranking_options,
        answers=answers,
        judgement_required=info.judgement_required,
    )


def _mark_served(store: Store, asg: dict[str, Any]) -> None:
    if asg["first_served_at"] is None:
        with store.write():
            store.db.execute(
                "UPDATE assignments SET first_served_at = ? WHERE task_id = ? AND first_served_at IS NULL",
                [now(), asg["task_id"]],
            )


_ASG_COLS = "task_id, position, unit_id, first_served_at, done_at"


def next_task(store: Store, study_id: str, rater_id: str) -> Task | None:
    """The rater's first unanswered task in their order (None: all done). Resuming is calling this."""
    info = _open_study(store, study_id, rater_id)
    row = store.db.execute(
        f"SELECT {_ASG_COLS} FROM assignments WHERE study_id = ? AND rater_id = ? AND done_at IS NULL "
        "ORDER BY position LIMIT 1",
        [study_id, rater_id],
    ).fetchone()
    if row is None:
        return None
    asg = dict(zip(_ASG_COLS.split(", "), row, strict=True))
    _mark_served(store, asg)
    return _build_task(store, info, rater_id, asg)


def _assignment(store: Store, study_id: str, rater_id: str, task_id: str) -> dict[str, Any]:
    if not is_opaque_id(task_id):
        raise StudyError(f"unknown task id {str(task_id)[:40]!r} for this rater")
    row = store.db.execute(
        f"SELECT {_ASG_COLS} FROM assignments WHERE study_id = ? AND rater_id = ? AND task_id = ?",
        [study_id, rater_id, task_id],
    ).fetchone()
    if row is None:
        raise StudyError(f"unknown task id {task_id!r} for this rater")
    return dict(zip(_ASG_COLS.split(", "), row, strict=True))


def get_task(store: Store, study_id: str, rater_id: str, task_id: str) -> Task:
    """One of the rater's own tasks by id, with their current answers (to go back and revise)."""
    info = _open_study(store, study_id, rater_id)
    asg = _assignment(store, study_id, rater_id, task_id)
    _mark_served(store, asg)
    return _build_task(store, info, rater_id, asg)


def task_at(store: Store, study_id: str, rater_id: str, position: int) -> Task:
    """The rater's task at a 1-based position (for a "back" button)."""
    info = _open_study(store, study_id, rater_id)
    row = store.db.execute(
        f"SELECT {_ASG_COLS} FROM assignments WHERE study_id = ? AND rater_id = ? AND position = ?",
        [study_id, rater_id, position],
    ).fetchone()
    if row is None:
        raise StudyError(f"position {position!r} is outside this rater's tasks")
    asg = dict(zip(_ASG_COLS.split(", "), row, strict=True))
    _mark_served(store, asg)
    return _build_task(store, info, rater_id, asg)


def _number(where: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise StudyError(f"{where} must be a number from 0 to 10 but is {v!r}")
    return float(v)


def _validate(info: StudyInfo, kind: str, a: Answers) -> dict[str, Any]:
    """Checked, normalised answers; raises StudyError naming the bad value."""
    if not isinstance(a, Answers):
        raise StudyError(f"answers must be an Answers object, got {type(a).__name__}")
    if not isinstance(a.comment, str) or len(a.comment) > MAX_COMMENT:
        raise StudyError(f"comment must be text of at most {MAX_COMMENT} characters")
    if a.time_ms is not None and (
        isinstance(a.time_ms, bool) or not isinstance(a.time_ms, int) or not 0 <= a.time_ms <= MAX_TIME_MS
    ):
        raise StudyError(f"time_ms must be an integer from 0 to {MAX_TIME_MS} but is {a.time_ms!r}")
    if kind == "ranking":
        if a.scores or a.artefacts or a.judgement is not None or a.confidence is not None:
            raise StudyError("the ranking task takes a ranking only (no scores, artefacts or judgement)")
        options = sorted(info.labels.values())
        ranking = list(a.ranking)
        if sorted(ranking) != options:
            raise StudyError(f"ranking must order each of {options} exactly once (best first) but is {ranking!r}")
        by_label = {v: k for k, v in info.labels.items()}
        return {"scores": {}, "artefacts": [], "judgement": None, "ranking": [by_label[x] for x in ranking]}
    if a.ranking:
        raise StudyError("only the ranking task takes a ranking")
    if not isinstance(a.scores, dict):
        raise StudyError("scores must map aspect keys to values from 0 to 10")
    aspects = {x.key: x for x in info.aspects}
    unknown = sorted(str(k) for k in a.scores if k not in aspects)
    if unknown:
        raise StudyError(f"unknown aspect(s) {unknown}; this study scores {list(aspects)}")
    # An unset answer (absent, or None) is never stored as a value: a required one refuses the whole
    # submit, an optional one is stored as nothing.
    missing = [k for k, asp in aspects.items() if asp.required and a.scores.get(k) is None]
    if missing:
        raise StudyError(
            f"missing score(s) for {missing}: this study requires a value from 0 to 10 for each "
            "(nothing was stored: an unset answer is never recorded as a default)"
        )
    scores = {}
    for k, asp in aspects.items():
        if a.scores.get(k) is None:
            continue
        v = _number(f"score for {k!r}", a.scores[k])
        if not 0.0 <= v <= 10.0:
            raise StudyError(f"score for {k!r} must be from 0 to 10 but is {v!r}")
        if asp.type == "scale" and v != int(v):
            raise StudyError(f"score for {k!r} must be a whole number from 0 to 10 but is {v!r}")
        scores[k] = v
    known = [x.key for x in info.artefacts]
    marks = list(a.artefacts)
    if any(not isinstance(m, str) for m in marks) or sorted(set(marks) - set(known)):
        raise StudyError(
            f"unknown artefact(s) {sorted(str(m) for m in set(marks) - set(known))}; the checklist is {known}"
        )
    if len(set(marks)) != len(marks):
        raise StudyError("an artefact is listed twice")
    judgement = None
    if info.turing_test and a.judgement is None and a.confidence is None and not info.judgement_required:
        pass  # an optional judgement left unset: nothing is stored for it
    elif info.turing_test:
        if a.judgement is None:
            raise StudyError(
                "missing required judgement: say real or synthetic (and how sure) before submitting "
                "(nothing was stored)"
                if info.judgement_required
                else "a confidence was given without a judgement: say real or synthetic too, or neither"
            )
        if a.judgement not in JUDGEMENTS:
            raise StudyError(f"judgement must be one of {list(JUDGEMENTS)} but is {a.judgement!r}")
        c = a.confidence
        if c is None:
            raise StudyError(
                f"missing confidence: say how sure you are ({CONFIDENCE_MIN}-{CONFIDENCE_MAX}) with the judgement "
                "(nothing was stored)"
            )
        if isinstance(c, bool) or not isinstance(c, int) or not CONFIDENCE_MIN <= c <= CONFIDENCE_MAX:
            raise StudyError(f"confidence must be an integer from {CONFIDENCE_MIN} to {CONFIDENCE_MAX} but is {c!r}")
        judgement = (JUDGEMENTS.index(a.judgement), c)
    elif a.judgement is not None or a.confidence is not None:
        raise StudyError("this study asks no real-or-synthetic judgement")
    return {"scores": scores, "artefacts": sorted(set(marks)), "judgement": judgement, "ranking": []}


def _payload_sha(task_id: str, norm: dict[str, Any], comment: str) -> str:
    # time_ms is left out: a retry may re-measure it; the answers are what must match.
    blob = json.dumps({"task": task_id, **norm, "comment": comment}, sort_keys=True, default=list)
    return hashlib.sha256(blob.encode()).hexdigest()


def _elapsed_ms(first_served_at: str | None) -> int | None:
    if first_served_at is None:
        return None
    ms = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(first_served_at)).total_seconds() * 1000
    return int(min(max(ms, 0), MAX_TIME_MS))


def submit(store: Store, study_id: str, rater_id: str, task_id: str, answers: Answers, submission_id: str) -> Ack:
    """Store one task's answers; return only after they are committed (see the module doc)."""
    if not isinstance(submission_id, str) or not SUBMISSION_ID.match(submission_id):
        raise StudyError(
            f"submission_id must be 8-80 letters, digits, '-' or '_' (e.g. a UUID) but is {str(submission_id)[:90]!r}"
        )
    info = _open_study(store, study_id, rater_id)
    if info.status != "open":
        raise StudyError(f"study {study_id!r} is closed; no more answers are taken")
    asg = _assignment(store, study_id, rater_id, task_id)
    kind = store.db.execute("SELECT kind FROM units WHERE unit_id = ?", [asg["unit_id"]]).fetchone()[0]
    norm = _validate(info, kind, answers)
    payload = _payload_sha(task_id, norm, answers.comment)
    unit_id = asg["unit_id"]
    db = store.db
    with store.write():
        prior = db.execute(
            "SELECT study_id, rater_id, task_id, payload_sha256, revision FROM submissions WHERE submission_id = ?",
            [submission_id],
        ).fetchone()
        if prior is not None:
            if tuple(prior[:4]) != (study_id, rater_id, task_id, payload):
                raise StudyError(
                    f"submission id {submission_id!r} was already used for other answers; send a new id for new answers"
                )
            duplicate, revision = True, prior[4]
        else:
            duplicate = False
            revision = (
                1
                + db.execute(
                    "SELECT COUNT(*) FROM submissions WHERE study_id = ? AND rater_id = ? AND unit_id = ?",
                    [study_id, rater_id, unit_id],
                ).fetchone()[0]
            )
            ts = now()
            time_ms = answers.time_ms if answers.time_ms is not None else _elapsed_ms(asg["first_served_at"])
            db.execute(
                "INSERT INTO submissions (submission_id, study_id, rater_id, unit_id, task_id, payload_sha256, revision, "
                "time_ms, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [submission_id, study_id, rater_id, unit_id, task_id, payload, revision, time_ms, ts],
            )
            key = [study_id, unit_id, rater_id]
            if revision > 1:
                for table in ("ratings", "artefact_marks", "judgements", "comments", "rankings"):
                    db.execute(
                        f"UPDATE {table} SET current = 0, superseded_at = ? "
                        "WHERE study_id = ? AND unit_id = ? AND rater_id = ? AND current = 1",
                        [ts, *key],
                    )
            head = [submission_id, *key]
            db.conn.executemany(
                "INSERT INTO ratings (submission_id, study_id, unit_id, rater_id, aspect, value) VALUES (?, ?, ?, ?, ?, ?)",
                [[*head, k, v] for k, v in norm["scores"].items()],
            )
            if kind != "ranking":
                marked = set(norm["artefacts"])
                db.conn.executemany(
                    "INSERT INTO artefact_marks (submission_id, study_id, unit_id, rater_id, artefact, present) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [[*head, x.key, int(x.key in marked)] for x in info.artefacts],
                )
            if norm["judgement"] is not None:
                db.execute(
                    "INSERT INTO judgements (submission_id, study_id, unit_id, rater_id, says_synthetic, confidence) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [*head, *norm["judgement"]],
                )
            if answers.comment.strip():
                db.execute(
                    "INSERT INTO comments (submission_id, study_id, unit_id, rater_id, text) VALUES (?, ?, ?, ?, ?)",
                    [*head, answers.comment],
                )
            db.conn.executemany(
                "INSERT INTO rankings (submission_id, study_id, unit_id, rater_id, source, rank) VALUES (?, ?, ?, ?, ?, ?)",
                [[*head, src, r + 1] for r, src in enumerate(norm["ranking"])],
            )
            db.execute(
                "UPDATE assignments SET done_at = COALESCE(done_at, ?) WHERE task_id = ?",
                [ts, task_id],
            )
    return Ack(
        submission_id=submission_id,
        task_id=task_id,
        revision=revision,
        duplicate=duplicate,
        progress=_progress(store, study_id, rater_id),
    )
