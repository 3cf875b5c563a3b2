"""Blinded expert scoring studies.

- ``store``: the SQLite database (sqlite-utils) under ``annotations/``, migrations, connections.
- ``config`` / ``templates``: study configs (YAML), default aspects and artefacts, built-in templates.
- ``ingest``: reading real and generated image folders.
- ``blinding``: opaque ids, clean PNGs, anonymous model labels.
- ``study``: owner operations (create, add raters, status, unblind).
- ``session``: the rater-facing API (next task, submit, progress).
- ``analysis`` / ``stats``: summaries, agreement, Turing test, correlation with metrics.
- ``export`` / ``report``: CSV, JSON and a self-contained HTML report (blinded or not).
- ``invitations``: each rater's id, one-time code and rater-page link, as CSV or text to mail.

A typical use::

    from histolab.review import Store, load_config, create_study, next_task, submit, Answers

    store = Store()                      # annotations/ from HISTOLAB_ANNOTATIONS / HISTOLAB_DATA_DIR
    create_study(store, load_config("study.yaml"))
    task = next_task(store, "my-study", "rater1")
    submit(store, "my-study", "rater1", task.task_id, Answers(scores={...}, ...), submission_id=str(uuid.uuid4()))
"""

from histolab.review.config import StudyConfig, load_config, parse_config
from histolab.review.session import (
    Ack,
    Answers,
    Progress,
    Task,
    get_task,
    next_task,
    progress,
    rater_studies,
    submit,
    task_at,
)
from histolab.review.store import Store
from histolab.review.study import (
    add_rater,
    create_study,
    list_studies,
    load_study,
    reset_rater_code,
    set_status,
    study_status,
    unblind,
    verify_rater_code,
)

__all__ = [
    "Ack",
    "Answers",
    "Progress",
    "Store",
    "StudyConfig",
    "Task",
    "add_rater",
    "create_study",
    "get_task",
    "list_studies",
    "load_config",
    "load_study",
    "next_task",
    "parse_config",
    "progress",
    "rater_studies",
    "reset_rater_code",
    "set_status",
    "study_status",
    "submit",
    "task_at",
    "unblind",
    "verify_rater_code",
]
