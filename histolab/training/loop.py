"""The one training loop every method runs on (Hugging Face accelerate underneath).

``train(cfg, base=..., data=..., out=...)``:

1. Check the config, the output folder and, when resuming, that the saved
   state fits (same config, base model and data).
2. Accelerator: mixed precision (fp16/bf16 on a GPU; fp32 on a CPU, said in
   the log), gradient accumulation, and as many processes as ``accelerate
   launch`` starts (no code change: each takes its own slice of every batch).
3. Load the base model, the data; the method's trainer caches what is frozen
   (VAE latents, text or encoder embeddings, class images) and builds the
   trainable parts; AdamW over its parameter groups.
4. Steps. Each epoch's order comes from (seed, epoch), each step's noise,
   timesteps, augmentations and dropout from (seed, step): a resumed run
   repeats an uninterrupted one exactly. The learning rate of each group is
   its base rate times a warm-up + (constant | cosine | linear) factor.
5. After each epoch: a complete adapter folder, fixed-seed samples,
   validation metrics (histolab.training.validation), the resume state and
   the run folder's top-level adapter, each written atomically.
6. On cancel: the state and the current adapter are saved and the run
   returns ``status="cancelled"``; ``resume=True`` continues it. Out of memory,
   a full disk or a diverged loss stop the run with a TrainingError that says
   where the last good checkpoint is.
"""

from __future__ import annotations

import errno
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histolab.errors import InvalidRequest, TrainingError, is_cancelled
from histolab.training import checkpoint as ckpt
from histolab.training.config import TrainConfig, config_from_dict
from histolab.training.progress import Meter, Progress
from histolab.training.state import TrainingState, atomic_write, load_state, save_state

ProgressCallback = Callable[[Progress], None]
SAMPLE_SEED = 1234  # samples of every epoch use the same seeds: epochs compare image for image
VALIDATION_SEED = 987_654


@dataclass
class TrainResult:
    status: str  # "done" or "cancelled"
    out: Path
    step: int
    total_steps: int
    epochs: int
    best_epoch: int | None
    history: list[dict[str, Any]] = field(default_factory=list)
    message: str = ""


@dataclass
class Schedule:
    items: int  # training items per epoch (images x repeats)
    per_step: int  # images per optimiser step over all processes and micro-batches
    steps_per_epoch: int
    total_steps: int
    epochs: int
    warmup_steps: int

    @classmethod
    def of(cls, cfg: TrainConfig, n_images: int, world: int) -> Schedule:
        items = n_images * cfg.repeats
        per_step = cfg.batch_size * cfg.grad_accum * world
        spe = max(1, math.ceil(items / per_step))
        total = cfg.max_steps or cfg.epochs * spe
        epochs = math.ceil(total / spe)
        warmup = max(round(cfg.warmup_ratio * total), round(cfg.warmup_epochs * spe))
        return cls(items, per_step, spe, total, epochs, min(warmup, total))

    def lr_factor(self, step: int, kind: str) -> float:
        """Linear warm-up from 1/warmup (never a zero-lr step), then constant, cosine or linear decay to 0."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        p = min(1.0, (step - self.warmup_steps) / span)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * p))
        if kind == "linear":
            return 1.0 - p
        return 1.0


def epoch_order(seed: int, epoch: int, sched: Schedule, n_images: int):
    """The epoch's item order (image indices), padded by wrapping so every step is a full batch."""
    import numpy as np

    perm = np.random.default_rng([seed, epoch]).permutation(sched.items) % n_images
    return np.resize(perm, sched.steps_per_epoch * sched.per_step)


def step_seeds(seed: int, step: int, micro: int, rank: int) -> tuple[int, int]:
    """Two independent 63-bit seeds for a micro-step: the batch's generator and torch's global RNG (dropout)."""
    import numpy as np

    a, b = np.random.SeedSequence([seed, step, micro, rank]).generate_state(2, dtype=np.uint64)
    return int(a) >> 1, int(b) >> 1


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def training_precision(asked: str, cpu: bool, log) -> str:
    """accelerate's mixed_precision for ``asked`` on this machine. On a CPU bf16 autocast runs only where the
    CPU has native bfloat16 instructions (histolab.precision): elsewhere PyTorch emulates them, slower than
    fp32; fp16 autocast is a GPU feature."""
    import torch

    from histolab.precision import detect_cpu_bf16

    if not cpu:
        if asked == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return asked
    if asked == "no":
        return "no"
    found = detect_cpu_bf16()
    if asked in ("auto", "bf16") and found.supported:
        if asked == "auto":
            log(f"mixed_precision 'auto': bf16 autocast ({found.describe()})")
        return "bf16"
    if asked != "auto":
        why = "fp16 autocast needs a GPU" if asked == "fp16" else found.describe()
        log(f"mixed_precision {asked!r}: {why}; training on the CPU in full precision (fp32)")
    return "no"


