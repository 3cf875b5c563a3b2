"""What the app does before its page answers: no torch in its process (the start-up worker has its own),
so the adapter scan of checkpoints/ is read back from the last start when nothing there changed."""

import json
import subprocess
import sys

from histolab.config import PROJECT_ROOT, Paths
from histolab.ui.services import Services
from histolab.ui.settings import AppSettings


def make_paths(tmp_path):
    data = tmp_path / "data"
    paths = Paths(data / "checkpoints", data / "annotations", data / "jobs", data / "outputs")
    paths.checkpoints.mkdir(parents=True)
    (paths.checkpoints / "broken.safetensors").write_bytes(b"not a safetensors file")
    other = paths.checkpoints / "other-base"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return paths


def counting_scan(monkeypatch):
    from histolab.adapters import registry

    calls = []
    real = registry.scan

    def scan(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(registry, "scan", scan)
    return calls


def test_a_start_with_checkpoints_unchanged_reads_the_last_scan(tmp_path, monkeypatch):
    paths = make_paths(tmp_path)
    calls = counting_scan(monkeypatch)
    first = Services(AppSettings(), paths).adapter_entries()
    assert len(calls) == 1 and {e.kind for e in first} == {"?", "base model"}
    again = Services(AppSettings(), paths).adapter_entries()  # the next start
    assert len(calls) == 1 and again == first
    (paths.checkpoints / "new.safetensors").write_bytes(b"also not one")
    third = Services(AppSettings(), paths).adapter_entries()
    assert len(calls) == 2 and len(third) == len(first) + 1
    # Refresh (the page's button) always scans; so does changed adapter code.
    Services(AppSettings(), paths).adapter_entries(refresh=True)
    assert len(calls) == 3
    from histolab.adapters import scan_cache

    monkeypatch.setattr(scan_cache, "_code_signature", lambda: [["loader.py", 1, 2]])
    Services(AppSettings(), paths).adapter_entries()
    assert len(calls) == 4


def test_an_unreadable_saved_scan_is_scanned_again(tmp_path, monkeypatch):
    from histolab.adapters import scan_cache

    paths = make_paths(tmp_path)
    calls = counting_scan(monkeypatch)
    Services(AppSettings(), paths).adapter_entries()
    scan_cache.cache_file(paths.checkpoints, paths.outputs).write_text("{not json")
    assert len(Services(AppSettings(), paths).adapter_entries()) == 2 and len(calls) == 2


def test_the_page_builds_without_importing_torch(tmp_path):
    paths = make_paths(tmp_path)
    Services(AppSettings(), paths).adapter_entries()  # the previous start's scan
    code = (
        "import sys\n"
        "from histolab.config import Paths\n"
        "from histolab.ui import AppSettings, Services, build_app\n"
        f"p = Paths(*[__import__('pathlib').Path(x) for x in {[str(p) for p in paths.__dict__.values()]!r}])\n"
        "build_app(Services(AppSettings(preload=False), p))\n"
        "print('torch' in sys.modules, 'diffusers' in sys.modules, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "False", "False"], out.stdout
