"""The app's one thread for network work (histolab.torch_worker)."""

import threading

import pytest

from histolab.torch_worker import TorchWorker


def test_calls_run_on_one_thread_in_order_and_return_or_raise():
    prepared, worker = [], TorchWorker()
    worker.prepare = lambda: prepared.append(threading.get_ident())
    idents = [worker.call(threading.get_ident) for _ in range(3)]
    assert len(set(idents)) == 1 and idents[0] != threading.get_ident()
    assert prepared == idents  # prepare runs on the worker before each call
    with pytest.raises(ValueError, match="bad input"):
        worker.call(lambda: (_ for _ in ()).throw(ValueError("bad input")))
    assert worker.call(lambda a, b=0: a + b, 2, b=3) == 5  # still serving after an error


def test_a_call_from_the_worker_itself_runs_at_once():
    worker = TorchWorker()
    assert worker.call(lambda: worker.call(lambda: "inner")) == "inner"  # no deadlock


def test_requests_from_many_threads_are_served_one_at_a_time():
    worker, lock, overlaps, results = TorchWorker(), threading.Lock(), [], []

    def work(i):
        if not lock.acquire(blocking=False):
            overlaps.append(i)
            return None
        try:
            return threading.get_ident()
        finally:
            lock.release()

    threads = [threading.Thread(target=lambda i=i: results.append(worker.call(work, i))) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps and len(set(results)) == 1 and len(results) == 8


def test_one_thread_limits_only_the_calling_thread_and_restores_it():
    import torch

    from histolab.threads import one_thread

    worker = TorchWorker(prepare=lambda: torch.set_num_threads(2))
    before = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
        assert worker.call(torch.get_num_threads) == 2  # the network thread keeps its own count
    assert torch.get_num_threads() == before
