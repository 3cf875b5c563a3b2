"""What the pages call: models, adapters, the review store, training jobs, background tasks.

One ``Services`` object is made per app and passed to every tab, so tests
inject tiny models and temporary folders. It holds shared *resources* (loaded
models, caches, the database), never a user's choices: those arrive with each
request, and the engine applies a request's adapters under the model's lock
and removes them after (histolab.generation), so one user's adapter never
reaches another user's images.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histolab.config import EMBEDDED_BASE_DIR, EMBEDDED_BASE_ID, PROJECT_ROOT, Paths
from histolab.errors import InvalidRequest, ModelNotFound
from histolab.threads import one_thread
from histolab.torch_worker import TorchWorker
from histolab.ui.auth import Auth
from histolab.ui.settings import AppSettings
from histolab.ui.tasks import TaskRunner


class Preload:
    """The default model loaded in a background thread at start-up, and its state for the status line.

    A Space's first visitor otherwise waits for the load (seconds) and, on the
    CPU fast path, for the U-Net's graphs to be traced for the app's batch
    shapes; the preload does both (a one-step warm-up generation at 1 and at
    the default number of images) while the app starts. A request arriving
    meanwhile waits for the same load (ModelCache's per-source lock), never a
    second one.
    """

    def __init__(self):
        self.state = "not started"  # -> loading -> warming up -> ready | failed
        self.detail = ""
        self.seconds = 0.0
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        # Set when anyone else asks for a model: the warm-ups after the first shape are then left
        # out, so a visitor's request does not queue behind them for the model's lock (a shape
        # not warmed up is traced by the first request that has it).
        self.visitor = threading.Event()

    def status_line(self) -> str:
        if self.state == "ready":
            return f"Model ready ({self.detail}; loaded in {self.seconds:.1f} s)"
        if self.state == "failed":
            return f"Model failed to load: {self.detail}"
        if self.state == "not started":
            return "Model loads on the first request"
        return f"Model {self.state}..."


def describe_model(model) -> str:
    """'bfloat16 on cpu (avx512_bf16), traced U-Net' and the like, for the status line and logs."""
    from histolab.precision import detect_cpu_bf16, dtype_name

    device = str(getattr(model, "device", "?"))
    text = f"{dtype_name(getattr(model, 'dtype', '?'))} on {device}"
    if device == "cpu" and dtype_name(getattr(model, "dtype", "")) == "bfloat16":
        flag = detect_cpu_bf16().flag
        text += f" ({flag})" if flag else ""
    if getattr(model, "optimizations", {}).get("trace"):
        text += ", traced U-Net"
    units = getattr(model, "compiled_unets", None)
    if units is not None and units.loaded:
        text += f", compiled U-Net ({units.loaded} shape{'s' if units.loaded > 1 else ''})"
    return text


class CompileJob:
    """``python -m histolab compile-unet`` for the preloaded model, in a background process at the
    lowest CPU priority (a visitor's generation keeps the cores), its output in ``build.log`` beside
    the packages. ``state``: compiling -> done | failed (exit status); the packages it writes are
    picked up by the next generation."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]):
        import subprocess

        log.parent.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.state = "compiling"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT)
        self.thread = threading.Thread(target=self._wait, name="histolab-unet-compile", daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        rc = self.proc.wait()
        self.state = "done" if rc == 0 else f"failed (exit status {rc}; see {self.log})"


# The background compile is for small U-Nets such as the embedded default (13 M parameters, a minute per
# shape); an SD 1.5 U-Net (860 M) would take far longer and several GB of memory beside a serving app.
AUTO_COMPILE_MAX_PARAMS = 100_000_000


def start_unet_compile(model, source: str, batches: tuple[int, ...]) -> CompileJob | None:
    """Start compiling ``model``'s U-Net for ``batches`` images at its default size, unless every
    package is there already or the model is not on the CPU fast path. None when nothing was started."""
    import shutil

    units = getattr(model, "compiled_unets", None)
    if units is None:
        return None
    params = sum(p.numel() for p in model.unet.parameters())
    if params > AUTO_COMPILE_MAX_PARAMS:
        print(
            f"histolab: not compiling the U-Net in the background ({params / 1e6:.0f} M parameters: many minutes and "
            "GBs of memory); run `python -m histolab compile-unet --base ...` to do it",
            file=sys.stderr,
        )
        return None
    from histolab import startup_bundle
    from histolab.compiled_unet import app_shapes
    from histolab.precision import dtype_name

    bundled = startup_bundle.model_folder(model) is None or startup_bundle.is_current(
        model, source, [model.default_size], units.root
    )
    if not units.missing(model, app_shapes(model, batches)) and bundled:
        return None
    argv = [sys.executable, "-m", "histolab", "compile-unet", "--base", source, "--dtype", dtype_name(model.dtype)]
    argv += ["--batches", ",".join(str(b) for b in batches), "--cache-dir", str(units.root)]
    if shutil.which("nice"):
        argv = ["nice", "-n", "19", *argv]
    # One thread: the export runs the U-Net once; the compiler is single-threaded anyway.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return CompileJob(argv, units.root / "build.log", env)


# With a start-up worker, the preload starts once the worker has made a visitor's first images, or after this
# many seconds of the page being up without a request (histolab.startup_client.StartupWorker.wait_turn).
STARTUP_GRACE_S = 20.0
# ... and once no visitor's generation has ended for this long: Gradio still encodes and sends a result after
# the handler returns (measured: about a second at start-up), and the preload's imports would hold the GIL.
VISITOR_QUIET_S = 2.0


class ModelCache:
    """Base models by source, loaded on first use; at most ``max_models`` kept (least recently used go first).

    One load per source even when requests race (a lock per source); a model
    still in use by a request when it is dropped lives on until that request ends.
    ``get(source, dtype)`` asks for the source in a named dtype other than the loader's
    default (a recipe re-run in the dtype it was made in): kept under its own key, and the
    loader is then called as ``loader(source, dtype=...)``.
    """

    def __init__(self, loader: Callable[[str], Any], max_models: int = 2):
        self._loader = loader
        self._max = max_models
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, source: str, dtype: str | None = None):
        key = source if dtype is None else (source, dtype)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                if key in self._models:
                    return self._models[key]
            model = self._loader(source) if dtype is None else self._loader(source, dtype=dtype)
            with self._lock:
                self._models[key] = model
                self.loads += 1
                while len(self._models) > self._max:
                    self._models.popitem(last=False)
            return model

    def loaded(self, source: str):
        """The model if it is loaded, else None (never loads)."""
        with self._lock:
            return self._models.get(source)


def default_loader(settings: AppSettings) -> Callable[..., Any]:
    def load(source: str, dtype: str | None = None):
        from histolab.pipeline import load_base, optimize_for_inference, resolve_device, resolve_dtype

        device = resolve_device(settings.device)
        model = load_base(source, device=device, dtype=resolve_dtype(dtype or settings.dtype, device))
        return optimize_for_inference(model)

    return load


def warm_up(model, batches: tuple[int, ...]) -> None:
    """One guided step at each batch size: first-call costs (allocator, oneDNN kernel choice, and the
    traced U-Net's graph per shape) are paid here rather than by the first visitor."""
    from histolab.generation import GenerationRequest, generate

    for b in batches:
        generate(model, GenerationRequest(prompt="warm-up", steps=1, batch_size=b))


@dataclass(frozen=True)
class AdapterChoice:
    """An adapter the pages offer: its display name, where it is, and what the registry says of it."""

    label: str
    path: str
    kind: str
    base: str
    trigger: str
    usable: bool
    why: str


class Services:
    def __init__(
        self,
        settings: AppSettings | None = None,
        paths: Paths | None = None,
        *,
        model_loader: Callable[[str], Any] | None = None,
        extractor: Callable[[str], Any] | None = None,
        job_python: str | None = None,
        embedded_dir: Path = EMBEDDED_BASE_DIR,
    ):
        self.settings = (settings or AppSettings()).check()
        self.paths = paths or Paths.from_env()
        self._default_loader = model_loader is None
        self.embedded_dir = Path(embedded_dir)  # where the embedded default must be (tests point it elsewhere)
        # All network work (loads, warm-ups, generations) on one thread (histolab.torch_worker).
        self.torch = TorchWorker(prepare=lambda: self.thread_share.apply())
        loader = model_loader or default_loader(self.settings)
        self.models = ModelCache(lambda *a, **kw: self.torch.call(loader, *a, **kw), self.settings.models_cached)
        self._extractor = extractor
        self.job_python = job_python
        self._store = None
        self._store_lock = threading.Lock()
        self.auth = Auth(self.settings, self.store)
        self.tasks = TaskRunner(self.paths.outputs / "tasks")
        self._scan_lock = threading.Lock()
        self._scan_cache: tuple[tuple, list] | None = None
        self.job_monitor = None  # histolab.ui.train.JobMonitor, started by the Train tab
        self._thread_share = None  # histolab.threads.ThreadShare, made on first use (it imports torch)
        self.preload = Preload()
        self.compile_job: CompileJob | None = None  # the background U-Net compile, when one was started
        # The start-up worker (histolab.startup_client): makes the first images until the preload is done.
        self.startup = None
        # Set once the page is served: with a start-up worker, the preload waits for it, so that its imports
        # (diffusers, transformers: seconds of one core) do not hold up gradio's in this process.
        self.page_up = threading.Event()
        self._visitors = 0  # generations in flight (visitor_request), under _visitor_turn
        self._visitor_left = float("-inf")  # when the last one ended (time.monotonic)
        self._visitor_turn = threading.Condition()

    # ------------------------------------------------------------ folders
    @property
    def sets_root(self) -> Path:
        """Generated image sets (background batches) live here, one folder each."""
        return self.paths.outputs / "sets"

    @property
    def datasets_root(self) -> Path:
        """Users' own real datasets (class subfolders or CSV), for training and evaluation."""
        env = os.environ.get("HISTOLAB_DATASETS")
        if env:
            return Path(env)
        return Path(os.environ.get("HISTOLAB_DATA_DIR", PROJECT_ROOT)) / "datasets"

    # ------------------------------------------------------------ review store
    def store(self):
        with self._store_lock:
            if self._store is None:
                from histolab.review import Store

                self._store = Store(self.paths.annotations)
            return self._store

    # ------------------------------------------------------------ base models
    def base_choices(self) -> list[tuple[str, str]]:
        """(label, source) of every base the pages offer: the configured one, the embedded default,
        and diffusers folders in checkpoints/. Nothing typed by a user is ever loaded."""
        out = [(self._base_label(self.settings.base), self.settings.base)]
        if self.settings.base != EMBEDDED_BASE_ID:
            out.append((EMBEDDED_BASE_ID, EMBEDDED_BASE_ID))
        for e in self.adapter_entries():
            if e.kind == "base model" and all(src != e.path for _, src in out):
                out.append((e.name, e.path))
        return out

    def _base_label(self, source: str) -> str:
        return source if source == EMBEDDED_BASE_ID else Path(source).name or source

    def resolve_base(self, label_or_source: str) -> str:
        for label, src in self.base_choices():
            if label_or_source in (label, src):
                return src
        raise InvalidRequest(f"unknown base model {label_or_source!r}; choose one of the list")

    def base_problem(self, source: str | None = None) -> str:
        """Why the base cannot load, said before anyone waits for it ('' when it looks fine)."""
        source = source or self.settings.base
        if not self._default_loader:
            return ""
        if source == EMBEDDED_BASE_ID and not (self.embedded_dir / "model_index.json").exists():
            return (
                f"The embedded default base model is not installed yet ({self.embedded_dir} has no model_index.json). "
                "Generation needs it: restore it with `git checkout -- checkpoints/embedded-base`, train it with "
                "`python -m histolab.embedded.train_base`, or set HISTOLAB_BASE to another base model."
            )
        return ""

    def model(self, source: str, dtype: str | None = None):
        """The cached model for ``source``; with ``dtype`` (a name such as "bfloat16"), that source
        in that dtype: the app's own model when it already is, else a second one loaded so."""
        if threading.current_thread() is not self.preload.thread:
            self.preload.visitor.set()
        model = self.models.get(source)
        if dtype is None:
            return model
        from histolab.precision import check_dtype_name, dtype_name

        if dtype_name(model.dtype) == check_dtype_name(dtype):
            return model
        return self.models.get(source, dtype)

    def start_startup_worker(self, log=None):
        """Start the start-up worker for the configured base when the preload is on and a bundle was
        written for it (``compile-unet``); None otherwise. Call before importing gradio: both import at once."""
        from histolab.startup_client import StartupWorker, bundle_exists

        s = self.settings
        if not (s.preload and s.startup_worker and self._default_loader) or self.base_problem():
            return None
        if not bundle_exists(s.base):
            return None
        self.startup = StartupWorker(s.base, s.device, s.dtype, log=log)
        return self.startup

    def startup_serves(self, source: str) -> bool:
        """Whether a request for ``source`` goes to the start-up worker first (its model is not loaded yet)."""
        w = self.startup
        return (
            w is not None
            and source == self.settings.base
            and w.state in ("starting", "ready")
            and (self.models.loaded(source) is None)
        )

    @contextlib.contextmanager
    def visitor_request(self):
        """Marks a visitor's generation from the click until the handler has handed its result to Gradio."""
        import time

        with self._visitor_turn:
            self._visitors += 1
        try:
            yield
        finally:
            with self._visitor_turn:
                self._visitors -= 1
                self._visitor_left = time.monotonic()
                self._visitor_turn.notify_all()

    def wait_for_startup_turn(self, grace_s: float) -> None:
        """With a start-up worker: block until the page is up, the worker has made a visitor's images (or
        ``grace_s`` passed without a visitor, or it is not serving), and no visitor's generation (the worker's
        included) is in flight. The preload then starts: its imports hold the GIL that the delivery of a result needs, and
        its loading competes for the cores with the worker (histolab.threads: OpenMP teams of two processes
        on the same cores slow each other several times over)."""
        import time

        self.page_up.wait()
        self.startup.wait_turn(grace_s)
        while True:  # no visitor's generation in flight, and none for VISITOR_QUIET_S
            with self._visitor_turn:
                self._visitor_turn.wait_for(lambda: self._visitors == 0)
                quiet = time.monotonic() - self._visitor_left
            if quiet >= VISITOR_QUIET_S:
                return
            time.sleep(VISITOR_QUIET_S - quiet)

    def model_status_line(self) -> str:
        line = self.preload.status_line()
        w = self.startup
        if w is not None and w.state == "ready" and self.preload.state != "ready":
            line += f" First images come from the start-up worker (ready in {w.seconds:.1f} s)."
        return line

    def _close_startup(self) -> None:
        if self.startup is not None:
            self.startup.close()

    def start_preload(self, source: str | None = None, warm_batches: tuple[int, ...] | None = None) -> Preload:
        """Load ``source`` (the configured base) in a daemon thread, then warm it up at ``warm_batches``
        images (default: the Generate page's default of 4, then 1; see Preload). The page's default
        comes first: it is the shape of a first visitor's request, which would otherwise wait for
        the batch-1 graph to be traced and run first (the model's lock)."""
        source = source or self.settings.base
        warm_batches = warm_batches or tuple(dict.fromkeys((min(4, self.settings.max_batch), 1)))
        pre = self.preload
        if pre.thread is not None:
            return pre
        problem = self.base_problem(source)
        if problem:
            pre.state, pre.detail = "failed", problem
            pre.done.set()
            return pre

        def work():
            import time

            if self.startup is not None:
                pre.state = "waiting for the first images"
                self.wait_for_startup_turn(STARTUP_GRACE_S)
            t0 = time.perf_counter()
            try:
                pre.state = "loading"
                model = self.model(source)
                pre.state = "warming up"
                for i, b in enumerate(warm_batches):
                    if i and pre.visitor.is_set():
                        break
                    self.torch.call(warm_up, model, (b,))
                pre.detail = describe_model(model)
                pre.state = "ready"
                self._close_startup()  # requests now go to this model (the worker finishes one it is making)
                if self.settings.compile_unet:
                    self.compile_job = start_unet_compile(model, source, warm_batches)
            except Exception as exc:  # shown on the status line; a request then gets the error itself
                pre.state, pre.detail = "failed", f"{type(exc).__name__}: {exc}"
                self._close_startup()
            finally:
                pre.seconds = time.perf_counter() - t0
                pre.done.set()

        pre.thread = threading.Thread(target=work, name="histolab-preload", daemon=True)
        pre.thread.start()
        return pre

    # ------------------------------------------------------------ adapters
    def _signature(self) -> tuple:
        root = self.paths.checkpoints
        if not root.is_dir():
            return ()
        sig = []
        for p in sorted(root.iterdir()):
            try:
                st = p.stat()
                inner = (p / "manifest.json").stat().st_mtime_ns if (p / "manifest.json").exists() else 0
            except OSError:
                continue
            sig.append((p.name, st.st_mtime_ns, st.st_size, inner))
        return tuple(sig)

    def adapter_entries(self, refresh: bool = False) -> list:
        """The registry's scan of checkpoints/ (histolab.adapters.scan), redone when the folder changes."""
        from histolab.adapters import scan_cache

        sig = self._signature()
        with self._scan_lock:
            if not refresh and self._scan_cache is not None and self._scan_cache[0] == sig:
                return self._scan_cache[1]
            # Nothing there, or the last start's scan of the same files: the page's build then needs no torch.
            entries = (
                [] if not sig else None if refresh else scan_cache.load(self.paths.checkpoints, sig, self.paths.outputs)
            )
            if entries is None:
                from histolab.adapters import default_runtime, scan

                # Loading checks each tensor (shapes, finite values): torch work, done on one thread so that
                # this one (the page's build, a request) starts no OpenMP team (histolab.torch_worker). Not
                # on the network thread: the page's build would wait for the preload's model load.
                with one_thread():
                    entries = scan(self.paths.checkpoints, runtime=default_runtime())
                scan_cache.save(self.paths.checkpoints, sig, entries, self.paths.outputs)
            self._scan_cache = (sig, entries)
            return entries

    def adapters(self, refresh: bool = False) -> list[AdapterChoice]:
        out = []
        for e in self.adapter_entries(refresh):
            if e.kind == "base model":
                continue
            usable = e.kind != "?"
            out.append(AdapterChoice(e.name, e.path, e.kind, e.base, e.trigger, usable, e.why))
        return out

    def adapter_path(self, label: str) -> str:
        """The checkpoints/ path of an adapter chosen by name: only what the registry lists can be used."""
        for a in self.adapters():
            if a.label == label:
                if not a.usable:
                    raise InvalidRequest(f"adapter {label!r} cannot be used: {a.why}")
                return a.path
        raise InvalidRequest(f"unknown adapter {label!r}; choose one listed from checkpoints/ (or refresh the list)")

    # ------------------------------------------------------------ real data
    @functools.cache  # noqa: B019  (one Services per app; the crops never change)
    def _test_crops(self) -> tuple:
        from histolab.data import bundled

        return tuple(bundled.crops("test", stride=16))

    def class_labels(self) -> list[str]:
        from histolab.data import bundled

        return bundled.labels()

    def real_patches(self, label: str, n: int, seed: int = 0) -> list:
        """``n`` real crops of class ``label`` from the bundled test band (never seen in training)."""
        from histolab.data import bundled

        if label not in self.class_labels():
            raise InvalidRequest(f"unknown class {label!r}; the bundled classes are {self.class_labels()}")
        chosen = bundled.balanced([c for c in self._test_crops() if c.label == label], per_class=n, seed=seed)
        return [(bundled.load_crop(c), f"real {label}") for c in chosen]

    def image_sets(self) -> dict[str, str]:
        """Image sets by display name -> spec for the evaluation code (bundled splits, generated sets, datasets)."""
        out = {f"bundled:{s} (real)": f"bundled:{s}" for s in ("test", "val", "train")}
        for root, tag in ((self.sets_root, "generated"), (self.datasets_root, "dataset")):
            if root.is_dir():
                for p in sorted(root.iterdir()):
                    if p.is_dir() and not p.name.startswith("."):
                        out[f"{p.name} ({tag})"] = str(p)
        return out

    def materialize_real(self, split: str) -> Path:
        """The bundled split as a folder of PNGs in class subfolders (what a study's real source needs)."""
        from histolab.data import bundled
        from histolab.evaluation.images import BUNDLED_PER_CLASS, BUNDLED_STRIDE

        if split not in bundled.SPLITS:
            raise InvalidRequest(f"unknown split {split!r}")
        out = self.paths.outputs / "real" / f"bundled-{split}"
        if not (out / "index.csv").exists():
            tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            bundled.materialize(tmp, split=split, stride=BUNDLED_STRIDE, per_class=BUNDLED_PER_CLASS)
            try:
                tmp.rename(out)
            except OSError:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)  # another request made it meanwhile
        return out

    # ------------------------------------------------------------ evaluation
    def extractor(self, name: str):
        if self._extractor is not None:
            return self._extractor(name)
        from histolab.evaluation.extractors import get_extractor

        return get_extractor(name, paths=self.paths)

    # ------------------------------------------------------------ training
    @property
    def thread_share(self):
        """How this app and the jobs it starts split the cores (histolab.threads)."""
        if self._thread_share is None:
            from histolab.threads import ThreadShare

            self._thread_share = ThreadShare(self.jobs_running)
        return self._thread_share

    def jobs_running(self) -> bool:
        """Whether a training job of this app's jobs folder is running now (its worker holds its lock)."""
        try:
            return any(job.running() for job in self.jobs().list())
        except (ModelNotFound, OSError):
            return False

    def jobs(self):
        try:
            from histolab.training import JobStore
        except ImportError as exc:  # pragma: no cover - depends on the installed build
            raise ModelNotFound(f"training is not available in this installation ({exc})") from exc
        return JobStore(self.paths.jobs)
