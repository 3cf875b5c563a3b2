"""The Train tab through the API: a real job process started from a preset, watched (status, loss, samples,
log), cancelled, resumed to the end, and listed again by a fresh app on the same folders (a restart)."""

from __future__ import annotations

import pytest
from adapters_testkit import save_pipeline
from app_testkit import ADMIN_PASSWORD, make_services, served
from gradio_client import Client
from gradio_client.exceptions import AppError
from waiting import wait_until

# 12 bundled crops at batch 4: 3 steps per epoch, 8 epochs = 24 steps; one sample image per class per epoch.
OVERRIDES = """
max_images_per_class = 4
min_images_per_class = 2
repeats = 1
batch_size = 4
augment = flip
validation = none
samples_per_class = 1
sample_steps = 1
epochs = 8
"""


def wait_state(services, job_id, states, min_step=0):
    """The job's status once it is in one of ``states`` (at ``min_step`` or later); a job that finishes in
    another state fails at once, with its log."""
    job = services.jobs().get(job_id)

    def reached():
        st = job.status()
        if st.state in states and st.progress.get("step", 0) >= min_step:
            return st
        if st.finished:
            raise AssertionError(f"job {job_id} ended {st.state}, not {sorted(states)}: {st}\n{job.log_tail()}")
        return None

    return wait_until(reached, lambda: f"job {job_id}: {job.status()}\n{job.log_tail()}")


def test_start_watch_cancel_resume_and_list_after_a_restart(tiny_model, tmp_path):
    services = make_services(tmp_path, tiny_model)
    save_pipeline(tiny_model, services.paths.checkpoints / "tiny-base")  # a base the job process can load
    with served(services) as (_, url):
        guest = Client(url, verbose=False)
        with pytest.raises(AppError, match="sign in as admin"):
            guest.predict("tiny-lora", "bundled", "tiny-base", "ui-lora", 0, OVERRIDES, api_name="/train_start")
        admin = Client(url, verbose=False)
        admin.predict("admin", ADMIN_PASSWORD, api_name="/admin_sign_in")
        for args, message in [
            (("no-such-preset", "bundled", "tiny-base", "x", 0, ""), "no-such-preset"),
            (("tiny-lora", "bundled", "tiny-base", "../escape", 0, ""), "short lowercase name"),
            (
                ("tiny-lora", "bundled", "tiny-base", "ok-name", 0, "learning_rate = 1"),
                "unknown setting 'learning_rate'",
            ),
            (("tiny-lora", "bundled", "tiny-base", "ok-name", 0, "epochs = many"), "epochs"),
            (("tiny-lora", "elsewhere", "tiny-base", "ok-name", 0, ""), "unknown dataset"),
        ]:
            with pytest.raises(AppError) as exc:
                admin.predict(*args, api_name="/train_start")
            assert message in str(exc.value), str(exc.value)
        assert services.jobs().list() == []  # nothing was started by a refused request

        started, table, chosen, _ = admin.predict(
            "tiny-lora", "bundled", "tiny-base", "ui-lora", 0, OVERRIDES, api_name="/train_start"
        )
        job_id = chosen["value"]
        assert started.startswith(f"started job {job_id}") and table["data"][0][0] == job_id
        wait_state(services, job_id, {"running"}, min_step=4)
        msg = admin.predict(job_id, api_name="/train_cancel")
        assert "cancel asked" in msg
        st = wait_state(services, job_id, {"cancelled"})
        assert st.progress["step"] < 24
        line, loss, samples, log, _ = admin.predict(job_id, api_name="/train_job")
        assert "cancelled" in line and "step" in line
        epochs = [r for r in loss["data"] if r[2] == "epoch mean"]  # (step, loss, series)
        assert len(epochs) == len(samples) >= 1 and all(r[0] % 3 == 0 and r[1] > 0 for r in epochs)
        assert samples and samples[0]["caption"].startswith("epoch ")
        assert "cancelled" in log
        msg, _ = admin.predict(job_id, api_name="/train_resume")
        assert "resumed" in msg
        with pytest.raises(AppError, match="only a cancelled, interrupted or failed job resumes"):
            admin.predict(job_id, api_name="/train_resume")
        st = wait_state(services, job_id, {"done"})
        assert st.progress["step"] == 24
        assert "ui-lora" in [a.label for a in services.adapters(refresh=True)]  # the adapter is offered at once

    # A restart: a new app on the same folders lists the job and its curve from disk.
    again = make_services(tmp_path, tiny_model)
    with served(again) as (_, url):
        admin = Client(url, verbose=False)
        admin.predict("admin", ADMIN_PASSWORD, api_name="/admin_sign_in")
        table, chosen = admin.predict(None, api_name="/train_jobs")
        assert table["data"][0][:2] == [job_id, "done"] and chosen["value"] == job_id
        line, loss, samples, log, _ = admin.predict(job_id, api_name="/train_job")
        assert "done" in line and len(samples) == 8
        assert [r[0] for r in loss["data"] if r[2] == "epoch mean"] == [3, 6, 9, 12, 15, 18, 21, 24]
        with pytest.raises(AppError, match="no job"):
            admin.predict("20990101-000000-abcdef", api_name="/train_job")
