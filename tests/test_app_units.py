"""The app's parts without a server: settings, sign-in checks, upload checks, background tasks, X/Y axes,
grids, the ZeroGPU decorator, launch options, the job monitor."""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import types

import pytest
from PIL import Image
from waiting import GENEROUS, finish_task, wait_until

from histolab.config import Paths
from histolab.errors import InvalidRequest
from histolab.ui.auth import LOCKOUT_S, MAX_FAILURES, AccessDenied, Auth, Identity, check_password, hash_password
from histolab.ui.settings import AppSettings

# ------------------------------------------------------------------ settings


def test_settings_from_env_parse_check_and_hash_the_password():
    s = AppSettings.from_env(
        {
            "HISTOLAB_BASE": "checkpoints/sd15",
            "HISTOLAB_MAX_BATCH": "2",
            "GRADIO_SERVER_PORT": "7999",
            "HISTOLAB_ADMIN_PASSWORD": "s3cret",
            "HISTOLAB_SESSION_HOURS": "1.5",
            "HISTOLAB_LOCAL_ADMIN": "no",
        }
    )
    assert (s.base, s.max_batch, s.server_port, s.session_hours, s.local_admin) == (
        "checkpoints/sd15",
        2,
        7999,
        1.5,
        False,
    )
    assert "s3cret" not in repr(s) and s.admin_password_hash.startswith("pbkdf2_sha256$")
    assert check_password("s3cret", s.admin_password_hash) and not check_password("s3cret ", s.admin_password_hash)
    for env, message in [
        ({"HISTOLAB_QUEUE_SIZE": "many"}, "HISTOLAB_QUEUE_SIZE must be an integer but is 'many'"),
        ({"HISTOLAB_LOCAL_ADMIN": "maybe"}, "HISTOLAB_LOCAL_ADMIN must be 1/true/yes or 0/false/no"),
        ({"HISTOLAB_MAX_STEPS": "0"}, "`max_steps` must be at least 1 but is 0"),
        ({"HISTOLAB_ADMIN_PASSWORD": "a", "HISTOLAB_ADMIN_PASSWORD_HASH": "b"}, "not both"),
    ]:
        with pytest.raises(InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
            AppSettings.from_env(env)
    with pytest.raises(AccessDenied, match="pbkdf2_sha256"):
        AppSettings.from_env({"HISTOLAB_ADMIN_PASSWORD_HASH": "md5$abc"})
    hashed = hash_password("pw", iterations=1000)
    assert AppSettings.from_env({"HISTOLAB_ADMIN_PASSWORD_HASH": hashed}).admin_password_hash == hashed


@pytest.mark.parametrize(
    ("kw", "admin"),
    [
        ({}, True),  # loopback, no password: the machine's user
        ({"server_name": "0.0.0.0"}, False),  # reachable from the network: never without a sign-in
        ({"server_name": "localhost"}, True),
        ({"server_name": "::1"}, True),
        ({"admin_password_hash": "x"}, False),  # a password is set: use it
        ({"on_space": True}, False),
        ({"on_space": True, "local_admin": True}, False),  # a Space is never local
        ({"server_name": "0.0.0.0", "local_admin": True}, True),  # said explicitly (e.g. behind a private proxy)
    ],
)
def test_admin_without_sign_in_only_where_only_this_machine_reaches_the_app(kw, admin):
    assert AppSettings(**kw).admin_without_sign_in is admin


# ------------------------------------------------------------------ sign-in


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_admin_sign_in_guard_and_expiry():
    clock = Clock()
    auth = Auth(AppSettings(admin_password_hash=hash_password("pw", iterations=1000), session_hours=1), None, clock)
    auth.guard._clock = clock
    ident = auth.admin_sign_in("admin", "pw", "1.2.3.4")
    assert (ident.role, ident.name, ident.local) == ("admin", "admin", False)
    assert auth.require_admin({"admin": ident}) == ident
    clock.t += 3601
    with pytest.raises(AccessDenied, match="sign in as admin"):
        auth.require_admin({"admin": ident})  # the sign-in expired
    for _ in range(MAX_FAILURES):
        with pytest.raises(AccessDenied, match="wrong admin name or password"):
            auth.admin_sign_in("admin", "guess", "5.6.7.8")
    with pytest.raises(AccessDenied, match="too many failed sign-ins"):
        auth.admin_sign_in("admin", "pw", "5.6.7.8")  # even the right password waits
    clock.t += LOCKOUT_S + 1
    assert auth.admin_sign_in("admin", "pw", "5.6.7.8").role == "admin"
    with pytest.raises(AccessDenied, match="sign-in is off"):
        Auth(AppSettings(server_name="0.0.0.0"), None).admin_sign_in("admin", "", "")


def test_raters_are_never_admins_and_local_admins_need_no_sign_in():
    rater = Identity("rater", "alice", "s1", since=1e12)
    auth = Auth(AppSettings(server_name="0.0.0.0"), None)
    with pytest.raises(AccessDenied):
        auth.require_admin({"admin": None, "rater": rater})
    assert auth.require_rater({"rater": rater}) == rater
    local = Auth(AppSettings(), None).require_admin({})
    assert local.local and local.role == "admin"


# ------------------------------------------------------------------ uploads


def _png(size=(64, 64), mode="RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def test_uploads_are_judged_by_content(tmp_path):
    from histolab.ui.uploads import image_upload, open_image, png_upload

    def put(name, data):
        p = tmp_path / name
        p.write_bytes(data)
        return p

    assert image_upload(put("a.png", _png()), max_bytes=10**6, max_side=256).size == (64, 64)
    assert image_upload(put("a.txt", _png(format="JPEG")), max_bytes=10**6, max_side=256).mode == "RGB"  # name ignored
    assert open_image(_png(mode="RGBA"), max_side=256).mode == "RGB"
    assert open_image(_png(mode="I;16"), max_side=256).mode == "RGB"
    gif = io.BytesIO()
    Image.new("RGB", (16, 16)).save(gif, format="GIF")
    tiff = io.BytesIO()
    Image.new("RGB", (16, 16)).save(tiff, format="TIFF", save_all=True, append_images=[Image.new("RGB", (16, 16))])
    for data, message in [
        (b"", "an empty file"),
        (b"GIF89a" + gif.getvalue()[6:], "not a PNG/JPEG/TIFF/BMP/WEBP image"),
        (_png()[:40], "damaged or not a readable image"),
        (_png((4, 64)), "4x64 pixels; sides must be from 8 to 256"),
        (_png((300, 10)), "300x10 pixels"),
        (tiff.getvalue(), "2 frames or pages"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 2000, "damaged"),
    ]:
        with pytest.raises(InvalidRequest, match=message.replace("(", r"\(")):
            image_upload(put("x.png", data), max_bytes=10**6, max_side=256)
    with pytest.raises(InvalidRequest, match="limit here is 0 MB"):
        image_upload(put("big.png", _png()), max_bytes=10, max_side=256)
    with pytest.raises(InvalidRequest, match="not a PNG image"):
        png_upload(put("j.png", _png(format="JPEG")), max_bytes=10**6, max_side=256)
    with pytest.raises(InvalidRequest, match="is empty: choose a file first"):
        image_upload(None, max_bytes=10, max_side=10)


# ------------------------------------------------------------------ tasks


def test_tasks_run_in_order_report_fail_and_are_listed_from_disk(tmp_path):
    from histolab.ui.tasks import TaskRunner

    runner = TaskRunner(tmp_path / "tasks")
    gate = threading.Event()

    def slow(params, ctx):
        ctx.progress(0.5, "half way")
        assert gate.wait(GENEROUS), "the test never opened the gate"
        ctx.check_cancel()
        (ctx.folder / "out.txt").write_text(params["text"])
        return {"files": ["out.txt"]}

    def broken(params, ctx):
        raise KeyError("a bug")

    def refused(params, ctx):
        raise InvalidRequest("a clear refusal")

    for kind, fn in (("slow", slow), ("broken", broken), ("refused", refused)):
        runner.register(kind, fn)
    a = runner.submit("slow", {"text": "hello"}, title="a", owner="admin")

    def half_way():
        info = runner.wait(a.id, 1.0)
        return info if info.message == "half way" else None

    info = wait_until(half_way, lambda: runner.get(a.id), poll=0)
    assert (info.state, info.fraction) == ("running", 0.5)
    b = runner.submit("slow", {"text": "never"}, title="b", owner="admin")
    assert runner.get(b.id).state == "queued"
    runner.cancel(b.id)
    c = runner.submit("broken", {}, title="c", owner="admin")
    d = runner.submit("refused", {}, title="d", owner="admin")
    gate.set()
    for t in (a, b, c, d):
        finish_task(runner, t.id)
    assert runner.get(a.id).state == "done" and (runner.folder(a.id) / "out.txt").read_text() == "hello"
    assert runner.get(b.id).state == "cancelled" and not (runner.folder(b.id) / "out.txt").exists()
    assert runner.get(c.id).state == "failed" and "KeyError" in (runner.folder(c.id) / "error.txt").read_text()
    assert (runner.get(d.id).state, runner.get(d.id).message) == ("failed", "a clear refusal")
    with pytest.raises(InvalidRequest, match="must be plain data"):
        runner.submit("slow", {"x": object()}, title="e", owner="admin")
    # A restart: another runner on the same folder lists them; one left "running" on disk is interrupted.
    path = runner.folder(a.id) / "task.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "state": "running"}))
    again = TaskRunner(tmp_path / "tasks")
    again.register("slow", slow)
    states = {t.id: t.state for t in again.list()}
    assert states == {a.id: "interrupted", b.id: "cancelled", c.id: "failed", d.id: "failed"}
    rerun = again.rerun(a.id, owner="admin", changes={"text": "again"})
    finish_task(again, rerun.id)
    assert again.get(rerun.id).state == "done"
    for bad in ("../x", "", "a/b", "x" * 60):
        with pytest.raises(InvalidRequest, match="not a task id"):
            again.get(bad)


# ------------------------------------------------------------------ compare, images


class _Svc:
    def adapters(self):
        return [types.SimpleNamespace(label="lora-a")]


@pytest.mark.parametrize(
    ("axis", "text", "values"),
    [
        ("guidance", "1, 2.5,4", [1.0, 2.5, 4.0]),
        ("guidance", "1:2:0.5", [1.0, 1.5, 2.0]),
        ("steps", "10, 20", [10, 20]),
        ("seed", "0:2:1", [0, 1, 2]),
        ("sampler", "ddim, euler_a", ["ddim", "euler_a"]),
        ("adapter", "(none), lora-a", ["(none)", "lora-a"]),
        ("prompt", "skin | colon glands", ["skin", "colon glands"]),
    ],
)
def test_axis_values(axis, text, values):
    from histolab.ui.compare import parse_axis

    assert parse_axis(axis, text, _Svc()) == values


@pytest.mark.parametrize(
    ("axis", "text", "message"),
    [
        ("guidance", "", "has no values"),
        ("steps", "2.5", "whole number"),
        ("guidance", "3:1:1", "STOP >= START"),
        ("guidance", "0:100:1", "101 values; at most 64"),
        ("sampler", "k_fancy", "unknown sampler(s) ['k_fancy']"),
        ("colour", "1", "unknown axis"),
        ("prompt", "a || b", "an empty prompt"),
    ],
)
def test_axis_errors(axis, text, message):
    from histolab.ui.compare import parse_axis

    with pytest.raises(InvalidRequest, match=re.escape(message)):
        parse_axis(axis, text, _Svc())


def test_grid_and_blinded_html():
    from histolab.ui.images import CELL_MIN, HEADER_H, LABEL_W, blinded_images_html, grid

    cells = [[Image.new("RGB", (32, 32), (255, 0, 0)), None], [Image.new("RGB", (32, 32), (0, 0, 255))] * 2]
    g = grid(cells, ["row 1", "row 2"], ["a", "b"], title="t")
    assert g.size == (LABEL_W + 2 * CELL_MIN, 2 * HEADER_H + 2 * CELL_MIN)
    assert g.getpixel((LABEL_W + 5, 2 * HEADER_H + 5)) == (255, 0, 0)
    assert g.getpixel((LABEL_W + CELL_MIN + CELL_MIN // 2, 2 * HEADER_H + CELL_MIN // 2)) == (255, 255, 255)  # empty
    html = blinded_images_html([_png(), _png()], caption='Image <"x">')
    assert html.count("data:image/png;base64,") == 2 and "Image &lt;&quot;x&quot;&gt; 2 of 2" in html
    assert "<x>" not in html


# ------------------------------------------------------------------ Spaces, launch options


def test_zero_gpu_decorator_only_on_a_zero_gpu_space(monkeypatch):
    from histolab.ui import spaces

    def handler(x, progress=None):
        return x + 1

    assert spaces.gpu(handler, env={}) is handler
    assert spaces.gpu(handler, env={"SPACES_ZERO_GPU": "1"}) is handler  # `spaces` is not installed here
    calls = []
    fake = types.ModuleType("spaces")

    def GPU(duration):
        def wrap(fn):
            def wrapped(*a, **k):
                calls.append(duration)
                return fn(*a, **k)

            return wrapped

        return wrap

    fake.GPU = GPU
    fake.__spec__ = types.SimpleNamespace(name="spaces")
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object() if name == "spaces" else None)
    wrapped = spaces.gpu(handler, env={"SPACES_ZERO_GPU": "1"})
    assert wrapped is not handler and wrapped(1) == 2 and calls == [spaces.GPU_SECONDS]
    import inspect

    assert list(inspect.signature(wrapped).parameters) == ["x", "progress"]  # Gradio still sees the parameters


def test_launch_options_are_locked_down(tmp_path):
    from histolab.config import EMBEDDED_BASE_DIR
    from histolab.ui import launch_options

    paths = Paths.from_env({"HISTOLAB_DATA_DIR": str(tmp_path)})
    opts = launch_options(AppSettings(max_upload_mb=7), paths)
    assert opts["allowed_paths"] == [] and opts["enable_monitoring"] is False and opts["ssr_mode"] is False
    assert opts["run_history"] is False and opts["mcp_server"] is False and opts["max_file_size"] == "7mb"
    for folder in (paths.checkpoints, paths.annotations, paths.jobs, paths.outputs, EMBEDDED_BASE_DIR.parent):
        assert str(folder.resolve()) in opts["blocked_paths"]
    assert opts["server_name"] == "127.0.0.1"


def test_job_monitor_records_each_step_once(tmp_path):
    from histolab.ui.train import LOSS_FILE, JobMonitor

    status = types.SimpleNamespace(state="running", progress={"step": 3, "loss": 0.5, "epoch": 1})
    job = types.SimpleNamespace(id="j1", dir=tmp_path, status=lambda: status)
    monitor = JobMonitor(lambda: types.SimpleNamespace(list=lambda: [job]))
    monitor.sample()
    monitor.sample()  # the same step again: not written twice
    status.progress = {"step": 5, "loss": None}  # a phase without a loss
    monitor.sample()
    status.progress = {"step": 6, "loss": 0.25}
    monitor.sample()
    status.state = "done"
    status.progress = {"step": 9, "loss": 0.1}
    monitor.sample()
    rows = [json.loads(x) for x in (tmp_path / LOSS_FILE).read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(3, 0.5), (6, 0.25)]


def test_review_answers_are_mapped_by_the_session_not_the_page():
    from histolab.errors import StudyError
    from histolab.ui.review import _answers

    cur = {
        "kind": "item",
        "aspects": ["realism", "stain"],
        "aspect_types": ["scale", "continuous"],
        "ask_judgement": True,
        "ranking_options": [],
    }
    a = _answers(cur, [7.0, 3.5, 5, 5, 5], ["patchy_stroma"], "real", 4.0, [], "ok")
    assert a.scores == {"realism": 7, "stain": 3.5} and isinstance(a.scores["realism"], int)
    assert (a.judgement, a.confidence, a.artefacts) == ("real", 4, ("patchy_stroma",))
    ranking = {"kind": "ranking", "ranking_options": ["Model A", "Model B"], "aspects": [], "ask_judgement": False}
    assert _answers(ranking, [], [], None, None, ["Model B", "Model A", None], "").ranking == ("Model B", "Model A")
    with pytest.raises(StudyError, match="give every rank a model"):
        _answers(ranking, [], [], None, None, ["Model B", None], "")
