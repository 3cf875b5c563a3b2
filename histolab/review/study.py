"""Owner-side study operations: create, add raters, status, unblind, close.

``create_study`` validates everything (config, every image, blinding) before
it writes anything; then it writes the images into the store's own folder
(``annotations/studies/<id>/``, so the study survives the originals moving)
and the rows in one transaction. A failure at any point leaves no study.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import random
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from histolab.errors import StudyError
from histolab.review import prompt_rank
from histolab.review.blinding import model_labels, opaque_id, served_png, shown_text_leaks
from histolab.review.config import SLUG, RaterDef, StudyConfig, parse_raters
from histolab.review.ingest import ScannedImage, SourceScan, scan_source
from histolab.review.store import Store, now
from histolab.review.templates import ArtefactDef, AspectDef

_EXT = {"PNG": "png", "JPEG": "jpg", "TIFF": "tif", "BMP": "bmp", "GIF": "gif", "WEBP": "webp"}


@dataclass(frozen=True)
class StudyInfo:
    """A study's definition as the store holds it (the secret included: never hand this to a rater)."""

    study_id: str
    title: str
    owner: str
    template: str
    mode: str
    seed: int
    secret: str
    image_size: int
    instructions: str
    turing_test: bool
    ranking: bool
    show_prompt: bool
    set_size: int | None
    status: str
    created_at: str
    aspects: tuple[AspectDef, ...]
    artefacts: tuple[ArtefactDef, ...]
    sources: tuple[dict[str, Any], ...]  # name, kind, role, label, path, description
    judgement_required: bool = True  # Turing test: a task needs its real-or-synthetic judgement

    @property
    def labels(self) -> dict[str, str]:
        """Rated source -> its anonymous label."""
        return {s["name"]: s["label"] for s in self.sources if s["role"] == "rated"}


@dataclass
class CreationReport:
    study_id: str
    folder: Path
    rated_items: dict[str, int]  # source -> images
    reference_items: dict[str, int]
    units: int  # tasks per rater
    raters: dict[str, str]  # rater id -> sign-in code (shown once, stored hashed)
    ignored: dict[str, list[str]] = field(default_factory=dict)
    duplicates: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    unsampled: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # set mode: images beyond whole sets
    native_sizes: dict[str, list[str]] = field(default_factory=dict)  # rated source -> its images' sizes
    prompt_rank_groups: int = 0  # per-prompt rank tasks per rater (prompt_ranking)
    prompt_rank_notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"study {self.study_id}: {self.units} tasks per rater, images in {self.folder}"]
        if self.prompt_rank_groups:
            out.append(
                f"  per-prompt ranking (real image among the models): {self.prompt_rank_groups} groups per rater"
            )
        out += [f"  {n}" for n in self.prompt_rank_notes]
        for name, n in self.rated_items.items():
            out.append(f"  rated source {name}: {n} images")
        for name, n in self.reference_items.items():
            out.append(f"  reference source {name}: {n} images")
        for name, files in self.ignored.items():
            out.append(f"  source {name}: ignored {len(files)} non-image file(s): {', '.join(files[:5])}")
        for name, dups in self.duplicates.items():
            out.append(f"  source {name}: skipped {len(dups)} duplicate image(s), e.g. {dups[0][0]} = {dups[0][1]}")
        for name, n in self.unsampled.items():
            if n:
                out.append(f"  source {name}: {n} image(s) left out by its limit")
        for name, n in self.dropped.items():
            if n:
                out.append(f"  source {name}: {n} image(s) left out (not enough for a whole set)")
        if len({tuple(v) for v in self.native_sizes.values()}) > 1:
            sizes = "; ".join(f"{k} {', '.join(v)}" for k, v in self.native_sizes.items())
            out.append(
                f"  blinding warning: the rated sources have different native sizes ({sizes}); every image is "
                "served at the same size, but resampling leaves different sharpness that raters may notice"
            )
        return out


