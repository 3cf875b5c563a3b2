"""The default model loaded in the background at start-up (Services.start_preload) and its status line."""

import threading

from app_testkit import make_settings
from waiting import GENEROUS, join_all

from histolab.config import Paths
from histolab.ui.services import Services


def services_with(tmp_path, loader):
    return Services(make_settings(), Paths.from_env({"HISTOLAB_DATA_DIR": str(tmp_path)}), model_loader=loader)


def test_preload_loads_once_warms_up_and_reports_ready(tmp_path, tiny_model):
    gate, calls = threading.Event(), []

    def loader(source):
        calls.append(source)
        gate.wait()
        return tiny_model

    services = services_with(tmp_path, loader)
    assert services.preload.status_line() == "Model loads on the first request"
    pre = services.start_preload(warm_batches=(1, 2))
    assert services.start_preload() is pre  # a second call starts nothing
    got, request = [], threading.Thread(target=lambda: got.append(services.model(services.settings.base)))
    request.start()  # a visitor's request during the load waits for the same load
    assert pre.state in ("not started", "loading") and not pre.done.is_set()
    assert pre.status_line() in ("Model loading...", "Model not started...", "Model loads on the first request")
    gate.set()
    assert pre.done.wait(GENEROUS) and pre.state == "ready", (pre.state, pre.detail)
    join_all([request])
    assert got == [tiny_model] and calls == [services.settings.base] and services.models.loads == 1
    line = pre.status_line()
    assert line.startswith("Model ready (float32 on cpu") and "loaded in" in line


def test_preload_failure_is_shown(tmp_path):
    def loader(source):
        raise OSError("disk on fire")

    pre = services_with(tmp_path, loader).start_preload()
    assert pre.done.wait(GENEROUS) and pre.state == "failed", (pre.state, pre.detail)
    assert pre.status_line() == "Model failed to load: OSError: disk on fire"


def test_preload_of_a_missing_embedded_base_says_what_to_do(tmp_path):
    services = Services(paths=Paths.from_env({"HISTOLAB_DATA_DIR": str(tmp_path)}), embedded_dir=tmp_path / "none")
    pre = services.start_preload()
    assert pre.done.is_set() and pre.thread is None and pre.state == "failed"
    assert "git checkout -- checkpoints/embedded-base" in pre.status_line()


def test_preload_setting_reads_the_environment():
    from histolab.ui.settings import AppSettings

    assert AppSettings.from_env({}).preload is True
    assert AppSettings.from_env({"HISTOLAB_PRELOAD": "0"}).preload is False


def test_preload_warms_up_the_first_request_shape_first(tmp_path, tiny_model, monkeypatch):
    """The Generate page's default number of images (here max_batch=3) before 1: a first visitor's
    request has that shape and would otherwise wait for the batch-1 warm-up."""
    from histolab.ui import services as services_module

    seen = []
    monkeypatch.setattr(services_module, "warm_up", lambda model, batches: seen.append(batches))
    pre = services_with(tmp_path, lambda source: tiny_model).start_preload()
    assert pre.done.wait(GENEROUS) and pre.state == "ready", (pre.state, pre.detail)
    assert seen == [(3,), (1,)]


def test_preload_leaves_the_later_warm_ups_out_once_a_visitor_asks(tmp_path, tiny_model, monkeypatch):
    """A request waiting for the model's lock would otherwise also wait for the batch-1 warm-up."""
    from histolab.ui import services as services_module

    services = services_with(tmp_path, lambda source: tiny_model)
    seen, gate = [], threading.Event()

    def warm_up(model, batches):
        seen.append(batches)
        gate.wait()  # the first warm-up is running when the visitor arrives

    monkeypatch.setattr(services_module, "warm_up", warm_up)
    pre = services.start_preload()
    visitor = threading.Thread(target=lambda: services.model(services.settings.base))
    visitor.start()
    join_all([visitor])
    gate.set()
    assert pre.done.wait(GENEROUS) and pre.state == "ready", (pre.state, pre.detail)
    assert seen == [(3,)]
