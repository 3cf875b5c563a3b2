"""SIGKILL the process that is writing ratings, restart, and check that nothing acknowledged was lost.

The child process rates as two raters at once (one thread each) and prints a
line only after ``submit`` has returned, i.e. after the commit: every printed
line is an acknowledgement. The parent kills it with SIGKILL in mid-session,
twice, each time checking the store: every acknowledged answer is there exactly
as sent, at most one more per rater and kill (committed, killed before it could print) is there,
each rater resumes at the first task they had not answered, retries of the
acknowledged submissions are recognised as duplicates, and the database passes
SQLite's integrity check. A last run finishes the study.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_review_support import make_sources, replayable_answers, study_dict

from histolab.review import Store, create_study, get_task, next_task, parse_config, submit

ROOT = Path(__file__).resolve().parent.parent
RATERS = ("ann", "bob")

CHILD = textwrap.dedent(
    """
    import json, sys, threading
    from histolab.review import Store, next_task, submit
    from test_review_support import replayable_answers

    root, study = sys.argv[1], sys.argv[2]
    store = Store(root)
    lock = threading.Lock()

    def rate(rater):
        while (task := next_task(store, study, rater)) is not None:
            a = replayable_answers(task, rater)
            sid = f"{rater}-{task.position:04d}"
            ack = submit(store, study, rater, task.task_id, a, sid)
            with lock:
                print(json.dumps({"rater": rater, "task": task.task_id, "position": task.position,
                                  "sid": sid, "scores": a.scores, "duplicate": ack.duplicate}), flush=True)

    threads = [threading.Thread(target=rate, args=(r,)) for r in sys.argv[3:]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("FINISHED", flush=True)
    """
)


def _spawn(root: Path) -> subprocess.Popen:
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), "s1", *RATERS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _check(root: Path, acked: dict[str, dict], kills: int) -> dict[str, int]:
    store = Store(root)
    db = store.db
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    done_by = {}
    for rater in RATERS:
        mine = [a for a in acked.values() if a["rater"] == rater]
        for a in mine:
            row = db.execute(
                "SELECT unit_id FROM submissions WHERE submission_id = ? AND task_id = ?", [a["sid"], a["task"]]
            ).fetchone()
            assert row is not None, f"acknowledged submission {a['sid']} is missing"
            stored = dict(
                db.execute(
                    "SELECT aspect, value FROM ratings WHERE unit_id = ? AND rater_id = ? AND current = 1",
                    [row[0], rater],
                ).fetchall()
            )
            assert stored == {k: float(v) for k, v in a["scores"].items()}
        done = db.execute(
            "SELECT COUNT(*) FROM assignments WHERE study_id = 's1' AND rater_id = ? AND done_at IS NOT NULL", [rater]
        ).fetchone()[0]
        # At most one answer per kill was committed but not acknowledged (that kill came between the commit
        # and the print; the next run starts after it, so each kill can leave one).
        assert len(mine) <= done <= len(mine) + kills, (rater, done, len(mine), kills)
        positions = [
            p
            for (p,) in db.execute(
                "SELECT position FROM assignments WHERE study_id = 's1' AND rater_id = ? AND done_at IS NOT NULL",
                [rater],
            )
        ]
        assert sorted(positions) == list(range(1, done + 1)), "answered tasks are not a prefix of the rater's order"
        task = next_task(store, "s1", rater)
        assert task is None or task.position == done + 1
        # A client that never got its ack retries with the same id and answers: recognised, not duplicated.
        for a in mine:
            task = get_task(store, "s1", rater, a["task"])
            assert submit(store, "s1", rater, a["task"], replayable_answers(task, rater), a["sid"]).duplicate
        done_by[rater] = done
    dup = db.execute(
        "SELECT COUNT(*) FROM (SELECT 1 FROM ratings WHERE current = 1 GROUP BY unit_id, rater_id, aspect HAVING COUNT(*) > 1)"
    ).fetchone()[0]
    assert dup == 0
    store.close()
    return done_by


@pytest.mark.slow
def test_sigkill_mid_session_loses_no_acknowledged_rating(tmp_path):
    sources = make_sources(tmp_path, per_class=3)
    root = tmp_path / "ann"
    store = Store(root)
    rep = create_study(store, parse_config(study_dict(sources)))
    store.close()
    acked: dict[str, dict] = {}
    kills = 0
    for kill_after in (3, 8):  # acknowledgements to wait for in each run before the kill
        proc = _spawn(root)
        seen = 0
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("{"):
                a = json.loads(line)
                acked[a["sid"]] = a
                seen += 1
                if seen >= kill_after:
                    proc.send_signal(signal.SIGKILL)
                    break
        # Not communicate(): it reads the raw pipe and would skip lines already in stdout's buffer.
        rest, err = proc.stdout.read(), proc.stderr.read()
        assert proc.wait(timeout=120) == -signal.SIGKILL, err[-2000:]
        kills += 1
        for line in rest.splitlines():  # acks printed before the kill, still in the pipe
            if line.startswith("{"):
                a = json.loads(line)
                acked[a["sid"]] = a
        _check(root, acked, kills)
    assert kills == 2
    # A last, uninterrupted run finishes the study from where the kills left it.
    proc = _spawn(root)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "FINISHED" in out
    for line in out.splitlines():
        if line.startswith("{"):
            a = json.loads(line)
            assert not a["duplicate"]
            acked[a["sid"]] = a
    done = _check(root, acked, kills)
    assert done == {r: rep.units for r in RATERS}
    # Every task was answered exactly once; the only ones never acknowledged are those a kill
    # caught between commit and print (at most one per rater per kill).
    stored = Store(root).db.execute("SELECT COUNT(*) FROM submissions").fetchone()[0]
    assert stored == len(RATERS) * rep.units
    assert 0 <= stored - len(acked) <= kills * len(RATERS)
