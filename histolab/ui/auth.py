"""Who a browser session is: a guest, a rater of one study, the admin.

Identity lives in the session's server-side state (``gr.State`` is kept on the
server, keyed by the session; the browser never holds it), set only by the
sign-in handlers here after a check: the admin password against its salted
PBKDF2 hash, a rater's code through ``histolab.review.verify_rater_code``,
both compared in constant time. No handler takes an identity from a field the
client sends. A sign-in expires after ``AppSettings.session_hours``.

Repeated failures for one account or from one client are slowed down
(``SignInGuard``): a rater code has 96 bits, but an admin password may be weak.

``python -m histolab.ui.auth`` prints the hash for HISTOLAB_ADMIN_PASSWORD_HASH
(so the password itself need not sit in the environment).
"""

from __future__ import annotations

import getpass
import hashlib
import hmac
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, replace

from histolab.errors import HistolabError

PBKDF2_ITERATIONS = 200_000  # about 0.1 s per check on one core: cheap for a sign-in, slow for guessing
MAX_FAILURES = 5  # failed sign-ins per account or client in FAILURE_WINDOW_S before a pause
FAILURE_WINDOW_S = 300.0
LOCKOUT_S = 60.0


class AccessDenied(HistolabError):
    """The session is not signed in with the role this needs, or a sign-in was refused."""


@dataclass(frozen=True)
class Identity:
    role: str  # "admin" or "rater"
    name: str  # the admin user, or the rater id
    study_id: str = ""  # raters: the study they signed in to
    since: float = 0.0  # time.time() of the sign-in
    local: bool = False  # admin without sign-in (loopback-only app, see AppSettings.admin_without_sign_in)


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    if not password:
        raise AccessDenied("the admin password is empty")
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"pbkdf2_sha256${iterations}${salt.hex()}${digest.hex()}"


def parse_hash(text: str) -> tuple[int, bytes, bytes]:
    try:
        algo, iterations, salt, digest = text.strip().split("$")
        if algo != "pbkdf2_sha256":
            raise ValueError
        return int(iterations), bytes.fromhex(salt), bytes.fromhex(digest)
    except ValueError:
        raise AccessDenied(
            "HISTOLAB_ADMIN_PASSWORD_HASH must look like pbkdf2_sha256$ITERATIONS$SALT$DIGEST; "
            "make one with `python -m histolab.ui.auth`"
        ) from None


def check_password(password: str, stored: str) -> bool:
    """Constant-time comparison of the PBKDF2 digests (the work is the same whatever the input)."""
    iterations, salt, expected = parse_hash(stored)
    got = hashlib.pbkdf2_hmac("sha256", str(password).encode(), salt, iterations)
    return hmac.compare_digest(got, expected)


class SignInGuard:
    """Counts failed sign-ins per key (an account, a client address) and pauses keys that fail too often.

    ``clock`` (seconds, monotonic) is injected so tests step time instead of waiting on it.
    """

    def __init__(self, clock=time.monotonic, max_failures: int = MAX_FAILURES, lockout_s: float = LOCKOUT_S):
        self._clock = clock
        self.max_failures = max_failures
        self.lockout_s = lockout_s
        self._failures: dict[str, deque[float]] = {}
        self._locked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _who(key: str) -> str:
        if key.startswith("client:"):
            return "from this computer"
        if key.startswith("rater:"):
            return "for this rater id"
        return f"for {key}"

    def retry_in(self, *keys: str) -> float:
        """Seconds until every one of ``keys`` may try again (0: now)."""
        now = self._clock()
        with self._lock:
            return max([0.0, *(self._locked_until.get(k, 0.0) - now for k in keys)])

    def check(self, *keys: str) -> None:
        now = self._clock()
        with self._lock:
            for k in keys:
                until = self._locked_until.get(k, 0.0)
                if until > now:
                    raise AccessDenied(
                        f"too many failed sign-ins {self._who(k)}; try again in {math.ceil(until - now)} s"
                    )

    def failed(self, *keys: str) -> int:
        """Count a failure; return the tries left before a pause (0: the keys are paused now)."""
        now = self._clock()
        left = self.max_failures
        with self._lock:
            for k in keys:
                q = self._failures.setdefault(k, deque())
                q.append(now)
                while q and q[0] < now - FAILURE_WINDOW_S:
                    q.popleft()
                if len(q) >= self.max_failures:
                    self._locked_until[k] = now + self.lockout_s
                    q.clear()
                    left = 0
                else:
                    left = min(left, self.max_failures - len(q))
        return left

    def refused(self, message: str, *keys: str) -> AccessDenied:
        """Count a failure; the error says how many tries are left, or when to try again."""
        left = self.failed(*keys)
        if left == 0:
            return AccessDenied(
                f"{message}. Too many failed sign-ins: try again in {math.ceil(self.retry_in(*keys))} s"
            )
        return AccessDenied(f"{message} ({left} {'try' if left == 1 else 'tries'} left before a pause)")

    def failures(self, key: str) -> int:
        """Failures counted for ``key`` in the current window (0 after a pause starts or a success)."""
        with self._lock:
            return len(self._failures.get(key, ()))

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._failures.pop(k, None)


