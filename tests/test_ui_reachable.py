"""Gradio's launch-time check that its page answers waits out a slow first answer (histolab.ui.reachable)."""

import http.server
import socket
import threading

from waiting import GENEROUS

from histolab.ui import reachable


class SlowFirstAnswer(http.server.BaseHTTPRequestHandler):
    """The first request gets its answer only once a second request has come: a client that gives up on
    a slow answer and asks again gets through, one that gives up for good does not."""

    second = threading.Event()
    seen = 0
    lock = threading.Lock()

    def do_HEAD(self):
        with self.lock:
            type(self).seen += 1
            n = self.seen
        if n == 1:
            self.second.wait(GENEROUS)
        else:
            self.second.set()
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_timed_out_first_answer_is_asked_again():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowFirstAnswer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        assert reachable.patient_url_ok(url, deadline_s=GENEROUS, attempt_timeout_s=0.2)
        assert SlowFirstAnswer.seen >= 2  # the first request timed out; a later one was answered
    finally:
        SlowFirstAnswer.second.set()
        server.shutdown()


def test_a_refused_connection_is_still_unreachable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        assert reachable.patient_url_ok(f"http://127.0.0.1:{port}/", deadline_s=GENEROUS) is False


def test_launch_options_make_gradios_check_patient(tmp_path):
    from gradio import networking

    from histolab.config import Paths
    from histolab.ui import AppSettings, launch_options

    launch_options(AppSettings(), Paths.from_env({"HISTOLAB_DATA_DIR": str(tmp_path)}))
    assert networking.url_ok is reachable.patient_url_ok