def make_accelerator(cfg: TrainConfig, device: str | None, log):
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    mp = training_precision(cfg.mixed_precision, cpu, log)
    # A second run in one process (a notebook, the tests) may ask for another precision than the first;
    # accelerate keeps its state per process, so reset it there (never under `accelerate launch`).
    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") != mp and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(mixed_precision=mp, gradient_accumulation_steps=cfg.grad_accum, cpu=cpu)


class Run:
    """One training run: the loop and its checkpointing (see the module docstring)."""

    def __init__(
        self,
        cfg: TrainConfig | None,
        *,
        base: str,
        data: str,
        out: Path,
        resume: bool,
        preset: str,
        progress: ProgressCallback | None,
        cancel,
        encoder,
        validator,
        device: str | None,
        log_fn,
    ):
        self.out = Path(out)
        self.progress_cb = progress
        self.cancel = cancel
        self.encoder = encoder
        self.validator = validator
        self.device_req = device
        self.log_fn = log_fn
        self.is_main = True
        self.state = load_state(self.out / ckpt.WORK_DIR)
        if self.state is not None and not resume:
            raise InvalidRequest(
                f"{self.out} already holds a training run (step {self.state.step}); pass --resume to continue it, "
                "or choose another --out"
            )
        if self.state is None and resume:
            self._resume_note = f"nothing to resume in {self.out}: starting a new run"
        else:
            self._resume_note = ""
        extra = self.state.extra if self.state else {}
        if cfg is None:
            if self.state is None:
                raise InvalidRequest(f"no saved run in {self.out} to take the settings from; give --method/--preset")
            cfg = config_from_dict(self.state.config)
        cfg.check()
        if self.state is not None:
            self._check_same_config(cfg)
        self.cfg = cfg
        self.base = base if base is not None else extra.get("base", "embedded")
        if self.state is not None and not isinstance(self.base, str | Path):
            raise InvalidRequest("resuming needs the base model as a path or name, not a loaded object")
        self.data_source = data if data is not None else extra.get("data", "bundled")
        self.preset = preset or extra.get("preset", "")
        if self.state is not None:
            for what, given, saved in (("base", base, extra.get("base")), ("data", data, extra.get("data"))):
                if given is not None and saved is not None and str(given) != str(saved):
                    raise InvalidRequest(
                        f"--{what} {given!r} differs from the run's {saved!r}; resume with the same {what}"
                    )

    def _check_same_config(self, cfg: TrainConfig) -> None:
        saved = config_from_dict(self.state.config).to_dict()  # fields added since the run started: defaults
        now = cfg.to_dict()
        diff = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if diff:
            shown = ", ".join(f"{k}: saved {saved.get(k)!r}, given {now.get(k)!r}" for k in diff[:4])
            raise InvalidRequest(
                f"the settings differ from those the run in {self.out} was started with ({shown}); resume with the "
                "same settings (give only --out and --resume to use the saved ones)"
            )

    @property
    def base_label(self) -> str:
        return str(self.base) if isinstance(self.base, str | Path) else str(getattr(self.base, "source", "a model"))

    # ---------------------------------------------------------------- logging
    def log(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        if self.is_main:
            (self.out / ckpt.WORK_DIR).mkdir(parents=True, exist_ok=True)
            with open(self.out / ckpt.WORK_DIR / "log.txt", "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
            if self.log_fn is not None:
                self.log_fn(msg)

    def report(self, phase: str, message: str = "", **kw) -> None:
        if self.progress_cb is None or not self.is_main:
            return
        sched = getattr(self, "sched", None)
        kw.setdefault("step", self.step)
        kw.setdefault("epoch", self.epoch)
        total, epochs = (sched.total_steps, sched.epochs) if sched else (0, 0)
        self.progress_cb(Progress(phase=phase, total_steps=total, epochs=epochs, message=message, **kw))

    # ------------------------------------------------------------------- run
    def run(self) -> TrainResult:
        self.setup()
        try:
            return self._loop()
        finally:
            self.close()

    def close(self) -> None:
        if getattr(self, "trainer", None) is not None:
            self.trainer.close()
        if getattr(self, "sampler", None) is not None:
            self.sampler.close()

    def setup(self) -> None:
        """Everything before the first step, as numbered steps (each a method below)."""
        # 1. Accelerator, work folder, the run's first log line.
        self._start_accelerator()
        # 2. Base model and data, each checked against a resumed run's.
        self._load_base_and_data()
        # 3. The method: caches of the frozen parts, the trainable network.
        self._prepare_method()
        # 4. Optimiser (restored on resume), learning-rate schedule, validator.
        self._prepare_optimization()
        # 5. The plan in one log line: images, steps, epochs, trainable parameters.
        self._log_plan()

    def _start_accelerator(self) -> None:
        import torch

        cfg = self.cfg
        self.is_main = True
        self.step, self.epoch = self.state.step if self.state else 0, 0
        acc = make_accelerator(cfg, self.device_req, self.log)
        self.acc = acc
        self.is_main = acc.is_main_process
        work = self.out / ckpt.WORK_DIR
        if self.is_main:
            work.mkdir(parents=True, exist_ok=True)
            ckpt.clean_temporaries(self.out)
        acc.wait_for_everyone()
        if self._resume_note:
            self.log(self._resume_note)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        self.log(
            f"{'resuming' if self.state else 'starting'} {cfg.method} training -> {self.out} "
            f"(preset {self.preset or 'none'}, base {self.base_label}, data {self.data_source}, device {acc.device}, "
            f"{acc.num_processes} process(es), precision {acc.mixed_precision})"
        )

    def _load_base_and_data(self) -> None:
        import torch

        from histolab.pipeline import load_base
        from histolab.training.data import load_training_data

        cfg, acc = self.cfg, self.acc
        self.report("loading", "base model and data")
        if isinstance(self.base, str | Path):
            model = load_base(str(self.base), device=str(acc.device), dtype=torch.float32)
        else:  # a loaded BaseModel (benchmarks): it is trained in place, so nothing can sample from a frozen copy
            model = self.base
            model.unet.to(acc.device)
            model.vae.to(acc.device)
            model.text_encoder.to(acc.device)
            model.device = acc.device
            needs = [
                n
                for n, v in (
                    ("samples_per_class", cfg.samples_per_class),
                    ("validation", cfg.validation != "none"),
                    ("prior_preservation", getattr(cfg, "prior_preservation", False)),
                )
                if v
            ]
            if needs:
                raise InvalidRequest(
                    f"training a loaded model object cannot sample from a frozen copy: set {needs[0]} off "
                    "(or give the base as a path)"
                )
        if self.state and self.state.base_hash != model.hash:
            raise InvalidRequest(
                f"the base model {self.base!r} is not the one this run was trained on "
                f"(hash {model.hash[:10]} vs {self.state.base_hash[:10]}); resume with the same base"
            )
        data = load_training_data(
            self.data_source,
            min_per_class=cfg.min_images_per_class,
            max_per_class=cfg.max_images_per_class,
            seed=cfg.seed,
            label_names=cfg.label_names,
            only_classes=cfg.only_classes,
            holdout=cfg.holdout,
        )
        fingerprint = data.fingerprint()
        if self.state and self.state.data_fingerprint != fingerprint:
            raise InvalidRequest(
                f"the training images in {self.data_source!r} are not those this run was started with; "
                "resume with the same data"
            )
        self.log(data.summary())
        self.data = data
        self.model = model
        self.fingerprint = fingerprint

    def _prepare_method(self) -> None:
        import torch

        from histolab.training.sampling import EpochSampler
        from histolab.training.trainer import trainer_class

        cfg, acc = self.cfg, self.acc
        sampler = EpochSampler(self.base, device=acc.device, dtype=self.weight_dtype, encoder=self.encoder)
        self.sampler = sampler
        torch.manual_seed(cfg.seed)
        trainer = trainer_class(cfg.method)(
            cfg,
            self.model,
            self.data,
            device=acc.device,
            weight_dtype=self.weight_dtype,
            workdir=self.out / ckpt.WORK_DIR,
            log=self.log,
            sampler=sampler,
            encoder=self.encoder,
            progress=lambda ph, msg="": self.report(ph, msg),
        )
        trainer.run_name = self.out.name
        self.trainer = trainer
        self.report("caching", "frozen parts: latents and conditioning")
        with acc.main_process_first():  # one process writes the caches, the others read them
            trainer.prepare()
        if getattr(trainer, "encoder", None) is not None:
            sampler.runtime.register_encoder(trainer.encoder, device=str(acc.device))

    def _prepare_optimization(self) -> None:
        from histolab.training.optim import build_optimizer
        from histolab.training.validation import make_validator

        cfg, acc, trainer = self.cfg, self.acc, self.trainer
        net = trainer.network()
        groups = trainer.param_groups()
        self.base_lrs = [g["lr"] for g in groups]
        self.group_names = [g.pop("name", f"group{i}") for i, g in enumerate(groups)]
        optimizer = build_optimizer(cfg, groups, acc.device)
        self.history: list[dict[str, Any]] = list(self.state.history) if self.state else []
        extra = self.state.extra if self.state else {}
        self.epoch_loss = list(extra.get("epoch_loss", [0.0, 0]))
        if self.state is not None:
            trainer.load_trainable_state(self.state.trainable)
            optimizer.load_state_dict(self.state.optimizer)
            self.log(f"resumed at step {self.state.step}")
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        net, optimizer = acc.prepare(net, optimizer)
        self.net, self.optimizer = net, optimizer
        self.sched = Schedule.of(cfg, trainer.items(), acc.num_processes)
        self.validator = (
            self.validator
            if self.validator is not None
            else (
                make_validator(cfg, self.data, self.out / ckpt.WORK_DIR, str(acc.device), self.log)
                if self.is_main
                else None
            )
        )

    def _log_plan(self) -> None:
        cfg, s = self.cfg, self.sched
        n_train = sum(p.numel() for p in self.params)
        groups = ", ".join(f"{n} (lr {lr:g})" for n, lr in zip(self.group_names, self.base_lrs, strict=True))
        self.log(
            f"{self.trainer.items()} images x {cfg.repeats} repeats, {s.per_step} images per step: "
            f"{s.steps_per_epoch} steps per epoch, {s.total_steps} steps ({s.epochs} epochs), warm-up {s.warmup_steps}; "
            f"{n_train:,} trainable parameters in groups {groups}"
        )

    def _loop(self) -> TrainResult:
        """The training steps from ``self.step`` to the end, each as numbered steps below."""
        cfg, sched, trainer = self.cfg, self.sched, self.trainer
        n_images = trainer.items()
        meter = Meter()
        meter.start()
        order, order_epoch = None, -1
        self.epoch = min(sched.epochs, (self.step - 1) // sched.steps_per_epoch + 1) if self.step else 1
        while self.step < sched.total_steps:
            # 1. Where we are: the epoch, a cancel request, this epoch's image order, the learning rate.
            self.epoch = self.step // sched.steps_per_epoch + 1
            if self._cancel_requested():
                return self._cancelled()
            if order_epoch != self.epoch:
                order, order_epoch = epoch_order(cfg.seed, self.epoch, sched, n_images), self.epoch
            self._set_learning_rate()
            # 2. One optimiser step over grad_accum micro-batches.
            loss_value = self._optimizer_step(order)
            # 3. Check the loss, count the step, report progress.
            self._record_step(loss_value, meter)
            # 4. The end of an epoch (checkpoint, validation) or a periodic state save.
            end_of_epoch = self.step % sched.steps_per_epoch == 0 or self.step == sched.total_steps
            if end_of_epoch:
                self._end_of_epoch(self.epoch)
                meter.start()
            elif cfg.save_state_every and self.step % cfg.save_state_every == 0:
                self._save_state()
                meter.start()
        return self._finish()

    def _set_learning_rate(self) -> None:
        factor = self.sched.lr_factor(self.step, self.cfg.lr_schedule)
        for g, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base_lr * factor

    def _optimizer_step(self, order) -> float:
        """Forward, backward and update for step ``self.step``; the loss averaged over micro-batches and processes."""
        import torch

        cfg, acc, trainer = self.cfg, self.acc, self.trainer
        world, rank = acc.num_processes, acc.process_index
        k = self.step % self.sched.steps_per_epoch
        self.net.train()
        loss_sum = 0.0
        try:
            for micro in range(cfg.grad_accum):
                start = (k * cfg.grad_accum + micro) * cfg.batch_size * world + rank * cfg.batch_size
                idx = order[start : start + cfg.batch_size]
                gen_seed, torch_seed = step_seeds(cfg.seed, self.step, micro, rank)
                gen = torch.Generator().manual_seed(gen_seed)
                batch = trainer.batch(idx, gen)
                torch.manual_seed(torch_seed)
                with acc.accumulate(self.net):
                    loss = self.net(batch)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(self.params, cfg.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                loss_sum += float(loss.detach())
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                raise TrainingError(
                    f"out of memory at step {self.step + 1} (batch_size {cfg.batch_size}, resolution "
                    f"{trainer.resolution}, precision {acc.mixed_precision}): lower batch_size (and raise "
                    f"grad_accum to keep the effective batch), turn on gradient_checkpointing, or use "
                    f"mixed precision. {self._last_good()}"
                ) from exc
            raise
        loss_value = loss_sum / cfg.grad_accum
        if world > 1:
            loss_value = float(acc.gather(torch.tensor([loss_value], device=acc.device)).mean())
        return loss_value

    def _record_step(self, loss_value: float, meter: Meter) -> None:
        cfg, sched = self.cfg, self.sched
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"the loss is {loss_value} at step {self.step + 1}: training diverged; lower the learning rate "
                f"(lr {cfg.lr:g}) or use fp32/bf16 instead of fp16. {self._last_good()}"
            )
        self.step += 1
        self.epoch_loss[0] += loss_value
        self.epoch_loss[1] += 1
        meter.add(loss_value, sched.per_step)
        rate, spstep = meter.rates()
        self.report(
            "training",
            step=self.step,
            loss=meter.loss(),
            lr=self.optimizer.param_groups[0]["lr"],
            samples_per_s=rate,
            eta_s=spstep * (sched.total_steps - self.step) if spstep else None,
        )

    def _cancel_requested(self) -> bool:
        """Every process must stop at the same step: with several, any one's request counts for all."""
        want = is_cancelled(self.cancel)
        if self.acc.num_processes == 1:
            return want
        import torch

        flag = torch.tensor([1.0 if want else 0.0], device=self.acc.device)
        return bool(self.acc.gather(flag).max() > 0)

    # -------------------------------------------------------------- checkpoints
    def _manifest(self, status: str, metrics: dict[str, Any] | None = None):
        from histolab import __version__
        from histolab.adapters.manifest import Manifest, base_info

        data = self.data
        report = data.report
        return Manifest(
            kind=self.trainer.kind,
            name=self.out.name,
            base=base_info(self.model),
            training={
                "method": self.cfg.method,
                "preset": self.preset,
                "config": self.cfg.to_dict(),
                "status": status,
                "step": self.step,
                "epoch": self.epoch,
                "total_steps": self.sched.total_steps,
                "steps_per_epoch": self.sched.steps_per_epoch,
                "base_source": self.base_label,
                "data": {
                    "source": str(self.data_source),
                    "train": data.counts(),
                    "val": len(data.val_images),
                    "skipped": int(getattr(report, "skipped", 0)) if report is not None else 0,
                    "fingerprint": self.fingerprint,
                },
                "precision": self.acc.mixed_precision,
                "processes": self.acc.num_processes,
                "device": str(self.acc.device),
                "histolab": __version__,
            },
            metrics=dict(metrics or {}),
        )

    def _guard_disk(self, what: str, fn):
        try:
            return fn()
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            cause = "the disk is full" if full else f"{type(exc).__name__}: {exc}"
            raise TrainingError(
                f"could not save {what}: {cause}{' (free some space, then resume with --resume)' if full else ''}. "
                f"{self._last_good()}"
            ) from exc

    def _last_good(self) -> str:
        folders = ckpt.epoch_folders(self.out)
        st = load_state(self.out / ckpt.WORK_DIR) if (self.out / ckpt.WORK_DIR).is_dir() else None
        parts = []
        if folders:
            e, p = list(folders.items())[-1]
            parts.append(f"the last good checkpoint is epoch {e} ({p}, also in {self.out})")
        else:
            parts.append("no epoch checkpoint was written yet")
        if st is not None:
            parts.append(f"the resume state is at step {st.step}")
        return "; ".join(parts).capitalize() + "; it is intact."

    def _save_state(self) -> None:
        if not self.is_main:
            self.acc.wait_for_everyone()
            return
        st = TrainingState(
            step=self.step,
            config=self.cfg.to_dict(),
            base_hash=self.model.hash,
            data_fingerprint=self.fingerprint,
            trainable=self.trainer.trainable_state(),
            optimizer=self.optimizer.state_dict(),
            history=self.history,
            extra={
                "epoch_loss": self.epoch_loss,
                "base": self.base_label,
                "data": str(self.data_source),
                "preset": self.preset,
                "method": self.cfg.method,
            },
        )
        self._guard_disk(f"the resume state at step {self.step}", lambda: save_state(self.out / ckpt.WORK_DIR, st))
        self.acc.wait_for_everyone()

    def _end_of_epoch(self, epoch: int) -> None:
        cfg = self.cfg
        metrics: dict[str, Any] = {"epoch": epoch, "step": self.step}
        if self.epoch_loss[1]:
            metrics["train_loss"] = self.epoch_loss[0] / self.epoch_loss[1]
        self.epoch_loss = [0.0, 0]
        if self.is_main:
            folder = ckpt.epoch_dir(self.out, epoch)
            self.report("saving", f"epoch {epoch} checkpoint")
            manifest = self._manifest(f"epoch {epoch} of {self.sched.epochs}", metrics)
            manifest.name = f"{self.out.name}-epoch-{epoch:03d}"
            self._guard_disk(
                f"the epoch {epoch} checkpoint",
                lambda: ckpt.write_folder(folder, lambda tmp: self.trainer.save_adapter(tmp, manifest)),
            )
            if cfg.samples_per_class:
                self.report("sampling", f"epoch {epoch} samples")
                img = self._samples(folder)
                self._guard_disk(
                    "the samples", lambda: atomic_write(folder / "samples.png", lambda tmp: img.save(tmp, format="PNG"))
                )
            last = self.step == self.sched.total_steps
            if self.validator is not None and (epoch % cfg.validate_every == 0 or last):
                self.report("validating", f"epoch {epoch}")
                metrics.update(self._validate(folder))
            self.history.append(metrics)
            best = self._best()
            manifest.metrics = dict(metrics)
            self._guard_disk("the epoch manifest", lambda: _write_manifest(folder, manifest))
            self._save_state()
            self._promote(folder, status=f"epoch {epoch} of {self.sched.epochs}")
            removed = ckpt.prune(self.out, cfg.keep_epochs, {best} if best else set())
            keys = ("train_loss", "/fid", "/kid_x1000_mean", "/precision", "/recall")
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float) and k.endswith(keys))
            self.log(
                f"epoch {epoch}/{self.sched.epochs} saved to {folder} ({shown})"
                + (f"; removed epochs {removed}" if removed else "")
            )
            if best == epoch:
                self.log(f"epoch {epoch} is the best so far by {self.validator.metric}")
        else:
            self._save_state()

    def _samples(self, folder: Path):
        from histolab.training.sampling import grid

        labels: list[str] = []
        reqs = self.trainer.sample_requests(self.cfg.samples_per_class, SAMPLE_SEED, labels)
        images = self.sampler.generate(folder, reqs)
        refs = [r.reference if r.mode == "reference" else None for r in reqs for _ in range(r.batch_size)]
        return grid(images, labels, refs if any(x is not None for x in refs) else None)

    def _validate(self, folder: Path) -> dict[str, float]:
        labels: list[str] = []
        per_image = getattr(self.trainer, "validation_requests", None) if self.cfg.val_per_image else None
        if per_image is not None:  # the 2026 protocol: one generation per validation image
            reqs = per_image(VALIDATION_SEED, labels)
        else:
            reqs = self.trainer.sample_requests(self.cfg.val_images_per_class, VALIDATION_SEED, labels)
        images = self.sampler.generate(folder, reqs)
        return {k: float(v) for k, v in self.validator(images, labels).items()}

    def _best(self) -> int | None:
        from histolab.training.validation import better

        if self.validator is None:
            return None
        best, best_v = None, None
        for h in self.history:
            v = h.get(self.validator.metric)
            if v is not None and math.isfinite(v) and better(v, best_v, self.validator.lower_is_better):
                best, best_v = h["epoch"], v
        return best

    def _top_metrics(self) -> dict[str, Any]:
        best = self._best()
        out: dict[str, Any] = {"history": self.history, "best_epoch": best}
        if self.validator is not None:
            out["selection_metric"] = self.validator.metric
            if best is not None:
                out["best"] = next(h for h in self.history if h["epoch"] == best)
        return out

    def _promote(self, folder: Path, status: str, selected: int | None = None) -> None:
        from histolab.adapters.manifest import read_manifest

        def write():
            ckpt.promote(folder, self.out)
            m = read_manifest(self.out)
            m.name = self.out.name
            m.training["status"] = status
            m.training["selected_epoch"] = selected if selected is not None else m.training.get("epoch")
            m.metrics = self._top_metrics()
            _write_manifest(self.out, m)

        self._guard_disk(f"the adapter in {self.out}", write)

    def _cancelled(self) -> TrainResult:
        self.log(f"cancelled at step {self.step}: saving the state and the current adapter")
        self._save_state()
        if self.is_main:
            tmp_folder = self.out / ckpt.WORK_DIR / "cancelled"
            manifest = self._manifest(f"cancelled at step {self.step}", {"step": self.step})
            self._guard_disk(
                "the cancelled run's adapter",
                lambda: ckpt.write_folder(tmp_folder, lambda tmp: self.trainer.save_adapter(tmp, manifest)),
            )
            self._promote(tmp_folder, status=f"cancelled at step {self.step} (resume with --resume)")
        self.report("cancelled", f"at step {self.step}; resume with --resume")
        return TrainResult(
            "cancelled",
            self.out,
            self.step,
            self.sched.total_steps,
            self.sched.epochs,
            self._best(),
            self.history,
            f"cancelled at step {self.step}",
        )

    def _finish(self) -> TrainResult:
        best = self._best()
        last = max((h["epoch"] for h in self.history), default=None)
        message = f"done: {self.step} steps, {len(self.history)} epochs"
        if self.is_main:
            if self.cfg.select_best and best is not None and best != last:
                self._promote(
                    ckpt.epoch_dir(self.out, best),
                    status=f"done; epoch {best} selected (best {self.validator.metric})",
                    selected=best,
                )
                message += f"; {self.out} holds epoch {best}, the best by {self.validator.metric}"
            elif last is not None:
                self._promote(ckpt.epoch_dir(self.out, last), status="done", selected=last)
                message += f"; {self.out} holds the last epoch ({last})"
        self.acc.wait_for_everyone()
        self.log(message)
        self.report("done", message)
        return TrainResult(
            "done", self.out, self.step, self.sched.total_steps, self.sched.epochs, best, self.history, message
        )


def _write_manifest(folder: Path, manifest) -> None:
    from histolab.adapters.manifest import MANIFEST_NAME

    if not manifest.created:
        import datetime

        manifest.created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    atomic_write(folder / MANIFEST_NAME, lambda tmp: tmp.write_text(manifest.to_json() + "\n", encoding="utf-8"))


def train(
    cfg: TrainConfig | None = None,
    *,
    base: str | None = None,
    data: str | None = None,
    out: str | Path,
    resume: bool = False,
    preset: str = "",
    progress: ProgressCallback | None = None,
    cancel: threading.Event | Callable[[], bool] | None = None,
    encoder=None,
    validator=None,
    device: str | None = None,
    log: Callable[[str], None] | None = print,
) -> TrainResult:
    """Train ``cfg.method`` on ``data`` ("bundled" or a dataset path) over ``base`` into ``out``.

    ``cfg=None`` with ``resume=True`` takes the settings saved in ``out``. ``encoder``: an ImageEncoder for
    the projector (else resolved by ``cfg.encoder``). ``validator``: a histolab.training.validation
    Validator (else the config's). Returns a TrainResult; raises TrainingError when training stops.
    """
    run = Run(
        cfg,
        base=base,
        data=data,
        out=Path(out),
        resume=resume,
        preset=preset,
        progress=progress,
        cancel=cancel,
        encoder=encoder,
        validator=validator,
        device=device,
        log_fn=log,
    )
    return run.run()