def _write_durably(path: Path, data: bytes) -> None:
    # The rows are committed with synchronous=FULL; the images they point at
    # must be on disk before that, or a power cut could leave rows without images.
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _code_hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def load_study(store: Store, study_id: str) -> StudyInfo:
    if not isinstance(study_id, str) or not SLUG.match(study_id):
        raise StudyError(f"unknown study {study_id!r}")
    db = store.db
    rows = list(db.query("SELECT * FROM studies WHERE study_id = ?", [study_id]))
    if not rows:
        raise StudyError(f"unknown study {study_id!r}; `python -m histolab study list` shows the studies")
    s = rows[0]
    aspects = tuple(
        AspectDef(
            key=r["key"],
            label=r["label"],
            description=r["description"],
            type=r["type"],
            scope=r["scope"],
            anchors=tuple((int(k), v) for k, v in json.loads(r["anchors_json"]).items()),
            required=bool(r["required"]),
        )
        for r in db.query("SELECT * FROM aspects WHERE study_id = ? ORDER BY position", [study_id])
    )
    artefacts = tuple(
        ArtefactDef(key=r["key"], label=r["label"], description=r["description"])
        for r in db.query("SELECT * FROM artefacts WHERE study_id = ? ORDER BY position", [study_id])
    )
    sources = tuple(
        {k: r[k] for k in ("name", "kind", "role", "label", "path", "description")}
        for r in db.query("SELECT * FROM sources WHERE study_id = ? ORDER BY position", [study_id])
    )
    return StudyInfo(
        study_id=s["study_id"],
        title=s["title"],
        owner=s["owner"],
        template=s["template"],
        mode=s["mode"],
        seed=s["seed"],
        secret=s["secret"],
        image_size=s["image_size"],
        instructions=s["instructions"],
        turing_test=bool(s["turing_test"]),
        ranking=bool(s["ranking"]),
        show_prompt=bool(s["show_prompt"]),
        set_size=s["set_size"],
        status=s["status"],
        created_at=s["created_at"],
        aspects=aspects,
        artefacts=artefacts,
        sources=sources,
        judgement_required=bool(s["judgement_required"]),
    )


def require_owner(info: StudyInfo, owner: str | None) -> None:
    """Unblinded views are the owner's alone."""
    if owner is None or not hmac.compare_digest(str(owner), info.owner):
        raise StudyError(f"only the owner of study {info.study_id!r} may see it unblinded (owner {owner!r} refused)")


def list_studies(store: Store) -> list[dict[str, Any]]:
    return list(
        store.db.query("SELECT study_id, title, owner, mode, status, created_at FROM studies ORDER BY created_at")
    )


def _shown_text(config: StudyConfig, cls: str | None) -> str | None:
    if not config.show_prompt or cls is None:
        return None
    return config.prompts.get(cls, cls)


def _plan_units(config: StudyConfig, rated: list[ScannedImage]) -> tuple[list[dict], dict[str, int]]:
    """Units (what one task shows) as dicts with kind, source, class and their images."""
    units: list[dict] = []
    dropped: dict[str, int] = {}
    if config.mode == "item":
        units = [{"kind": "item", "source": im.source, "class": im.cls, "images": [im]} for im in rated]
    else:
        groups: dict[tuple[str, str | None], list[ScannedImage]] = {}
        for im in rated:
            groups.setdefault((im.source, im.cls), []).append(im)
        size = config.set_size or 1
        for (src, cls), imgs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
            if len(imgs) < size:
                raise StudyError(
                    f"source {src!r} has {len(imgs)} image(s) of class {cls!r}, fewer than set_size {size}; "
                    "add images or lower set_size"
                )
            imgs = list(imgs)
            random.Random(f"{config.seed}|sets|{src}|{cls}").shuffle(imgs)
            n_sets = len(imgs) // size
            dropped[src] = dropped.get(src, 0) + len(imgs) - n_sets * size
            for k in range(n_sets):
                units.append({"kind": "set", "source": src, "class": cls, "images": imgs[k * size : (k + 1) * size]})
        if config.ranking:
            units.append({"kind": "ranking", "source": None, "class": None, "images": []})
    # Unit codes (U0001, ...) follow a seeded shuffle, so a code says nothing about the source.
    random.Random(f"{config.seed}|codes").shuffle(units)
    for i, u in enumerate(units):
        u["code"] = f"U{i + 1:04d}"
    return units, dropped