class Auth:
    """Sign-in checks. ``store`` is a callable returning the review Store (opened on first use)."""

    def __init__(self, settings, store, clock=time.time, guard: SignInGuard | None = None):
        self.settings = settings
        self._store = store
        self._clock = clock
        self.guard = guard or SignInGuard()

    # ------------------------------------------------------------ admin
    def admin_sign_in(self, user: str, password: str, client: str = "") -> Identity:
        keys = ("admin", f"client:{client}")
        self.guard.check(*keys)
        stored = self.settings.admin_password_hash
        if not stored:
            raise AccessDenied(
                "admin sign-in is off: set HISTOLAB_ADMIN_PASSWORD (or HISTOLAB_ADMIN_PASSWORD_HASH) where the app runs"
            )
        # Both comparisons always run, so a wrong user name costs the same time as a wrong password.
        user_ok = hmac.compare_digest(str(user or "").encode(), self.settings.admin_user.encode())
        password_ok = check_password(str(password or ""), stored)
        if not (user_ok and password_ok):
            raise self.guard.refused("wrong admin name or password", *keys)
        self.guard.succeeded(*keys)
        return Identity("admin", self.settings.admin_user, since=self._clock())

    def local_admin(self) -> Identity | None:
        if self.settings.admin_without_sign_in:
            return Identity("admin", self.settings.admin_user, since=self._clock(), local=True)
        return None

    # ------------------------------------------------------------ raters
    def rater_sign_in(self, study_id: str, rater_id: str, code: str, client: str = "") -> Identity:
        from histolab.review import verify_rater_code
        from histolab.review.config import SLUG

        study_id, rater_id = str(study_id or "").strip(), str(rater_id or "").strip()
        keys = (f"rater:{study_id}/{rater_id}", f"client:{client}")
        self.guard.check(*keys)
        # One message for every failure: it must not tell which of the three was wrong.
        refused = "unknown study, rater or code; check what the study's owner sent you"
        if not SLUG.match(study_id) or not SLUG.match(rater_id):
            raise self.guard.refused(refused, *keys)
        if not verify_rater_code(self._store(), study_id, rater_id, str(code or "").strip()):
            raise self.guard.refused(refused, *keys)
        self.guard.succeeded(*keys)
        return Identity("rater", rater_id, study_id=study_id, since=self._clock())

    # ------------------------------------------------------------ sessions
    def valid(self, identity: Identity | None) -> Identity | None:
        """The identity if its sign-in has not expired (local admins do not expire)."""
        if identity is None:
            return None
        if identity.local:
            return replace(identity, since=self._clock())
        if self._clock() - identity.since > self.settings.session_hours * 3600:
            return None
        return identity

    def require_admin(self, session: dict) -> Identity:
        ident = self.valid(session.get("admin")) or self.local_admin()
        if ident is None:
            raise AccessDenied("this needs the admin: sign in as admin at the top of the page")
        return ident

    def require_rater(self, session: dict) -> Identity:
        ident = self.valid(session.get("rater"))
        if ident is None:
            raise AccessDenied("sign in with your study, rater id and code first (sign-ins last a working day)")
        return ident

    def is_admin(self, session: dict) -> bool:
        try:
            self.require_admin(session)
        except AccessDenied:
            return False
        return True


def main() -> int:
    """Print a hash for HISTOLAB_ADMIN_PASSWORD_HASH."""
    password = getpass.getpass("admin password: ")
    if password != getpass.getpass("again: "):
        print("the two passwords differ")
        return 2
    print(hash_password(password))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
