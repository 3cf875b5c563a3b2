"""Study configs (YAML): parsing and validation, before anything is created.

A config names the study, its template, sources, raters and any edits to the
template's aspects and artefacts; see ``examples/study.yaml`` for a worked
example with every field. Unknown keys are refused (a typo must not silently
drop a setting); paths are relative to the config file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from histolab.errors import StudyError
from histolab.review.templates import (
    ARTEFACTS_BY_KEY,
    ASPECT_SCOPES,
    ASPECT_TYPES,
    ASPECTS_BY_KEY,
    SCALE_MAX,
    SCALE_MIN,
    TEMPLATES,
    ArtefactDef,
    AspectDef,
)

SLUG = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
SOURCE_KINDS = ("real", "generated")
SOURCE_ROLES = ("rated", "reference")
# How a source's images get their class:
#   auto:       class subfolders if the folder has any, else "prompt" (generated) or "none" (real)
#   subfolders: each immediate subfolder of the source is a class
#   prompt:     (generated) the class whose `prompts` text equals the recipe prompt, else the prompt itself
#   none:       no class
CLASS_MODES = ("auto", "subfolders", "prompt", "none")
MAX_SET_SIZE = 64


@dataclass(frozen=True)
class SourceConfig:
    name: str
    kind: str  # "real" or "generated" (generated images carry recipes)
    path: Path
    role: str = "rated"  # "reference": shown as known-real examples, never rated
    classes: str = "auto"
    class_name: str | None = None  # one fixed class for every image of the source
    limit: int | None = None  # at most this many images per class, a seeded sample
    images: tuple[str, ...] | None = None  # an explicit list (relative to path) instead of scanning
    description: str = ""


@dataclass(frozen=True)
class RaterDef:
    id: str
    name: str


@dataclass(frozen=True)
class StudyConfig:
    id: str
    title: str
    owner: str
    template: str
    mode: str
    seed: int
    image_size: int
    instructions: str
    turing_test: bool
    ranking: bool
    show_prompt: bool
    set_size: int | None
    aspects: tuple[AspectDef, ...]
    artefacts: tuple[ArtefactDef, ...]
    sources: tuple[SourceConfig, ...]
    raters: tuple[RaterDef, ...] = ()
    prompts: dict[str, str] = field(default_factory=dict)  # class -> the text raters see
    # Turing-test studies: must every task say real or synthetic (with how sure)? When false the rater may
    # leave both unset; a judgement given still needs its confidence.
    judgement_required: bool = True
    # The Prompt-to-Polyp protocol (histolab.review.prompt_rank): per prompt, one image of every rated source,
    # the real one among them, ranked 1..N. None: off; 0: as many groups per prompt as the sources allow.
    prompt_ranking: int | None = None

    @property
    def required_answers(self) -> tuple[str, ...]:
        """The answers a task cannot be submitted without: aspect keys, then "judgement" (Turing test)."""
        keys = tuple(a.key for a in self.aspects if a.required)
        return keys + (("judgement",) if self.turing_test and self.judgement_required else ())

    @property
    def rated_sources(self) -> tuple[SourceConfig, ...]:
        return tuple(s for s in self.sources if s.role == "rated")

    def to_dict(self) -> dict[str, Any]:
        """The validated config as plain data (stored with the study, for the record)."""
        return {
            "id": self.id,
            "title": self.title,
            "owner": self.owner,
            "template": self.template,
            "mode": self.mode,
            "seed": self.seed,
            "image_size": self.image_size,
            "instructions": self.instructions,
            "turing_test": self.turing_test,
            "ranking": self.ranking,
            "show_prompt": self.show_prompt,
            "set_size": self.set_size,
            "judgement_required": self.judgement_required,
            "prompts": dict(self.prompts),
            "prompt_ranking": self.prompt_ranking,
            "aspects": [
                {
                    "key": a.key,
                    "label": a.label,
                    "description": a.description,
                    "type": a.type,
                    "scope": a.scope,
                    "anchors": {str(k): v for k, v in a.anchors},
                    "required": a.required,
                }
                for a in self.aspects
            ],
            "artefacts": [{"key": a.key, "label": a.label, "description": a.description} for a in self.artefacts],
            "sources": [
                {
                    "name": s.name,
                    "kind": s.kind,
                    "path": str(s.path),
                    "role": s.role,
                    "classes": s.classes,
                    "class": s.class_name,
                    "limit": s.limit,
                    "images": list(s.images) if s.images is not None else None,
                    "description": s.description,
                }
                for s in self.sources
            ],
            "raters": [{"id": r.id, "name": r.name} for r in self.raters],
        }


# Defaults beside each top-level key, with the reason.
_TOP_KEYS = {
    "id",  # required: a slug that names the study in the store and on the command line
    "title",  # default: the id
    "owner",  # required: who may unblind
    "template",  # default "default" (item mode with a Turing test)
    "mode",
    "seed",  # default 0: a study is reproducible unless told otherwise
    "image_size",  # default 512: SD 1.5's native size; every image is served at this square size
    "instructions",
    "turing_test",
    "ranking",
    "show_prompt",  # default true: prompt faithfulness cannot be judged without the prompt
    "set_size",
    "aspects",
    "artefacts",
    "sources",
    "raters",
    "prompts",
    "required",  # default: every aspect and the judgement; a list names the answers a task needs
    "prompt_ranking",  # default off: true, or {per_prompt: N}, adds the per-prompt ranking with the real image
}
_SOURCE_KEYS = {"name", "kind", "path", "role", "classes", "class", "limit", "images", "description"}
_ASPECT_KEYS = {"key", "label", "description", "type", "scope", "anchors"}
_ARTEFACT_KEYS = {"key", "label", "description"}
_RATER_KEYS = {"id", "name"}
DEFAULT_IMAGE_SIZE = 512
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 32, 2048


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate a study config file."""
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study config {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise StudyError(f"study config {path} is not valid YAML: {exc}") from exc
    return parse_config(data, base_dir=path.parent)


def _unknown(where: str, d: dict, allowed: set[str]) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise StudyError(f"{where}: unknown key(s) {extra}; allowed: {sorted(allowed)}")


def _slug(where: str, value: Any) -> str:
    if not isinstance(value, str) or not SLUG.match(value):
        raise StudyError(
            f"{where} must be a short lowercase name (letters, digits, '_', '-', '.'; up to 64) but is {value!r}"
        )
    return value


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise StudyError(f"{where} must be true or false but is {value!r}")
    return value


def _int(where: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise StudyError(f"{where} must be an integer from {lo} to {hi} but is {value!r}")
    return value


def _text(where: str, value: Any, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise StudyError(f"{where} must be {'non-empty ' if required else ''}text but is {value!r}")
    return value


def _aspect(i: int, entry: Any, mode: str) -> AspectDef:
    where = f"aspects[{i}]"
    if isinstance(entry, str):
        entry = {"key": entry}
    if not isinstance(entry, dict):
        raise StudyError(f"{where} must be an aspect key or a mapping, got {entry!r}")
    _unknown(where, entry, _ASPECT_KEYS)
    key = _slug(f"{where}.key", entry.get("key"))
    base = ASPECTS_BY_KEY.get(key)
    if base is None and "label" not in entry:
        raise StudyError(f"{where}: {key!r} is not a default aspect ({sorted(ASPECTS_BY_KEY)}); give it a label")
    a = base or AspectDef(key=key, label="", description="")
    a = replace(
        a,
        label=_text(f"{where}.label", entry.get("label", a.label), required=True),
        description=_text(f"{where}.description", entry.get("description", a.description)),
        type=entry.get("type", a.type),
        scope=entry.get("scope", a.scope),
    )
    if a.type not in ASPECT_TYPES:
        raise StudyError(f"{where} ({key}): unknown aspect type {a.type!r}; use one of {list(ASPECT_TYPES)}")
    if a.scope not in ASPECT_SCOPES:
        raise StudyError(f"{where} ({key}): unknown scope {a.scope!r}; use one of {list(ASPECT_SCOPES)}")
    if a.scope == "set" and mode == "item":
        raise StudyError(
            f"{where} ({key}) is scored on a set of images, but this study shows one image at a time "
            "(mode: item); remove it or use mode: set"
        )
    if "anchors" in entry:
        anchors = entry["anchors"]
        if not isinstance(anchors, dict):
            raise StudyError(f"{where}.anchors must map scale points to text, e.g. {{0: poor, 10: excellent}}")
        pairs = []
        for k, v in anchors.items():
            try:
                point = int(k)
            except (TypeError, ValueError):
                point = None
            if point is None or str(point) != str(k).strip() or not SCALE_MIN <= point <= SCALE_MAX:
                raise StudyError(f"{where}.anchors: {k!r} is not a point of the {SCALE_MIN}-{SCALE_MAX} scale")
            pairs.append((point, _text(f"{where}.anchors[{k}]", v, required=True)))
        a = replace(a, anchors=tuple(sorted(pairs)))
    return a


def _artefact(i: int, entry: Any) -> ArtefactDef:
    where = f"artefacts[{i}]"
    if isinstance(entry, str):
        entry = {"key": entry}
    if not isinstance(entry, dict):
        raise StudyError(f"{where} must be an artefact key or a mapping, got {entry!r}")
    _unknown(where, entry, _ARTEFACT_KEYS)
    key = _slug(f"{where}.key", entry.get("key"))
    base = ARTEFACTS_BY_KEY.get(key)
    if base is None and "label" not in entry:
        raise StudyError(f"{where}: {key!r} is not a default artefact ({sorted(ARTEFACTS_BY_KEY)}); give it a label")
    a = base or ArtefactDef(key=key, label="", description="")
    return ArtefactDef(
        key=key,
        label=_text(f"{where}.label", entry.get("label", a.label), required=True),
        description=_text(f"{where}.description", entry.get("description", a.description)),
    )


def _source(i: int, entry: Any, base_dir: Path) -> SourceConfig:
    where = f"sources[{i}]"
    if not isinstance(entry, dict):
        raise StudyError(f"{where} must be a mapping with name, kind and path")
    _unknown(where, entry, _SOURCE_KEYS)
    name = _slug(f"{where}.name", entry.get("name"))
    where = f"source {name!r}"
    kind = entry.get("kind")
    if kind not in SOURCE_KINDS:
        raise StudyError(f"{where}: kind must be one of {list(SOURCE_KINDS)} but is {kind!r}")
    role = entry.get("role", "rated")
    if role not in SOURCE_ROLES:
        raise StudyError(f"{where}: role must be one of {list(SOURCE_ROLES)} but is {role!r}")
    if role == "reference" and kind != "real":
        raise StudyError(f"{where}: reference images are shown as real, so a reference source must be kind: real")
    raw_path = entry.get("path")
    if not isinstance(raw_path, str) or not raw_path:
        raise StudyError(f"{where}: path must be a folder of images but is {raw_path!r}")
    path = Path(raw_path).expanduser()
    path = path if path.is_absolute() else (base_dir / path)
    if not path.is_dir():
        raise StudyError(f"{where}: folder {path} does not exist")
    classes = entry.get("classes", "auto")
    if classes not in CLASS_MODES:
        raise StudyError(f"{where}: classes must be one of {list(CLASS_MODES)} but is {classes!r}")
    if classes == "prompt" and kind != "generated":
        raise StudyError(f"{where}: classes: prompt needs generated images (they carry prompts)")
    class_name = entry.get("class")
    if class_name is not None:
        class_name = _text(f"{where}.class", class_name, required=True)
        if "classes" in entry:
            raise StudyError(f"{where}: give either class (one class for all) or classes, not both")
        classes = "none"
    limit = entry.get("limit")
    if limit is not None:
        limit = _int(f"{where}.limit", limit, 1, 1_000_000)
    images = entry.get("images")
    if images is not None:
        if not isinstance(images, list) or not all(isinstance(x, str) and x for x in images) or not images:
            raise StudyError(f"{where}.images must be a non-empty list of file names")
        for rel in images:
            p = path / rel
            if Path(rel).is_absolute() or ".." in Path(rel).parts:
                raise StudyError(f"{where}: image {rel!r} must be a path inside {path}")
            if not p.is_file():
                raise StudyError(f"{where}: image {p} does not exist")
        images = tuple(images)
    return SourceConfig(
        name=name,
        kind=kind,
        path=path.resolve(),
        role=role,
        classes=classes,
        class_name=class_name,
        limit=limit,
        images=images,
        description=_text(f"{where}.description", entry.get("description")),
    )


def _required(value: Any, aspects: tuple[AspectDef, ...], turing: bool) -> tuple[tuple[AspectDef, ...], bool]:
    """The top-level ``required`` list (aspect keys and "judgement"): exactly these answers are required.

    Absent: every aspect and the judgement are. Which answers a rater must give is part of the protocol, so
    it is fixed here, stored with the study and checked by the store (an optional answer left unset is
    stored as nothing, never as a value).
    """
    if value is None:
        return aspects, True
    keys = [a.key for a in aspects]
    allowed = [*keys, *(["judgement"] if turing else [])]
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise StudyError(f"required must be a list of answer keys from {allowed}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise StudyError(f"required: unknown answer(s) {unknown}; this study's answers are {allowed}")
    picked = set(value)
    return tuple(replace(a, required=a.key in picked) for a in aspects), "judgement" in picked


def parse_raters(entries: Any) -> tuple[RaterDef, ...]:
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise StudyError("raters must be a list of rater ids or {id, name} mappings")
    out = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            e = {"id": e}
        if not isinstance(e, dict):
            raise StudyError(f"raters[{i}] must be a rater id or a mapping, got {e!r}")
        _unknown(f"raters[{i}]", e, _RATER_KEYS)
        rid = _slug(f"raters[{i}].id", e.get("id"))
        out.append(RaterDef(id=rid, name=_text(f"raters[{i}].name", e.get("name", rid), required=True)))
    ids = [r.id for r in out]
    dup = sorted({x for x in ids if ids.count(x) > 1})
    if dup:
        raise StudyError(f"raters: duplicate id(s) {dup}")
    return tuple(out)


def parse_config(data: Any, base_dir: str | Path = ".") -> StudyConfig:
    """Validate a config mapping (as read from YAML) into a ``StudyConfig``."""
    base_dir = Path(base_dir)
    if not isinstance(data, dict):
        raise StudyError("a study config must be a mapping (YAML keys: id, owner, sources, ...)")
    _unknown("study config", data, _TOP_KEYS)
    sid = _slug("id", data.get("id"))
    template_name = data.get("template", "default")
    if template_name not in TEMPLATES:
        raise StudyError(f"unknown template {template_name!r}; use one of {sorted(TEMPLATES)}")
    t = TEMPLATES[template_name]
    mode = data.get("mode", t.mode)
    if mode not in ("item", "set"):
        raise StudyError(f"mode must be 'item' or 'set' but is {mode!r}")
    turing = _bool("turing_test", data.get("turing_test", t.turing_test))
    ranking = _bool("ranking", data.get("ranking", t.ranking if mode == "set" else False))
    if ranking and mode != "set":
        raise StudyError("ranking: true needs mode: set (models are anonymised as Model A, B, ... only in sets)")
    set_size = data.get("set_size", t.set_size if mode == "set" else None)
    if mode == "set":
        set_size = _int("set_size", set_size if set_size is not None else 10, 1, MAX_SET_SIZE)
    elif set_size is not None:
        raise StudyError("set_size applies to mode: set only")

    if "aspects" in data:
        if not isinstance(data["aspects"], list) or not data["aspects"]:
            raise StudyError("aspects must be a non-empty list")
        aspects = tuple(_aspect(i, e, mode) for i, e in enumerate(data["aspects"]))
    else:
        from histolab.review.templates import DEFAULT_ASPECTS

        # A template's aspects, adapted to the mode chosen: an item study drops set-level aspects.
        aspects = (
            t.aspects if mode == t.mode else tuple(a for a in DEFAULT_ASPECTS if mode == "set" or a.scope == "item")
        )
    keys = [a.key for a in aspects]
    if len(set(keys)) != len(keys):
        raise StudyError(f"aspects: duplicate key(s) {sorted({k for k in keys if keys.count(k) > 1})}")

    if "artefacts" in data:
        if not isinstance(data["artefacts"], list):
            raise StudyError("artefacts must be a list (may be empty)")
        artefacts = tuple(_artefact(i, e) for i, e in enumerate(data["artefacts"]))
    else:
        artefacts = t.artefacts
    keys = [a.key for a in artefacts]
    if len(set(keys)) != len(keys):
        raise StudyError(f"artefacts: duplicate key(s) {sorted({k for k in keys if keys.count(k) > 1})}")

    if not isinstance(data.get("sources"), list) or not data["sources"]:
        raise StudyError("sources must be a non-empty list of image folders")
    sources = tuple(_source(i, e, base_dir) for i, e in enumerate(data["sources"]))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise StudyError(f"sources: duplicate name(s) {sorted({n for n in names if names.count(n) > 1})}")
    rated = [s for s in sources if s.role == "rated"]
    if not rated:
        raise StudyError("sources: at least one source must be rated (role: rated)")
    if ranking and len(rated) < 2:
        raise StudyError("ranking needs at least two rated sources to rank")

    aspects, judgement_required = _required(data.get("required"), aspects, turing)
    prompt_ranking = _prompt_ranking(data.get("prompt_ranking", False), rated)

    prompts = data.get("prompts") or {}
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in prompts.items()):
        raise StudyError("prompts must map class names to the text raters see, e.g. {skin_he: 'H&E skin'}")

    return StudyConfig(
        id=sid,
        title=_text("title", data.get("title", sid), required=True),
        owner=_slug("owner", data.get("owner")),
        template=template_name,
        mode=mode,
        seed=_int("seed", data.get("seed", 0), 0, 2**62),
        image_size=_int("image_size", data.get("image_size", DEFAULT_IMAGE_SIZE), MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
        instructions=_text("instructions", data.get("instructions", t.instructions), required=True),
        turing_test=turing,
        ranking=ranking,
        show_prompt=_bool("show_prompt", data.get("show_prompt", True)),
        set_size=set_size,
        aspects=aspects,
        artefacts=artefacts,
        sources=sources,
        raters=parse_raters(data.get("raters")),
        prompts=dict(prompts),
        judgement_required=judgement_required,
        prompt_ranking=prompt_ranking,
    )


def _prompt_ranking(value: Any, rated: list[SourceConfig]) -> int | None:
    """``prompt_ranking``: false, true or {per_prompt: N} -> None, 0 or N (groups per prompt, 0: all)."""
    if value is False or value is None:
        return None
    if isinstance(value, dict):
        _unknown("prompt_ranking", value, {"per_prompt"})
        per = _int("prompt_ranking.per_prompt", value.get("per_prompt"), 1, 1_000_000)
    elif value is True:
        per = 0
    else:
        raise StudyError(f"prompt_ranking must be true, false or {{per_prompt: N}} but is {value!r}")
    real = [s.name for s in rated if s.kind == "real"]
    if len(real) != 1 or len(rated) < 2:
        raise StudyError(
            "prompt_ranking ranks the real image among the models' images for each prompt: it needs exactly one "
            f"rated real source and at least one rated generated source (rated real sources: {real or 'none'}, "
            f"rated sources: {len(rated)})"
        )
    return per