def rater_order(units: list[dict[str, Any]], rater_id: str, seed: int, mode: str) -> list[int]:
    """A rater's task order (unit ids): their own seeded shuffle.

    Set studies keep the sets of one prompt together (each group shows its
    references first) in a shuffled order of groups and of sets within each
    group; the ranking comes last, after every set has been seen.
    """
    rng = random.Random(f"{seed}|order|{rater_id}")
    units = sorted(units, key=lambda u: u["code"])
    if mode == "item":
        ids = [u["unit_id"] for u in units]
        rng.shuffle(ids)
        return ids
    groups: dict[str | None, list[int]] = {}
    ranking = []
    for u in units:
        if u["kind"] == "ranking":
            ranking.append(u["unit_id"])
        else:
            groups.setdefault(u["class"], []).append(u["unit_id"])
    keys = sorted(groups, key=lambda c: (c is None, c or ""))
    rng.shuffle(keys)
    order = []
    for k in keys:
        ids = groups[k]
        rng.shuffle(ids)
        order.extend(ids)
    return order + ranking


def _insert_rater(store: Store, info_secret: str, study_id: str, seed: int, mode: str, rater: RaterDef) -> str:
    """Rater row and assignments, inside the caller's transaction. Returns the sign-in code."""
    db = store.db
    code = secrets.token_urlsafe(12)
    db["raters"].insert(
        {
            "study_id": study_id,
            "rater_id": rater.id,
            "name": rater.name,
            "code_sha256": _code_hash(code),
            "added_at": now(),
        }
    )
    units = list(db.query("SELECT unit_id, kind, class, code FROM units WHERE study_id = ?", [study_id]))
    order = rater_order(units, rater.id, seed, mode)
    db["assignments"].insert_all(
        {
            "study_id": study_id,
            "rater_id": rater.id,
            "position": pos + 1,
            "unit_id": uid,
            "task_id": opaque_id(info_secret, "task", rater.id, uid),
            "first_served_at": None,
            "done_at": None,
        }
        for pos, uid in enumerate(order)
    )
    prompt_rank.assign_rater(db, info_secret, study_id, seed, rater.id)  # nothing when the study has no groups
    return code


def create_study(store: Store, config: StudyConfig) -> CreationReport:
    """Build a study from a validated config. Nothing is written unless everything is valid."""
    with store.creation_lock(config.id):
        return _create_locked(store, config)


