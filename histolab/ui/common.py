"""Small pieces every tab uses: errors to ``gr.Error``, number parsing, the session dict."""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from histolab.errors import HistolabError, InvalidRequest

log = logging.getLogger("histolab.ui")

ACCELERATOR = "accelerator"  # the concurrency group of every event that runs a network on the device


@dataclass
class OnLoad:
    """What a tab runs when a page loads (or the admin signs in or out): read lists from disk, show or hide."""

    fn: Callable[..., Any]
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


def new_session() -> dict[str, Any]:
    """A browser session's server-side state (the value of its ``gr.State``)."""
    return {"admin": None, "rater": None, "review": None, "last": None, "cancel": None}


def ui_errors(fn):
    """Library errors become ``gr.Error`` with their message; a bug is logged with its traceback and reported
    as an internal error (the app keeps running, and nothing is swallowed silently)."""
    import gradio as gr

    def translate(exc: Exception) -> Exception:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, HistolabError):
            return gr.Error(str(exc), print_exception=False)
        log.exception("internal error in %s", fn.__name__)
        return gr.Error(f"internal error ({type(exc).__name__}); the server log has the details")

    if inspect.isgeneratorfunction(fn):
        # A streaming handler (live previews): Gradio must still see a generator function, and its errors
        # arise while it is iterated, not when it is called.
        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                err = translate(exc)
                if err is exc:
                    raise
                raise err from exc

        return streaming

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            err = translate(exc)
            if err is exc:
                raise
            raise err from exc

    return wrapper


def to_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """Gradio numbers may arrive as floats, strings or None; a non-integer is the user's error, said so."""
    if value is None or value == "":
        raise InvalidRequest(f"`{name}` is empty")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"`{name}` must be a whole number but is {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise InvalidRequest(f"`{name}` must be a whole number but is {value!r}")
    v = int(f)
    if lo is not None and v < lo:
        raise InvalidRequest(f"`{name}` must be at least {lo} but is {v}")
    if hi is not None and v > hi:
        raise InvalidRequest(f"`{name}` must be at most {hi} here but is {v}")
    return v


def to_float(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"`{name}` must be a number but is {value!r}") from None
    if not math.isfinite(f):
        raise InvalidRequest(f"`{name}` must be a finite number but is {value!r}")
    if lo is not None and f < lo:
        raise InvalidRequest(f"`{name}` must be at least {lo:g} but is {f:g}")
    if hi is not None and f > hi:
        raise InvalidRequest(f"`{name}` must be at most {hi:g} but is {f:g}")
    return f


def client_key(request) -> str:
    """The client's address, for counting failed sign-ins (never for identity)."""
    try:
        return str(request.client.host)
    except AttributeError:
        return ""


def session_of(state: Any) -> dict[str, Any]:
    return state if isinstance(state, dict) else new_session()
