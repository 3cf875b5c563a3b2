"""Typed errors. The library raises these; the UI turns them into ``gr.Error``
and the CLI into a one-line message with a non-zero exit."""

from __future__ import annotations


class HistolabError(Exception):
    """Base of every error that histolab raises on purpose."""


class InvalidRequest(HistolabError, ValueError):
    """A request or argument is out of range; the message names the value."""


class DataError(HistolabError):
    """A dataset cannot be read or has no usable images."""


class ModelNotFound(HistolabError):
    """A base model, adapter or encoder is not where it was looked for."""


class OfflineError(ModelNotFound):
    """A hub id was asked for but the hub cannot be reached."""


class UnsafeFile(HistolabError):
    """A file is not in a format we load, or its content is not trustworthy."""


class AdapterError(HistolabError):
    """An adapter does not fit the base model, or cannot be applied."""


class AdapterWarning(UserWarning):
    """An adapter was applied, but part of its file was not (e.g. layers naming modules the base lacks)."""


class Cancelled(HistolabError):
    """Work was cancelled by the user."""


def is_cancelled(cancel) -> bool:
    """Whether a cancel signal is set: None (never), a ``threading.Event``, or a callable.

    One definition for the generation engine, batch runs and the training loop, beside the
    exception they raise when it is."""
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return bool(cancel.is_set())
    return bool(cancel())


class TrainingError(HistolabError):
    """Training stopped (out of memory, disk full, a NaN loss, ...); the message says where the last good checkpoint is."""


class StudyError(HistolabError):
    """A review-study operation was refused (bad rating, unknown item, ...)."""