def _create_locked(store: Store, config: StudyConfig) -> CreationReport:
    db = store.db
    if db.execute("SELECT 1 FROM studies WHERE study_id = ?", [config.id]).fetchone():
        raise StudyError(f"study {config.id!r} already exists; choose another id")

    # 1. Read every image of every source (errors name the file).
    scans: list[SourceScan] = [scan_source(s, config.prompts, config.seed) for s in config.sources]
    first_seen: dict[str, ScannedImage] = {}
    for scan in scans:
        for im in scan.images:
            other = first_seen.get(im.pixel_sha256)
            if other is not None:
                raise StudyError(
                    f"the same image is in source {other.source!r} ({other.rel}) and source {im.source!r} ({im.rel}); "
                    "an image can belong to one source only"
                )
            first_seen[im.pixel_sha256] = im
    rated = [im for sc in scans if sc.source.role == "rated" for im in sc.images]
    references = [im for sc in scans if sc.source.role == "reference" for im in sc.images]

    # 2. Blinding: the text shown with an image must not single out its source.
    kinds = {s.name: s.kind for s in config.rated_sources}
    texts: dict[str, set[str | None]] = {s.name: set() for s in config.rated_sources}
    for im in rated:
        texts[im.source].add(_shown_text(config, im.cls))
    problems = shown_text_leaks(texts, kinds, config.mode)
    if problems:
        raise StudyError(
            "blinding: raters could tell sources apart by the prompt shown: "
            + "; ".join(problems)
            + ". Give every source images of the same classes, map classes to shared text with `prompts:`, "
            "or set show_prompt: false"
        )

    # 3. Units and anonymous labels.
    units, dropped = _plan_units(config, rated)
    if not units:
        raise StudyError("the study has nothing to rate")
    # Set studies show "Model A"... to raters; item studies never show a label, and
    # their blinded reports call the sources "Source A"...
    prefix = "Model" if config.mode == "set" else "Source"
    labels = model_labels([s.name for s in config.rated_sources], config.seed, prefix)

    # 4. Images into a staging folder, then into place.
    final = store.study_dir(config.id)
    staging = final.with_name(f".{config.id}.staging-{secrets.token_hex(4)}")
    if final.exists():
        # A folder without a study row is what a crash during creation leaves.
        shutil.rmtree(final)
    try:
        (staging / "images").mkdir(parents=True)
        (staging / "originals").mkdir()
        for im in [*rated, *references]:
            with Image.open(im.path) as pil:
                png = served_png(pil, config.image_size)
            _write_durably(staging / "images" / f"{im.pixel_sha256}.png", png)
            _write_durably(staging / "originals" / f"{im.sha256}.{_EXT[im.format]}", im.path.read_bytes())
        for d in (staging / "images", staging / "originals"):
            _fsync_dir(d)
        staging.rename(final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    # 5. Rows, in one transaction.
    codes: dict[str, str] = {}
    try:
        with store.write():
            secret = secrets.token_hex(32)
            db["studies"].insert(
                {
                    "study_id": config.id,
                    "title": config.title,
                    "owner": config.owner,
                    "template": config.template,
                    "mode": config.mode,
                    "seed": config.seed,
                    "secret": secret,
                    "image_size": config.image_size,
                    "instructions": config.instructions,
                    "turing_test": int(config.turing_test),
                    "ranking": int(config.ranking),
                    "show_prompt": int(config.show_prompt),
                    "set_size": config.set_size,
                    "judgement_required": int(config.judgement_required),
                    "status": "open",
                    "config_json": json.dumps(config.to_dict(), sort_keys=True),
                    "created_at": now(),
                }
            )
            db["aspects"].insert_all(
                {
                    "study_id": config.id,
                    "key": a.key,
                    "position": i,
                    "label": a.label,
                    "type": a.type,
                    "scope": a.scope,
                    "minimum": 0,
                    "maximum": 10,
                    "description": a.description,
                    "anchors_json": json.dumps({str(k): v for k, v in a.anchors}),
                    "required": int(a.required),
                }
                for i, a in enumerate(config.aspects)
            )
            db["artefacts"].insert_all(
                {"study_id": config.id, "key": a.key, "position": i, "label": a.label, "description": a.description}
                for i, a in enumerate(config.artefacts)
            )
            db["sources"].insert_all(
                {
                    "study_id": config.id,
                    "name": s.name,
                    "kind": s.kind,
                    "role": s.role,
                    "label": labels.get(s.name),
                    "path": str(s.path),
                    "description": s.description,
                    "position": i,
                }
                for i, s in enumerate(config.sources)
            )
            item_ids: dict[str, int] = {}
            for im in [*rated, *references]:
                item_ids[im.pixel_sha256] = (
                    db["items"]
                    .insert(
                        {
                            "study_id": config.id,
                            "source": im.source,
                            "sha256": im.sha256,
                            "pixel_sha256": im.pixel_sha256,
                            "class": im.cls,
                            "prompt_shown": _shown_text(config, im.cls),
                            "recipe_json": im.recipe.to_json() if im.recipe else None,
                            "original_path": str(im.path),
                            "width": im.width,
                            "height": im.height,
                            "image_file": f"images/{im.pixel_sha256}.png",
                            "original_file": f"originals/{im.sha256}.{_EXT[im.format]}",
                        }
                    )
                    .last_pk
                )
            for u in units:
                u["unit_id"] = (
                    db["units"]
                    .insert(
                        {
                            "study_id": config.id,
                            "kind": u["kind"],
                            "source": u["source"],
                            "class": u["class"],
                            "code": u["code"],
                        }
                    )
                    .last_pk
                )
                db["unit_items"].insert_all(
                    {"unit_id": u["unit_id"], "item_id": item_ids[im.pixel_sha256], "position": k}
                    for k, im in enumerate(u["images"])
                )
            rank_groups, rank_notes = 0, []
            if config.prompt_ranking is not None:
                rank_groups, rank_notes = _prompt_rank_groups(db, config, rated, item_ids)
            for r in config.raters:
                codes[r.id] = _insert_rater(store, secret, config.id, config.seed, config.mode, r)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise

    return CreationReport(
        study_id=config.id,
        folder=final,
        rated_items={s.source.name: len(s.images) for s in scans if s.source.role == "rated"},
        reference_items={s.source.name: len(s.images) for s in scans if s.source.role == "reference"},
        units=len(units),
        raters=codes,
        ignored={s.source.name: s.ignored for s in scans if s.ignored},
        duplicates={s.source.name: s.duplicates for s in scans if s.duplicates},
        unsampled={s.source.name: s.unsampled for s in scans if s.unsampled},
        dropped={k: v for k, v in dropped.items() if v},
        native_sizes={
            s.source.name: sorted({f"{im.width}x{im.height}" for im in s.images})
            for s in scans
            if s.source.role == "rated"
        },
        prompt_rank_groups=rank_groups,
        prompt_rank_notes=rank_notes,
    )


def _prompt_rank_groups(
    db, config: StudyConfig, rated: list[ScannedImage], item_ids: dict[str, int]
) -> tuple[int, list[str]]:
    items = [
        {
            "item_id": item_ids[im.pixel_sha256],
            "source": im.source,
            "class": im.cls,
            "prompt_shown": _shown_text(config, im.cls),
            "pixel_sha256": im.pixel_sha256,
        }
        for im in rated
    ]
    sources = [s.name for s in config.rated_sources]
    groups, notes = prompt_rank.plan_groups(items, sources, config.seed, config.prompt_ranking or None)
    if not groups:
        raise StudyError(
            "prompt_ranking: no prompt (class) has an image from every rated source ("
            + "; ".join(notes)
            + "); give every source images of the same classes"
        )
    prompt_rank.insert_groups(db, config.id, groups)
    return len(groups), notes


def add_rater(store: Store, study_id: str, rater_id: str, name: str | None = None) -> str:
    """Add a rater (their own seeded order of every task); return their sign-in code."""
    (rater,) = parse_raters([{"id": rater_id, "name": name or rater_id}])
    info = load_study(store, study_id)
    with store.write():
        if store.db.execute(
            "SELECT 1 FROM raters WHERE study_id = ? AND rater_id = ?", [study_id, rater.id]
        ).fetchone():
            raise StudyError(f"rater {rater.id!r} is already in study {study_id!r}")
        return _insert_rater(store, info.secret, study_id, info.seed, info.mode, rater)


def reset_rater_code(store: Store, study_id: str, rater_id: str) -> str:
    """A new sign-in code for a rater who lost theirs (the old one stops working)."""
    code = secrets.token_urlsafe(12)
    with store.write():
        cur = store.db.execute(
            "UPDATE raters SET code_sha256 = ? WHERE study_id = ? AND rater_id = ?",
            [_code_hash(code), study_id, rater_id],
        )
        if cur.rowcount != 1:
            raise StudyError(f"rater {rater_id!r} is not in study {study_id!r}")
    return code


def verify_rater_code(store: Store, study_id: str, rater_id: str, code: str) -> bool:
    """True when ``code`` is this rater's sign-in code for this study (constant-time compare)."""
    row = store.db.execute(
        "SELECT code_sha256 FROM raters WHERE study_id = ? AND rater_id = ?", [study_id, rater_id]
    ).fetchone()
    expected = row[0] if row else _code_hash(secrets.token_hex(16))
    return bool(row) and hmac.compare_digest(expected, _code_hash(str(code)))


def set_status(store: Store, study_id: str, owner: str, status: str) -> None:
    """Close a study (no more submits) or reopen it. Owner only."""
    if status not in ("open", "closed"):
        raise StudyError(f"status must be 'open' or 'closed' but is {status!r}")
    require_owner(load_study(store, study_id), owner)
    with store.write():
        store.db.execute("UPDATE studies SET status = ? WHERE study_id = ?", [status, study_id])


def study_status(store: Store, study_id: str) -> dict[str, Any]:
    """Progress of every rater; nothing here unblinds."""
    info = load_study(store, study_id)
    db = store.db
    raters = []
    for r in db.query(
        """SELECT r.rater_id, r.name,
                  COUNT(a.unit_id) AS total,
                  SUM(a.done_at IS NOT NULL) AS done,
                  MAX(a.done_at) AS last_activity
           FROM raters r LEFT JOIN assignments a ON a.study_id = r.study_id AND a.rater_id = r.rater_id
           WHERE r.study_id = ? GROUP BY r.rater_id ORDER BY r.added_at, r.rater_id""",
        [study_id],
    ):
        raters.append({**r, "done": int(r["done"] or 0)})
    # Per-prompt rank tasks (prompt_ranking), counted apart: they are not units.
    ranked = {
        rid: (int(done or 0), int(total))
        for rid, total, done in db.execute(
            "SELECT rater_id, COUNT(*), SUM(done_at IS NOT NULL) FROM prompt_rank_assignments "
            "WHERE study_id = ? GROUP BY rater_id",
            [study_id],
        )
    }
    for r in raters:
        r["rank_done"], r["rank_total"] = ranked.get(r["rater_id"], (0, 0))
    n_units = db.execute("SELECT COUNT(*) FROM units WHERE study_id = ?", [study_id]).fetchone()[0]
    n_ratings = db.execute("SELECT COUNT(*) FROM ratings WHERE study_id = ? AND current = 1", [study_id]).fetchone()[0]
    n_subs = db.execute("SELECT COUNT(*) FROM submissions WHERE study_id = ?", [study_id]).fetchone()[0]
    return {
        "study_id": info.study_id,
        "title": info.title,
        "owner": info.owner,
        "mode": info.mode,
        "status": info.status,
        "created_at": info.created_at,
        "tasks_per_rater": n_units,
        "aspects": [a.key for a in info.aspects],
        "artefacts": [a.key for a in info.artefacts],
        "raters": raters,
        "ratings": n_ratings,
        "submissions": n_subs,
    }


def unblind(store: Store, study_id: str, owner: str) -> list[dict[str, Any]]:
    """Owner only: every rater's tasks with the source, class and image hashes behind each opaque id."""
    info = require_owner_info(store, study_id, owner)
    rows = store.db.query(
        """SELECT a.rater_id, a.position, a.task_id, a.done_at, u.code AS unit, u.kind, u.source, u.class,
                  s.kind AS source_kind, s.label,
                  GROUP_CONCAT(i.sha256, ' ') AS sha256s
           FROM assignments a JOIN units u ON u.unit_id = a.unit_id
           LEFT JOIN sources s ON s.study_id = u.study_id AND s.name = u.source
           LEFT JOIN unit_items ui ON ui.unit_id = u.unit_id
           LEFT JOIN items i ON i.item_id = ui.item_id
           WHERE a.study_id = ? GROUP BY a.rater_id, a.position ORDER BY a.rater_id, a.position""",
        [info.study_id],
    )
    return [dict(r) for r in rows]


def require_owner_info(store: Store, study_id: str, owner: str | None) -> StudyInfo:
    info = load_study(store, study_id)
    require_owner(info, owner)
    return info
