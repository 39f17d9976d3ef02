#!/usr/bin/env python3
"""Keep MCP stdio servers warm across CLI calls: one daemon per config, behind a Unix socket.

A single-file, standard-library-only port of mcporter's keep-alive daemon (openclaw/mcporter,
``src/daemon/``, wire protocol v2). ``python3 mcporter_daemon.py demo`` gives a tour, ``--help``
the commands. Each section below opens with a banner saying what it owns. In file order:

  The vendorable core (no MCP in it; ``__all__`` above the marker line is its API):
    constants and errors -> paths (DaemonApp, DaemonPaths) -> wire protocol (frames, exchange)
    -> metadata and locks (FileLock) -> process identity (is_our_pid, the ps/proc seam)
    -> daemon host (DaemonHost, _Takeover, _Connection) -> daemon client (DaemonClient).
  ---- the marker line ----
  MCP: constants -> config and imports (load_config) -> stdio client (_ServerProcess,
    _JsonRpcChannel, McpStdioClient) -> tool arguments -> keep-alive service (_OPERATIONS,
    _KeptServer, McpKeepAliveService) -> serve, the editor bridge (ServeBridge) -> demo
    server -> service files -> CLI, main() last.

One warm ``call demo.counter``. The CLI process: main -> _parse_command_line (one command's
parser) -> cmd_call (load_config, resolve_target, the arguments as text) ->
_via_daemon_or_ephemeral -> DaemonClient.request -> ensure (verified_status) -> _send ->
exchange: one JSON line out, progress frames and one answer back. The daemon:
_accept -> _worker -> _Connection.handle -> _read_request -> _dispatch -> _run_handler (the
work on its own thread; progress frames; _CallerWatch) -> McpKeepAliveService.handle
(_OPERATIONS["callTool"]: read, check) -> _KeptServer.use -> live_client -> _call_tool
-> McpStdioClient.call_tool -> _JsonRpcChannel.request (send with a deadline, _wait_answer,
answered by the reader thread's _dispatch) -> _Exchange.answer. Back in the CLI:
result_or_raise -> _print_result -> stdout -> _exit_without_teardown.

Where each invariant (README, "Invariants") is kept:
   1 one daemon: DaemonClient.ensure (spawn lock, re-check), _Takeover.run (bind lock)
   2 verified peer: DaemonClient.verified_status, status_matches, record_is_live
   3 hands off the living: plan_takeover, _Takeover._reconcile
   4 hung is replaced: _TakeoverFacts.gather (two probes), RecordedDaemon.terminate
   5 stale stops first: _Takeover._stop_before_rebind
   6 a torn record is no record: validate_metadata, write_metadata, _MetadataRecord.sync
   7 clean only your own: DaemonHost._release_files, remove_metadata_if_owned
   8 no socket, no daemon: DaemonHost._housekeeping (_Listener.owns_path)
   9 errors at once: load_config, DaemonClient._wait_ready, McpStdioClient.start
  10 bad input is contained: _Connection._read_request, _parse_request, _Load.admit
  11 no shell: _ServerProcess.spawn (an argument list), McpKeepAliveService._server
  12 at most once, exactly one answer: DaemonClient.request, _Exchange.answer,
     DaemonHost._handle_stop and _finish (nothing taken in is left unanswered at exit)
  13 one copy of a server: _KeptServer.live_client (its life lock), _Takeover._wait_for_stopping
  14 every wait has a deadline: exchange, _JsonRpcChannel._write_until, call_expiry
  15 paths are bytes: DaemonPaths.for_config, config_fingerprint (os.fsencode)
  16 warm state is kept: plan_takeover (busy, or silent once, is not hung), ping_verdict,
     nohup in DaemonHost._install_signal_handlers
  17 no other user gets in: ensure_private_dir, _refuse_unsafe_config
"""

from __future__ import annotations

import _socket  # the client's connect, send and receive; ``socket`` is for the host (below)
import os
import sys
import time

# The builtin hash modules; hashlib would load OpenSSL (about 4 MB RSS and 2 ms per start) for
# two hashes of a few kilobytes. Builds without them fall back to hashlib.
try:
    from _sha1 import sha1 as _sha1  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on how CPython was built
    from hashlib import sha1 as _sha1
try:
    from _sha256 import sha256 as _sha256  # type: ignore[import-not-found]  # Python 3.9-3.11
except ImportError:
    try:  # Python 3.12+ renamed it; by name, since checkers running on 3.11 do not know it
        _sha256 = __import__("_sha2").sha256
    except ImportError:  # pragma: no cover - depends on how CPython was built
        from hashlib import sha256 as _sha256

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs import time on the CLI's hot path; annotations are strings.
    import subprocess
    import threading
    from typing import (  # novermin: TypeGuard is 3.10+, read by checkers only (never imported)
        Any,
        Callable,
        Dict,
        Iterable,
        List,
        Optional,
        Tuple,
        TypeGuard,
    )

if TYPE_CHECKING:
    import fcntl
    import json
    import socket
else:

    class _LazyModule:
        """A module imported on first use. A warm ``call`` needs neither ``json`` (it imports
        ``re`` and compiles patterns) nor ``socket`` (it builds enums): milliseconds each; nor
        ``fcntl``, whose locks guard only starting and stopping (a shared library to load)."""

        def __init__(self, name: str) -> None:
            self.name = name

        def __getattr__(self, attr: str) -> Any:
            module = __import__(self.name)
            globals()[self.name] = module  # later lookups skip this proxy
            return getattr(module, attr)

    fcntl = _LazyModule("fcntl")  # POSIX only: on Windows every command says why it cannot run
    json = _LazyModule("json")
    socket = _LazyModule("socket")

__version__ = "0.1.0"

__all__ = [
    # -- the vendorable core (everything above the "core ends here" line); the MCP part below
    # that line adds its own names --
    # errors
    "DaemonError",
    "UsageError",
    "ConfigError",
    "UnsafePathError",
    "DaemonTimeout",
    "LockTimeout",
    "TransportError",
    "DaemonStartError",
    "RemoteError",
    "HandlerError",
    # paths: the application the core serves (its name, env prefix, state dir) and its files
    "DaemonApp",
    "use_app",
    "DaemonPaths",
    "state_base_dir",
    "ensure_private_dir",
    # wire protocol
    "DAEMON_PROTOCOL_VERSION",
    "exchange",
    "encode_answer",
    # metadata and locks
    "read_metadata",
    "write_metadata",
    "validate_metadata",
    "remove_metadata_if_owned",
    "FileLock",
    # process identity
    "pid_alive",
    "process_start_time",
    "process_stopped",
    "is_our_pid",
    "terminate_process",
    "terminate_daemon_tree",
    "end_server_group",
    "leaderless_group_is_ours",
    "RecordedDaemon",
    # the host: for the caller, DaemonHost(paths, fingerprint, handlers).run(); to override,
    # its hooks (status_extra, metadata_extra, on_tick, on_shutdown) and the handlers
    "DaemonHost",
    "DaemonLog",
    "RequestContext",
    "ProbeResult",
    "probe_live_daemon",
    "plan_takeover",
    "status_matches",
    # the client: ensure(), request(), stop()
    "DaemonClient",
    "__version__",
]


# ##########################################################################################
# Constants and errors: the core's tunable numbers and every error type the core raises.
# ##########################################################################################

DAEMON_PROTOCOL_VERSION = 2

# Production waits. Every timeout, grace period and interval the lifecycle sits out is a named
# constant in a constants block (this one; the layer below the core's end line has its own), and
# the ones tests would sit out are written ``_wait(production, shortest)``. One private setting
# shortens them for tests: the environment variable DAEMON_TEST_WAIT_SCALE, a factor in (0, 1]
# read once at import and inherited by every daemon and server a test launches. It multiplies
# each such wait, never below its ``shortest``: the least that still holds on a loaded machine.
# Unset, every wait is its production value. Waits that judge whether a process is alive or
# answering (the probe timeout, the start-up budget, call timeouts, the client's idle budget)
# are never shortened: a short one could make a healthy but busy daemon look hung.


def _wait_scale() -> float:
    raw = os.environ.get("DAEMON_TEST_WAIT_SCALE", "").strip()
    try:
        value = float(raw)
    except ValueError:
        return 1.0
    return value if 0.0 < value <= 1.0 else 1.0


_WAIT_SCALE = _wait_scale()


def _wait(production: float, shortest: float) -> float:
    """A production wait under the tests' scale, never below ``shortest`` (nor above itself)."""
    return max(production * _WAIT_SCALE, min(shortest, production))


_DEFAULT_PROBE_TIMEOUT = 2.0  # the application's <prefix>PROBE_TIMEOUT_MS overrides (DaemonApp)

_DEFAULT_IDLE_BUDGET = 10.0  # client gives up on a daemon silent this long (progress resets it)

_PROGRESS_CADENCES_MS = (25, 50, 100, 250)

_CLIENT_PROGRESS_MS = 250

_MAX_REQUEST_BYTES = 32 * 1024 * 1024

_RECV_CHUNK = 65536  # a large frame is read 1 MiB at a time once it proves large

_SEND_CHUNK = 1024 * 1024  # a large frame is encoded and sent this much at a time (bounded RSS)

_SEND_IDLE = _wait(5.0, 3.0)  # a reader taking no bytes this long is dropped, however large the frame

_MAX_PENDING_BYTES = 64 * 1024 * 1024  # all half-read requests together, so abuse stays bounded

_MAX_CONNECTIONS = 512

# Past the cap, one thread reads each connection's request line (control requests are small)
# and answers `status` and `stop` as always, anything else `busy`; past this many more, the
# accept path answers `busy` at once. Neither is ever a silent close: a prober takes that for
# death.
_MAX_OVERFLOW = 512

_OVERFLOW_READ_DEADLINE = 2.0  # a connection past the cap must send its request within this

_SMALL_REQUEST_BYTES = 16 * 1024  # a request this small (every control request) is always read

_BUSY_RETRY_MAX = 0.25  # a client answered `busy` tries again after at most this long

_SPARE_WORKERS = 4  # idle threads kept to serve the next connections without a thread start

_REQUEST_READ_DEADLINE = _wait(10.0, 3.0)  # a client must deliver its request line within this

_LOCK_TIMEOUT = 60.0

_START_SLOW_NOTICE = 5.0

_START_GIVE_UP = 45.0

_STOP_WAIT = _wait(5.0, 3.0)  # a stopping daemon drains, then closes its servers: above the two

_TERM_GRACE = _wait(1.0, 0.5)

_KILL_WAIT = 2.0  # after SIGKILL, for the process (or group) to go; then for a leader's reap

_PS_TIMEOUT = 5.0  # a ps that takes longer gives no process facts (so nothing is signalled)

_CALLER_CHECK_INTERVAL = 0.25  # the host looks this often whether a request's caller went away
_CANCEL_GRACE = _wait(5.0, 1.0)  # a cancelled handler gets this long before its thread is let go

_SOCKET_CHECK_INTERVAL = _wait(1.0, 0.25)  # the housekeeping tick: socket, metadata, idle, pings

_DRAIN_WAIT = _wait(2.0, 1.0)  # a stopping daemon's work in flight gets this long before the hook closes all

_DRAIN_AFTER_CLOSE = _wait(1.0, 0.5)  # then the answers still owed get this long to go out

_STOPPING_WAIT = _wait(15.0, 6.0)  # a stopping daemon gets this long to close its servers, then is ended

_ACCEPT_BACKOFF_MAX = 1.0  # out of fds: retry accept() no faster than this, instead of spinning

# Shutdown reasons, as logged ("shutting down: <reason>"). A `stop` request's files go without
# the bind lock (its stopper waits for our exit); every other reason takes the lock first.
_STOP_REQUEST = "stop request"
_STOP_SIGNAL = "signal"  # followed by the signal number
_STOP_IDLE = "idle"  # followed by "for <timeout>s"
_STOP_SOCKET_LOST = "socket path lost (removed or replaced)"
_STOP_LOOP_ENDED = "serving loop ended"

# What a `status` probe of the socket found (``ProbeResult.kind``, ``plan_takeover``'s input).
_PROBE_LIVE = "live"  # answers for this socket path, its pid alive
_PROBE_STOPPING = "stopping"  # answers "shutting down" with a live pid
_PROBE_SILENT = "silent"  # no answer within the probe timeout: maybe only slow
_PROBE_SILENT_TWICE = "silent-twice"  # the second, longer probe got no answer either
_PROBE_BUSY = "busy"  # answered `busy`: at its caps, so alive but slow
_PROBE_CLOSED = "closed"  # accepted and closed without a word (an older daemon at its cap does)
_PROBE_BUSY_TWICE = "busy-twice"  # a second probe after busy or closed got no answer either
_PROBE_DEAD = "dead"  # refused, no socket, an error answer, another path, or a dead pid

# The bind guard's plans (``plan_takeover``); the daemon log names the one taken ("bound …").
_PLAN_RECONCILE = "reconcile"
_PLAN_STOP_THEN_BIND = "stop-then-bind"
_PLAN_WAIT_THEN_BIND = "wait-then-bind"
_PLAN_TERMINATE_THEN_BIND = "terminate-then-bind"
_PLAN_PROBE_AGAIN = "probe-again"
_PLAN_LEAVE = "leave"  # alive but busy: neither bind nor terminate; report it as the daemon
_PLAN_BIND = "bind"

# What to do once a stop has waited out its time (``plan_stop_escalation``).
_ESCALATE_STOPPED = "stopped"
_ESCALATE_TERMINATE = "terminate"
_ESCALATE_STILL_STOPPING = "still-stopping"
_ESCALATE_REFUSE = "refuse"

_LOG_ROTATE_BYTES = 10 * 1024 * 1024


class DaemonError(Exception):
    """Root of every error this module raises; ``exit_code`` is what the CLI exits with.

    ``code`` names it in an error frame; ``rpc_code`` and ``data`` are a JSON-RPC error's
    own, when a server behind a handler answered with one."""

    exit_code = 1
    code = "runtime_error"
    rpc_code: Optional[int] = None
    data: Any = None

    def __init__(
        self, *args: Any, code: Optional[str] = None, rpc_code: Any = None, data: Any = None
    ) -> None:
        super().__init__(*args)
        # Set here only, so each subclass names its code without redefining the attribute.
        if code is not None:
            self.code = code
        if rpc_code is not None:
            self.rpc_code = _rpc_code(rpc_code)
        if data is not None:
            self.data = data


def _rpc_code(value: Any) -> Optional[int]:
    """A JSON-RPC error code, or None for anything that is not one (JSON-RPC codes are integers)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class UsageError(DaemonError):
    """The command line is wrong."""

    exit_code = 2


class ConfigError(DaemonError, ValueError):
    """The configuration cannot be read, parsed or used."""

    exit_code = 2


class UnsafePathError(DaemonError, PermissionError):
    """A state directory or socket path is unsafe or unusable."""

    exit_code = 2


class DaemonTimeout(DaemonError, TimeoutError):
    """Something did not happen within its deadline."""


class LockTimeout(DaemonTimeout):
    """A lock stayed held by another process past the bounded wait."""


class TransportError(DaemonError, ConnectionError):
    """The daemon could not be reached, or hung up without an answer."""


class _NotDelivered(TransportError):
    """The request never reached a daemon (refused, no socket, send failed): safe to send again.
    Any other TransportError came after the request was sent, when its handler may have run."""


class _HungUp(TransportError):
    """The daemon accepted the connection and closed it without a frame. A prober must not
    read that as death: an older daemon at its connection cap does exactly this."""


class _HungUpUnread(_NotDelivered, _HungUp):
    """Closed (or reset) before it read the request: never delivered, and a hang-up."""


class DaemonStartError(DaemonError):
    """A launched daemon exited before it became ready; the message is its own error."""


class RemoteError(DaemonError):
    """The daemon answered ``ok: false``; ``code`` is its error code. It exits 2 when the
    application names that code a usage error (``DaemonApp.usage_codes``), else 1."""

    def __init__(self, message: str, code: str = "error", rpc_code: Any = None, data: Any = None) -> None:
        super().__init__(message, code=code, rpc_code=rpc_code, data=data)


def _require_posix() -> None:
    if os.name != "posix" or not hasattr(_socket, "AF_UNIX"):
        raise DaemonError("this program needs a POSIX system (fcntl and AF_UNIX sockets)")


def _env_seconds(name: str, default: float) -> float:
    """A millisecond environment override, as seconds; junk falls back to the default."""
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) / 1000.0
    except ValueError:
        return default
    return value if value > 0 else default


def _now_ms() -> int:
    return int(time.time() * 1000)


# ##########################################################################################
# Paths: where a daemon's files live, their safety checks, and the script's own identity.
# ##########################################################################################


def _sun_path_limit() -> int:
    """Usable AF_UNIX path bytes (the NUL excluded): 107 on Linux, 103 on macOS/BSD."""
    return 107 if sys.platform.startswith("linux") else 103


class DaemonApp:
    """The application the core serves, as far as the core must know it; the core itself
    assumes none of it. A vendoring program names its own (``use_app``, or ``app=`` for one
    ``DaemonPaths``); until then the neutral default below applies.

    - ``name`` starts the application's error lines (``<name>: …``): a launched daemon's
      own error is shown without it;
    - ``env_prefix`` names its environment overrides: ``<prefix>DIR`` (the state directory)
      and ``<prefix>PROBE_TIMEOUT_MS``; empty, none are read;
    - ``xdg_state_dir`` is its state directory under ``$XDG_STATE_HOME`` when that is set,
      ``home_state_dir`` under the home directory otherwise;
    - ``tmp_dir`` names its directory in /tmp (``/tmp/<tmp_dir>-<uid>``) for socket paths
      too long for AF_UNIX;
    - ``usage_codes`` are the error codes its handlers answer for a usage or configuration
      problem: a client's RemoteError with one of them exits 2.
    """

    __slots__ = ("name", "env_prefix", "xdg_state_dir", "home_state_dir", "tmp_dir", "usage_codes")

    def __init__(
        self,
        name: str,
        env_prefix: str = "",
        *,
        xdg_state_dir: Optional[str] = None,
        home_state_dir: Optional[str] = None,
        tmp_dir: Optional[str] = None,
        usage_codes: Iterable[str] = (),
    ) -> None:
        self.name = name
        self.env_prefix = env_prefix
        self.xdg_state_dir = xdg_state_dir or name
        self.home_state_dir = home_state_dir or os.path.join(".local", "state", name)
        self.tmp_dir = tmp_dir or name
        self.usage_codes = frozenset(usage_codes)

    def env(self, suffix: str) -> Optional[str]:
        """The application's ``<prefix><suffix>`` environment variable (None without a prefix)."""
        return os.environ.get(self.env_prefix + suffix) if self.env_prefix else None

    def env_seconds(self, suffix: str, default: float) -> float:
        """A millisecond override ``<prefix><suffix>``, as seconds; unset or junk: ``default``."""
        return _env_seconds(self.env_prefix + suffix, default) if self.env_prefix else default

    def state_dir(self) -> str:
        """``<prefix>DIR``, else ``$XDG_STATE_HOME/<xdg_state_dir>``, else ``~/<home_state_dir>``."""
        explicit = self.env("DIR")
        if explicit:
            return os.path.abspath(os.path.expanduser(explicit))
        xdg = os.environ.get("XDG_STATE_HOME")
        if xdg:
            return os.path.join(os.path.abspath(xdg), self.xdg_state_dir)
        return os.path.join(os.path.expanduser("~"), self.home_state_dir)


_APP = DaemonApp("daemon")


def use_app(app: DaemonApp) -> None:
    """Make ``app`` the application every ``DaemonPaths`` made without ``app=`` serves."""
    global _APP
    _APP = app


def state_base_dir(app: Optional[DaemonApp] = None) -> str:
    """The default state directory of ``app`` (of the current one: ``use_app``)."""
    return (app or _APP).state_dir()


def ensure_private_dir(path: str, refuse_symlink: bool = False) -> str:
    """Create ``path`` (and its missing parents) 0700 if missing; refuse one not owned by us,
    writable by others, or that we cannot write.

    ``refuse_symlink`` is for directories in a shared place such as /tmp, where anyone may
    plant a link to a directory of ours before we create it (tmux checks with lstat too)."""
    try:
        _make_private_dirs(path)
        st = os.lstat(path) if refuse_symlink else os.stat(path)
    except FileExistsError:
        raise UnsafePathError(f"state path {path} exists and is not a directory") from None
    except OSError as exc:
        raise UnsafePathError(f"cannot create state directory {path}: {exc.strerror}") from exc
    _check_private_dir(path, st)
    _check_writable_dir(path, st)
    return path


def _make_private_dirs(path: str) -> None:
    """``os.makedirs`` whose every created directory is 0700 whatever the umask: a parent
    that also holds config files, made 0777 under umask 000, would let any user plant one."""
    head, tail = os.path.split(path)
    if not tail:
        head, tail = os.path.split(head)
    if head and tail and not os.path.exists(head):
        _make_private_dirs(head)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return
    # The umask may have taken bits away (or left them: 0700 & ~000); set exactly 0700, on
    # the directory just made (no symlink swapped in meanwhile is followed).
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _check_private_dir(path: str, st: os.stat_result) -> None:
    """Refuse a state directory that is a link (``st`` from lstat), not a directory, not
    ours, or writable by group or others: whoever could write it could plant a record."""
    import stat as _stat

    if _stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"state path {path} is a symbolic link; refusing to use it")
    if not _stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"state path {path} is not a directory")
    if st.st_uid != os.getuid():
        raise UnsafePathError(
            f"state directory {path} is owned by uid {st.st_uid}, not you (uid {os.getuid()}); "
            "refusing to use it"
        )
    if st.st_mode & 0o022:
        raise UnsafePathError(
            f"state directory {path} has mode {st.st_mode & 0o777:04o} (writable by group or "
            f"others); run: chmod 700 {path}"
        )


def _check_writable_dir(path: str, st: os.stat_result) -> None:
    """A state directory we cannot write fails here, in one line naming it and why, rather
    than later at whichever file is made first."""
    if os.access(path, os.W_OK | os.X_OK):
        return
    try:
        read_only_fs = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only_fs = False
    if read_only_fs:
        raise UnsafePathError(f"state directory {path} is on a read-only file system")
    raise UnsafePathError(
        f"state directory {path} is read-only for you (mode {st.st_mode & 0o777:04o}); run: chmod 700 {path}"
    )


def _fallback_socket_dir(app: DaemonApp) -> str:
    # Not $TMPDIR: launchd, shells and IDEs each see a different one.
    return f"/tmp/{app.tmp_dir}-{os.getuid()}"


def _fallback_key(base_dir: str, key: str) -> str:
    """The fallback socket's name: one /tmp directory serves every state dir, and two state
    dirs with the same config must never share (adopt, or stop) one daemon."""
    raw = os.fsencode(os.path.abspath(base_dir)) + b"\0" + os.fsencode(key)
    return _sha1(raw).hexdigest()[:16]


def _socket_path_fits(path: str) -> bool:
    return len(os.fsencode(path)) <= _sun_path_limit()


class DaemonPaths:
    """Every file of one daemon: socket, metadata, spawn lock, bind lock and log.

    ``base_dir`` is kept resolved (symlinks followed): two spellings of one directory name
    one socket, so callers that spell it differently share one daemon instead of each taking
    the other's for a stranger's and replacing it."""

    __slots__ = ("base_dir", "key", "socket", "metadata", "lock", "bind", "log", "app", "_preferred")

    def __init__(self, base_dir: str, key: str, app: Optional[DaemonApp] = None) -> None:
        self.app = app or _APP
        self.base_dir = base_dir = os.path.realpath(base_dir)
        self.key = key
        stem = os.path.join(base_dir, f"daemon-{key}")
        self.metadata = stem + ".json"
        self.lock = stem + ".lock"
        self.bind = stem + ".bind"
        self.log = stem + ".log"
        self.socket = self._preferred = stem + ".sock"
        if not _socket_path_fits(self.socket):
            fallback = _fallback_socket_dir(self.app)
            self.socket = os.path.join(fallback, f"{_fallback_key(base_dir, key)}.sock")

    @classmethod
    def for_key(
        cls, key: str, base_dir: Optional[str] = None, app: Optional[DaemonApp] = None
    ) -> DaemonPaths:
        """Paths for a caller-chosen key (vendoring: one key per singleton)."""
        return cls(base_dir or state_base_dir(app), key, app)

    @classmethod
    def for_config(
        cls, config_path: str, base_dir: Optional[str] = None, app: Optional[DaemonApp] = None
    ) -> DaemonPaths:
        """Paths for the daemon that serves ``config_path`` (key: 12 hex of its sha1)."""
        # fsencode: a path is bytes, and a non-UTF-8 one arrives surrogate-escaped.
        key = _sha1(os.fsencode(os.path.abspath(config_path))).hexdigest()[:12]
        return cls.for_key(key, base_dir, app)

    def prepare(self) -> DaemonPaths:
        """Create and safety-check the directories; fail clearly when the socket cannot fit."""
        ensure_private_dir(self.base_dir)
        if self.socket == self._preferred:
            return self
        too_long = self._too_long()
        if not _socket_path_fits(self.socket):
            raise UnsafePathError(
                f"{too_long}, and so is the fallback {self.socket}; use a shorter key or directory"
            )
        try:
            ensure_private_dir(os.path.dirname(self.socket), refuse_symlink=True)
        except UnsafePathError as exc:
            raise UnsafePathError(f"{too_long}, and the fallback is unusable: {exc}") from None
        return self

    def _too_long(self) -> str:
        return (
            f"socket path {self._preferred} is {len(os.fsencode(self._preferred))} bytes, over "
            f"this system's AF_UNIX limit of {_sun_path_limit()}"
        )

    def check(self) -> bool:
        """``prepare``'s safety checks on the directories that exist, creating nothing: a
        record is read, and a pid it names perhaps signalled, only from a directory that
        passes them (UnsafePathError otherwise). False when there is no state directory,
        so no record either."""
        try:
            st = os.stat(self.base_dir)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise UnsafePathError(f"cannot use state directory {self.base_dir}: {exc.strerror}") from None
        _check_private_dir(self.base_dir, st)
        if self.socket != self._preferred:
            fallback = os.path.dirname(self.socket)
            try:
                _check_private_dir(fallback, os.lstat(fallback))
            except FileNotFoundError:
                pass
            except (OSError, UnsafePathError) as exc:
                raise UnsafePathError(f"{self._too_long()}, and the fallback is unusable: {exc}") from None
        return True

    def __repr__(self) -> str:
        return f"DaemonPaths(socket={self.socket!r}, metadata={self.metadata!r})"


_SCRIPT_DIGEST: List[str] = []
_SCRIPT_FILE: List[List[int]] = []  # the identity of the file hashed, when safe to vouch for
_SCRIPT_OTHER: List[List[int]] = []  # an identity found to hold other bytes than ours
# A file changed this recently may change again within one tick of its filesystem's clock and
# keep its ctime (1 s on some filesystems; git calls such an index entry "racily clean").
_SCRIPT_RACY_SECONDS = 2.0


def _file_identity(st: os.stat_result) -> List[int]:
    """What changes whenever a file's bytes do: ctime is set by the kernel on every write and
    cannot be set back by its owner (git's index trusts it the same way)."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _changed_lately(identity: List[int], now_ns: int) -> bool:
    """Whether a file (its ``_file_identity``) changed too recently to vouch for: its ctime
    is within the racy window of ``now_ns``."""
    return identity[4] >= now_ns - int(_SCRIPT_RACY_SECONDS * 1e9)


def _hash_script() -> Tuple[str, Optional[List[int]]]:
    """(this file's digest, its identity when safe to vouch for: unchanged while it was read,
    and not changed so recently that it could change again unseen). OSError when unreadable."""
    with open(os.path.abspath(__file__), "rb") as fh:
        now = time.time_ns()
        before = _file_identity(os.fstat(fh.fileno()))
        digest = _sha256(fh.read()).hexdigest()[:12]
        settled = before == _file_identity(os.fstat(fh.fileno())) and not _changed_lately(before, now)
    return digest, before if settled else None


def _script_version() -> str:
    """``__version__`` plus a digest of this file, so an edited script is a new identity."""
    if not _SCRIPT_DIGEST:
        try:
            digest, identity = _hash_script()
        except OSError:
            digest, identity = "unknown", None
        if identity is not None:
            _SCRIPT_FILE.append(identity)
        _SCRIPT_DIGEST.append(f"{__version__}+{digest}")
    return _SCRIPT_DIGEST[0]


def _vouch_for_script_now() -> bool:
    """True when the record is to name this file's identity anew. Without it every client
    would hash the file for the daemon's whole life: after a start within seconds of a write
    (an upgrade by copy, then a call), or once the file is rewritten with the same bytes (a
    reinstall, a checkout). A host calls it each tick: a ``stat``, and a hash only for a
    settled identity not yet seen (one holding other bytes is remembered, never vouched for)."""
    if not _SCRIPT_DIGEST or _SCRIPT_DIGEST[0].endswith("+unknown"):
        return False
    try:
        identity = _file_identity(os.stat(os.path.abspath(__file__)))
        seen = identity in _SCRIPT_FILE or identity in _SCRIPT_OTHER
        if seen or _changed_lately(identity, time.time_ns()):
            return False
        digest, settled = _hash_script()
    except OSError:
        return False
    if settled is None:
        return False
    if _SCRIPT_DIGEST[0] != f"{__version__}+{digest}":
        _SCRIPT_OTHER[:] = [settled]  # other bytes than we run: clients will see it is stale
        return False
    _SCRIPT_FILE[:] = [settled]
    return True


def _adopt_script_version(record: Any) -> bool:
    """Take a daemon's recorded ``scriptVersion`` as this script's own, without hashing it,
    when the record's ``scriptFile`` is this file's identity now: the daemon hashed these very
    bytes. ``record`` must come from a checked state directory. True when adopted."""
    if _SCRIPT_DIGEST or not isinstance(record, dict):
        return False
    version, identity = record.get("scriptVersion"), record.get("scriptFile")
    if not isinstance(version, str) or not version.startswith(f"{__version__}+") or not identity:
        return False
    try:
        if identity != _file_identity(os.stat(os.path.abspath(__file__))):
            return False
    except OSError:
        return False
    _SCRIPT_DIGEST.append(version)
    return True


# ##########################################################################################
# Wire protocol: newline-delimited JSON frames, one request per connection (mcporter v2).
# ##########################################################################################


try:  # json's C half: what json.loads and json.dumps run, without the patterns json compiles
    import _json
except ImportError:  # pragma: no cover - a build without the accelerator
    _json = None  # type: ignore[assignment]


class _JsonDefaults:
    """The settings ``json.loads`` gives its C scanner by default (the scanner reads these)."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__


_JSON_SCAN: Any = getattr(_json, "make_scanner", None)
_JSON_SCAN = _JSON_SCAN and _JSON_SCAN(_JsonDefaults())
_JSON_ENCODER: Any = getattr(_json, "make_encoder", None)
_JSON_ASCII: Any = getattr(_json, "encode_basestring_ascii", None)


def _json_loads(data: Any) -> Any:
    """``json.loads(data)``: the same C scanner json.loads runs, called directly, so the hot
    path need not import json. Anything it does not take whole (errors included) goes to
    json.loads itself, which gives the value or the error json always gives."""
    if _JSON_SCAN:
        try:
            text = data.decode("utf-8", "surrogatepass") if isinstance(data, (bytes, bytearray)) else data
            text = text.strip(" \t\n\r")  # JSON's white space, as json.loads skips it
            value, end = _JSON_SCAN(text, 0)
            if end == len(text):
                return value
        except Exception:
            pass
    return json.loads(data)


def _unencodable(value: Any) -> Any:
    raise TypeError(type(value).__name__)


def _json_compact(obj: Any) -> str:
    """``json.dumps(obj, separators=(",", ":"), ensure_ascii=True)`` through the same C
    encoder, called directly; on any error json.dumps runs, to raise exactly its error."""
    if _JSON_ENCODER and _JSON_ASCII:
        try:
            # (markers for the circular check, default, string encoder, indent, the
            # separators, sort_keys, skipkeys, allow_nan): json.dumps's own arguments
            encode = _JSON_ENCODER({}, _unencodable, _JSON_ASCII, None, ":", ",", False, False, True)
            return "".join(encode(obj, 0))
        except Exception:
            pass
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)


def encode_frame(obj: Dict[str, Any]) -> bytes:
    # ASCII-safe: a lone surrogate (JS servers cut strings mid-pair) has no UTF-8 encoding.
    return (_json_compact(obj) + "\n").encode("ascii")


def encode_answer_pieces(frame: Dict[str, Any], large: Optional[bool] = None) -> Iterable[bytes]:
    """``encode_answer`` in pieces of at most about ``_SEND_CHUNK`` bytes (newline included);
    ``large``: ``_looks_large(frame)`` when the caller has asked already."""
    if not (_looks_large(frame) if large is None else large):
        yield encode_answer(frame)
        return
    encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
    try:
        chunks = list(encoder.iterencode(frame))  # str pieces; the one big string stays one
    except (TypeError, ValueError, RecursionError):
        yield encode_answer(frame)
        return
    for chunk in chunks:
        for i in range(0, len(chunk), _SEND_CHUNK):
            yield chunk[i : i + _SEND_CHUNK].encode("ascii")
    yield b"\n"


def _looks_large(frame: Any, depth: int = 8) -> bool:
    """Whether an answer is worth streaming (and its memory returning): any string in it
    longer than a send piece, wherever a handler put it (bounded depth: cheap to ask). Level
    by level, without recursion: every answer is asked, `status` (40-odd values) included."""
    level = [frame]
    for _ in range(depth + 1):
        deeper: List[Any] = []
        for item in level:
            if isinstance(item, str):
                if len(item) > _SEND_CHUNK:
                    return True
            elif isinstance(item, dict):
                deeper.extend(item.values())
            elif isinstance(item, list):
                deeper.extend(item)
        if not deeper:
            return False
        level = deeper
    return False


def encode_answer(frame: Dict[str, Any]) -> bytes:
    """``frame`` encoded, or an error frame naming why it cannot be: every caller gets an answer."""
    try:
        return encode_frame(frame)
    except (TypeError, ValueError, RecursionError) as exc:
        problem = f"{type(exc).__name__}: {exc}"[:300]
        return encode_frame(
            _error_frame(
                frame.get("id"), f"the result cannot be sent as JSON ({problem})", "unencodable_result"
            )
        )


def progress_cadence_ms(requested: Any) -> Optional[int]:
    """The fixed cadence for a request's progressIntervalMs: the largest step not above it."""
    if isinstance(requested, bool) or not isinstance(requested, (int, float)) or requested <= 0:
        return None
    fitting = [c for c in _PROGRESS_CADENCES_MS if c <= requested]
    return fitting[-1] if fitting else _PROGRESS_CADENCES_MS[0]


def progress_update(params: Any) -> Optional[Dict[str, Any]]:
    """The progress, total and message of a progress report (a frame's, or a server's
    notification), or None when malformed."""
    if not isinstance(params, dict):
        return None
    progress = params.get("progress")
    if not _finite_number(progress):
        return None
    update: Dict[str, Any] = {"progress": progress}
    total = params.get("total")
    if _finite_number(total):
        update["total"] = total
    if isinstance(params.get("message"), str):
        update["message"] = params["message"]
    if params.get("phase") in ("starting", "started"):  # a kept server's start-up, from the daemon
        update["phase"] = params["phase"]
    return update


def _finite_number(value: Any) -> bool:
    # Python's json reads NaN and Infinity; neither is a progress value (nor valid JSON). The
    # difference test spares the CLI importing math: it is NaN for both, 0 for any finite value.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value - value == 0


class _FrameTooLarge(Exception):
    pass


def _read_line(
    sock: _socket.socket,
    limit: int,
    buf: bytearray,
    deadline: Optional[float] = None,
    idle: Optional[float] = None,
) -> Optional[bytes]:
    """One ``\\n``-terminated line from ``sock``; None on EOF before a full line.

    ``buf`` carries bytes past the line to the next call. The socket's own timeout (or
    ``idle``) is the idle budget between chunks; ``deadline`` (monotonic) bounds the whole line.
    """
    scanned = 0  # bytes already searched for a newline: rescanning them would be quadratic
    while True:
        nl = buf.find(b"\n", scanned)
        if nl >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            return line
        scanned = len(buf)
        if len(buf) > limit:
            raise _FrameTooLarge()
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _socket.timeout("request line deadline passed")
            sock.settimeout(min(left, idle) if idle else left)
        chunk = sock.recv(_RECV_CHUNK if len(buf) < _RECV_CHUNK else _RECV_CHUNK * 16)
        if not chunk:
            return None
        buf += chunk


def exchange(
    socket_path: str,
    request: Dict[str, Any],
    idle_timeout: float,
    connect_timeout: Optional[float] = None,
    overall_timeout: Optional[float] = None,
    on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
    start_budget: float = 0.0,
    on_socket: Optional[Callable[[_socket.socket], None]] = None,
) -> Dict[str, Any]:
    """Send one request, return the response frame; a server's progress in a progress frame
    goes to ``on_progress``. ``on_socket`` gets the connection first (to cut it from another
    thread with ``shutdown``: the daemon hears its caller gone and cancels the work).

    ``idle_timeout`` is an idle budget: every frame (progress included) resets it, so a long
    call stays alive while a silent (hung) daemon still trips it. ``overall_timeout`` bounds
    the whole wait, progress or not, plus ``start_budget`` once the daemon reports that the
    work waits for its backend to start (phase "starting"). _NotDelivered when the request
    never reached a daemon.
    """
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        if on_socket is not None:
            on_socket(sock)
        try:
            _connect(sock, socket_path, connect_timeout or idle_timeout)
        except _socket.timeout:
            raise DaemonTimeout(f"daemon at {socket_path} did not accept a connection") from None
        except OSError as exc:
            raise _NotDelivered(f"cannot connect to {socket_path}: {exc.strerror or exc}") from None
        sock.settimeout(idle_timeout)
        deadline = time.monotonic() + overall_timeout if overall_timeout else None
        return _send_and_receive(
            sock, socket_path, request, idle_timeout, deadline, on_progress, start_budget
        )
    finally:
        sock.close()


def _connect(sock: _socket.socket, path: str, timeout: float) -> None:
    """Connect within ``timeout``. A full listen queue answers EAGAIN at once on a socket with
    a timeout; wait for room instead, since the queue drains as the daemon accepts."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    sock.settimeout(timeout)
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise _socket.timeout("listen queue stayed full") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.02)


def _send_and_receive(
    sock: _socket.socket,
    socket_path: str,
    request: Dict[str, Any],
    idle_timeout: float,
    deadline: Optional[float] = None,
    on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
    start_budget: float = 0.0,
) -> Dict[str, Any]:
    buf = bytearray()
    frames = 0
    try:
        sock.sendall(encode_frame(request))
    except OSError as exc:
        # The daemon reads only whole lines, so a request not all sent never ran. A daemon
        # past all its caps answers `busy` at once and closes: that answer is the news.
        early = _answer_before_request(sock)
        if early is not None:
            return early
        raise _HungUpUnread(f"cannot send to {socket_path}: {exc.strerror or exc}") from None
    try:
        while True:
            line = _read_line(sock, _MAX_REQUEST_BYTES * 4, buf, deadline, idle_timeout)
            if line is None:
                if not buf.strip():
                    raise _HungUp(f"daemon at {socket_path} closed the connection without answering")
                # mcporter's own daemon ends its last frame with EOF instead of a newline.
                line, buf[:] = bytes(buf), b""
            frames += 1
            frame = _json_loads(line)
            if isinstance(frame, dict) and frame.get("type") == "progress":
                update = progress_update(frame.get("progress"))
                if update is not None and update.get("phase") == "starting" and deadline is not None:
                    deadline, start_budget = deadline + start_budget, 0.0  # once per request
                if on_progress is not None and update is not None:
                    _report_quietly(on_progress, update)
                continue
            if not isinstance(frame, dict) or "ok" not in frame:
                raise TransportError(f"daemon at {socket_path} sent a malformed frame")
            return frame
    except _socket.timeout:
        if deadline is not None and time.monotonic() >= deadline:
            raise DaemonTimeout(
                f"no answer from the daemon at {socket_path} within the call's time limit (still working)"
            ) from None
        raise DaemonTimeout(
            f"daemon at {socket_path} sent nothing for {idle_timeout:g}s (hung or overloaded)"
        ) from None
    except (ValueError, _FrameTooLarge):
        raise TransportError(f"daemon at {socket_path} sent a malformed frame") from None
    except DaemonError:
        raise  # TransportError is an OSError too; do not wrap our own message twice
    except ConnectionResetError:
        if frames or buf:
            raise TransportError(f"connection to {socket_path} was reset") from None
        # A reset, not EOF, before any frame: the kernel resets a connection whose peer closed
        # with our bytes unread (a listener closed with it still queued, a daemon killed before
        # it read the line), so the request never reached a handler.
        raise _HungUpUnread(f"daemon at {socket_path} closed without reading the request") from None
    except OSError as exc:
        raise TransportError(f"connection to {socket_path} failed: {exc.strerror or exc}") from None


def _answer_before_request(sock: _socket.socket) -> Optional[Dict[str, Any]]:
    """An error frame the daemon sent before it closed without reading our request, if any."""
    try:
        sock.setblocking(False)
        data = sock.recv(_RECV_CHUNK)
        frame = _json_loads(data.split(b"\n", 1)[0]) if data else None
    except (OSError, ValueError, RecursionError):
        return None
    return frame if isinstance(frame, dict) and frame.get("ok") is False else None


def _report_quietly(on_progress: Callable[[Dict[str, Any]], None], update: Dict[str, Any]) -> None:
    """Showing progress must never fail the call it is about."""
    try:
        on_progress(update)
    except Exception:
        pass


def result_or_raise(response: Dict[str, Any], usage_codes: Iterable[str] = ()) -> Any:
    """The result of an ``ok`` answer; else RemoteError, exiting 2 for a code in ``usage_codes``."""
    if response.get("ok"):
        return response.get("result")
    error = response.get("error") or {}
    code = str(error.get("code") or "error")
    exc = RemoteError(
        str(error.get("message") or "daemon error"), code, error.get("rpcCode"), error.get("data")
    )
    if code in usage_codes:
        exc.exit_code = 2
    raise exc


class _Busy(Exception):
    pass


def _more_pending(conn: socket.socket) -> bool:
    """True when more bytes are already waiting (the sender has not paused yet)."""
    timeout = conn.gettimeout()
    # On a socket with a timeout CPython polls for readability before recv, so MSG_DONTWAIT
    # alone would wait out the whole timeout (10 s for every newline-less mcporter request).
    conn.setblocking(False)
    try:
        return bool(conn.recv(1, socket.MSG_PEEK))
    except OSError:  # BlockingIOError: nothing waiting
        return False
    finally:
        conn.settimeout(timeout)


def _is_json(buf: bytearray) -> bool:
    try:
        json.loads(buf)
        return True
    except (ValueError, RecursionError):
        return False


def _error_frame(rid: Any, message: str, code: str) -> Dict[str, Any]:
    return {"id": rid, "ok": False, "error": {"message": message, "code": code}}


def _parse_request(raw: bytes) -> Tuple[Optional[Dict[str, Any]], Optional[Dict[str, Any]]]:
    """(request, None) or (None, error frame): bad JSON, shapes and types answered, not raised."""
    try:
        req = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        return None, _error_frame(None, "request is not valid JSON", "invalid_json")
    if not isinstance(req, dict):
        return None, _error_frame(None, "request must be a JSON object", "bad_request")
    rid = req.get("id")
    if isinstance(rid, (dict, list)):
        rid = None
    if not isinstance(req.get("method"), str):
        return None, _error_frame(rid, "request needs a string 'method'", "bad_request")
    params = req.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return None, _error_frame(rid, "'params' must be an object", "bad_request")
    version = req.get("protocolVersion")
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version > DAEMON_PROTOCOL_VERSION
    ):
        return None, _error_frame(rid, f"unsupported protocolVersion {version!r}", "bad_request")
    req["params"] = params
    req["id"] = rid
    return req, None


# ##########################################################################################
# Metadata and locks: the atomic metadata file and flock-based locks with bounded waits.
# ##########################################################################################


def read_metadata(path: str) -> Optional[Dict[str, Any]]:
    """The metadata at ``path``; unreadable, torn, corrupt or malformed metadata reads as absent."""
    try:
        with open(path, "rb") as fh:
            data = _json_loads(fh.read())
    except (OSError, ValueError):
        return None
    return validate_metadata(data)


def validate_metadata(data: Any) -> Optional[Dict[str, Any]]:
    """``data`` when it is a well-formed record, else None (free of I/O).

    Well-formed: ``pid`` an int > 0, ``pidStartTime`` a non-empty string, ``socketPath`` a
    string, ``servers`` a dict whose every entry has such a ``pid`` and ``pidStartTime``.
    A record with any malformed part is rejected whole rather than trimmed: readers then see
    no record, so nothing it names is trusted or signalled, and the serving daemon (which
    owns the socket) sees it absent and rewrites it within a housekeeping round.
    """
    if not isinstance(data, dict) or not _is_identity(data.get("pid"), data.get("pidStartTime")):
        return None
    if not isinstance(data.get("socketPath"), str):
        return None
    servers = data.get("servers")
    if not isinstance(servers, dict):
        return None
    for entry in servers.values():
        if not isinstance(entry, dict) or not _is_identity(entry.get("pid"), entry.get("pidStartTime")):
            return None
    return data


def _is_identity(pid: Any, start_time: Any) -> bool:
    return _is_pid(pid) and isinstance(start_time, str) and bool(start_time)


def _is_pid(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def write_metadata(path: str, data: Dict[str, Any]) -> None:
    """Write atomically: temp file in the same directory, fsync, rename over."""
    tmp = f"{path}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_metadata_if_owned(path: str, pid: int) -> bool:
    """Remove the metadata only when it names ``pid``; a successor's file is left alone."""
    meta = read_metadata(path)
    if meta is None or meta.get("pid") != pid:
        return False
    _unlink_quietly(path)
    return True


class FileLock:
    """An exclusive ``flock`` on its own file, with a bounded wait that names the holder.

    The kernel drops the lock when its holder dies, so there is never a stale lock to clean,
    and the file is never unlinked (that would split waiters across two inodes).
    """

    def __init__(self, path: str, timeout: float = _LOCK_TIMEOUT, what: str = "lock") -> None:
        self.path = path
        self.timeout = timeout
        self.what = what
        self._fd: Optional[int] = None

    def acquire(self, timeout: Optional[float] = None) -> bool:
        """Take the lock; False when ``timeout`` is 0 and it is held, else LockTimeout."""
        _require_posix()
        wait = self.timeout if timeout is None else timeout
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:  # a read-only or vanished directory: one line naming it
            raise UnsafePathError(f"cannot open the {self.what} {self.path}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + wait
        step = 0.002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self._holder(fd)
                    os.close(fd)
                    if wait <= 0:
                        return False
                    raise LockTimeout(
                        f"timed out after {wait:g}s waiting for the {self.what} {self.path}"
                        + (f" (held by pid {holder})" if holder else "")
                    ) from None
                time.sleep(step)
                step = min(step * 2, 0.01)
        self._fd = fd
        # Truncate only while holding the lock (filelock #591); the pid is for error messages.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return True

    @staticmethod
    def _holder(fd: int) -> Optional[int]:
        try:
            text = os.pread(fd, 32, 0).decode().strip()
            return int(text) if text else None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Drop the lock (a no-op when not held)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


# ##########################################################################################
# Process identity: is a pid alive, is it the process we recorded, and ending it safely.
# ##########################################################################################


def pid_alive(pid: int) -> bool:
    """Alive by ``kill(pid, 0)`` (EPERM counts: someone else's process) and not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return _process_info(pid)[1] != "Z"


def _linux_stat_fields(pid: Any) -> Optional[List[str]]:
    """/proc/<pid>/stat from field 3 (state) on, split after the last ')' (a name may hold one)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields if len(fields) >= 20 else None


def _linux_process_info(pid: int) -> Tuple[Optional[str], Optional[str]]:
    """(start time, state) from /proc/<pid>/stat: fields 22 and 3."""
    fields = _linux_stat_fields(pid)
    if fields is None:
        return None, None
    return fields[19], fields[0]


def _ps(*args: str) -> str:
    """``ps``'s output in the C locale and UTC, so its dates and columns parse the same
    everywhere; empty when ps cannot run (no process facts: nothing is signalled)."""
    import subprocess

    env = dict(os.environ, LC_ALL="C", TZ="UTC")
    try:
        return subprocess.run(
            ["ps", *args], capture_output=True, text=True, env=env, timeout=_PS_TIMEOUT
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _ps_process_info(pid: int) -> Tuple[Optional[str], Optional[str]]:
    """(start time, state) from ``ps`` (1 s resolution), for systems without /proc."""
    out = _ps("-o", "state=", "-o", "lstart=", "-p", str(pid)).strip()
    if not out:
        return None, None
    state, _, start = out.partition(" ")
    return " ".join(start.split()) or None, state[:1] or None


def _linux_group_members(pgid: int) -> List[Tuple[int, int, Optional[float]]]:
    """(pid, session id, start order) of each live (non-zombie) process in group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _linux_stat_fields(entry)
        if fields is not None and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append((int(entry), int(fields[3]), _linux_start_order(fields[19])))
    return members


def _ps_group_members(pgid: int) -> List[Tuple[int, int, Optional[float]]]:
    """The same from ``ps`` (``sess`` is the session id on the BSDs; lstart comes last: it has spaces)."""
    out = _ps("-A", "-o", "pid=", "-o", "pgid=", "-o", "sess=", "-o", "state=", "-o", "lstart=")
    members = []
    for line in out.splitlines():
        parts = line.split(None, 4)
        if len(parts) == 5 and parts[1] == str(pgid) and not parts[3].startswith("Z"):
            try:
                members.append((int(parts[0]), int(parts[2]), _ps_start_order(" ".join(parts[4].split()))))
            except ValueError:
                continue
    return members


def _linux_start_order(token: Any) -> Optional[float]:
    """A start time token as a number that orders processes by start (clock ticks since boot)."""
    try:
        return float(token)
    except (TypeError, ValueError):
        return None


def _ps_start_order(token: Any) -> Optional[float]:
    """ps's lstart (UTC, 1 s resolution) as epoch seconds."""
    import calendar

    try:
        return float(calendar.timegm(time.strptime(str(token), "%a %b %d %H:%M:%S %Y")))
    except ValueError:
        return None


def _linux_child_pids(pid: int) -> List[int]:
    """Direct children of ``pid`` (found before a kill, so reparenting cannot hide them)."""
    listed = (entry for entry in os.listdir("/proc") if entry.isdigit())
    return [int(e) for e in listed if (_linux_stat_fields(e) or ["", ""])[1] == str(pid)]


def _ps_child_pids(pid: int) -> List[int]:
    """The same from ``ps``."""
    rows = (ln.split() for ln in _ps("-A", "-o", "pid=", "-o", "ppid=").splitlines())
    return [int(row[0]) for row in rows if len(row) == 2 and row[1] == str(pid) and row[0].isdigit()]


# The one platform seam for process facts: Linux reads /proc, everything else asks ps.
_ON_PROC = os.path.exists("/proc/self/stat")

_process_info = _linux_process_info if _ON_PROC else _ps_process_info

_group_members = _linux_group_members if _ON_PROC else _ps_group_members

_start_order = _linux_start_order if _ON_PROC else _ps_start_order

_child_pids = _linux_child_pids if _ON_PROC else _ps_child_pids

# Exit checks that do not reap; macOS has os.waitid only from Python 3.13.
_HAS_WAITID = hasattr(os, "waitid") and hasattr(os, "WNOWAIT")


def process_start_time(pid: int) -> Optional[str]:
    """An opaque token that changes when ``pid`` is reused; None when the pid is gone."""
    return _process_info(pid)[0]


def process_stopped(pid: int) -> bool:
    """True when the OS reports ``pid`` stopped (SIGSTOP, state T): proof of a hang."""
    return _process_info(pid)[1] in ("T", "t")


def is_our_pid(pid: Any, start_time: Any) -> bool:
    """Alive and the very process recorded: same pid and same start time. Else never signal it."""
    if not _is_pid(pid) or not start_time:
        return False
    start, state = _process_info(pid)
    return start is not None and str(start) == str(start_time) and state != "Z"


def _signal(pid: int, sig: int, group: bool = False) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except OSError:
        pass


def _poll_until(done: Callable[[], bool], timeout: float) -> bool:
    """Ask ``done`` (backing off from 5 to 50 ms) until it is true or ``timeout`` passed;
    its last answer."""
    deadline = time.monotonic() + timeout
    step = 0.005
    while True:
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
        step = min(step * 2, 0.05)


def _wait_gone(pid: int, timeout: float, start_time: Optional[str] = None) -> bool:
    """Poll until ``pid`` is gone (or no longer the recorded process); True when it is."""
    return _poll_until(
        lambda: not pid_alive(pid) or (start_time is not None and not is_our_pid(pid, start_time)), timeout
    )


def _escalate(
    send: Callable[[int], None],
    ours: Callable[[], bool],
    gone: Callable[[], bool],
    grace: float,
    kill_wait: float = _KILL_WAIT,
) -> bool:
    """The one way anything is ended: SIGTERM (and SIGCONT: a stopped process handles it
    only once woken), ``grace`` to go, then SIGKILL and ``kill_wait``. ``send`` delivers a
    signal, each only while ``ours()`` still proves the target ours. True when ``gone()``."""
    import signal

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
        if gone() or not ours():
            break
        send(sig)
        if sig == signal.SIGTERM:
            send(signal.SIGCONT)
        if _poll_until(gone, wait):
            return True
    return gone()


def terminate_process(
    pid: int, start_time: Optional[str], grace: float = _TERM_GRACE, group: bool = False
) -> bool:
    """SIGTERM, SIGCONT, grace, SIGKILL — only while ``pid`` is verified ours. True when gone."""
    if not is_our_pid(pid, start_time):
        return not pid_alive(pid)  # not ours: never signalled, so gone only if already gone
    # A group is signalled only while the pid still leads it (it was spawned as leader).
    use_group = group and _safe_getpgid(pid) == pid
    return _escalate(
        lambda sig: _signal(pid, sig, use_group),
        lambda: is_our_pid(pid, start_time),
        lambda: not pid_alive(pid) or not is_our_pid(pid, start_time),
        grace,
    )


def _safe_getpgid(pid: int) -> Optional[int]:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def leaderless_group_is_ours(
    pgid: int,
    leader_start: Optional[float],
    leader_alive: bool,
    members: List[Tuple[int, int, Optional[float]]],
) -> bool:
    """May the survivors of a recorded server's group be ended without its leader?

    ``members`` are (pid, session id, start order) of the live processes in group ``pgid``.
    Only with proof they are that server's: its leader (pid ``pgid``) is gone — and Linux hands
    out no pid still in use as a group id, so no stranger took it — every member is in the
    session the server led (it was spawned with start_new_session) and none started before it.
    """
    if leader_alive or leader_start is None or not members:
        return False
    return all(sid == pgid and start is not None and start >= leader_start for _pid, sid, start in members)


def _end_leaderless_group(pgid: int, leader_start: Optional[str], grace: float) -> None:
    """SIGTERM, grace, SIGKILL what is left of a dead server's group, re-proving it each time."""
    order = _start_order(leader_start)
    _escalate(
        lambda sig: _signal(pgid, sig, group=True),
        lambda: leaderless_group_is_ours(pgid, order, pid_alive(pgid), _group_members(pgid)),
        lambda: not _group_members(pgid),
        grace,
        grace,
    )


def end_server_group(pid: Any, start_time: Any, grace: float = _TERM_GRACE) -> None:
    """End a recorded server (a child spawned as a group leader) and its whole process group,
    also when the leader already exited and left children behind."""
    if not _is_pid(pid) or not start_time:
        return
    if is_our_pid(pid, start_time):
        terminate_process(pid, str(start_time), grace, group=True)
    # The leader may go first (stdin EOF, or our SIGTERM) while a member ignores SIGTERM.
    _end_leaderless_group(pid, str(start_time), grace)


def _recorded_server_left(entry: Any) -> bool:
    """A metadata server record whose leader or group members still run."""
    if not isinstance(entry, dict) or not _is_pid(entry.get("pid")) or not entry.get("pidStartTime"):
        return False
    return is_our_pid(entry["pid"], entry["pidStartTime"]) or bool(_group_members(entry["pid"]))


def terminate_daemon_tree(
    pid: int, start_time: Optional[str], servers: Dict[str, Any], grace: float = _TERM_GRACE
) -> None:
    """End a verified-ours daemon and its servers (recorded ones and live children)."""
    victims: List[Tuple[int, Optional[str]]] = []
    for entry in (servers or {}).values():
        if _recorded_server_left(entry):
            victims.append((entry["pid"], str(entry["pidStartTime"])))
    if is_our_pid(pid, start_time):
        known = {v[0] for v in victims}
        for child in _child_pids(pid):
            if child not in known:
                victims.append((child, process_start_time(child)))
        terminate_process(pid, start_time, grace)
    for child, child_start in victims:
        end_server_group(child, child_start, grace)


class RecordedDaemon:
    """A daemon as its metadata records it, read once and validated: pid, start time, socket
    path and servers. It ends a process only while pid and start time prove it ours."""

    __slots__ = ("record", "pid", "start_time", "socket_path", "servers")

    def __init__(self, record: Dict[str, Any]) -> None:
        """``record`` is a validated metadata record (see ``validate_metadata``)."""
        self.record = record
        self.pid: int = record["pid"]
        self.start_time: str = record["pidStartTime"]
        self.socket_path: str = record["socketPath"]
        self.servers: Dict[str, Any] = record["servers"]

    @classmethod
    def read(cls, path: str) -> Optional[RecordedDaemon]:
        """The daemon the metadata at ``path`` records; None when absent, torn or malformed."""
        return cls.from_record(read_metadata(path))

    @classmethod
    def from_record(cls, data: Any) -> Optional[RecordedDaemon]:
        """The daemon ``data`` records, when it is a well-formed record; else None."""
        record = validate_metadata(data)
        return cls(record) if record is not None else None

    def is_ours(self) -> bool:
        """Alive and the very process recorded (same pid, same start time)."""
        return is_our_pid(self.pid, self.start_time)

    def is_stopped(self) -> bool:
        """The OS reports the recorded pid stopped (state T), whoever it is now."""
        return process_stopped(self.pid)

    def process_facts(self) -> Tuple[Optional[str], Optional[str]]:
        """(start time, state) the OS reports now for the recorded pid."""
        return _process_info(self.pid)

    def live_servers(self) -> List[Tuple[str, int, str]]:
        """(name, pid, start time) of each recorded server whose leader or group still runs."""
        entries = self.servers.items()
        return [(name, e["pid"], e["pidStartTime"]) for name, e in entries if _recorded_server_left(e)]

    def end_servers(self, on_each: Callable[[str, int], None] = lambda name, pid: None) -> None:
        """End the recorded servers still running (a dead daemon could not close them)."""
        for name, pid, start in self.live_servers():
            on_each(name, pid)
            end_server_group(pid, start, _TERM_GRACE)

    def terminate(self) -> None:
        """End the daemon (while still ours) and its servers: recorded ones and live children."""
        terminate_daemon_tree(self.pid, self.start_time, self.servers)


# ##########################################################################################
# Daemon host: bind guard, concurrent serving, housekeeping, ownership-checked shutdown.
# ##########################################################################################


def _log_prefix() -> str:
    """``<UTC time>Z [<pid>] ``; one clock read, so the milliseconds belong to the second."""
    seconds, millis = divmod(int(time.time() * 1000), 1000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{stamp}.{millis:03d}Z [{os.getpid()}] "


class DaemonLog:
    """Timestamped lines to a file (0600, rotated at 10 MB, one old file kept) or stderr."""

    def __init__(
        self, path: Optional[str] = None, verbose: bool = False, servers: Iterable[str] = ()
    ) -> None:
        import threading

        self.path = path
        self.verbose = verbose
        self.servers = frozenset(servers)
        self._lock = threading.Lock()
        self._fh: Any = None
        if path:
            self._open()

    def _open(self) -> None:
        assert self.path is not None
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise DaemonError(f"cannot open log file {self.path}: {exc.strerror}") from None
        os.fchmod(fd, 0o600)
        self._fh = os.fdopen(fd, "a", encoding="utf-8", errors="replace")

    def traces(self, server: str) -> bool:
        """Whether calls to ``server`` get a trace line."""
        return self.verbose or server in self.servers

    def event(self, message: str) -> None:
        """One lifecycle line, stamped with the time and our pid."""
        self.write(_log_prefix() + message)

    def write(self, line: str) -> None:
        """One raw line; a full disk or closed stream is ignored, never raised."""
        with self._lock:
            fh = self._fh or sys.stderr
            try:
                fh.write(line + "\n")
                fh.flush()
                if self._fh is not None and self._fh.tell() > _LOG_ROTATE_BYTES:
                    self._rotate()
            except (OSError, ValueError):
                pass  # a full disk must not take the daemon down

    def _rotate(self) -> None:
        assert self.path is not None
        old = self._fh
        os.replace(self.path, self.path + ".1")
        self._open()
        # When stderr is the log (a detached daemon), follow the rotation so tracebacks land too.
        try:
            if os.path.sameopenfile(old.fileno(), 2):
                os.dup2(self._fh.fileno(), 2)
        except OSError:
            pass
        old.close()


class RequestContext:
    """What a handler may use besides its params: ``notices`` reach the caller's stderr;
    ``report_progress`` puts the server's latest progress into the caller's progress frames;
    ``cancelled`` is set when the caller went away, so the work can stop (and tell its server)."""

    __slots__ = ("notices", "method", "cancelled", "progress")

    def __init__(self, method: str) -> None:
        import threading

        self.method = method
        self.notices: List[str] = []
        self.cancelled = threading.Event()
        self.progress: Optional[Dict[str, Any]] = None  # replaced whole: read without a lock

    def report_progress(self, update: Dict[str, Any]) -> None:
        """Record the latest progress; the host puts it in the caller's next progress frame."""
        self.progress = dict(update)


class HandlerError(DaemonError):
    """Raised by a handler to answer ``ok: false`` with a chosen code."""

    def __init__(self, message: str, code: str = "runtime_error") -> None:
        super().__init__(message, code=code)


class ProbeResult:
    """What a ``status`` probe of the socket found: live, stopping, silent (timeout) or dead."""

    __slots__ = ("kind", "status", "detail")

    def __init__(self, kind: str, status: Optional[Dict[str, Any]] = None, detail: str = "") -> None:
        self.kind = kind  # one of the _PROBE_ constants
        self.status = status or {}
        self.detail = detail

    @property
    def pid(self) -> Optional[int]:
        """The pid the answer named, when it is a valid one."""
        pid = self.status.get("pid")
        return pid if _is_pid(pid) else None


def _builtin_request(method: str, rid: str) -> Dict[str, Any]:
    """A request for a built-in method (``status``, ``stop``): no params, this protocol."""
    return {"id": rid, "method": method, "params": {}, "protocolVersion": DAEMON_PROTOCOL_VERSION}


def probe_live_daemon(socket_path: str, timeout: float) -> ProbeResult:
    """Live means: it answers ``status``, reports this socket path, and its pid is alive."""
    if not os.path.exists(socket_path):
        return ProbeResult(_PROBE_DEAD, detail="no socket file")
    try:
        response = exchange(socket_path, _builtin_request("status", "probe"), timeout)
    except DaemonTimeout:
        return ProbeResult(_PROBE_SILENT, detail=f"no answer within {timeout:g}s")
    except _HungUp as exc:
        return ProbeResult(_PROBE_CLOSED, detail=str(exc))
    except TransportError as exc:
        return ProbeResult(_PROBE_DEAD, detail=str(exc))
    status = response.get("result") if response.get("ok") else None
    if not isinstance(status, dict):
        error: Dict[str, Any] = response["error"] if isinstance(response.get("error"), dict) else {}
        pid = error.get("pid")
        named = {"pid": pid, "pidStartTime": error.get("pidStartTime")} if _is_pid(pid) else {}
        if error.get("code") == "busy":
            # Whoever answers is alive, at its caps: slow, never dead.
            return ProbeResult(_PROBE_BUSY, named, detail="busy")
        if error.get("code") == "shutting_down" and _is_pid(pid) and pid_alive(pid):
            # Still closing its servers: it owns them until its pid is gone (stop is a barrier).
            return ProbeResult(_PROBE_STOPPING, named, detail="shutting down")
        return ProbeResult(_PROBE_DEAD, detail="answered with an error")
    if status.get("socketPath") != socket_path:
        return ProbeResult(_PROBE_DEAD, detail="answers for another socket path")
    pid = status.get("pid")
    if not _is_pid(pid) or not pid_alive(pid):
        return ProbeResult(_PROBE_DEAD, detail="its pid is not alive")
    return ProbeResult(_PROBE_LIVE, status)


def plan_takeover(probe: str, fresh: bool, owner_ours: bool, owner_stopped: bool) -> str:
    """The bind guard's decision, free of I/O.

    ``probe`` is "live", "stopping" (answers "shutting down"), "silent" (first probe timed
    out), "silent-twice" (the longer second probe too), "busy" (answered busy), "closed"
    (accepted, then closed without a word), "busy-twice" (a second probe after busy or
    closed got no answer either) or "dead". Returns "reconcile", "stop-then-bind",
    "wait-then-bind", "terminate-then-bind", "probe-again", "leave" or "bind".
    """
    if owner_ours and owner_stopped:
        return _PLAN_TERMINATE_THEN_BIND  # the OS says it is stopped: hung, whatever it answers
    if probe == _PROBE_STOPPING:
        return _PLAN_WAIT_THEN_BIND  # its servers are still closing: never two copies at once
    if probe == _PROBE_LIVE:
        return _PLAN_RECONCILE if fresh else _PLAN_STOP_THEN_BIND
    if probe in (_PROBE_SILENT, _PROBE_BUSY) or (probe == _PROBE_CLOSED and owner_ours):
        # A timeout alone is no proof of a hang: a busy or loaded daemon is slow (mypy #18008).
        # Nor is a busy answer, or a bare close from the pid the record names alive.
        return _PLAN_PROBE_AGAIN
    if probe == _PROBE_BUSY_TWICE:
        return _PLAN_LEAVE  # alive but slow: only a stop or silence on both probes proves a hang
    if owner_ours:
        return _PLAN_TERMINATE_THEN_BIND  # hung (silent twice) or unreachable: ours, so end it
    return _PLAN_BIND


class _TakeoverFacts:
    """What the bind guard knows before it acts: the recorded owner, what the socket answered,
    and the plan ``plan_takeover`` makes of them. A silent, busy or bare-closing socket is
    probed a second, longer time before the plan is final, since a timeout alone proves no
    hang (and a busy answer proves life)."""

    __slots__ = ("recorded", "owner_ours", "owner_stopped", "probe", "kind", "plan")

    def __init__(self, recorded: Optional[RecordedDaemon]) -> None:
        self.recorded = recorded
        self.owner_ours = self.owner_stopped = False
        self.probe = ProbeResult(_PROBE_SILENT)
        self.kind = _PROBE_SILENT
        self.plan = _PLAN_PROBE_AGAIN
        self.look_at_owner()

    @classmethod
    def gather(cls, paths: DaemonPaths, fingerprint: str, probe_timeout: float) -> _TakeoverFacts:
        """Read the record, probe the socket (twice when silent), and plan."""
        socket_path = paths.socket
        facts = cls(RecordedDaemon.read(paths.metadata))
        if not facts.owner_stopped:  # a stopped owner is known hung: a probe could only time out
            facts.heard(probe_live_daemon(socket_path, probe_timeout))
        facts.decide(fingerprint)
        if facts.plan == _PLAN_PROBE_AGAIN:
            facts.heard(probe_live_daemon(socket_path, max(3 * probe_timeout, 1.0)), second=True)
            facts.look_at_owner()  # it may have exited, or been stopped, meanwhile
            facts.decide(fingerprint)
        return facts

    def look_at_owner(self) -> None:
        """Whether the recorded owner is ours, and stopped (asked only of one that is ours)."""
        recorded = self.recorded
        self.owner_ours = recorded is not None and recorded.is_ours()
        self.owner_stopped = recorded is not None and self.owner_ours and recorded.is_stopped()

    def heard(self, probe: ProbeResult, second: bool = False) -> None:
        """Record a probe. The second one, when it gets no answer either, is "silent-twice"
        after a silent first (a hang) and otherwise "busy-twice" (busy or closed showed life)."""
        kind = probe.kind
        if second and kind in (_PROBE_SILENT, _PROBE_BUSY, _PROBE_CLOSED):
            both_silent = kind == _PROBE_SILENT and self.kind == _PROBE_SILENT
            kind = _PROBE_SILENT_TWICE if both_silent else _PROBE_BUSY_TWICE
        self.probe = probe
        self.kind = kind

    def decide(self, fingerprint: str) -> None:
        """The plan for these facts (``fresh``: the live answer carries our fingerprint)."""
        fresh = self.probe.status.get("fingerprint") == fingerprint
        self.plan = plan_takeover(self.kind, fresh, self.owner_ours, self.owner_stopped)


def plan_stop_escalation(kind: str, verified: bool, gone: bool) -> str:
    """After ``stop`` waited out its timeout: "stopped", "terminate" (verified ours by the
    metadata), "still-stopping" (another stop is ending it) or "refuse" (never signal an
    unverified pid)."""
    if gone:
        return _ESCALATE_STOPPED
    if verified:
        return _ESCALATE_TERMINATE
    return _ESCALATE_STILL_STOPPING if kind == _PROBE_STOPPING else _ESCALATE_REFUSE


class _StopPolicy:
    """How ``_stop_then_escalate`` asks and waits, and what its caller says meanwhile.

    ``ask`` is the stop request's (answer, connect) timeouts, or None to only wait (it is
    stopping already); ``wait`` gives the seconds to wait for the pid, asked once the request
    is done. ``on_unheard`` hears a stop request that failed; ``on_plan`` hears the plan
    before it is carried out, so each caller says it its own way."""

    __slots__ = ("ask", "wait", "on_unheard", "on_plan")

    def __init__(
        self,
        ask: Optional[Tuple[float, float]],
        wait: Callable[[], float],
        on_unheard: Callable[[DaemonError], None] = lambda exc: None,
        on_plan: Callable[[str], None] = lambda plan: None,
    ) -> None:
        self.ask = ask
        self.wait = wait
        self.on_unheard = on_unheard
        self.on_plan = on_plan


def _stop_then_escalate(
    socket_path: str, pid: int, recorded: Optional[RecordedDaemon], kind: str, policy: _StopPolicy
) -> str:
    """Ask daemon ``pid`` (which the probe found ``kind``) to stop, wait for its pid to go,
    then escalate as ``plan_stop_escalation`` decides; returns the plan, carried out. Only a
    ``recorded`` daemon naming this very pid, still ours after the wait, is terminated.
    """
    start = process_start_time(pid)
    if policy.ask is not None:
        answer_s, connect_s = policy.ask
        try:
            exchange(socket_path, _builtin_request("stop", "stop"), answer_s, connect_timeout=connect_s)
        except DaemonError as exc:
            policy.on_unheard(exc)  # it may have exited before answering; the pid tells
    gone = _wait_gone(pid, policy.wait(), start)
    verified = recorded is not None and recorded.pid == pid and recorded.is_ours()
    plan = plan_stop_escalation(kind, verified, gone)
    policy.on_plan(plan)
    if plan == _ESCALATE_TERMINATE:
        assert recorded is not None
        recorded.terminate()
    return plan


def status_matches(
    meta: Optional[Dict[str, Any]],
    status: Any,
    socket_path: str,
    proc_facts: Tuple[Optional[str], Optional[str]],
) -> bool:
    """Whether a ``status`` answer comes from the daemon a record names (verified peer); no I/O.

    ``meta`` is a validated record or None; ``status`` the answer's result (None when there
    was no answer yet); ``proc_facts`` the (start time, state) the OS reports now for the
    record's pid. A stopped daemon is hung, so it never verifies: it is to be replaced.
    """
    if not record_is_live(meta, socket_path, proc_facts) or not isinstance(status, dict):
        return False
    assert meta is not None
    return status.get("pid") == meta["pid"] and status.get("socketPath") == socket_path


def record_is_live(
    meta: Optional[Dict[str, Any]], socket_path: str, proc_facts: Tuple[Optional[str], Optional[str]]
) -> bool:
    """The half of ``status_matches`` that needs no answer: worth asking the socket at all?"""
    if meta is None or meta["socketPath"] != socket_path:
        return False
    start, state = proc_facts
    return start is not None and str(start) == meta["pidStartTime"] and state not in ("Z", "T", "t")


class _OwnerLock:
    """Held by a serving host for its whole life: an exclusive ``flock`` on its own file
    (``daemon-<key>.owner``), which names the holder (pid and start time). So whoever owns the
    socket can be found without the metadata (torn, removed), and only while it lives: the
    kernel drops the lock when it dies.

    Its own file, never the bind lock's: starters take that one during every takeover, and a
    life-long lock on it would shut them out. ``flock``, not ``fcntl`` locks: those belong to
    the process, so a look from inside the same process (a vendoring program that also runs a
    client) would release it. The file is never unlinked, as every lock file."""

    __slots__ = ("path", "fd")

    def __init__(self, paths: DaemonPaths) -> None:
        self.path = _owner_lock_path(paths)
        self.fd: Optional[int] = None

    def take(self, start_time: Optional[str]) -> bool:
        """Take it without waiting (a daemon that lost its socket may still hold it): True
        once held."""
        if self.fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {start_time or ''}\n".encode(), 0)
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # closing drops the flock


def _owner_lock_path(paths: DaemonPaths) -> str:
    return os.path.join(paths.base_dir, f"daemon-{paths.key}.owner")


def _socket_owner(paths: DaemonPaths) -> Optional[RecordedDaemon]:
    """The daemon holding the owner lock (see ``_OwnerLock``), as a record of its identity
    when it is verified ours (alive with the start time it wrote); else None. For when the
    metadata is torn or gone: whoever holds the lock serves, or served, this socket."""
    try:
        fd = os.open(_owner_lock_path(paths), os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 128, 0).decode("ascii", "replace")  # held: it names its holder
        else:
            return None  # nobody holds it (closing the fd drops our look)
    except OSError:
        return None
    finally:
        os.close(fd)
    fields = text.split()
    if len(fields) != 2 or not fields[0].isdigit():
        return None
    owner = RecordedDaemon.from_record(
        {"pid": int(fields[0]), "pidStartTime": fields[1], "socketPath": paths.socket, "servers": {}}
    )
    return owner if owner is not None and owner.is_ours() else None


class _Hooks:
    """The embedding program's hooks (see ``DaemonHost``), and what ``status_extra`` last
    returned: past the connection cap, ``status`` is answered from it, since the overflow
    thread must not wait on a hook."""

    __slots__ = ("status_extra", "metadata_extra", "on_tick", "on_shutdown", "status_extra_seen")

    def __init__(
        self,
        status_extra: Optional[Callable[[], Dict[str, Any]]],
        metadata_extra: Optional[Callable[[], Dict[str, Any]]],
        on_tick: Optional[Callable[[], None]],
        on_shutdown: Optional[Callable[[], None]],
    ) -> None:
        self.status_extra = status_extra
        self.metadata_extra = metadata_extra
        self.on_tick = on_tick
        self.on_shutdown = on_shutdown
        self.status_extra_seen: Dict[str, Any] = {}


class _Hook:
    """A ``DaemonHost`` hook as a plain attribute (settable until ``run``), kept in its ``_Hooks``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, host: Optional[DaemonHost], owner: Optional[type] = None) -> Any:
        return self if host is None else getattr(host._hooks, self.name)

    def __set__(self, host: DaemonHost, value: Any) -> None:
        setattr(host._hooks, self.name, value)


class DaemonHost:
    """A singleton daemon: bind guard, then serve ``method -> handler`` until told to stop.

    ``handlers`` map a method name to ``handler(params, ctx) -> result``; ``status`` and
    ``stop`` are built in. ``fingerprint`` names the identity: a live daemon with the same one
    is kept, one with another is stopped before this one binds.

    For the caller: ``run()``; from any thread, ``request_stop(reason)``, ``touch()`` (counts
    as activity for ``idle_timeout``), ``request_wake()`` and ``mark_metadata_dirty()``.

    Hooks (all optional; set them in the constructor or as attributes before ``run``):

    - ``status_extra() -> dict`` is merged into every ``status`` answer (for example a
      ``servers`` list). It runs on the connection's thread for each ``status``: keep it cheap.
    - ``metadata_extra() -> dict`` is merged into the metadata record; a ``servers`` map of
      ``{name: {"pid", "pidStartTime"}}`` lets a successor end them if this host is SIGKILLed.
      The record is cached: call ``mark_metadata_dirty()`` when its data changes.
    - ``on_tick()`` runs on the housekeeping thread about once a second (sooner after
      ``mark_metadata_dirty``), never on the accept path; an exception is logged, not fatal.
    - ``on_shutdown()`` runs once when stopping, after in-flight work had up to 2 s to end:
      close what the handlers keep open. Meanwhile requests are answered "shutting down".

    The state lives with its owners: ``_Takeover`` (the bind guard, run once), ``_Listener``
    (the socket, its owner lock and the wake pipe), ``_Load`` (connections and requests in
    flight, and the ``_Overflow`` reader past the cap), ``_MetadataRecord`` (the record and its
    rewrites), ``_RunState`` (why and how it stops), ``_Hooks`` (the hooks above); each
    connection is served by a ``_Connection``.
    """

    status_extra = _Hook()
    metadata_extra = _Hook()
    on_tick = _Hook()
    on_shutdown = _Hook()

    def __init__(
        self,
        paths: DaemonPaths,
        fingerprint: str,
        handlers: Optional[Dict[str, Callable[[Dict[str, Any], RequestContext], Any]]] = None,
        *,
        idle_timeout: Optional[float] = None,
        status_extra: Optional[Callable[[], Dict[str, Any]]] = None,
        metadata_extra: Optional[Callable[[], Dict[str, Any]]] = None,
        on_tick: Optional[Callable[[], None]] = None,
        on_shutdown: Optional[Callable[[], None]] = None,
        log: Optional[DaemonLog] = None,
        probe_timeout: Optional[float] = None,
    ) -> None:
        self.paths = paths
        self.fingerprint = fingerprint
        self.handlers = dict(handlers or {})
        self.idle_timeout = idle_timeout
        self._hooks = _Hooks(status_extra, metadata_extra, on_tick, on_shutdown)
        self.log = log or DaemonLog()
        self.probe_timeout = probe_timeout or paths.app.env_seconds(
            "PROBE_TIMEOUT_MS", _DEFAULT_PROBE_TIMEOUT
        )
        self._record = _MetadataRecord(self)
        self._listener = _Listener(paths)
        self._load = _Load(_Overflow(self))
        self._state = _RunState()

    @property
    def pid(self) -> int:
        """This host's process id (what its metadata and ``status`` name)."""
        return self._record.pid

    @property
    def started_at(self) -> int:
        """When this host was made, in ms since the epoch (``startedAt``)."""
        return self._record.started_at

    # -- public ------------------------------------------------------------------------------

    def run(self) -> int:
        """Bind (or find a live twin and exit 0), serve until stopped, clean up; exit code."""
        _require_posix()
        self.paths.prepare()
        twin = _Takeover(self).run()
        if twin is not None:
            self.log.event(f"daemon already running (pid {twin}); not starting another")
            return 0
        restore = self._install_signal_handlers()
        if _compiled_in_this_process():
            _release_freed_memory()  # the compiler's garbage: about 9 MiB, a third of the daemon
        try:
            self._serve_forever()
        finally:
            try:
                self._finish()
            finally:
                restore()  # an embedding program gets its SIGINT (KeyboardInterrupt) back
        return 0

    def request_stop(self, reason: str) -> None:
        """Ask the serving loop to shut down (safe from any thread or a signal handler)."""
        if self._state.reason is None:
            self._state.reason = reason
        self._state.tick.set()
        self._listener.wake(b"x")

    def mark_metadata_dirty(self) -> None:
        """The data behind ``metadata_extra`` changed; rewrite the metadata soon."""
        self._record.mark_dirty()
        self._state.tick.set()

    def request_wake(self) -> None:
        """Wake the serving loop (it looks again whether to wind down or stop)."""
        self._listener.wake(b"w")

    def touch(self) -> None:
        """Count now as activity, for the idle timeout."""
        self._load.touch()

    # -- serving -----------------------------------------------------------------------------

    def _install_signal_handlers(self) -> Callable[[], None]:
        """Wake pipe and signal handlers; returns what undoes both (a vendored host may run
        again, and its embedding program wants its own SIGINT handling back)."""
        import signal
        import threading

        self._listener.open_wake_pipe()
        saved: Dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
                    continue  # started under nohup: a hangup must not take the servers down
                saved[sig] = signal.signal(
                    sig, lambda signum, _frame: self.request_stop(f"{_STOP_SIGNAL} {signum}")
                )
        # (Outside the main thread Python forbids handlers; vendors stop us by request.)

        def restore() -> None:
            for sig, handler in saved.items():
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
            self._listener.close_wake_pipe()

        return restore

    def _serve_forever(self) -> None:
        """Accept until the servers are closed. A stopping daemon keeps answering (with
        "shutting down" and its pid) until then, so a starter waits for it instead of binding
        a second copy of its servers beside it (stop is a barrier)."""
        import threading

        threading.Thread(target=self._housekeeping_loop, name="housekeeping", daemon=True).start()
        stopper = None
        backoff, resume_at = 0.0, 0.0
        while not self._state.drained.is_set():
            if self._state.reason is not None and stopper is None:
                stopper = threading.Thread(target=self._wind_down, name="wind-down", daemon=True)
                stopper.start()
            now = time.monotonic()
            paused = now < resume_at  # out of fds: listen only to the wake pipe for a while
            wait = resume_at - now if paused else _SOCKET_CHECK_INTERVAL
            if self._listener.wait(wait, paused):
                if self._accept():
                    backoff = 0.0
                else:
                    backoff = accept_backoff(backoff)
                    resume_at = time.monotonic() + backoff

    def _accept(self) -> bool:
        """Accept one connection; False when out of resources (EMFILE and kin: back off)."""
        import errno
        import threading

        assert self._listener.sock is not None
        try:
            conn, _ = self._listener.sock.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.log.event(f"cannot accept: {exc.strerror}; backing off")
                return False
            return True  # the client gave up (ECONNABORTED) or a spurious wake-up
        admitted = self._load.admit(conn)
        if admitted == "overflow":
            self._load.overflow_reader.add(conn)
        elif admitted == "full":
            _answer_and_close(
                conn, self._busy_frame(None, f"{_MAX_CONNECTIONS + _MAX_OVERFLOW} connections open")
            )
        elif admitted == "worker":
            try:
                threading.Thread(target=self._worker, args=(conn,), daemon=True).start()
            except RuntimeError:  # no thread to be had: refuse this one (never silently), keep serving
                self._load.closed()
                _answer_and_close(conn, self._busy_frame(None, "no thread to serve it"))
                return False
        return True

    def _worker(self, conn: socket.socket) -> None:
        """Serve a connection, then wait as a spare for the next (a few spares at most)."""
        while True:
            _Connection(self, conn).handle()
            if not self._load.become_spare(self._state.reason is not None):
                return
            conn = self._load.handoff.get()

    # -- housekeeping (its own thread: never on the accept path) ------------------------------

    def _housekeeping_loop(self) -> None:
        """Socket ownership, metadata repair, hooks and idle expiry, once a second or when
        woken. A slow hook (a server taking seconds to close) must not delay `status`."""
        while self._state.reason is None:
            self._state.tick.wait(_SOCKET_CHECK_INTERVAL)
            self._state.tick.clear()
            if self._state.reason is not None:
                return
            try:
                self._housekeeping()
            except Exception as exc:  # a housekeeping failure must not take the daemon down
                self.log.event(f"housekeeping error: {exc!r}")

    def _housekeeping(self) -> None:
        if not self._listener.owns_path(self.paths.socket):
            # Removed or replaced: nobody can reach us any more, so we must not linger.
            self.request_stop(_STOP_SOCKET_LOST)
            return
        if self._listener.owner.fd is None:
            self._take_owner_lock()
        if _vouch_for_script_now():
            self._record.mark_dirty()
        self._record.sync()
        hooks = self._hooks
        if hooks.on_tick:
            try:
                hooks.on_tick()
            except Exception as exc:  # a housekeeping bug must not kill the daemon
                self.log.event(f"housekeeping error: {exc!r}")
        self._maybe_idle_out()

    def _take_owner_lock(self) -> None:
        """Hold the owner lock from now on; a predecessor that lost its socket may hold it
        still (housekeeping tries again until it is gone)."""
        owner = self._listener.owner
        try:
            owner.take(self._record.current().get("pidStartTime"))
        except OSError as exc:
            self.log.event(f"cannot take the owner lock {owner.path}: {exc.strerror or exc}")

    def _maybe_idle_out(self) -> None:
        """Idle shutdown re-checks activity under the bind lock, so a starter that just
        probed us (holding that lock) can never be left without a daemon."""
        if not idle_expired(self.idle_timeout, self._load.active, self._load.idle_for()):
            return
        lock = FileLock(self.paths.bind, what="bind lock")
        if not lock.acquire(timeout=0):
            return
        try:
            if idle_expired(self.idle_timeout, self._load.active, self._load.idle_for()):
                self.request_stop(f"{_STOP_IDLE} for {self.idle_timeout:g}s")
        finally:
            lock.release()

    # -- built-in methods --------------------------------------------------------------------

    def _builtin_status(self, params: Dict[str, Any], ctx: RequestContext) -> Dict[str, Any]:
        hooks = self._hooks
        extra = hooks.status_extra() if hooks.status_extra else {}
        hooks.status_extra_seen = extra
        return self._status_answer(extra)

    def _status_answer(self, extra: Dict[str, Any]) -> Dict[str, Any]:
        """The ``status`` result with ``extra`` merged in. Past the connection cap it is built
        from the last ``status_extra`` seen: the overflow thread must not wait on a hook."""
        status = {
            "pid": self.pid,
            "protocolVersion": DAEMON_PROTOCOL_VERSION,
            "startedAt": self.started_at,
            "socketPath": self.paths.socket,
            "logPath": self.log.path,
            "fingerprint": self.fingerprint,
            "servers": [],
        }
        status.update(extra)
        status["metadata"] = self._record.current()  # lets a starter reconcile the file exactly
        return status

    def _busy_frame(self, rid: Any, why: str) -> Dict[str, Any]:
        # Past a cap, never a silent close: a prober takes that for death. The pid and start
        # time say who is busy, so nobody mistakes it for a hang (or for another daemon).
        frame = _error_frame(rid, f"daemon busy ({why}); try again shortly", "busy")
        frame["error"].update(pid=self.pid, pidStartTime=self._record.current().get("pidStartTime"))
        return frame

    def _shutting_down_frame(self, rid: Any) -> Dict[str, Any]:
        # The pid and start time let a starter or a second `stop` wait for this very
        # process to exit before anything takes its place.
        frame = _error_frame(rid, "daemon is shutting down", "shutting_down")
        frame["error"].update(pid=self.pid, pidStartTime=self._record.current().get("pidStartTime"))
        return frame

    def _handle_stop(self, conn: socket.socket, rid: Any) -> None:
        # Owed before the daemon is marked stopping (exactly one answer): the serving loop may
        # see the mark at once and wind down, and work in flight is what the wind-down waits
        # for and what the last step answers. Uncounted, this answer died with the process
        # whenever this thread lost the race to it.
        done = {"id": rid, "ok": True, "result": True}
        ex = _Exchange(conn, rid, if_stopped=done)
        self._load.begin(ex)
        try:
            # Metadata goes before the answer, so no later caller trusts a dying daemon (dmypy).
            self._state.reason = _STOP_REQUEST
            self._record.remove()
            ex.answer(done)
        finally:
            self._load.end(ex)
        self.request_stop(_STOP_REQUEST)

    # -- shutdown ----------------------------------------------------------------------------

    def _wind_down(self) -> None:
        """Off the accept thread: let in-flight work finish briefly, then close the servers.
        Until this ends, new requests are answered "shutting down" with our pid."""
        try:
            self.log.event(f"shutting down: {self._state.reason}")
            self._load.wait_idle(_DRAIN_WAIT)
            on_shutdown = self._hooks.on_shutdown
            if on_shutdown:
                try:
                    on_shutdown()
                except Exception as exc:
                    self.log.event(f"shutdown hook failed: {exc!r}")
            self._load.wait_idle(_DRAIN_AFTER_CLOSE)
        finally:
            self._state.drained.set()
            self.request_wake()

    def _finish(self) -> None:
        """The last steps, on the serving thread: stop listening, answer every request still
        owed an answer, drop the files that are still ours."""
        if self._state.reason is None:
            self._state.reason = _STOP_LOOP_ENDED
        if not self._state.drained.is_set():  # the loop died: still close the servers
            self._wind_down()
        self._listener.close()
        reason = self._state.reason
        # An answer already going out (a large one, to a slow reader) gets this long, all of
        # them together, to finish: a reader taking a few bytes now and then holds no exit.
        until = time.monotonic() + _SEND_IDLE
        for ex in self._load.take_owed():
            stopped = _error_frame(ex.rid, f"daemon stopped ({reason}) before it finished", "daemon_stopped")
            ex.answer(ex.if_stopped or stopped, wait=max(0.0, until - time.monotonic()))
        # Connections taken in but not yet answered (their threads about to say "shutting
        # down") would close unanswered when the process ends; that answer lets a caller send
        # again safely, a closed connection does not. Bounded: a silent client holds nobody.
        self._load.wait_closed(_DRAIN_AFTER_CLOSE)
        if reason == _STOP_REQUEST:
            self._release_files()  # no lock: a stopper inside the bind guard waits for our exit
        else:
            # Someone inside the bind guard is taking over; the files are theirs to replace.
            lock = FileLock(self.paths.bind, what="bind lock")
            try:
                if lock.acquire(timeout=0):
                    try:
                        self._release_files()
                    finally:
                        lock.release()
            except OSError as exc:
                self.log.event(f"cannot remove state files: {exc}")
        self._listener.owner.release()  # last: until here, this process still owns the socket
        self.log.event("daemon exited")

    def _release_files(self) -> None:
        """Remove the metadata and socket — each only while still this process's own."""
        if self._state.files_released:
            return
        self._state.files_released = True
        self._record.remove()
        if self._listener.owns_path(self.paths.socket):
            _unlink_quietly(self.paths.socket)


class _RunState:
    """Where a host is in its life: why it stops (None while serving), the event that wakes
    housekeeping early, whether its servers are closed (the serving loop may end), and
    whether its files are gone."""

    __slots__ = ("reason", "tick", "drained", "files_released")

    def __init__(self) -> None:
        import threading

        self.reason: Optional[str] = None  # one of the _STOP_ reasons (some with a detail)
        self.tick = threading.Event()
        self.drained = threading.Event()
        self.files_released = False


class _Listener:
    """The bound socket, its identity as bound (to tell whether the path is still ours), the
    owner lock held while this process owns the socket (taken after the bind, released after
    the close), and the wake pipe that interrupts the serving loop's wait."""

    __slots__ = ("sock", "sock_id", "owner", "wake_r", "wake_w")

    def __init__(self, paths: DaemonPaths) -> None:
        self.sock: Optional[socket.socket] = None
        self.sock_id: Optional[Tuple[int, int]] = None
        self.owner = _OwnerLock(paths)
        self.wake_r, self.wake_w = -1, -1

    def bind(self, path: str) -> None:
        """Replace a stale socket file (never anything else) and listen, under umask 077."""
        import stat as _stat

        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not _stat.S_ISSOCK(st.st_mode):
                raise UnsafePathError(f"{path} exists and is not a socket; refusing to remove it")
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o077)
        try:
            listener.bind(path)
        except OSError as exc:
            listener.close()
            raise DaemonError(f"cannot bind socket {path}: {exc.strerror or exc}") from None
        finally:
            os.umask(old_umask)
        listener.listen(socket.SOMAXCONN)  # a burst of callers must queue, not be refused
        st = os.stat(path)
        self.sock_id = (st.st_dev, st.st_ino)
        self.sock = listener

    def owns_path(self, path: str) -> bool:
        """Whether ``path`` still is the socket this process bound (not removed or replaced)."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.sock_id

    def wait(self, timeout: float, paused: bool) -> bool:
        """Wait for a connection or a wake-up (only a wake-up while ``paused``); True when a
        connection is waiting to be accepted."""
        import select

        watch: List[Any] = [self.wake_r] if paused else [self.sock, self.wake_r]
        try:
            ready, _, _ = select.select(watch, [], [], timeout)
        except InterruptedError:
            return False
        if self.wake_r in ready:
            try:
                os.read(self.wake_r, 4096)
            except OSError:
                pass
        return self.sock in ready

    def open_wake_pipe(self) -> None:
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)

    def close_wake_pipe(self) -> None:
        for fd in (self.wake_r, self.wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.wake_r, self.wake_w = -1, -1

    def wake(self, byte: bytes) -> None:
        """Interrupt ``wait`` (safe from a signal handler; a full pipe is awake already)."""
        try:
            os.write(self.wake_w, byte)
        except OSError:
            pass

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


class _Load:
    """What the accept loop and the connections count together, under one lock: open
    connections, spare workers waiting for the next one, half-read request bytes (capped in
    all), requests in flight (each owed one answer) and when anything last happened. The
    connections past the cap are counted here too, and read by its ``overflow_reader``."""

    __slots__ = (
        "lock",
        "connections",
        "overflow",
        "overflow_reader",
        "spare_workers",
        "handoff",
        "pending_bytes",
        "active",
        "inflight",
        "last_activity",
    )

    def __init__(self, overflow_reader: _Overflow) -> None:
        import queue
        import threading

        self.lock = threading.Lock()
        self.connections = 0
        self.overflow = 0  # connections past the cap, read on the overflow thread
        self.overflow_reader = overflow_reader
        self.spare_workers = 0
        self.handoff: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()  # for spare workers
        self.pending_bytes = 0
        self.active = 0
        self.inflight: Dict[int, _Exchange] = {}  # by id(conn): requests still owed an answer
        self.last_activity = time.monotonic()

    def touch(self) -> None:
        self.last_activity = time.monotonic()

    def idle_for(self) -> float:
        return time.monotonic() - self.last_activity

    def admit(self, conn: socket.socket) -> str:
        """Count a new connection: "worker" when it needs a new worker thread, "handed" when
        a spare worker took it, "overflow" past the cap (the overflow thread reads it), "full"
        past that too (to be answered `busy` at once)."""
        with self.lock:
            if self.connections >= _MAX_CONNECTIONS:
                if self.overflow >= _MAX_OVERFLOW:
                    return "full"
                self.overflow += 1
                return "overflow"
            self.connections += 1
            if self.spare_workers:  # a waiting worker is cheaper than a new thread
                self.spare_workers -= 1
                self.handoff.put(conn)
                return "handed"
        return "worker"

    def closed(self) -> None:
        with self.lock:
            self.connections -= 1

    def overflow_closed(self) -> None:
        with self.lock:
            self.overflow -= 1

    def become_spare(self, stopping: bool) -> bool:
        """Whether a worker that served its connection should wait for the next one."""
        with self.lock:
            if self.spare_workers >= _SPARE_WORKERS or stopping:
                return False
            self.spare_workers += 1
            return True

    def reserve(self, nbytes: int, held: int) -> None:
        """Count ``nbytes`` more of a half-read request that holds ``held`` already; _Busy past
        the cap for all of them, unless the request is still small (control requests are):
        those are bounded by the connection cap and must always be read."""
        with self.lock:
            if self.pending_bytes + nbytes > _MAX_PENDING_BYTES and held + nbytes > _SMALL_REQUEST_BYTES:
                raise _Busy()
            self.pending_bytes += nbytes

    def release(self, nbytes: int) -> None:
        with self.lock:
            self.pending_bytes -= nbytes

    def begin(self, ex: _Exchange) -> None:
        with self.lock:
            self.active += 1
            self.inflight[id(ex.conn)] = ex

    def end(self, ex: _Exchange) -> None:
        with self.lock:
            self.active -= 1
            self.inflight.pop(id(ex.conn), None)
        self.touch()

    def take_owed(self) -> List[_Exchange]:
        """The requests still owed an answer; from now on nobody else answers them."""
        with self.lock:
            owed, self.inflight = list(self.inflight.values()), {}
        return owed

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            time.sleep(0.01)

    def wait_closed(self, timeout: float) -> None:
        """Until every connection taken in (the overflow's too) is answered and closed."""
        deadline = time.monotonic() + timeout
        while (self.connections or self.overflow) and time.monotonic() < deadline:
            time.sleep(0.01)


class _Overflow:
    """Connections past the cap, all on one thread (a selector, no thread each): each gets
    ``_OVERFLOW_READ_DEADLINE`` to send a small request line. ``status`` and ``stop`` are
    answered as always (status from the last hook data seen), anything else gets ``busy``;
    a connection that sends nothing in time gets ``busy`` too. Never a silent close."""

    __slots__ = ("host", "queue", "lock", "wake_r", "wake_w", "thread")

    def __init__(self, host: DaemonHost) -> None:
        import queue
        import threading

        self.host = host
        self.queue: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.wake_r: Optional[socket.socket] = None
        self.wake_w: Optional[socket.socket] = None
        self.thread: Optional[threading.Thread] = None

    def add(self, conn: socket.socket) -> None:
        """Hand over a connection past the cap (on the accept thread: never blocks)."""
        import threading

        with self.lock:
            if self.thread is None:
                try:
                    self.wake_r, self.wake_w = socket.socketpair()
                    self.wake_r.setblocking(False)
                    self.wake_w.setblocking(False)
                    thread = threading.Thread(target=self._run, name="overflow", daemon=True)
                    thread.start()
                except (OSError, RuntimeError):  # out of fds or threads: answer at once instead
                    self.wake_r = self.wake_w = None
                    self.host._load.overflow_closed()
                    _answer_and_close(conn, self.host._busy_frame(None, "out of resources"))
                    return
                self.thread = thread
        self.queue.put(conn)
        try:
            assert self.wake_w is not None
            self.wake_w.send(b"x")
        except OSError:
            pass  # a full wake socket is awake already

    def _run(self) -> None:
        import selectors

        assert self.wake_r is not None
        sel = selectors.DefaultSelector()  # epoll/kqueue: these fds are past FD_SETSIZE
        sel.register(self.wake_r, selectors.EVENT_READ)
        reading: Dict[socket.socket, Tuple[float, bytearray]] = {}
        while reading or not self.host._state.drained.is_set():
            now = time.monotonic()
            for conn, (deadline, buf) in list(reading.items()):
                if now >= deadline:
                    self._finish(sel, reading, conn, bytes(buf) if _is_json(buf) else None)
            wait = min((d for d, _ in reading.values()), default=now + _SOCKET_CHECK_INTERVAL) - now
            for key, _ in sel.select(max(wait, 0.0)):
                if key.fileobj is self.wake_r:
                    self._take_new(sel, reading)
                    continue
                conn = key.fileobj  # type: ignore[assignment]
                self._read(sel, reading, conn)
        with self.lock:  # the host is done: a host run again starts afresh
            sel.close()
            for end in (self.wake_r, self.wake_w):
                if end is not None:
                    end.close()
            self.wake_r = self.wake_w = self.thread = None

    def _take_new(self, sel: Any, reading: Dict[socket.socket, Tuple[float, bytearray]]) -> None:
        import queue
        import selectors

        assert self.wake_r is not None
        try:
            self.wake_r.recv(4096)
        except OSError:
            pass
        while True:
            try:
                conn = self.queue.get_nowait()
            except queue.Empty:
                return
            conn.setblocking(False)
            reading[conn] = (time.monotonic() + _OVERFLOW_READ_DEADLINE, bytearray())
            sel.register(conn, selectors.EVENT_READ)

    def _read(
        self, sel: Any, reading: Dict[socket.socket, Tuple[float, bytearray]], conn: socket.socket
    ) -> None:
        buf = reading[conn][1]
        try:
            chunk = conn.recv(_SMALL_REQUEST_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        nl = chunk.find(b"\n")
        if nl >= 0:
            self._finish(sel, reading, conn, bytes(buf) + chunk[:nl])
        elif not chunk:  # the caller closed its side: answer a whole request, if it sent one
            self._finish(sel, reading, conn, bytes(buf) if _is_json(buf) else b"", gone=not buf.strip())
        elif len(buf) + len(chunk) > _SMALL_REQUEST_BYTES:
            self._finish(sel, reading, conn, None)  # no control request is this large
        else:
            buf += chunk

    def _finish(
        self,
        sel: Any,
        reading: Dict[socket.socket, Tuple[float, bytearray]],
        conn: socket.socket,
        line: Optional[bytes],
        gone: bool = False,
    ) -> None:
        """Answer ``line`` (None: nothing usable arrived, so `busy`) and let the connection go."""
        del reading[conn]
        sel.unregister(conn)
        try:
            if not gone:
                self._answer(conn, line)
        except Exception as exc:  # bad input must never stop this thread
            self.host.log.event(f"connection error: {exc!r}")
        finally:
            conn.close()
            self.host._load.overflow_closed()

    def _answer(self, conn: socket.socket, line: Optional[bytes]) -> None:
        host = self.host
        why = f"{_MAX_CONNECTIONS} connections open"
        if line is None:
            _answer_and_close(conn, host._busy_frame(None, why))
            return
        request, error = _parse_request(line)
        if error is not None:
            _answer_and_close(conn, error)
            return
        assert request is not None
        rid, method = request["id"], request["method"]
        host.touch()
        if host._state.reason is not None:
            _answer_and_close(conn, host._shutting_down_frame(rid))
        elif method == "stop":
            conn.setblocking(True)
            host._handle_stop(conn, rid)
        elif method == "status":
            _answer_and_close(
                conn, {"id": rid, "ok": True, "result": host._status_answer(host._hooks.status_extra_seen)}
            )
        else:
            _answer_and_close(conn, host._busy_frame(rid, why))


class _MetadataRecord:
    """The host's metadata record: built on demand and cached (``status`` carries it and must
    stay cheap), rebuilt when marked dirty, written atomically. A failing write is logged once
    and retried by housekeeping; the daemon keeps serving and the old record stays whole."""

    __slots__ = ("host", "pid", "started_at", "cache", "generation", "dirty", "failing")

    def __init__(self, host: DaemonHost) -> None:
        self.host = host
        self.pid = os.getpid()
        self.started_at = _now_ms()
        self.cache: Optional[Dict[str, Any]] = None
        self.generation = 0  # bumped when marked dirty: a record built meanwhile is not cached
        self.dirty = False
        self.failing = False

    def mark_dirty(self) -> None:
        self.generation += 1
        self.cache = None
        self.dirty = True

    def current(self) -> Dict[str, Any]:
        """The record, cached: ``status`` includes it and must stay cheap."""
        cached = self.cache
        if cached is not None:
            return cached
        generation = self.generation
        host = self.host
        data: Dict[str, Any] = {
            "pid": self.pid,
            "pidStartTime": process_start_time(self.pid),
            "protocolVersion": DAEMON_PROTOCOL_VERSION,
            "socketPath": host.paths.socket,
            "startedAt": self.started_at,
            "logPath": host.log.path,
            "fingerprint": host.fingerprint,
            "scriptVersion": _script_version(),
            "servers": {},
        }
        if _SCRIPT_FILE:  # lets a client take scriptVersion without hashing the same file
            data["scriptFile"] = _SCRIPT_FILE[0]
        metadata_extra = host._hooks.metadata_extra
        if metadata_extra:
            data.update(metadata_extra())
        if generation == self.generation:  # not marked dirty while we built it
            self.cache = data
        return data

    def write(self) -> bool:
        """Write the record; a failure (disk full, quota, EMFILE) is logged and retried by
        housekeeping, never fatal: the daemon still serves, and the old record stays whole."""
        path = self.host.paths.metadata
        generation = self.generation
        try:
            write_metadata(path, self.current())
        except OSError as exc:
            if not self.failing:
                self.host.log.event(f"cannot write metadata {path}: {exc.strerror or exc}; retrying")
            self.failing = True
            self.dirty = True
            return False
        if self.failing:
            self.host.log.event("metadata written again")
        self.failing = False
        if generation == self.generation:  # else marked dirty meanwhile: write again
            self.dirty = False
        return True

    def sync(self) -> None:
        """Repair missing or torn metadata, or record server changes — only while we own the
        socket and nobody else is inside the bind guard (they would be writing it)."""
        host = self.host
        current = RecordedDaemon.read(host.paths.metadata)
        if not self.dirty and current is not None and current.pid == self.pid:
            return
        # A record naming another pid is wrong while we own the socket inode, whether that pid
        # is alive or not: a successor replaces the socket under the bind lock before writing
        # its record, so the check below (under that lock) never overwrites a successor's.
        lock = FileLock(host.paths.bind, what="bind lock")
        if not lock.acquire(timeout=0):
            return
        try:
            if host._listener.owns_path(host.paths.socket) and host._state.reason is None:
                self.write()
        finally:
            lock.release()

    def remove(self) -> None:
        """Remove the metadata file while it names this process (a successor's stays)."""
        remove_metadata_if_owned(self.host.paths.metadata, self.pid)


class _Takeover:
    """The bind guard, run once under the bind lock: gather the facts, let ``plan_takeover``
    decide, act. Acting keeps a live fresh twin (reconcile) or clears the way — stops, waits
    for or terminates the daemon there, ends a dead one's servers — and binds, writing the
    metadata before the lock is released."""

    __slots__ = ("host", "log")

    def __init__(self, host: DaemonHost) -> None:
        self.host = host
        self.log = host.log

    def run(self) -> Optional[int]:
        """Keep a live fresh twin (its pid), or clear the way and bind (None)."""
        host = self.host
        with FileLock(host.paths.bind, what="bind lock"):
            facts = _TakeoverFacts.gather(host.paths, host.fingerprint, host.probe_timeout)
            if facts.plan == _PLAN_RECONCILE:
                self._reconcile(facts.probe.status, facts.recorded)
                return facts.probe.pid
            if facts.plan == _PLAN_LEAVE:
                # Busy, not hung: it keeps its socket and servers; callers wait for room.
                pid = facts.probe.pid or (facts.recorded.pid if facts.recorded is not None else 0)
                self.log.event(f"daemon pid {pid or '?'} is busy ({facts.probe.detail}); leaving it be")
                return pid
            self._clear_the_way(facts)
            self._reap_recorded_servers(facts.recorded)
            host._listener.bind(host.paths.socket)
            host._take_owner_lock()
            host._record.write()
            self.log.event(f"bound {host.paths.socket} (plan: {facts.plan})")
        return None

    def _clear_the_way(self, facts: _TakeoverFacts) -> None:
        """Carry out a plan that ends in a bind: whatever holds the socket goes first."""
        if facts.plan == _PLAN_STOP_THEN_BIND:
            self._stop_before_rebind(facts.probe, facts.recorded)
        elif facts.plan == _PLAN_WAIT_THEN_BIND:
            self._wait_for_stopping(facts.probe, facts.recorded)
        elif facts.plan == _PLAN_TERMINATE_THEN_BIND:
            assert facts.recorded is not None  # the plan needs an owner verified ours
            why = "stopped (state T)" if facts.owner_stopped else facts.probe.detail or "unreachable"
            self.log.event(f"terminating hung daemon pid {facts.recorded.pid}: {why}")
            facts.recorded.terminate()
        elif facts.kind == _PROBE_SILENT_TWICE:
            self.log.event("socket accepts but never answers and its owner is unknown; rebinding")

    def _reconcile(self, status: Dict[str, Any], recorded: Optional[RecordedDaemon]) -> None:
        """A live, fresh daemon runs: make the metadata match it if it does not."""
        wanted = status.get("metadata")
        if not isinstance(wanted, dict) or wanted.get("pid") != status.get("pid"):
            return
        if (
            recorded is None
            or recorded.pid != wanted["pid"]
            or recorded.start_time != wanted.get("pidStartTime")  # else no client verifies it
            or recorded.socket_path != self.host.paths.socket
        ):
            write_metadata(self.host.paths.metadata, wanted)
            self.log.event(f"reconciled metadata with live daemon pid {wanted['pid']}")

    def _stop_before_rebind(self, probe: ProbeResult, recorded: Optional[RecordedDaemon]) -> None:
        """A live but stale daemon: ask it to stop and wait for its pid before rebinding."""
        pid = probe.pid
        assert pid is not None
        self.log.event(f"stopping stale daemon pid {pid} (fingerprint changed) before rebinding")

        def unheard(exc: DaemonError) -> None:
            self.log.event(f"stale daemon pid {pid} did not take the stop request: {exc}")

        def say(plan: str) -> None:
            if plan == _ESCALATE_REFUSE:
                # Only the metadata's pid + start time proves it ours (verified peer); a daemon we cannot
                # verify is left alone. It loses its socket now and exits when it notices.
                self.log.event(
                    f"stale daemon pid {pid} did not exit and cannot be verified; rebinding anyway"
                )
            elif plan == _ESCALATE_TERMINATE:
                self.log.event(f"stale daemon pid {pid} did not exit within {_STOP_WAIT:g}s; terminating it")

        ask = (self.host.probe_timeout, self.host.probe_timeout)
        policy = _StopPolicy(ask, lambda: _STOP_WAIT, unheard, say)
        _stop_then_escalate(self.host.paths.socket, pid, recorded, _PROBE_LIVE, policy)

    def _wait_for_stopping(self, probe: ProbeResult, recorded: Optional[RecordedDaemon]) -> None:
        """A daemon answering "shutting down" still owns its servers: wait for its pid to
        go (bounded), so two copies of one server (one browser profile) never run at once."""
        pid, start = probe.status["pid"], probe.status.get("pidStartTime")
        self.log.event(f"daemon pid {pid} is shutting down; waiting for it to exit before binding")
        if _wait_gone(pid, _STOPPING_WAIT, str(start) if start else None):
            return
        # It answered on our private socket with this very pid and start time: ours.
        servers = recorded.servers if recorded is not None and recorded.pid == pid else {}
        answered = RecordedDaemon.from_record(
            {"pid": pid, "pidStartTime": start, "socketPath": self.host.paths.socket, "servers": servers}
        )
        if answered is None or not answered.is_ours():
            return
        self.log.event(f"daemon pid {pid} still shutting down after {_STOPPING_WAIT:g}s; terminating it")
        answered.terminate()

    def _reap_recorded_servers(self, recorded: Optional[RecordedDaemon]) -> None:
        """A SIGKILLed owner could not close its servers, and some ignore stdin EOF."""
        if recorded is None or recorded.is_ours():
            return  # a live owner closes its own servers
        recorded.end_servers(
            lambda name, pid: self.log.event(f"ending server '{name}' (pid {pid}) left by a dead daemon")
        )


class _Connection:
    """One connection, served in the socketserver pattern: read the request against a
    deadline, parse it, dispatch it, and send exactly one answer — with progress frames
    while the work runs and the caller watched for going away (see ``_Exchange``)."""

    __slots__ = ("host", "conn", "large")

    def __init__(self, host: DaemonHost, conn: socket.socket) -> None:
        self.host = host
        self.conn = conn
        self.large = False  # a large answer went out: memory to hand back once it is freed

    def handle(self) -> None:
        """Serve the one request, then close; bad input must never crash the daemon."""
        try:
            self._serve()
        except Exception as exc:
            self.host.log.event(f"connection error: {exc!r}")
        finally:
            try:
                self.conn.close()
            except OSError:
                pass
            self.host._load.closed()
        if self.large:  # its frame is unreferenced now that _serve returned
            _release_freed_memory()

    def _serve(self) -> None:
        try:
            raw = self._read_request()
        except _FrameTooLarge:
            too_large = f"request exceeds {_MAX_REQUEST_BYTES} bytes"
            _send_frame(self.conn, _error_frame(None, too_large, "request_too_large"))
            return
        except _Busy:
            _send_frame(self.conn, self.host._busy_frame(None, "too much pending input"))
            return
        except (socket.timeout, OSError):
            return  # silent, slow or vanished client: just drop it
        if raw is None:
            return
        request, error = _parse_request(raw)
        if error is not None:
            _send_frame(self.conn, error)
            return
        assert request is not None
        self._dispatch(request)

    def _read_request(self) -> Optional[bytes]:
        """The request line, or a complete JSON object sent without a newline (as mcporter's
        own client does), within a deadline and under the size and pending-memory caps."""
        conn, load = self.conn, self.host._load
        deadline = time.monotonic() + _REQUEST_READ_DEADLINE
        buf = bytearray()
        ends_object = False  # the last non-blank byte so far is "}": maybe a whole request
        try:
            while True:
                if ends_object and not _more_pending(conn) and _is_json(buf):
                    return bytes(buf)
                if len(buf) > _MAX_REQUEST_BYTES:
                    raise _FrameTooLarge()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise socket.timeout("request deadline")
                conn.settimeout(left)
                chunk = conn.recv(65536)
                if not chunk:
                    return bytes(buf) if buf.strip() else None
                nl = chunk.find(b"\n")  # only the new bytes: rescanning buf would be quadratic
                if nl >= 0:
                    return bytes(buf) + chunk[:nl]
                load.reserve(len(chunk), len(buf))
                buf += chunk
                tail = chunk.rstrip()
                ends_object = tail.endswith(b"}") if tail else ends_object
        finally:
            load.release(len(buf))

    def _dispatch(self, request: Dict[str, Any]) -> None:
        host = self.host
        rid, method = request.get("id"), request["method"]
        host.touch()
        if host._state.reason is not None:
            _send_frame(self.conn, host._shutting_down_frame(rid))
            return
        if method == "stop":
            host._handle_stop(self.conn, rid)
            return
        handler = host._builtin_status if method == "status" else host.handlers.get(method)
        if handler is None:
            _send_frame(self.conn, _error_frame(rid, f"unknown method: {method}", "unknown_method"))
            return
        cadence = None
        if request.get("protocolVersion") == DAEMON_PROTOCOL_VERSION:
            cadence = progress_cadence_ms(request.get("progressIntervalMs"))
        ctx = RequestContext(method)
        ex = _Exchange(self.conn, rid)
        host._load.begin(ex)
        try:  # in flight until answered: a stopping daemon waits for the answer to go out
            frame = self._run_handler(ex, handler, request["params"], ctx, cadence)
            reason = host._state.reason
            if reason is not None and not frame.get("ok"):
                # Its server was closed under it: say why, once, so the caller does not retry.
                frame = _error_frame(
                    rid, f"daemon stopped ({reason}) before {method} finished", "daemon_stopped"
                )
            if ctx.notices:
                frame["notices"] = ctx.notices
            self.large = _looks_large(frame)
            ex.answer(frame, self.large)
        finally:
            host._load.end(ex)

    def _run_handler(
        self,
        ex: _Exchange,
        handler: Callable[[Dict[str, Any], RequestContext], Any],
        params: Dict[str, Any],
        ctx: RequestContext,
        cadence_ms: Optional[int],
    ) -> Dict[str, Any]:
        import threading

        if handler == self.host._builtin_status:
            return self._call(ex.rid, handler, params, ctx)  # answered at once: nothing to watch
        # The work runs on its own thread while this one proves we are alive (progress frames)
        # and watches for the caller going away, so its server is told to cancel.
        box: List[Dict[str, Any]] = []
        done = threading.Event()

        def work() -> None:
            box.append(self._call(ex.rid, handler, params, ctx))
            done.set()

        threading.Thread(target=work, daemon=True).start()
        slice_s = min(cadence_ms / 1000.0, _CALLER_CHECK_INTERVAL) if cadence_ms else _CALLER_CHECK_INTERVAL
        watch = _CallerWatch(ex.conn)
        next_frame = time.monotonic() + (cadence_ms or 0) / 1000.0
        while not done.wait(slice_s):
            gone = watch.gone()
            if not gone and cadence_ms and time.monotonic() >= next_frame:
                next_frame += cadence_ms / 1000.0
                gone = not ex.progress(encode_frame(progress_frame(ex.rid, ctx.progress)))
            if gone:
                self.host.log.event(f"{ctx.method}: the caller went away; cancelling it")
                ctx.cancelled.set()
                # A handler that heeds ctx.cancelled returns at once; one that does not must
                # not hold this thread (or count as work in flight) forever. Nobody gets it.
                if not done.wait(_CANCEL_GRACE):
                    return _error_frame(ex.rid, "the caller went away", "cancelled")
                break
        return box[0]

    def _call(
        self, rid: Any, handler: Callable[..., Any], params: Dict[str, Any], ctx: RequestContext
    ) -> Dict[str, Any]:
        try:
            return {"id": rid, "ok": True, "result": handler(params, ctx)}
        except DaemonError as exc:
            frame = _error_frame(rid, str(exc), exc.code)
            if exc.rpc_code is not None:  # a server's JSON-RPC error reaches the caller whole
                frame["error"].update(rpcCode=exc.rpc_code, data=exc.data)
            return frame
        except Exception as exc:
            self.host.log.event(f"handler {ctx.method} failed: {exc!r}")
            return _error_frame(rid, f"{type(exc).__name__}: {exc}", "runtime_error")


def _compiled_in_this_process() -> bool:
    """Whether this process compiled this file instead of loading its bytecode cache: run as a
    script (launchd, systemd), with bytecode writing off, or where no cache could be written.
    The compiler leaves megabytes of freed memory behind in the C allocator."""
    cached = globals().get("__cached__")
    return __name__ == "__main__" or sys.dont_write_bytecode or not cached or not os.path.exists(cached)


def _release_freed_memory() -> None:
    """Give memory freed by a large result back to the OS. glibc keeps freed blocks of up
    to 32 MiB in its arenas once it has seen a larger one, so an idle daemon would stay tens
    of MiB fat after relaying a big answer; other C libraries need nothing."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return  # not glibc
    trim(0)


def _send_frame(conn: socket.socket, frame: Dict[str, Any], large: Optional[bool] = None) -> bool:
    """Send one answer frame, encoded as it goes: a 50 MiB result costs no second full
    copy, and a slow reader gets time per chunk rather than 5 s for the whole frame."""
    try:
        conn.settimeout(_SEND_IDLE)
        for piece in encode_answer_pieces(frame, large):
            conn.sendall(piece)
        return True
    except OSError:
        return False


def _answer_and_close(conn: socket.socket, frame: Dict[str, Any]) -> None:
    """Answer a connection we do not serve, without blocking (a fresh connection's send buffer
    holds a small frame), and close it. Input already waiting is read first, so the close
    does not reset the connection before the caller reads the answer."""
    try:
        conn.setblocking(False)
        try:
            conn.recv(_SMALL_REQUEST_BYTES)
        except OSError:
            pass
        data = encode_answer(frame)
        sent = 0
        while sent < len(data):
            sent += conn.send(data[sent:])
    except OSError:
        pass  # it went away, or will not read: nothing more to do for it
    finally:
        conn.close()


class _Exchange:
    """One request's connection: progress frames and exactly one answer, whoever sends it
    (its handler, or shutdown for a handler that never returned: ``if_stopped``, else an
    error saying the daemon stopped first)."""

    __slots__ = ("conn", "rid", "lock", "answered", "if_stopped")

    def __init__(self, conn: socket.socket, rid: Any, if_stopped: Optional[Dict[str, Any]] = None) -> None:
        import threading

        self.conn = conn
        self.rid = rid
        self.lock = threading.Lock()
        self.answered = False
        self.if_stopped = if_stopped

    def progress(self, frame: bytes) -> bool:
        with self.lock:
            if self.answered:
                return True
            try:
                self.conn.sendall(frame)
                return True
            except OSError:
                return False

    def answer(self, frame: Dict[str, Any], large: Optional[bool] = None, wait: float = -1) -> bool:
        """Send ``frame`` unless answered already; False then, or when another answer still
        going out holds the exchange past ``wait`` seconds (-1: as long as it takes)."""
        if not self.lock.acquire(timeout=wait):
            return False
        try:
            if self.answered:
                return False
            self.answered = True
            return _send_frame(self.conn, frame, large)
        finally:
            self.lock.release()


def progress_frame(rid: Any, progress: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """A progress frame; the server's latest progress rides along as an extra field, which
    mcporter's v2 clients ignore."""
    frame: Dict[str, Any] = {"type": "progress", "id": rid}
    if progress:
        frame["progress"] = progress
    return frame


class _CallerWatch:
    """Whether a request's caller went away, seen on its connection without waiting.

    A closed or killed caller shows as a hang-up (POLLHUP: both directions shut) or a reset.
    A caller that only shut its writing side (``nc -N``, a half-close) still reads the answer,
    so end-of-input alone is not "gone"; extra bytes after the request line are dropped.
    """

    def __init__(self, conn: socket.socket) -> None:
        import select

        self.conn = conn
        self.poller = select.poll()  # not select(): a busy daemon's fds can pass FD_SETSIZE
        self.poller.register(conn, select.POLLIN)
        self.select = select

    def gone(self) -> bool:
        try:
            events = self.poller.poll(0)
        except OSError:
            return True
        flags = events[0][1] if events else 0
        if flags & (self.select.POLLHUP | self.select.POLLERR | self.select.POLLNVAL):
            return True
        if flags & self.select.POLLIN:
            try:
                data = self.conn.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError:
                return True
            if not data:
                self.poller.modify(self.conn, 0)  # half-closed: from now on only a hang-up counts
        return False


def accept_backoff(previous: float) -> float:
    """The next pause before retrying accept() while out of fds: doubling, capped."""
    return min(max(previous * 2, 0.05), _ACCEPT_BACKOFF_MAX)


def idle_expired(idle_timeout: Optional[float], active: int, idle_for: float) -> bool:
    """Whether an idle daemon should shut down: a timeout set, nothing running, quiet long enough."""
    return bool(idle_timeout) and not active and idle_for >= idle_timeout  # type: ignore[operator]


# ##########################################################################################
# Daemon client: verified status, ensure (spawn lock, detached launch), requests, stop.
# ##########################################################################################


class DaemonClient:
    """Talks only to a daemon it verified; starts (or restarts) one when needed.

    ``launch_argv`` runs the host in the foreground (e.g. ``[python, script, "start",
    "--foreground"]``); it is started detached, in a new session, stderr to the log.
    """

    def __init__(
        self,
        paths: DaemonPaths,
        fingerprint: str,
        launch_argv: List[str],
        *,
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        probe_timeout: Optional[float] = None,
        start_timeout: float = _START_GIVE_UP,
        on_slow: Optional[Callable[[str], None]] = None,
    ) -> None:
        self.paths = paths
        self.fingerprint = fingerprint
        self.launch_argv = list(launch_argv)
        self.env = env
        self.cwd = cwd
        self.probe_timeout = probe_timeout or paths.app.env_seconds(
            "PROBE_TIMEOUT_MS", _DEFAULT_PROBE_TIMEOUT
        )
        self.start_timeout = start_timeout
        self.on_slow = on_slow or (lambda msg: print(msg, file=sys.stderr, flush=True))

    # -- verification ------------------------------------------------------------------------

    def verified_status(self, timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """The daemon's status when metadata, pid identity and its own answer all agree.

        The result carries ``fresh``: whether its fingerprint is ours. None when unverified.
        ``timeout`` is for the answer (default: the probe timeout). UnsafePathError when the
        state directory fails the safety checks: its record could have been planted by anyone.
        """
        if not self.paths.check():
            return None  # no state directory, so no record
        recorded = RecordedDaemon.read(self.paths.metadata)
        if recorded is None:
            return None
        facts = recorded.process_facts()
        if not record_is_live(recorded.record, self.paths.socket, facts):
            return None  # dead, reused, or stopped: no round trip needed to know
        return self._fresh_if_matches(recorded, self._ask_status(timeout), facts)

    def serving_status(self) -> Optional[Dict[str, Any]]:
        """``verified_status``, or else the daemon answering on the socket when its answer
        verifies against the record it carries (its own pid and start time).

        For reports only (``status``, ``doctor``): a damaged metadata file must not hide a
        daemon that serves, while the lifecycle still trusts only the file."""
        status = self.verified_status()
        if status is not None:
            return status
        recorded = RecordedDaemon.read(self.paths.metadata)
        if recorded is not None and recorded.is_stopped():
            return None  # hung (state T): asking would only wait out the probe timeout
        status = self._ask_status()
        carried = RecordedDaemon.from_record(status.get("metadata")) if status else None
        if carried is None:
            return None
        return self._fresh_if_matches(carried, status, carried.process_facts())

    def _fresh_if_matches(
        self,
        recorded: RecordedDaemon,
        status: Optional[Dict[str, Any]],
        facts: Tuple[Optional[str], Optional[str]],
    ) -> Optional[Dict[str, Any]]:
        """``status`` marked ``fresh`` or not, when it comes from the daemon ``recorded`` names."""
        if not status_matches(recorded.record, status, self.paths.socket, facts):
            return None
        assert status is not None
        status["fresh"] = status.get("fingerprint") == self.fingerprint
        return status

    def _ask_status(self, timeout: Optional[float] = None) -> Optional[Dict[str, Any]]:
        request = _builtin_request("status", "status")
        try:
            response = exchange(self.paths.socket, request, timeout or self.probe_timeout)
        except DaemonError:
            return None
        status = response.get("result") if response.get("ok") else None
        return status if isinstance(status, dict) else None

    def ensure(self) -> Tuple[Dict[str, Any], bool]:
        """(status of a verified fresh daemon, whether this call started it)."""
        status = self.verified_status()
        if status and status["fresh"]:
            return status, False
        self.paths.prepare()
        with FileLock(self.paths.lock, what="spawn lock"):
            status = self.verified_status()  # a racing caller may have started it meanwhile
            if status and status["fresh"]:
                return status, False
            return self._launch_and_wait()

    # -- launching -----------------------------------------------------------------------------

    def _launch_and_wait(self) -> Tuple[Dict[str, Any], bool]:
        began = time.monotonic()
        while True:
            proc, offset = self._launch()
            ready = self._wait_ready(proc, offset, began)
            if ready is not None:
                return ready
            # The child found another daemon serving, which then went away before it could be
            # verified: the request was never sent, so launching again is safe.

    def _launch(self) -> Tuple[subprocess.Popen, int]:
        import subprocess

        log_fd = os.open(self.paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        offset = os.lseek(log_fd, 0, os.SEEK_END)
        try:
            proc = subprocess.Popen(
                self.launch_argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_fd,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,  # survives the caller's terminal and process group
                close_fds=True,
            )
        except OSError as exc:
            raise DaemonStartError(f"cannot launch daemon ({self.launch_argv[0]}): {exc.strerror}") from None
        finally:
            os.close(log_fd)
        return proc, offset

    def _wait_ready(
        self, proc: subprocess.Popen, log_offset: int, began: float
    ) -> Optional[Tuple[Dict[str, Any], bool]]:
        """(status, whether we started it) once verified ready; None to launch again."""
        step, said_slow = 0.01, False
        while True:
            status = self.verified_status()
            # Our own child is accepted whatever its fingerprint: the config may have changed
            # since this process read it, and a fingerprint that no longer exists never shows.
            if status and (status["fresh"] or status["pid"] == proc.pid):
                _reap_in_background(proc)
                return status, status["pid"] == proc.pid  # another pid: a twin, adopted
            code = proc.poll()
            if code is not None:
                twin = _twin_named(self._log_lines(log_offset, proc.pid)) if code == 0 else None
                if twin is not None:
                    # The child's verdict: daemon ``twin`` serves the config as it read it
                    # (maybe newer than ours). Our request was never sent, so use that one.
                    status = self._adopt(twin, began)
                    if status is not None:
                        return status, False
                    if pid_alive(twin):
                        raise DaemonTimeout(
                            f"daemon (pid {twin}) serves the socket but could not be verified within "
                            f"{self.start_timeout:g}s (busy, or its metadata {self.paths.metadata} is damaged)"
                        )
                    return None  # it went away meanwhile: launch again
                status = self.verified_status()
                if status and (status["fresh"] or code == 0):
                    return status, False
                error = DaemonStartError(self._startup_error(log_offset, code, proc.pid))
                error.exit_code = 2 if code == 2 else 1  # the child's usage/config verdict holds
                raise error
            elapsed = time.monotonic() - began
            if elapsed > _START_SLOW_NOTICE and not said_slow:
                said_slow = True
                self.on_slow(f"daemon (pid {proc.pid}) is slow to start; still waiting…")
            if elapsed > self.start_timeout:
                _reap_in_background(proc)
                raise DaemonTimeout(
                    f"daemon (pid {proc.pid}) not ready after {self.start_timeout:g}s; "
                    f"log {self.paths.log} ends: {self._log_tail(log_offset, proc.pid) or '(empty)'}"
                )
            time.sleep(step)
            step = min(step * 1.5, 0.05)

    def _adopt(self, twin: int, began: float) -> Optional[Dict[str, Any]]:
        """The status of daemon ``twin`` once verified, polled while it lives and the start
        budget lasts; the child just heard it answer, so a slow answer is waited for."""
        patient = max(3 * self.probe_timeout, 1.0)  # as the bind guard's second probe
        step = 0.01
        while True:
            status = self.verified_status(patient)
            if status is not None:
                return status
            if not pid_alive(twin) or time.monotonic() - began > self.start_timeout:
                return None
            time.sleep(step)
            step = min(step * 2, 0.1)

    def _log_lines(self, offset: int, pid: int) -> List[str]:
        """The lines ``pid`` wrote since ``offset``: other daemons append to the same log, and
        their lines must never pass for the child's own."""
        try:
            with open(self.paths.log, "rb") as fh:
                fh.seek(offset)
                text = fh.read(1 << 20).decode("utf-8", "replace")
        except OSError:
            return []
        return [ln.strip() for ln in text.splitlines() if _log_line_pid(ln) == pid]

    def _log_tail(self, offset: int, pid: int, lines: int = 3) -> str:
        """The last ``lines`` lines ``pid`` wrote since ``offset``."""
        return " | ".join(self._log_lines(offset, pid)[-lines:])

    def _startup_error(self, offset: int, code: int, pid: int) -> str:
        name = self.paths.app.name
        said = [_strip_log_prefix(line, name) for line in self._log_lines(offset, pid)]
        text = launch_failure_text(
            pid, code, any(_is_bound_line(line) for line in said), said[-1] if said else ""
        )
        if not said:
            text += f" (log: {self.paths.log})"
        return f"daemon failed to start: {text}"

    # -- requests ------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        params: Optional[Dict[str, Any]] = None,
        *,
        idle_timeout: float = _DEFAULT_IDLE_BUDGET,
        progress_ms: Optional[int] = _CLIENT_PROGRESS_MS,
        auto_start: bool = True,
        notices: Optional[List[str]] = None,
        overall_timeout: Optional[float] = None,
        on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
        start_budget: float = 0.0,
        on_socket: Optional[Callable[[_socket.socket], None]] = None,
    ) -> Any:
        """Send one request to a verified fresh daemon (starting it if allowed). Raises
        RemoteError for ``ok: false``, DaemonTimeout past ``overall_timeout`` (progress or not;
        plus ``start_budget`` when the daemon reports a start, see ``exchange``).
        A server's progress, relayed in the daemon's progress frames, goes to ``on_progress``;
        ``on_socket`` gets each connection (see ``exchange``).

        A delivered request runs at most once: it is sent again (after ``ensure``) only when it
        never reached a daemon, or was answered ``shutting_down`` (its handler never ran). A
        ``busy`` answer (the daemon at its caps; the handler never ran either) is sent again
        after a short pause, for as long as the request's own time allows.
        """
        if auto_start:
            self.ensure()
        send = (
            method,
            params,
            idle_timeout,
            progress_ms,
            overall_timeout,
            on_progress,
            start_budget,
            on_socket,
        )
        until = time.monotonic() + (overall_timeout or idle_timeout)
        try:
            response = self._send_while_busy(send, until)
        except _NotDelivered:
            if not auto_start:
                raise
            self.ensure()
            response = self._send_while_busy(send, until)
        if auto_start and (response.get("error") or {}).get("code") == "shutting_down":
            self.ensure()
            response = self._send_while_busy(send, until)
        if notices is not None:
            notices.extend(str(n) for n in response.get("notices") or [])
        return result_or_raise(response, self.paths.app.usage_codes)

    def _send_while_busy(self, send: Tuple[Any, ...], until: float) -> Dict[str, Any]:
        """``_send``, again after a pause while the daemon answers ``busy``, until ``until``."""
        pause = 0.01
        while True:
            response = self._send(*send)
            busy = (response.get("error") or {}).get("code") == "busy"
            if not busy or time.monotonic() + pause > until:
                return response
            time.sleep(pause)
            pause = min(pause * 2, _BUSY_RETRY_MAX)

    def _send(
        self,
        method: str,
        params: Optional[Dict[str, Any]],
        idle: float,
        progress_ms: Optional[int],
        overall: Optional[float] = None,
        on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
        start_budget: float = 0.0,
        on_socket: Optional[Callable[[_socket.socket], None]] = None,
    ) -> Dict[str, Any]:
        req: Dict[str, Any] = {
            "id": f"{os.getpid()}-{time.monotonic_ns()}",
            "method": method,
            "params": params or {},
            "protocolVersion": DAEMON_PROTOCOL_VERSION,
        }
        if progress_ms:
            req["progressIntervalMs"] = progress_ms
        return exchange(
            self.paths.socket,
            req,
            idle,
            connect_timeout=self.probe_timeout,
            overall_timeout=overall,
            on_progress=on_progress,
            start_budget=start_budget,
            on_socket=on_socket,
        )

    # -- stopping ------------------------------------------------------------------------------

    def stop(self, timeout: float = _STOP_WAIT) -> str:
        """Stop the daemon and return after its pid is gone; if it is still there when
        ``timeout`` has passed and the metadata proves it ours, terminate it and its
        servers. A daemon already stopping (a concurrent ``stop``) is waited for. Returns
        what happened, in words. A state directory that fails the safety checks is refused
        (UnsafePathError) before its record is read: a planted record must never get a pid
        signalled."""
        deadline = time.monotonic() + timeout
        self.paths.check()
        # Read before the stop: a stopping daemon removes its file, and only the record proves
        # a pid ours (verified peer), so it is what allows a terminate later.
        recorded = RecordedDaemon.read(self.paths.metadata)
        recorded_ours = recorded is not None and recorded.is_ours()
        if not recorded_ours:
            # Torn or gone: the socket's owner still holds its owner lock, which names it (and
            # is proved ours the same way, pid + start time). "No daemon running" must never
            # be said of a process that holds the socket (one SIGSTOPped, say).
            owner = _socket_owner(self.paths)
            if owner is not None:
                recorded, recorded_ours = owner, True
        probe = probe_live_daemon(self.paths.socket, min(self.probe_timeout, timeout))
        pid = stop_target(probe.kind, probe.pid, recorded.pid if recorded else None, recorded_ours)
        if pid is None:
            cleaned = self._clear_stale_files()
            return "no daemon running" + (" (removed stale files)" if cleaned else "")

        def left() -> float:
            return max(deadline - time.monotonic(), 0.0)

        ask = None
        if probe.kind in (_PROBE_LIVE, _PROBE_SILENT, _PROBE_BUSY, _PROBE_CLOSED):
            # Silent, busy or closed may only be slow: ask, then wait it out.
            answer_s = max(left(), 0.05)
            ask = (answer_s, min(answer_s, self.probe_timeout))
        plan = _stop_then_escalate(self.paths.socket, pid, recorded, probe.kind, _StopPolicy(ask, left))
        return self._stop_outcome(plan, pid, probe.kind, timeout)

    def _stop_outcome(self, plan: str, pid: int, kind: str, timeout: float) -> str:
        """What ``stop`` says of a carried-out plan (or raises, when it could not stop it)."""
        if plan == _ESCALATE_STOPPED:
            return f"stopped (pid {pid})"
        if plan == _ESCALATE_STILL_STOPPING:
            raise DaemonTimeout(f"daemon (pid {pid}) is still shutting down after {timeout:g}s")
        if plan == _ESCALATE_REFUSE:
            # Signals only with proof (verified peer): the record read before the stop names this very
            # process (a stopping daemon removes the file, so it had to be read first).
            raise DaemonError(
                f"daemon (pid {pid}) did not stop within {timeout:g}s and cannot be verified as ours; "
                "not signalled"
            )
        self._clear_stale_files()  # terminated: its files are left behind
        if kind in (_PROBE_LIVE, _PROBE_STOPPING):
            return f"daemon (pid {pid}) did not stop within {timeout:g}s; terminated it"
        return f"terminated unresponsive daemon (pid {pid})"

    def _clear_stale_files(self) -> bool:
        """Under the bind lock: end a dead daemon's recorded servers, drop its files."""
        if not os.path.isdir(self.paths.base_dir):
            return False
        cleaned = False
        with FileLock(self.paths.bind, timeout=5.0, what="bind lock"):
            recorded = RecordedDaemon.read(self.paths.metadata)
            if recorded is not None and recorded.is_ours():
                return False  # a live owner appeared meanwhile
            if recorded is not None:
                recorded.end_servers()
            if recorded is not None or os.path.exists(self.paths.metadata):
                _unlink_quietly(self.paths.metadata)
                cleaned = True
            if (
                os.path.exists(self.paths.socket)
                and probe_live_daemon(self.paths.socket, self.probe_timeout).kind == _PROBE_DEAD
            ):
                _unlink_quietly(self.paths.socket)
                cleaned = True
        return cleaned


def stop_target(kind: str, answered: Optional[int], recorded: Any, recorded_ours: bool) -> Optional[int]:
    """Which pid a ``stop`` waits for: the one that answered (live, stopping, or busy naming
    itself), else the metadata's pid when it is verified ours (silent, or its socket is gone);
    else none."""
    if kind in (_PROBE_LIVE, _PROBE_STOPPING) or (kind == _PROBE_BUSY and answered is not None):
        return answered
    return recorded if recorded_ours else None


def launch_failure_text(pid: int, code: int, bound: bool, last_line: str) -> str:
    """What to say of a launched daemon that exited (``code``; negative: killed by that
    signal) before it was ready, free of I/O. ``bound``: its log says it bound the socket;
    ``last_line``: its last log line. Its own error line is quoted as it is; a death says
    what ended it, and when."""
    if code < 0:
        import signal

        try:
            name = f" ({signal.Signals(-code).name})"
        except ValueError:
            name = ""
        how = f"was killed by signal {-code}{name}"
    else:
        how = f"exited with code {code}"
    if bound:
        said = "" if not last_line or _is_bound_line(last_line) else f"; its last log line: {last_line}"
        return f"the launched daemon (pid {pid}) {how} right after binding{said}"
    if last_line and code > 0:
        return last_line  # its own error, e.g. a config it cannot read
    return f"the launched daemon (pid {pid}) {how} before it was ready" + (
        f"; its last log line: {last_line}" if last_line else ""
    )


def _is_bound_line(message: str) -> bool:
    return message.startswith("bound ") and "(plan: " in message


def _twin_named(messages: List[str]) -> Optional[int]:
    """The pid in a launched host's "daemon already running (pid N)" (its verdict that N
    serves), read from its own log lines."""
    for line in reversed(messages):
        text = _strip_log_prefix(line, "")
        head = "daemon already running (pid "
        if text.startswith(head):
            digits = text[len(head) :].split(")", 1)[0]
            return int(digits) if digits.isdigit() and int(digits) > 0 else None
    return None


def _reap_in_background(proc: subprocess.Popen) -> None:
    """A long-lived caller must not collect zombies: wait for the detached child off-thread."""
    import threading

    threading.Thread(target=proc.wait, name="daemon-reaper", daemon=True).start()


def _log_line_pid(line: str) -> Optional[int]:
    """The pid of a log line (``<stamp>Z [<pid>] message``); None for an unstamped line."""
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].endswith("Z") or not parts[1].startswith("["):
        return None
    digits = parts[1][1:].rstrip("]")
    return int(digits) if digits.isdigit() and parts[1].endswith("]") else None


def _strip_log_prefix(line: str, name: str) -> str:
    """Drop our log line's timestamp and pid, and the application's ``<name>: ``, so the
    child's own error reads as one line."""
    parts = line.split(" ", 2)
    if len(parts) == 3 and parts[0].endswith("Z") and parts[1].startswith("["):
        line = parts[2]
    prefix = f"{name}: "
    return line[len(prefix) :] if line.startswith(prefix) else line


# ==== The vendorable core ends here. Everything below is MCP: config, servers, the CLI. ====


# ##########################################################################################
# MCP constants and errors: protocol versions, server timings, keep-alive defaults.
# ##########################################################################################

__all__ += [
    # -- the MCP layer --
    "MCP_PROTOCOL_VERSION",
    "McpError",
    "Config",
    "ServerSpec",
    "load_config",
    "discover_config",
    "config_fingerprint",
    "parse_jsonc",
    "McpStdioClient",
    "McpKeepAliveService",
    "ServeBridge",
    "serve_name",
    "parse_serve_name",
    # -- the CLI --
    "main",
]

_PROG = "mcporter-daemon"

# What the core must know of this tool: its name, its MCPORTER_DAEMON_* overrides (DIR,
# PROBE_TIMEOUT_MS), its state directory beside mcporter's, its /tmp/mcporter-<uid> fallback
# socket directory, and the error codes of its handlers that mean a usage or config problem.
use_app(
    DaemonApp(
        _PROG,
        "MCPORTER_DAEMON_",
        xdg_state_dir=os.path.join("mcporter", "pydaemon"),
        home_state_dir=os.path.join(".mcporter", "pydaemon"),
        tmp_dir="mcporter",
        usage_codes=("config", "unknown_server", "not_keep_alive", "command_not_found", "invalid_arguments"),
    )
)

MCP_PROTOCOL_VERSION = "2025-11-25"

_DEFAULT_CALL_TIMEOUT = 60.0  # MCPORTER_DAEMON_TIMEOUT_MS or --timeout override

_MCP_OLDEST_VERSION = "2024-11-05"

_STDERR_TAIL_LINES = 3  # a dead server's error carries its last stderr lines

_STDERR_LINE_CHARS = 300

_STDERR_EOF_WAIT = 0.3  # for a dying server's last stderr lines (a grandchild may hold the pipe)

_STDERR_LINE_CAP = 64 * 1024  # a longer stderr line is logged cut (a newline-free flood stays bounded)

_STDERR_READ = 64 * 1024

_MCP_CLOSE_GRACE = _wait(2.0, 1.0)  # stdin closed, then SIGTERM, then SIGKILL, this far apart
# A close's every step: exit wait, SIGTERM grace, SIGKILL wait, reap (McpStdioClient._end_group).
_MCP_CLOSE_WORST = 4 * _MCP_CLOSE_GRACE + 0.5

_MCP_WRITE_DEADLINE = _wait(2.0, 1.0)  # for frames not tied to a call (notifications, answers to the server)

_CANCEL_WRITE_DEADLINE = 0.5

_CANCEL_CHECK_INTERVAL = 0.05  # a call whose caller may go away looks this often whether it did

_WRITE_SLICE = 0.1  # a blocked writer re-checks this often whether close() wants the pipe

_CLIENT_DEADLINE_GRACE = _wait(3.0, 1.5)  # past a call's own timeout, for the daemon to deliver its error

_DEFAULT_HEALTH_CHECK_MS = 30_000  # a kept server idle this long is pinged (lifecycle.healthCheckMs)

_PING_TIMEOUT = _wait(5.0, 2.0)  # two missed in a row restart a server: never short enough to miss a busy one

_PING_FAILURES_TO_RESTART = 2  # one lost ping may be a hiccup; two in a row is a wedged server

_WEDGED_CLOSE_GRACE = _wait(1.0, 0.5)  # it stopped answering: shorter grace steps than a normal close

_TEST_CLOCK_VAR = "MCPORTER_DAEMON_TEST_CLOCK_FILE"  # private: tests step the daemon's wall clock


def _mono_ms() -> int:
    """Now on the monotonic clock, in ms: what intervals (idle close, pings) are measured on,
    so no step of the wall clock (NTP, a suspend, a user) stretches or shrinks them."""
    return int(time.monotonic() * 1000)


def _install_test_clock() -> None:
    """For tests only: when MCPORTER_DAEMON_TEST_CLOCK_FILE names a file, this process's
    ``time.time()`` is offset by the seconds written in it (read at each call), so a test can
    step the wall clock inside a running daemon and see that no interval depends on it."""
    path = os.environ.get(_TEST_CLOCK_VAR)
    if not path:
        return
    real = time.time

    def stepped() -> float:
        try:
            with open(path) as fh:
                return real() + float(fh.read().strip() or 0)
        except (OSError, ValueError):
            return real()

    time.time = stepped


_MALLOC_MMAP_VAR = "MALLOC_MMAP_THRESHOLD_"  # glibc reads it at start-up
_MALLOC_SET_BY_US = "MCPORTER_DAEMON_MALLOC_TUNED"
_DAEMON_MMAP_THRESHOLD = str(1024 * 1024)
_DEFAULT_STARTUP_TIMEOUT_MS = 60_000  # spawn + initialize (startupTimeoutMs), as mcporter

_KEEPALIVE_NAMES = ("chrome-devtools", "mobile-mcp", "playwright", "cloudbase")

_KEEPALIVE_COMMAND_HINTS = ("chrome-devtools-mcp", "@playwright/mcp", "mobile-mcp", "cloudbase-mcp")


class McpError(DaemonError):
    """An MCP server failed, answered with an error, or spoke a version we do not."""

    def __init__(self, message: str, code: str = "mcp_error", rpc_code: Any = None, data: Any = None) -> None:
        super().__init__(message, code=code, rpc_code=rpc_code, data=data)
        if code == "command_not_found":
            self.exit_code = 2  # a configuration problem, wherever the server runs


# ##########################################################################################
# Config: discovery, JSONC, server entries, editor imports and the config fingerprint.
# ##########################################################################################


def _skip_blank(text: str, i: int) -> int:
    """Index of the next character that is not white space or inside a comment."""
    n = len(text)
    while i < n:
        if text[i] in " \t\r\n":
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        else:
            break
    return i


def _strip_jsonc(text: str) -> str:
    """Blank out comments and trailing commas, keeping every line and column in place."""
    out: List[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        ch = text[i]
        if in_string:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 1
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
            out.append(ch)
        elif text.startswith("//", i) or text.startswith("/*", i):
            end = _skip_blank(text, i)
            out.append("".join(c if c == "\n" else " " for c in text[i:end]))
            i = end
            continue
        elif ch == ",":
            j = _skip_blank(text, i + 1)
            out.append(" " if j < n and text[j] in "}]" else ch)  # one trailing comma only
        else:
            out.append(ch)
        i += 1
    return "".join(out)


def parse_jsonc(text: str, source: str) -> Any:
    """Parse JSON with comments and trailing commas; errors name the line and column."""
    try:
        # Plain JSON first: the C parser takes a 2 MB ~/.claude.json in milliseconds, where
        # stripping comments in Python first costs half a second on every call.
        return _json_loads(text)
    except ValueError:
        pass
    try:
        return json.loads(_strip_jsonc(text))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{source}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None


def _is_env_name(name: str) -> bool:
    return bool(name) and not name[0].isdigit() and all(c == "_" or c.isascii() and c.isalnum() for c in name)


def _expand_placeholders(
    value: str,
    environ: Dict[str, str],
    refs: Optional[Dict[str, Optional[str]]] = None,
    missing: Optional[List[str]] = None,
) -> str:
    """``${VAR}`` and ``${VAR:-fallback}`` as mcporter expands them: an unset or empty VAR
    takes the fallback; an unset VAR without one is empty, and its name goes to ``missing``
    (callers that must not run with a hole in an argument refuse it). ``refs`` collects each
    variable read and its value (None when unset). ``${...}`` that is not a variable name
    (VS Code's ``${input:token}``) stays as written."""
    out, i = [], 0
    while True:
        start = value.find("${", i)
        end = value.find("}", start + 2) if start >= 0 else -1
        if start < 0 or end < 0:
            out.append(value[i:])
            return "".join(out)
        name, sep, fallback = value[start + 2 : end].partition(":-")
        if not _is_env_name(name):
            out.append(value[i : start + 2])
            i = start + 2
            continue
        out.append(value[i:start])
        got = environ.get(name)
        if refs is not None:
            refs[name] = got
        if got is None and not sep and missing is not None and name not in missing:
            missing.append(name)
        out.append(got if got else fallback if sep else "")
        i = end + 1


def _env_name_set(raw: Optional[str]) -> Tuple[bool, frozenset]:
    """``*`` → (True, ∅); ``a,b`` → (False, {a, b})."""
    names = frozenset(p.strip() for p in (raw or "").split(",") if p.strip())
    return "*" in names, names


class ServerSpec:
    """One configured MCP server, resolved: argv, env, cwd, keep-alive and why."""

    __slots__ = (
        "name",
        "command",
        "env",
        "cwd",
        "url",
        "keep_alive",
        "keep_alive_reason",
        "idle_timeout_ms",
        "health_check_ms",
        "source",
        "startup_timeout_ms",
        "allowed_tools",
        "blocked_tools",
        "unknown_keys",
        "problem",
        "env_refs",
    )

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source
        self.command: List[str] = []
        self.env: Dict[str, str] = {}
        self.cwd: Optional[str] = None
        self.url: Optional[str] = None
        self.keep_alive = False
        self.keep_alive_reason = "not selected"
        self.idle_timeout_ms: Optional[int] = None
        self.health_check_ms = _DEFAULT_HEALTH_CHECK_MS  # 0: never pinged
        self.startup_timeout_ms = _DEFAULT_STARTUP_TIMEOUT_MS  # spawn + initialize
        self.allowed_tools: Optional[frozenset] = None  # None: no allow-list
        self.blocked_tools: frozenset = frozenset()
        self.unknown_keys: List[str] = []  # for doctor: keys neither this tool nor mcporter knows
        self.problem = ""  # why it cannot run (an unset ${VAR}); raised when it is used
        self.env_refs: Dict[str, Optional[str]] = {}  # ${VAR}s it reads: their values (None: unset)

    def __repr__(self) -> str:
        return f"ServerSpec({self.name!r}, command={self.command!r}, keep_alive={self.keep_alive})"

    def allows_tool(self, name: str) -> bool:
        """Whether ``allowedTools``/``blockedTools`` let this tool be listed and called:
        exact names, as mcporter matches them; an empty allow-list allows nothing."""
        if self.allowed_tools is not None:
            return name in self.allowed_tools
        return name not in self.blocked_tools

    def tool_refusal(self, name: str) -> str:
        """The one line refusing a filtered tool (empty when it is allowed)."""
        if self.allows_tool(name):
            return ""
        rule = "is not in allowedTools" if self.allowed_tools is not None else "is in blockedTools"
        return f"tool '{name}' of server '{self.name}' {rule} ({self.source}); it is not called"


class Config:
    """The merged configuration and everything that identifies it."""

    __slots__ = (
        "path",
        "layers",
        "explicit",
        "servers",
        "daemon_idle_timeout_ms",
        "root",
        "imports",
        "looping",
    )

    def __init__(self, path: str, layers: List[Tuple[str, Optional[bytes]]], explicit: bool):
        self.path = path  # the config path that names the daemon
        self.layers = layers  # (path, bytes or None when absent), lowest precedence first
        self.explicit = explicit
        self.servers: Dict[str, ServerSpec] = {}
        self.daemon_idle_timeout_ms: Optional[int] = None
        self.root = ""
        self.imports: List[Any] = []  # _ImportedFile: editor configs that were read
        self.looping: Dict[str, str] = {}  # servers that run our own `serve`: name -> source

    def keep_alive_servers(self) -> List[str]:
        """Names of the servers the daemon keeps running."""
        return [name for name, spec in self.servers.items() if spec.keep_alive]

    def fingerprint(self) -> str:
        """The daemon identity for this config: layers, imports, keep-alive env, versions."""
        return config_fingerprint(list(self.layers) + [f.layer() for f in self.imports])


def _read_optional(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None


def config_path_risk(mode: int, owner: int, me: int, is_dir: bool) -> Tuple[str, str]:
    """("refuse" | "warn" | "", why) for a config file or its directory, as ssh's StrictModes:
    one that another user owns or anyone may write could make us run their command. A sticky
    world-writable directory (/tmp) is fine: nobody else can replace a file in it."""
    import stat

    if owner not in (me, 0):
        return "refuse", f"is owned by uid {owner}, not by you (uid {me}) or root"
    if mode & stat.S_IWOTH and not (is_dir and mode & stat.S_ISVTX):
        return "refuse", "is writable by every user"
    if mode & stat.S_IWGRP and not (is_dir and mode & stat.S_ISVTX):
        return "warn", "is writable by its group"
    return "", ""


def _config_path_risks(path: str) -> List[Tuple[str, str, str, str]]:
    """(verdict, path, why, fix) for a config file and the directories holding it (as spelled
    and, for a symlink, where it points)."""
    out = []
    me = os.geteuid()
    real = os.path.realpath(path)
    for target in dict.fromkeys([path, os.path.dirname(path), os.path.dirname(real)]):
        try:
            st = os.stat(target)
        except OSError:
            continue
        is_dir = os.path.isdir(target)
        verdict, why = config_path_risk(st.st_mode, st.st_uid, me, is_dir)
        if verdict:
            what = "directory" if is_dir else "file"
            fix = f"chmod go-w {target}" if "writable" in why else f"chown {me} {target}, or remove it"
            out.append((verdict, target, f"config {what} {target} {why}", fix))
    return out


def _refuse_unsafe_config(path: str) -> None:
    for verdict, _target, why, fix in _config_path_risks(path):
        if verdict == "refuse":
            raise ConfigError(f"{why}; refusing to run its commands — fix: {fix}")


def _home_config_candidates() -> List[str]:
    out = []
    xdg = os.environ.get("XDG_CONFIG_HOME")
    if xdg:
        xdg = os.path.abspath(xdg)  # layer paths are part of the fingerprint: never cwd-relative
        out += [os.path.join(xdg, "mcporter", "mcporter.json" + s) for s in ("", "c")]
    home = os.path.join(os.path.expanduser("~"), ".mcporter", "mcporter.json")
    return out + [home, home + "c"]


def _explicit_config_path(config: Optional[str]) -> Optional[str]:
    """``--config``, else ``MCPORTER_CONFIG``, made absolute; None when neither is set."""
    explicit = config or os.environ.get("MCPORTER_CONFIG")
    return os.path.abspath(os.path.expanduser(explicit)) if explicit else None


def discover_config(
    config: Optional[str] = None, root: Optional[str] = None
) -> Tuple[str, List[Tuple[str, Optional[bytes]]], bool]:
    """(naming path, layers, explicit) as mcporter discovers them."""
    path = _explicit_config_path(config)
    if path:
        data = _read_optional(path)
        if data is None:
            raise ConfigError(f"{path}: config file not found")
        _refuse_unsafe_config(path)
        return path, [(path, data)], True
    project = os.path.join(os.path.abspath(root or os.getcwd()), "config", "mcporter.json")
    layers: List[Tuple[str, Optional[bytes]]] = []
    home_path = None
    for candidate in _home_config_candidates():
        data = _read_optional(candidate)
        if data is not None:
            home_path = candidate
            layers.append((candidate, data))
            break
    if home_path is None:
        layers.append((_home_config_candidates()[-2], None))
    project_data = _read_optional(project)
    layers.append((project, project_data))
    for layer_path, data in layers:
        if data is not None:
            _refuse_unsafe_config(layer_path)
    naming = project if project_data is not None or home_path is None else home_path
    return naming, layers, False


def config_fingerprint(layers: Iterable[Tuple[str, Optional[bytes]]]) -> str:
    """Content hash naming a daemon's identity: layers, keep-alive env, protocol, script."""
    h = _sha256()
    # Paths and environment values are bytes to the OS; fsencode keeps non-UTF-8 ones hashable.
    for path, data in layers:
        digest = "absent" if data is None else _sha256(data).hexdigest()
        h.update(os.fsencode(path) + f"\0{digest}\0".encode())
    for name in ("MCPORTER_KEEPALIVE", "MCPORTER_DISABLE_KEEPALIVE"):
        h.update(f"{name}=".encode() + os.fsencode(os.environ.get(name, "")) + b"\0")
    h.update(f"protocol={DAEMON_PROTOCOL_VERSION}\0script={_script_version()}".encode())
    return h.hexdigest()[:32]


def _type_error(source: str, where: str, expected: str, got: Any) -> ConfigError:
    return ConfigError(f"{source}: {where} must be {expected}, not {type(got).__name__}")


def _parse_lifecycle(spec: ServerSpec, raw: Any, where: str) -> Optional[bool]:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"mode": raw}
    if not isinstance(raw, dict):
        raise _type_error(spec.source, where, "a string or an object", raw)
    mode = raw.get("mode", "keep-alive")
    if mode not in ("keep-alive", "ephemeral"):
        raise ConfigError(f"{spec.source}: {where}.mode must be 'keep-alive' or 'ephemeral'")
    idle = raw.get("idleTimeoutMs")
    if idle is not None:
        if isinstance(idle, bool) or not isinstance(idle, (int, float)) or idle <= 0:
            raise ConfigError(f"{spec.source}: {where}.idleTimeoutMs must be a positive number")
        spec.idle_timeout_ms = int(idle)
    health = raw.get("healthCheckMs")
    if health is not None:
        if isinstance(health, bool) or not isinstance(health, (int, float)) or health < 0:
            raise ConfigError(f"{spec.source}: {where}.healthCheckMs must be a number >= 0 (0: no pings)")
        spec.health_check_ms = int(health)
    return mode == "keep-alive"


def _split_command(command: str) -> List[str]:
    """``shlex.split``: split like a shell would, but never run one. Without quotes or
    backslashes that is a split at shlex's white space, which spares a call importing shlex
    (and the regular expressions it compiles)."""
    if any(c in command for c in "'\"\\"):
        import shlex

        return shlex.split(command)
    spaced = command.replace("\t", " ").replace("\r", " ").replace("\n", " ")
    return [word for word in spaced.split(" ") if word]


def _parse_command(spec: ServerSpec, entry: Dict[str, Any], where: str, environ: Dict[str, str]) -> None:
    command = entry.get("command")
    if isinstance(command, str):
        argv = _split_command(command)
    elif isinstance(command, list) and all(isinstance(p, str) for p in command):
        argv = list(command)
    else:
        raise _type_error(spec.source, f"{where}.command", "a string or a list of strings", command)
    args = entry.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise _type_error(spec.source, f"{where}.args", "a list of strings", args)
    if not argv:
        raise ConfigError(f"{spec.source}: {where}.command is empty")
    # Expanded word by word, after the split: a value with spaces stays one argument, as a
    # quoted "$VAR" in a shell, and can never add arguments of its own.
    spec.command = [_expand_strict(spec, w, environ, f"{where}.command") for w in argv]
    spec.command += [_expand_strict(spec, a, environ, f"{where}.args") for a in args]


def _expand_strict(spec: ServerSpec, value: str, environ: Dict[str, str], where: str) -> str:
    """A placeholder in command, args or cwd: an unset variable without a default is the
    server's problem (raised when it is used), never a silently empty argument."""
    missing: List[str] = []
    out = _expand_placeholders(value, environ, spec.env_refs, missing)
    if missing and not spec.problem:
        spec.problem = (
            f"server '{spec.name}': environment variable {missing[0]} is not set "
            f"(${{{missing[0]}}} in {where}, {spec.source}); set it, or write ${{{missing[0]}:-default}}"
        )
    return out


# Every key of a server entry that mcporter knows; the ones this tool does not use (HTTP and
# OAuth settings) are not typos, so doctor names only the rest.
_SERVER_KEYS = frozenset(
    [
        "command",
        "executable",
        "args",
        "env",
        "cwd",
        "lifecycle",
        "url",
        "baseUrl",
        "base_url",
        "serverUrl",
        "server_url",
        "allowedTools",
        "allowed_tools",
        "blockedTools",
        "blocked_tools",
        "startupTimeoutMs",
        "startup_timeout_ms",
        "description",
        "headers",
        "auth",
        "tokenCacheDir",
        "token_cache_dir",
        "clientName",
        "client_name",
        "protocolVersion",
        "protocol_version",
        "chromeDevtoolsRelay",
        "chrome_devtools_relay",
        "oauthClientId",
        "oauth_client_id",
        "oauthClientSecret",
        "oauth_client_secret",
        "oauthClientSecretEnv",
        "oauth_client_secret_env",
        "oauthTokenEndpointAuthMethod",
        "oauth_token_endpoint_auth_method",
        "oauthRedirectUrl",
        "oauth_redirect_url",
        "oauthClientMetadataUrl",
        "oauth_client_metadata_url",
        "oauthScope",
        "oauth_scope",
        "oauthCommand",
        "oauth_command",
        "bearerToken",
        "bearer_token",
        "bearerTokenEnv",
        "bearer_token_env",
        "refresh",
        "httpFetch",
        "http_fetch",
        "logging",
        "type",
    ]
)


def _parse_tool_filters(spec: ServerSpec, entry: Dict[str, Any], where: str) -> None:
    """``allowedTools``/``blockedTools`` (or snake_case): exact tool names; both at once is
    an error, as in mcporter, since which one wins would be a guess."""
    lists: Dict[str, frozenset] = {}
    for key, snake in (("allowedTools", "allowed_tools"), ("blockedTools", "blocked_tools")):
        value = entry.get(key, entry.get(snake))
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise _type_error(spec.source, f"{where}.{key}", "a list of tool names", value)
        lists[key] = frozenset(value)
    if len(lists) == 2:
        raise ConfigError(
            f"{spec.source}: {where}: give allowedTools or blockedTools, not both (as in mcporter)"
        )
    spec.allowed_tools = lists.get("allowedTools")
    spec.blocked_tools = lists.get("blockedTools", frozenset())


def _parse_startup_timeout(spec: ServerSpec, entry: Dict[str, Any], where: str) -> None:
    value = entry.get("startupTimeoutMs", entry.get("startup_timeout_ms"))
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(
            f"{spec.source}: {where}.startupTimeoutMs must be a positive number of milliseconds"
        )
    spec.startup_timeout_ms = int(value)


def _parse_server(name: str, entry: Any, source: str, base_dir: str, environ: Dict[str, str]) -> ServerSpec:
    where = f"mcpServers.{name}"
    if not isinstance(entry, dict):
        raise _type_error(source, where, "an object", entry)
    spec = ServerSpec(name, source)
    spec.unknown_keys = [str(k) for k in entry if k not in _SERVER_KEYS]
    _parse_tool_filters(spec, entry, where)
    url = entry.get("url") or entry.get("baseUrl")
    if url:
        if not isinstance(url, str):
            raise _type_error(source, f"{where}.url", "a string", url)
        spec.url = url
        return spec
    _parse_command(spec, entry, where, environ)
    env = entry.get("env", {})
    if not isinstance(env, dict):
        raise _type_error(source, f"{where}.env", "an object", env)
    for key, value in env.items():
        if not isinstance(value, str):
            raise _type_error(source, f"{where}.env.{key}", "a string", value)
    # env stays lenient, as in mcporter: an unset ${VAR} there is an empty value.
    spec.env = {str(k): _expand_placeholders(v, environ, spec.env_refs) for k, v in env.items()}
    cwd = entry.get("cwd")
    if cwd is not None:
        if not isinstance(cwd, str):
            raise _type_error(source, f"{where}.cwd", "a string", cwd)
        cwd = _expand_strict(spec, cwd, environ, f"{where}.cwd")
        spec.cwd = os.path.join(base_dir, os.path.expanduser(cwd))
    _parse_startup_timeout(spec, entry, where)
    explicit = _parse_lifecycle(spec, entry.get("lifecycle"), f"{where}.lifecycle")
    _select_keep_alive(spec, explicit, environ)
    return spec


def _select_keep_alive(spec: ServerSpec, explicit: Optional[bool], environ: Dict[str, str]) -> None:
    """Environment overrides win, then the config's lifecycle, then the known-server defaults."""
    off_all, off = _env_name_set(environ.get("MCPORTER_DISABLE_KEEPALIVE"))
    on_all, on = _env_name_set(environ.get("MCPORTER_KEEPALIVE"))
    joined = " ".join(spec.command)
    if off_all or spec.name in off:
        spec.keep_alive, spec.keep_alive_reason = False, "MCPORTER_DISABLE_KEEPALIVE"
    elif on_all or spec.name in on:
        spec.keep_alive, spec.keep_alive_reason = True, "MCPORTER_KEEPALIVE"
    elif explicit is not None:
        spec.keep_alive, spec.keep_alive_reason = explicit, "lifecycle in config"
    elif spec.name in _KEEPALIVE_NAMES or any(h in joined for h in _KEEPALIVE_COMMAND_HINTS):
        spec.keep_alive, spec.keep_alive_reason = True, "known stateful server"
    else:
        spec.keep_alive, spec.keep_alive_reason = False, "ephemeral by default"


def _parse_idle_ms(doc: Dict[str, Any], source: str) -> Optional[int]:
    for key in ("daemonIdleTimeoutMs", "daemon_idle_timeout_ms"):
        value = doc.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{source}: {key} must be a positive number")
        return int(value)
    return None


# -- imports: servers defined in editor and agent configs, found as mcporter 0.12.3 finds them --

IMPORT_KINDS = ("cursor", "claude-code", "claude-desktop", "codex", "windsurf", "opencode", "vscode")


def import_order(configured: Any) -> List[str]:
    """A layer's ``imports``: its kinds first, then the other defaults; ``[]`` turns imports off."""
    if configured is None:
        return list(IMPORT_KINDS)
    kinds = [k for k in configured if k in IMPORT_KINDS]
    if not configured:
        return []
    return kinds + [k for k in IMPORT_KINDS if k not in kinds]


def _effective_import_order(docs: List[Dict[str, Any]]) -> List[str]:
    """mcporter reads imports once per layer, first seen wins, and the same files each time:
    the first layer that does not turn imports off decides the order."""
    for doc in docs or [{}]:
        order = import_order(doc.get("imports"))
        if order:
            return order
    return []


def import_plan(layers: List[Tuple[str, Optional[bytes]]]) -> List[Tuple[str, List[str]]]:
    """(layer, the import kinds it reads, in order) for each config layer that exists; with
    none, mcporter reads the defaults as if from an empty project config."""
    plan = [
        (path, import_order(_parse_layer(path, data).get("imports")))
        for path, data in layers
        if data is not None
    ]
    if not any(data is not None for _, data in layers):
        plan = [(layers[-1][0] + " (absent)", list(IMPORT_KINDS))] if layers else []
    return plan


def import_candidates(kind: str, root: str, home: str, environ: Dict[str, str], platform: str) -> List[str]:
    """mcporter's candidate paths for one kind, project-relative (under ``root``) first.

    The one place editor-config locations differ by platform (``platform`` is sys.platform)."""
    j = os.path.join
    xdg = environ.get("XDG_CONFIG_HOME")
    mac = platform == "darwin"
    if kind == "cursor":
        paths = [j(root, ".cursor", "mcp.json"), j(home, ".cursor", "mcp.json")]
        paths += [
            j(home, "AppData", "Roaming", "Cursor", "User", "mcp.json"),
            j(home, "Library", "Application Support", "Cursor", "User", "mcp.json"),
        ]
        paths += [j(xdg, "Cursor", "User", "mcp.json")] if xdg else []
    elif kind == "claude-code":
        paths = [j(base, ".claude", name) for base in (root, home) for name in _CLAUDE_CODE_FILES]
        paths.append(j(home, ".claude.json"))
    elif kind == "claude-desktop":
        paths = [
            j(home, "Library", "Application Support", "Claude", "settings.json")
            if mac
            else j(home, ".config", "Claude", "settings.json")
        ]
    elif kind == "codex":
        paths = [j(root, ".codex", "config.toml"), j(home, ".codex", "config.toml")]
    elif kind == "windsurf":
        paths = [
            j(home, ".codeium", "windsurf", "mcp_config.json"),
            j(home, ".codeium", "windsurf-next", "mcp_config.json"),
            j(home, ".windsurf", "mcp_config.json"),
            j(home, ".config", ".codeium", "windsurf", "mcp_config.json"),
        ]
    elif kind == "opencode":
        paths = _opencode_candidates(root, home, environ)
    elif kind == "vscode":
        user = j(home, "Library", "Application Support") if mac else j(home, ".config")
        paths = [j(root, ".vscode", "mcp.json")] + [j(user, app, "User", "mcp.json") for app in _VSCODE_APPS]
    else:
        paths = []
    return list(dict.fromkeys(p for p in paths if p))


_CLAUDE_CODE_FILES = ("settings.local.json", "settings.json", "mcp.json")

_VSCODE_APPS = ("Code", "Code - Insiders")


def _opencode_candidates(root: str, home: str, environ: Dict[str, str]) -> List[str]:
    j = os.path.join
    config_home = environ.get("XDG_CONFIG_HOME") or j(environ.get("HOME") or home, ".config")
    paths = [environ.get("OPENCODE_CONFIG") or "", j(root, "opencode.jsonc"), j(root, "opencode.json")]
    override = environ.get("OPENCODE_CONFIG_DIR")
    if override:
        paths += [j(override, "opencode.jsonc"), j(override, "opencode.json")]
    workdir = environ.get("OPENAI_WORKDIR")
    paths += [j(root, ".openai", "config.json"), j(workdir, ".openai", "config.json") if workdir else ""]
    paths.append(j(config_home, "openai", "config.json"))
    user_dir = (
        j(environ["XDG_CONFIG_HOME"], "opencode")
        if environ.get("XDG_CONFIG_HOME")
        else j(home, ".config", "opencode")
    )
    return paths + [j(user_dir, "opencode.jsonc"), j(user_dir, "opencode.json")]


def extract_import_entries(doc: Any, kind: str, path: str, root: str) -> Dict[str, Dict[str, Any]]:
    """The server entries of one editor config, in mcporter's reading of each format:
    ``mcpServers``, VS Code's ``servers``, opencode's ``mcp``, a root-level map for legacy
    files, and Claude Code's entries scoped to this project in ``~/.claude.json``."""
    out: Dict[str, Dict[str, Any]] = {}
    if not isinstance(doc, dict):
        return out
    if kind == "codex":
        _add_import_entries(doc.get("mcp_servers"), out)
        return out
    keys = ("mcp",) if kind == "opencode" else ("mcpServers", "servers", "mcp")
    containers = [doc[k] for k in keys if isinstance(doc.get(k), dict)]
    root_style = kind != "opencode" and (
        kind != "claude-code"
        or path.endswith(".claude.json")
        or path.endswith(os.path.join(".claude", "mcp.json"))
    )
    if not containers and root_style:
        containers = [doc]
    for container in containers:
        _add_import_entries(container, out)
    projects = doc.get("projects")
    if isinstance(projects, dict):
        here = os.path.abspath(root)
        for key, project in projects.items():
            if isinstance(project, dict) and os.path.abspath(os.path.expanduser(str(key))) == here:
                scoped: Dict[str, Dict[str, Any]] = {}
                _add_import_entries(project.get("mcpServers"), scoped)
                for name, entry in scoped.items():
                    out.setdefault(name, entry)
    return out


def _add_import_entries(container: Any, out: Dict[str, Dict[str, Any]]) -> None:
    if not isinstance(container, dict):
        return
    for name, value in container.items():
        entry = _convert_import_entry(value) if name not in out else None
        if entry is not None:
            out[str(name)] = entry


def _convert_import_entry(value: Any) -> Optional[Dict[str, Any]]:
    """An editor's server entry as a config entry; None when it names no command or URL."""
    if not isinstance(value, dict):
        return None
    entry: Dict[str, Any] = {}
    for key in ("baseUrl", "base_url", "url", "serverUrl", "server_url"):
        if isinstance(value.get(key), str) and value[key]:
            entry["url"] = value[key]
            break
    command = value.get("command", value.get("executable"))
    if (
        isinstance(command, str)
        and command
        or (isinstance(command, list) and command and all(isinstance(c, str) for c in command))
    ):
        entry["command"] = command
    args = value.get("args")
    if isinstance(args, list) and all(isinstance(a, str) for a in args):
        entry["args"] = args
    env = value.get("env")
    if isinstance(env, dict):
        entry["env"] = {str(k): v for k, v in ((k, _env_string(v)) for k, v in env.items()) if v is not None}
    return entry if "url" in entry or "command" in entry else None


def _env_string(value: Any) -> Optional[str]:
    """An env value as JavaScript's String() writes it (true, 3, 1.5); others are dropped."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(int(value)) if float(value).is_integer() else repr(value)
    return None


def _without_bom(data: bytes) -> bytes:
    """What the ``utf-8-sig`` codec would decode, without importing it on every call."""
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def _read_import_file(path: str, kind: str, root: str) -> Tuple[Optional[Dict[str, Dict[str, Any]]], str]:
    """(entries or None when absent, a note). Unparsable files count as empty, as in mcporter."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:  # absent, a directory, unreadable: nothing to import from it
        return None, ""
    text = _without_bom(data).decode("utf-8", "replace")
    if not text.strip():
        return {}, ""
    if path.endswith(".toml"):
        try:
            import tomllib  # type: ignore[import-not-found]  # novermin (3.11+; guarded)
        except ImportError:
            return {}, "skipped: reading Codex TOML needs Python 3.11+ (tomllib)"
        try:
            doc = tomllib.loads(text)
        except ValueError as exc:
            return {}, f"ignored: {exc}"
    else:
        try:
            doc = parse_jsonc(text, path)
        except ConfigError as exc:
            return {}, f"ignored: {exc}"
    return extract_import_entries(doc, kind, path, root), ""


class _ImportedFile:
    """One editor config that was read: its path, kind, entries and a note for doctor."""

    __slots__ = ("path", "kind", "entries", "note")

    def __init__(self, path: str, kind: str, entries: Dict[str, Dict[str, Any]], note: str) -> None:
        self.path, self.kind, self.entries, self.note = path, kind, entries, note

    def layer(self) -> Tuple[str, bytes]:
        """Its fingerprint layer: the entries it contributes, not its bytes, so a `touch` or
        an edit elsewhere in a busy file (``~/.claude.json``) does not restart the daemon."""
        return (f"import:{self.kind}:{self.path}", json.dumps(self.entries, sort_keys=True).encode())


_OUR_COMMAND_NAMES = ("mcporter_daemon.py", "mcporter-daemon", "mcporter_daemon")


def runs_serve_bridge(argv: List[str]) -> bool:
    """Whether a server command runs this tool's own ``serve`` (an editor config that
    registers the bridge, imported): started by the daemon, it would bridge to itself.

    Looks through a shell's ``-c`` string too: a word naming this script (by name, as a
    console script, ``-m mcporter_daemon``, or its own path) followed later by ``serve``."""
    words = [w for arg in argv for w in arg.split()]
    here = os.path.realpath(__file__)
    for i, word in enumerate(words):
        ours = os.path.basename(word) in _OUR_COMMAND_NAMES or (
            word == "-m" and i + 1 < len(words) and words[i + 1] == "mcporter_daemon"
        )
        if not ours and word.endswith(".py"):  # a renamed copy of this script
            try:
                ours = os.path.realpath(word) == here
            except (OSError, ValueError):
                ours = False
        if ours and "serve" in words[i + 1 :]:
            return True
    return False


def read_imports(order: List[str], root: str, environ: Dict[str, str]) -> List[_ImportedFile]:
    home = os.path.expanduser("~")
    found = []
    for kind in order:
        for path in import_candidates(kind, root, home, environ, sys.platform):
            entries, note = _read_import_file(path, kind, root)
            if entries is not None:
                found.append(_ImportedFile(path, kind, entries, note))
    return found


def load_config(config: Optional[str] = None, root: Optional[str] = None) -> Config:
    """Discover, parse and merge the config layers (project overrides home per server)."""
    path, layers, explicit = discover_config(config, root)
    cfg = Config(path, layers, explicit)
    cfg.root = os.path.abspath(root or os.getcwd())
    environ = dict(os.environ)
    docs = [(source, _parse_layer(source, data)) for source, data in layers if data is not None]
    # Imported servers first: every mcporter config entry wins over them (first seen wins
    # among imports), and one that cannot be used is skipped, as mcporter skips it.
    cfg.imports = read_imports(_effective_import_order([doc for _, doc in docs]), cfg.root, environ)
    for imported in cfg.imports:
        for name, entry in imported.entries.items():
            if name not in cfg.servers:
                try:
                    spec = _parse_server(name, entry, imported.path, os.path.dirname(imported.path), environ)
                except ConfigError:
                    continue
                if runs_serve_bridge(spec.command):
                    cfg.looping.setdefault(name, imported.path)
                    continue
                if not spec.problem:
                    cfg.servers[name] = spec
    for source, doc in docs:
        servers = doc.get("mcpServers", {})
        if not isinstance(servers, dict):
            raise _type_error(source, "mcpServers", "an object", servers)
        base_dir = os.path.dirname(source)
        for name, entry in servers.items():
            cfg.servers.pop(name, None)  # a config entry takes an import's place and its order
            cfg.servers[name] = _parse_server(name, entry, source, base_dir, environ)
            if runs_serve_bridge(cfg.servers[name].command):
                cfg.looping[name] = cfg.servers.pop(name).source
        idle = _parse_idle_ms(doc, source)
        if idle is not None:
            cfg.daemon_idle_timeout_ms = idle
    return cfg


def _parse_layer(source: str, data: bytes) -> Dict[str, Any]:
    try:
        text = _without_bom(data).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: config is not valid UTF-8") from None
    doc = parse_jsonc(text, source) if text.strip() else {}
    if not isinstance(doc, dict):
        raise _type_error(source, "the top level", "an object", doc)
    imports = doc.get("imports")
    if imports is not None and (
        not isinstance(imports, list) or not all(isinstance(k, str) for k in imports)
    ):
        raise _type_error(source, "imports", "a list of strings", imports)
    unknown = [k for k in imports or [] if k not in IMPORT_KINDS]
    if unknown:
        raise ConfigError(f"{source}: unknown import kind {unknown[0]!r} (known: {', '.join(IMPORT_KINDS)})")
    return doc


# ##########################################################################################
# MCP stdio client: one spawned server, JSON-RPC over its stdin/stdout, answered promptly.
# Three parts, each owning its own state: ``_ServerProcess`` (spawn, exit watch, stderr tail,
# group end), ``_JsonRpcChannel`` (writes with deadlines, reader and dispatch, pending table,
# ids, cancellation, answers to the server's requests) and ``McpStdioClient``, the MCP face.
# ##########################################################################################

_MCP_START_TIMEOUT = 30.0  # a server's spawn and initialize handshake, unless the caller says

_BROKEN_CLOSE_GRACE = 0.5  # a server whose stream broke, or whose handshake failed

_RETIRED_CLOSE_GRACE = 0.1  # a server found exited or broken, before its replacement starts

_THREAD_JOIN_WAIT = 1.0  # a closed server's reader and stderr threads


class _CallOptions:
    """How one request waits: ``timeout`` seconds at most; ``idle`` seconds without an answer
    or progress (None: no such budget); ``cancelled`` an Event set when the caller went away;
    ``notices`` collects what the caller should be told (a declined elicitation);
    ``on_progress`` gets each progress update."""

    __slots__ = ("timeout", "notices", "on_progress", "cancelled", "idle")

    def __init__(
        self,
        timeout: float = _DEFAULT_CALL_TIMEOUT,
        notices: Optional[List[str]] = None,
        on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
        cancelled: Optional[Any] = None,
        idle: Optional[float] = None,
    ) -> None:
        self.timeout = timeout
        self.notices = notices
        self.on_progress = on_progress
        self.cancelled = cancelled
        self.idle = idle


class _Pending:
    __slots__ = ("event", "response", "heard", "on_progress")

    def __init__(self, on_progress: Optional[Callable[[Dict[str, Any]], None]]) -> None:
        import threading

        self.event = threading.Event()
        self.response: Optional[Dict[str, Any]] = None
        self.heard = time.monotonic()  # last sign of life for this request: sent, or progress
        self.on_progress = on_progress


def call_expiry(deadline: float, heard: float, idle: Optional[float]) -> Tuple[float, str]:
    """When a request waiting since its last sign of life ``heard`` gives up, and why.

    The idle budget (``idle``; None = none) runs from the last progress notification (or the
    send), so a server that reports progress may take longer than the budget; the deadline
    (the call's ``--timeout``) ends the wait regardless: progress never extends it.
    """
    if idle is not None and heard + idle < deadline:
        return heard + idle, "stalled"
    return deadline, "timeout"


def _with_progress_token(params: Optional[Dict[str, Any]], token: int) -> Dict[str, Any]:
    meta = params.get("_meta") if params else None
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta["progressToken"] = token
    return dict(params or {}, _meta=meta)


def _answered_error(server: str, response: Dict[str, Any]) -> McpError:
    """The McpError for an error answer: the server's JSON-RPC code and data kept, its code in the
    one line. A failure this client made up itself (the process exited) carries no code."""
    err = response["error"] if isinstance(response["error"], dict) else {}
    code = _rpc_code(err.get("code"))
    shown = f" (JSON-RPC error {code})" if code is not None else ""
    message = str(err.get("message") or "error")
    return McpError(f"server '{server}': {message}{shown}", "runtime_error", code, err.get("data"))


def _server_log_line(params: Any) -> str:
    """A server's ``notifications/message`` as one log line: level, logger, data."""
    params = params if isinstance(params, dict) else {}
    data = params.get("data")
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    logger = params.get("logger")
    return (
        f"({params.get('level', 'info')}{f' {logger}' if isinstance(logger, str) and logger else ''}) {text}"
    )


def _cwd_problem(name: str, cwd: Optional[str], source: Optional[str]) -> str:
    """Why server ``name`` cannot start in ``cwd`` ("" when it can): a missing directory makes
    the spawn fail like a missing command, which would name the wrong thing."""
    if cwd is None or os.path.isdir(cwd):
        return ""
    what = "is not a directory" if os.path.exists(cwd) else "does not exist"
    return f"working directory {cwd} {what} (server '{name}'{f', from {source}' if source else ''})"


def _read_lines(fd: int) -> Iterable[str]:
    """The lines of a pipe, decoded (invalid UTF-8 replaced), until EOF.

    One growing buffer, decoded in place: a buffered readline() would hold a large line as
    8 KiB pieces and then join them, and glibc keeps those pieces' heap after they are freed,
    so a 67 MiB tool result would cost three copies instead of two. Nothing here keeps a line
    once it is handed out."""
    buf = bytearray()
    scanned = 0
    while True:
        nl = buf.find(b"\n", scanned)
        if nl >= 0:
            with memoryview(buf) as view:
                line = [str(view[:nl], "utf-8", "replace")]
            if nl >= _SEND_CHUNK:
                buf = buf[nl + 1 :]  # a new small buffer: the big one is freed now
            else:
                del buf[: nl + 1]  # cheap for a short line (no copy of the rest)
            scanned = 0
            yield line.pop()
            continue
        scanned = len(buf)
        try:
            chunk = os.read(fd, 1 << 20)
        except OSError:
            chunk = b""
        if not chunk:
            if buf.strip():
                yield buf.decode("utf-8", "replace")
            return
        buf += chunk


def _stderr_lines(fd: int) -> Iterable[str]:
    """A server's stderr as lines until EOF, blank ones left out: split at ``\\n`` and at
    ``\\r`` (a progress bar redraws its line with ``\\r`` and may never end one).

    Memory stays bounded whatever the server writes: a line past _STDERR_LINE_CAP bytes is
    handed out cut and marked, and the rest of it is dropped up to its end."""
    pending = b""
    dropping = False  # inside the rest of a line already handed out cut
    while True:
        try:
            chunk = os.read(fd, _STDERR_READ)
        except OSError:
            chunk = b""
        if not chunk:
            break
        parts = (pending + chunk).replace(b"\r", b"\n").split(b"\n")
        pending = parts.pop()
        for part in parts:
            if not dropping and part.strip():
                yield part.decode("utf-8", "replace")
            dropping = False
        if len(pending) >= _STDERR_LINE_CAP:
            if not dropping:
                cut = pending[:_STDERR_LINE_CAP].decode("utf-8", "replace")
                yield f"{cut} … (truncated: the line ran past {_STDERR_LINE_CAP // 1024} KiB)"
            dropping, pending = True, b""
    if pending.strip() and not dropping:
        yield pending.decode("utf-8", "replace")


def _parse_messages(text: str) -> Tuple[List[Dict[str, Any]], str]:
    """The JSON-RPC messages on one stdout line (one object, or each object of a batch
    array), and what was wrong with the line for the log ("" when nothing was)."""
    if not text.strip():
        return [], ""
    try:
        parsed = json.loads(text)  # a trailing \r\n is white space to JSON
    except RecursionError:  # not a ValueError: nested past the parser's recursion limit
        return [], "skipped stdout line nested too deeply to parse"
    except ValueError:
        return [], "skipped non-JSON stdout line"
    items = parsed if isinstance(parsed, list) else [parsed]
    messages = [m for m in items if isinstance(m, dict)]
    if not items or len(messages) < len(items):
        return messages, "skipped non-object stdout message"
    return messages, ""


def _exit_words(code: Optional[int]) -> str:
    """``exit code 3``, or ``killed by signal 9 (SIGKILL)`` for a negative code."""
    if code is None or code >= 0:
        return f"exit code {code}"
    import signal

    try:
        name = f" ({signal.Signals(-code).name})"
    except ValueError:
        name = ""
    return f"killed by signal {-code}{name}"


# Where a server's own request may name the client request it belongs to (``params._meta``).
_RELATED_REQUEST_KEYS = ("io.modelcontextprotocol/related-request-id", "relatedRequestId", "progressToken")


def notice_owner(params: Any, callers: List[int]) -> Optional[int]:
    """Which in-flight caller's request a server request (an elicitation) belongs to: the one
    it names in ``_meta`` (our progress token is the request id), else the only caller in
    flight; None when it cannot be told, and then nobody is shown it."""
    meta = params.get("_meta") if isinstance(params, dict) else None
    refs = [meta.get(key) for key in _RELATED_REQUEST_KEYS] if isinstance(meta, dict) else []
    for ref in refs:
        if ref is not None and not isinstance(ref, bool):
            return ref if ref in callers else None
    return callers[0] if len(callers) == 1 else None


# -- the server process ---------------------------------------------------------------------


class _ServerProcess:
    """The spawned server process and its group: spawn, exit watch (without reaping), the
    stderr tail, and the group's end. Knows nothing of what flows over stdin and stdout."""

    def __init__(self, name: str, log: Callable[[str], None]) -> None:
        import threading

        self.name = name
        self.log = log
        self.proc: Optional[subprocess.Popen] = None
        self.stdin_fd = -1
        self.threads: List[threading.Thread] = []
        self.stderr_lines: List[str] = []
        self.exited = threading.Event()  # the leader exited (seen without reaping it)
        self.exit_code: Optional[int] = None
        self.closing = False  # a close began: blocked writers let go of the pipe
        self.close_lock = threading.Lock()  # one group shutdown at a time (close, watcher)
        self.group_ended = False

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def spawn(
        self, argv: List[str], env: Optional[Dict[str, str]], cwd: Optional[str], source: Optional[str] = None
    ) -> None:
        """Start the server (never through a shell) in its own process group; drain its stderr.
        ``source``: the config file that defines it, named when its working directory is missing."""
        import subprocess

        full_env = dict(os.environ)
        if full_env.pop(_MALLOC_SET_BY_US, None):  # the daemon's memory tuning, not the user's
            full_env.pop(_MALLOC_MMAP_VAR, None)
        full_env.update(env or {})
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=full_env,
                cwd=cwd,
                start_new_session=True,  # own process group: the shutdown can end its children
                close_fds=True,
            )
        except OSError as exc:
            # A missing cwd fails like a missing command (ENOENT): name the directory instead.
            problem = _cwd_problem(self.name, cwd, source)
            if problem:
                raise McpError(problem, "command_not_found") from None
            if isinstance(exc, FileNotFoundError):
                raise McpError(
                    f"server '{self.name}': command not found: {argv[0]}", "command_not_found"
                ) from None
            raise McpError(
                f"server '{self.name}': cannot run {argv[0]}: {exc.strerror}", "command_not_found"
            ) from None
        assert self.proc.stdin is not None
        self.stdin_fd = self.proc.stdin.fileno()
        os.set_blocking(self.stdin_fd, False)  # writes wait in poll(), with a deadline
        self.spawn_thread(self._drain_stderr, "stderr")

    def spawn_thread(self, target: Callable[[], None], what: str) -> None:
        """A daemon thread serving this server; close() joins it (briefly)."""
        import threading

        t = threading.Thread(target=target, name=f"mcp-{self.name}-{what}", daemon=True)
        t.start()
        self.threads.append(t)

    def watch(self, on_exit: Callable[[], None]) -> None:
        """Call ``on_exit`` once the leader exits, then end what is left of its group."""
        import threading

        watcher = threading.Thread(target=self._watch_exit, args=(on_exit,), name=f"mcp-{self.name}-exit")
        watcher.daemon = True
        watcher.start()

    def _watch_exit(self, on_exit: Callable[[], None]) -> None:
        """Fail pending calls when the server exits, not at stdout EOF (a grandchild may hold
        stdout open), then end what is left of its group."""
        assert self.proc is not None
        info: Any = None
        try:
            if _HAS_WAITID:
                info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOWAIT)
            else:
                self._reap_if_exited(self.proc.wait())
        except ChildProcessError:
            pass
        if info is not None:
            self._note_exit(info)
        self.exited.set()
        on_exit()
        # Non-blocking: a running close() ends the group itself (and joins this thread).
        if not self.closing and self.close_lock.acquire(blocking=False):
            try:
                self.end_group(0.0, _MCP_CLOSE_GRACE)
            finally:
                self.close_lock.release()

    def leader_exited(self) -> bool:
        """Checked without reaping: a reaped leader's pid (the group id) could be reused by a
        stranger while we still signal the group. poll() and wait() would reap it."""
        proc = self.proc
        if self.exited.is_set() or proc is None:
            return self.exited.is_set()
        if not _HAS_WAITID:
            return self._reap_if_exited(proc.poll())
        try:
            info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG)
        except ChildProcessError:  # reaped already (by us, or by an embedder's waitpid(-1))
            info = None
            self.exited.set()
        if info is not None:
            self._note_exit(info)
        return self.exited.is_set()

    def _reap_if_exited(self, code: Optional[int]) -> bool:
        """Without waitid (macOS before Python 3.13) only a reaping check exists. POSIX still
        keeps a group id from reuse while any member lives, so only an emptied group is at
        risk, and _group_gone asks the kernel (killpg) before each signal."""
        if code is not None:
            self.exit_code = code
            self.exited.set()
        return self.exited.is_set()

    def _note_exit(self, info: Any) -> None:
        self.exit_code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        self.exited.set()

    def _drain_stderr(self) -> None:
        # Always drained, whatever happens here: a full stderr pipe would block the server mid-call.
        assert self.proc is not None and self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        try:
            for line in _stderr_lines(fd):
                # The last few lines say why a server died ("API_KEY not set"), bounded.
                self.stderr_lines = (self.stderr_lines + [line[:_STDERR_LINE_CHARS]])[-_STDERR_TAIL_LINES:]
                self.log(line)
        except Exception as exc:
            self.log(f"(stderr no longer logged: {exc!r})")
            try:
                while os.read(fd, _STDERR_READ):
                    pass
            except OSError:
                pass

    def stderr_tail(self, wait: float = 0.0) -> str:
        """The server's last stderr lines, joined; ``wait`` lets the drain reach EOF first (a
        dying server's last words may still be in the pipe)."""
        for t in self.threads:
            if t.name.endswith("-stderr"):
                t.join(wait)
        return " | ".join(self.stderr_lines)

    def exit_reason(self) -> str:
        """Why calls to a server whose output ended fail: its exit code (or signal) and last
        stderr lines, however fast it died."""
        tail = self.stderr_tail(wait=_STDERR_EOF_WAIT)
        self.exited.wait(_STDERR_EOF_WAIT)  # stdout closes a moment before the exit shows
        code = self.exit_code if self.leader_exited() else None
        why = (
            "exited" if code is None else f"exited ({_exit_words(code)})" if code >= 0 else _exit_words(code)
        )
        return why + (f"; stderr: {tail}" if tail else "")

    def close_stdin(self) -> None:
        """Close the server's stdin (the caller holds the channel's write lock)."""
        try:
            if self.proc is not None and self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass

    def join_threads(self, wait: float) -> None:
        for t in self.threads:
            t.join(wait)

    def _group_gone(self) -> bool:
        assert self.proc is not None
        if not self.leader_exited():
            return False
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        # Zombies (our unreaped leader among them) keep the group in the kernel's eyes: ask
        # who in it still runs.
        return not _group_members(self.proc.pid)

    def end_group(self, exit_wait: float, grace: float) -> None:
        """Wait ``exit_wait`` for the leader to exit; then SIGTERM, ``grace``, SIGKILL the group
        while any member remains; only then reap the leader (caller holds the close lock)."""
        import subprocess

        proc = self.proc
        if proc is None or self.group_ended:
            return
        self.exited.wait(exit_wait)
        # Always ours while the leader is unreaped: its pid, the group id, cannot be reused.
        _escalate(lambda sig: _signal(proc.pid, sig, group=True), lambda: True, self._group_gone, grace)
        self.group_ended = True
        try:
            proc.wait(_KILL_WAIT)
        except subprocess.TimeoutExpired:
            pass  # unkillable (D state): leave it unreaped rather than wait forever


# -- the JSON-RPC channel -------------------------------------------------------------------


class _JsonRpcChannel:
    """JSON-RPC over the server's stdin and stdout: framed writes with deadlines, the reader
    and its dispatch, the table of pending requests, cancellation, and prompt answers to the
    server's own requests. ``on_notification`` gets the notifications it does not handle
    itself; ``end`` closes the whole server when its stream can no longer be trusted."""

    def __init__(
        self,
        name: str,
        process: _ServerProcess,
        log: Callable[[str], None],
        on_notification: Callable[[str, Any], None],
        end: Callable[[float], None],
    ) -> None:
        import threading

        self.name = name
        self.process = process
        self.log = log
        self.on_notification = on_notification
        self.end = end
        self.write_lock = threading.Lock()
        self.state_lock = threading.Lock()  # the pending table, the ids, the notice sinks
        self.pending: Dict[int, _Pending] = {}
        self.next_id = 1
        self.notices: Dict[int, List[str]] = {}  # by request id: in-flight callers that want notices
        self.broken = ""  # why the stream to the server can no longer be trusted
        self.answered_at: Optional[float] = None  # (monotonic) the server's last answer, late ones too

    def open(self) -> None:
        """Start reading the spawned server's stdout."""
        self.process.spawn_thread(self._read_stdout, "stdout")

    def alive(self) -> bool:
        """Running, its stream intact, and its leader not exited (checked without reaping)."""
        return self.process.proc is not None and not self.broken and not self.process.leader_exited()

    def down_reason(self) -> str:
        """Why a server that is not alive is not: its broken stream, or how it exited (code or
        signal, last stderr lines), however fast that was."""
        if self.broken:
            return self.broken
        return self.process.exit_reason() if self.process.proc is not None else "not started"

    # -- reading -----------------------------------------------------------------------------

    def _read_stdout(self) -> None:
        """Read and dispatch until stdout ends, then say so: however the reading ends, the
        server never goes on looking healthy with nobody reading its answers."""
        proc = self.process.proc
        assert proc is not None and proc.stdout is not None
        why = "closed its stdout"
        try:
            for text in _read_lines(proc.stdout.fileno()):
                messages, junk = _parse_messages(text)  # each element of a batch, in order
                if junk:
                    self.log(f"({junk}: {text[:200].strip()})")
                del text  # one copy of a large line at a time: the text goes before dispatching
                messages.reverse()
                while messages:  # ...and each message before the next (maybe long) wait
                    self._dispatch_one(messages.pop())
        except Exception as exc:
            why = f"stdout could not be read ({exc!r})"
        self._output_ended(why)

    def _output_ended(self, why: str) -> None:
        """Nothing more can arrive. A server that exits closes stdout a moment before its exit
        shows: its calls fail with how it exited. One that lives on without stdout is broken."""
        if self.process.closing or self.process.exited.wait(_STDERR_EOF_WAIT):
            self.fail_pending()
        else:
            self._break(f"{why} while still running")

    def _dispatch_one(self, msg: Dict[str, Any]) -> None:
        try:
            self._dispatch(msg)
        except Exception as exc:  # a message nested too deep to log, say: skip it, read on
            self.log(f"(skipped a stdout message it could not handle: {exc!r})")

    def _dispatch(self, msg: Dict[str, Any]) -> None:
        """Tell messages apart by shape; servers number their own requests from 0 too."""
        if "method" in msg and "id" in msg:
            self._answer_server_request(msg)
        elif "method" in msg:
            if msg["method"] == "notifications/message":
                self.log(_server_log_line(msg.get("params")))
                self.on_notification(msg["method"], msg.get("params"))  # for watchEvents too
            elif msg["method"] == "notifications/progress":
                self._progress(msg.get("params"))
            else:
                self.on_notification(msg["method"], msg.get("params"))
        elif "id" in msg and ("result" in msg or "error" in msg):
            self.answered_at = time.monotonic()  # a late answer too: the server is alive
            with self.state_lock:
                pending = self.pending.pop(msg["id"], None) if isinstance(msg["id"], int) else None
            if pending is not None:  # a late answer to a timed-out request is ignored
                pending.response = msg
                pending.event.set()

    def _progress(self, params: Any) -> None:
        """A sign of life for the request whose id is the token (ours: see request()); progress
        for a request no longer waited for (timed out, cancelled) is stray and ignored."""
        token = params.get("progressToken") if isinstance(params, dict) else None
        update = progress_update(params)
        if update is None or isinstance(token, bool) or not isinstance(token, int):
            return
        with self.state_lock:
            pending = self.pending.get(token)
        if pending is None:
            return
        pending.heard = time.monotonic()
        if pending.on_progress is not None:
            try:
                pending.on_progress(update)
            except Exception as exc:  # a caller's display bug must not kill the reader thread
                self.log(f"(progress callback failed: {exc!r})")

    def _answer_server_request(self, msg: Dict[str, Any]) -> None:
        # Unanswered, a tool call hangs 60 s on TypeScript servers and forever on Python ones.
        method = msg.get("method")
        if method == "ping":
            self.send({"jsonrpc": "2.0", "id": msg["id"], "result": {}})
        elif method == "elicitation/create":
            self.send({"jsonrpc": "2.0", "id": msg["id"], "result": {"action": "decline"}})
            params = msg.get("params")
            prompt = params.get("message") if isinstance(params, dict) else None
            text = (
                f"server '{self.name}' asked for input"
                + (f" ({str(prompt)[:120]})" if prompt else "")
                + "; declined (not interactive)"
            )
            self.log(f"({text})")
            self._add_notice(text, params)
        else:
            self.send(
                {
                    "jsonrpc": "2.0",
                    "id": msg["id"],
                    "error": {"code": -32601, "message": f"client does not support {method}"},
                }
            )

    def _add_notice(self, text: str, params: Any) -> None:
        """Only the caller the server's request can be attributed to is told: its question may
        be private to that caller's work."""
        with self.state_lock:
            owner = notice_owner(params, list(self.notices))
            if owner is not None:
                self.notices[owner].append(text)

    def fail_pending(self, why: str = "") -> None:
        """Answer every pending request with an error: ``why``, or how the server exited."""
        with self.state_lock:
            pending, self.pending = self.pending, {}
        if not pending:
            return
        why = why or self.process.exit_reason()
        for p in pending.values():
            p.response = {"error": {"message": why}}  # no JSON-RPC code: no server sent this one
            p.event.set()

    # -- writing -----------------------------------------------------------------------------

    def send(self, msg: Dict[str, Any], deadline: Optional[float] = None) -> bool:
        """Write one frame by ``deadline``; True once all of it is written.

        False when it could not be: nothing written (the stream is intact), or cut off part-way
        — then the server is broken (it would read our next frame as the rest of this one) and
        is ended, so the next call starts a fresh one.
        """
        # ASCII-safe: a lone surrogate in a string cannot be encoded as UTF-8.
        data = (json.dumps(msg, separators=(",", ":"), ensure_ascii=True) + "\n").encode()
        if deadline is None:
            deadline = time.monotonic() + _MCP_WRITE_DEADLINE
        # One writer at a time, or two frames interleave; bounded, as the holder may be stuck.
        if not self.write_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        try:
            written = self._write_until(data, deadline)
        finally:
            self.write_lock.release()
        if 0 < written < len(data) and not self.process.closing:
            self._break(f"stopped reading its input ({written} of {len(data)} bytes of a frame written)")
        return written == len(data)

    def _write_until(self, data: bytes, deadline: float) -> int:
        """Bytes of ``data`` written to the server's stdin by ``deadline`` (caller holds the lock)."""
        import select

        view = memoryview(data)
        written = 0
        poller = select.poll()  # not select(): a busy daemon's fds can pass FD_SETSIZE
        poller.register(self.process.stdin_fd, select.POLLOUT)
        while written < len(data) and not self.process.closing:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not poller.poll(min(left, _WRITE_SLICE) * 1000):
                continue
            try:
                written += os.write(self.process.stdin_fd, view[written:])
            except BlockingIOError:
                continue
            except OSError:
                break  # EPIPE: the server is gone; the exit watcher fails what is pending
        return written

    def close_input(self) -> None:
        # Under the write lock: a writer still using the fd number after close could write
        # into whatever file reuses that number.
        got = self.write_lock.acquire(timeout=2 * _WRITE_SLICE + 1.0)
        try:
            if got:
                self.process.close_stdin()
        finally:
            if got:
                self.write_lock.release()

    def _break(self, why: str) -> None:
        """The stream to the server is corrupt: fail what is pending and end it in the background."""
        import threading

        if self.broken:
            return
        self.broken = why
        self.log(f"(server '{self.name}' {why}; ending it)")
        self.fail_pending(why)
        closer = threading.Thread(target=self.end, args=(_BROKEN_CLOSE_GRACE,), name=f"mcp-{self.name}-close")
        closer.daemon = True
        closer.start()

    def notify(
        self, method: str, params: Optional[Dict[str, Any]] = None, deadline: Optional[float] = None
    ) -> None:
        """Send a JSON-RPC notification (no answer expected), with a write deadline."""
        msg: Dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg, deadline)

    # -- requests ----------------------------------------------------------------------------

    def request(self, method: str, params: Optional[Dict[str, Any]], opts: _CallOptions) -> Any:
        """Send a request and wait for its answer; when the wait ends without one (timeout,
        idle budget without progress, caller gone, Ctrl-C) tell the server to cancel.

        The request's id is its ``progressToken``: unique among active requests, as MCP asks.
        """
        deadline = time.monotonic() + opts.timeout
        if not self.alive():
            raise McpError(f"server '{self.name}': {self.down_reason()}", "server_exited")
        if opts.cancelled is not None and opts.cancelled.is_set():
            raise McpError(f"server '{self.name}': {method} cancelled (the caller went away)", "cancelled")
        pending = _Pending(opts.on_progress)
        with self.state_lock:
            rid = self.next_id
            self.next_id += 1
            self.pending[rid] = pending
            if opts.notices is not None:
                self.notices[rid] = opts.notices
        msg: Dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        msg["params"] = _with_progress_token(params, rid)
        try:
            self._send_request(rid, method, msg, pending, deadline, opts)
            pending.heard = time.monotonic()
            try:
                why = self._wait_answer(pending, deadline, opts)
            except KeyboardInterrupt:
                self._give_up(rid, method, "interrupted")
                raise
            if why:
                self._give_up(rid, method, why)
                raise self._wait_error(method, why, opts)
        finally:
            if opts.notices is not None:
                with self.state_lock:
                    self.notices.pop(rid, None)
        response = pending.response or {}
        if "error" in response:
            raise _answered_error(self.name, response)
        return response.get("result")

    def _send_request(
        self,
        rid: int,
        method: str,
        msg: Dict[str, Any],
        pending: _Pending,
        deadline: float,
        opts: _CallOptions,
    ) -> None:
        if self.send(msg, deadline) or pending.event.is_set():
            return
        with self.state_lock:
            self.pending.pop(rid, None)
        # Cut off before its deadline: its input is closed (EPIPE), most often as it exits.
        cut_off = time.monotonic() < deadline and not self.process.closing
        if cut_off and not self.process.exited.wait(_STDERR_EOF_WAIT):
            self._break("closed its stdin while still running")
        if not self.alive():
            raise McpError(f"server '{self.name}': {self.down_reason()}", "server_exited")
        raise McpError(
            f"server '{self.name}': {method} timed out after {opts.timeout:g}s "
            f"(the server is not reading its input)",
            "operation_timeout",
        )

    @staticmethod
    def _wait_answer(pending: _Pending, deadline: float, opts: _CallOptions) -> str:
        """Empty once answered, else why the wait ended: "timeout", "stalled" or "cancelled"."""
        cancelled = opts.cancelled
        while True:
            until, why = call_expiry(deadline, pending.heard, opts.idle)
            left = until - time.monotonic()
            if cancelled is not None:
                left = min(left, _CANCEL_CHECK_INTERVAL)  # a cancel is an Event of its own
            if pending.event.wait(max(0.0, left)):
                return ""
            if cancelled is not None and cancelled.is_set():
                return "cancelled"
            until, why = call_expiry(deadline, pending.heard, opts.idle)
            if time.monotonic() >= until:
                return why

    def _give_up(self, rid: int, method: str, why: str) -> None:
        """Stop waiting for ``rid``: its late answer and stray progress are ignored from now on,
        and the server is told to stop working on it (never for ``initialize``, as MCP says)."""
        with self.state_lock:
            self.pending.pop(rid, None)
        if method != "initialize":
            # Briefly: the caller is gone or out of time, and a stuck writer may hold the lock.
            reason = {"timeout": "client timeout", "stalled": "client timeout (no progress)"}.get(
                why, "client went away"
            )
            cancel = {"requestId": rid, "reason": reason}
            self.notify("notifications/cancelled", cancel, time.monotonic() + _CANCEL_WRITE_DEADLINE)

    def _wait_error(self, method: str, why: str, opts: _CallOptions) -> McpError:
        if why == "cancelled":
            return McpError(f"server '{self.name}': {method} cancelled (the caller went away)", "cancelled")
        if why == "stalled":
            return McpError(
                f"server '{self.name}': {method} sent nothing (no answer, no progress) for {opts.idle:g}s",
                "operation_timeout",
            )
        return McpError(
            f"server '{self.name}': {method} timed out after {opts.timeout:g}s", "operation_timeout"
        )


# -- the MCP face ---------------------------------------------------------------------------


class McpStdioClient:
    """A spawned MCP stdio server: handshake, requests with timeouts, prompt answers to its
    own requests, and a shutdown that always ends the process group."""

    # Called (method, params) for the server's notifications but progress; the keep-alive
    # service sets it to pass list changes and log messages on to ``watchEvents`` callers.
    on_server_notification: Optional[Callable[[str, Any], None]] = None

    def __init__(
        self,
        name: str,
        argv: List[str],
        env: Optional[Dict[str, str]] = None,
        cwd: Optional[str] = None,
        log: Optional[Callable[[str], None]] = None,
        source: Optional[str] = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.cwd = cwd
        self.source = source  # the config file that defines the server, for its errors
        log = log or (lambda line: None)
        self._process = _ServerProcess(name, log)
        self._channel = _JsonRpcChannel(name, self._process, log, self._notified, self.close)
        self.protocol_version = ""
        self.instructions = ""  # the server's initialize instructions, shown by list
        self.tools_stale = True
        self._tools: Optional[List[Dict[str, Any]]] = None  # this process's tools/list, kept

    @property
    def pid(self) -> Optional[int]:
        """The server process's pid (None before start)."""
        return self._process.pid

    def alive(self) -> bool:
        """Running, its stream intact, and its leader not exited (checked without reaping)."""
        return self._channel.alive()

    def stderr_tail(self, wait: float = 0.0) -> str:
        """The server's last stderr lines, joined (``wait``: for the drain to reach EOF)."""
        return self._process.stderr_tail(wait)

    def answered_since(self, when: Optional[float]) -> bool:
        """Whether the server answered anything (a late answer too) after ``when`` (monotonic)."""
        heard = self._channel.answered_at
        return when is not None and heard is not None and heard > when

    def start(self, timeout: float = _MCP_START_TIMEOUT) -> McpStdioClient:
        """Spawn the server (never through a shell) and complete the MCP handshake."""
        self._process.spawn(self.argv, self.env, self.cwd, self.source)
        self._channel.open()
        self._process.watch(self._channel.fail_pending)
        try:
            self._initialize(timeout)
        except BaseException:
            self.close(grace=_BROKEN_CLOSE_GRACE)
            raise
        return self

    def close(self, grace: float = _MCP_CLOSE_GRACE) -> None:
        """Close stdin; after ``grace`` SIGTERM the group; after ``grace`` more, SIGKILL it.
        The whole group goes, also when its leader exits on EOF first and a child lives on."""
        process = self._process
        if process.proc is None:
            return
        process.closing = True  # a blocked writer lets go of the pipe within _WRITE_SLICE
        with process.close_lock:
            self._channel.close_input()
            process.end_group(grace, grace)
        process.join_threads(_THREAD_JOIN_WAIT)
        self._channel.fail_pending()

    def _notified(self, method: str, params: Any) -> None:
        if method == "notifications/tools/list_changed":
            self.tools_stale = True
        if self.on_server_notification is not None:
            self.on_server_notification(method, params)

    def request(
        self, method: str, params: Optional[Dict[str, Any]] = None, opts: Optional[_CallOptions] = None
    ) -> Any:
        """Send any request and wait for its answer (see ``_CallOptions`` for the wait)."""
        return self._channel.request(method, params, opts or _CallOptions())

    def notify(
        self, method: str, params: Optional[Dict[str, Any]] = None, deadline: Optional[float] = None
    ) -> None:
        """Send a JSON-RPC notification (no answer expected), with a write deadline."""
        self._channel.notify(method, params, deadline)

    # -- MCP methods ---------------------------------------------------------------------------

    def _initialize(self, timeout: float) -> None:
        result = self.request(
            "initialize",
            {
                "protocolVersion": MCP_PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "mcporter-daemon", "version": __version__},
            },
            _CallOptions(timeout),
        )
        version = str((result or {}).get("protocolVersion", ""))
        if not (_MCP_OLDEST_VERSION <= version <= MCP_PROTOCOL_VERSION):
            raise McpError(
                f"server '{self.name}' speaks MCP {version or '(none)'}; this client supports "
                f"{_MCP_OLDEST_VERSION} to {MCP_PROTOCOL_VERSION}",
                "runtime_error",
            )
        self.protocol_version = version
        self.instructions = str((result or {}).get("instructions") or "")
        self.notify("notifications/initialized")

    def _paginate(self, method: str, key: str, opts: Optional[_CallOptions]) -> List[Any]:
        items: List[Any] = []
        cursor = None
        for _ in range(1000):  # a server that loops its cursor must not loop us forever
            params: Dict[str, Any] = {"cursor": cursor} if cursor is not None else {}
            result = self.request(method, params, opts) or {}
            items.extend(result.get(key) or [])
            cursor = result.get("nextCursor")
            if not cursor:
                break
        return items

    def list_tools(self, opts: Optional[_CallOptions] = None) -> List[Dict[str, Any]]:
        """``tools/list``, every page."""
        self.tools_stale = False
        return self._paginate("tools/list", "tools", opts)

    def tools(self, opts: Optional[_CallOptions] = None) -> List[Dict[str, Any]]:
        """This process's tools/list, kept until it announces a change (``tools_stale``): typing
        a warm call's arguments costs no round trip to the server."""
        kept = self._tools
        if kept is not None and not self.tools_stale:
            return kept
        self._tools = None  # a failed re-list must not revive the old list
        tools = self.list_tools(opts)  # clears tools_stale first: a change meanwhile re-lists
        self._tools = tools
        return tools

    def call_tool(
        self, tool: str, args: Optional[Dict[str, Any]] = None, opts: Optional[_CallOptions] = None
    ) -> Dict[str, Any]:
        """``tools/call``; a result with ``isError: true`` is a normal result, not an error."""
        return self.request("tools/call", {"name": tool, "arguments": args or {}}, opts) or {}

    def list_resources(self, opts: Optional[_CallOptions] = None) -> List[Dict[str, Any]]:
        """``resources/list``, every page."""
        return self._paginate("resources/list", "resources", opts)

    def read_resource(self, uri: str, opts: Optional[_CallOptions] = None) -> Dict[str, Any]:
        """``resources/read`` of one URI."""
        return self.request("resources/read", {"uri": uri}, opts) or {}

    def list_resource_templates(self, opts: Optional[_CallOptions] = None) -> List[Dict[str, Any]]:
        """``resources/templates/list``, every page."""
        return self._paginate("resources/templates/list", "resourceTemplates", opts)

    def list_prompts(self, opts: Optional[_CallOptions] = None) -> List[Dict[str, Any]]:
        """``prompts/list``, every page."""
        return self._paginate("prompts/list", "prompts", opts)

    def get_prompt(
        self, name: str, args: Optional[Dict[str, str]] = None, opts: Optional[_CallOptions] = None
    ) -> Dict[str, Any]:
        """``prompts/get``; MCP prompt arguments are strings."""
        return self.request("prompts/get", {"name": name, "arguments": args or {}}, opts) or {}

    def ping(self, timeout: float = _PING_TIMEOUT) -> None:
        """MCP ``ping``; raises McpError when the server does not answer in time."""
        self.request("ping", {}, _CallOptions(timeout))


# ##########################################################################################
# Tool arguments: ``key=value`` pairs typed by the tool's inputSchema (daemon and ephemeral).
# ##########################################################################################

_EXPECTED = {
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean (true or false)",
    "array": "a JSON array",
    "object": "a JSON object",
    "null": "null",
}


def _json_or_string(raw: str) -> Any:
    """The rule without a schema, as before schemas were read: JSON when it parses, else text."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _schema_types(prop: Any) -> List[str]:
    """The JSON types a property accepts: its ``type`` (one name or a list), else those of its
    ``anyOf``/``oneOf`` branches (how pydantic writes ``Optional[int]``); [] when it says none."""
    if not isinstance(prop, dict):
        return []
    kind = prop.get("type")
    if isinstance(kind, str):
        return [kind]
    if isinstance(kind, list):
        return [k for k in kind if isinstance(k, str)]
    found: List[str] = []
    for key in ("anyOf", "oneOf"):
        branches = prop.get(key)
        for branch in branches if isinstance(branches, list) else []:
            found += [k for k in _schema_types(branch) if k not in found]
    return found


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")  # Python's json would take NaN and Infinity


def _parse_as(kind: str, raw: str) -> Tuple[bool, Any]:
    """(True, value) when ``raw`` is a value of JSON type ``kind``, else (False, None)."""
    if kind == "string":
        return True, raw
    if kind == "boolean":
        word = raw.strip().lower()
        return (True, word == "true") if word in ("true", "false") else (False, None)
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except ValueError:
        return False, None
    if kind == "null":
        return value is None, None
    if isinstance(value, bool):
        return False, None
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        return True, int(value)  # 3.0 is an integer in JSON Schema; send it as one
    wanted: Any = {"integer": int, "number": (int, float), "array": list, "object": dict}.get(kind)
    return (True, value) if wanted and isinstance(value, wanted) else (False, None)


def _same_json(a: Any, b: Any) -> bool:
    return isinstance(a, bool) == isinstance(b, bool) and a == b  # True == 1 in Python, not in JSON


def _in_enum(value: Any, allowed: List[Any]) -> bool:
    return any(_same_json(value, v) for v in allowed)


def _array_of_strings(prop: Any) -> bool:
    """Whether a property is an array whose items are strings (a bare value is then one item)."""
    items = prop.get("items") if isinstance(prop, dict) else None
    return "array" in _schema_types(prop) and "string" in _schema_types(items)


def coerce_argument(name: str, raw: str, prop: Any) -> Any:
    """The value to send for ``name=raw`` given the property's schema (None: no schema).

    A ``string`` property (also in a list such as ["string", "null"]) takes the text as
    written; other types are parsed, and text that does not parse is a UsageError naming the
    parameter and the type; a value outside an ``enum`` is a UsageError naming the choices.
    A bare value (not a JSON array) for an array of strings is sent as a one-item array."""
    types = _schema_types(prop)
    known = [k for k in types if k == "string" or k in _EXPECTED]
    allowed = prop.get("enum") if isinstance(prop, dict) and isinstance(prop.get("enum"), list) else None
    if not known:
        value = raw if allowed is not None and raw in allowed else _json_or_string(raw)
    elif "string" in known:
        value = raw
    else:
        for kind in known:
            ok, value = _parse_as(kind, raw)
            if ok:
                break
        else:
            if _array_of_strings(prop) and not raw.lstrip().startswith("["):
                return [raw]
            shown = raw if len(raw) <= 40 else raw[:37] + "..."
            expected = " or ".join(_EXPECTED[k] for k in known)
            raise UsageError(f"parameter '{name}' expects {expected}, got {shown!r}")
    if allowed is not None and not _in_enum(value, allowed):
        choices = ", ".join(v if isinstance(v, str) else json.dumps(v) for v in allowed)
        raise UsageError(f"parameter '{name}' must be one of: {choices} (got {raw!r})")
    return value


def coerce_arguments(raw: Dict[str, str], input_schema: Any) -> Dict[str, Any]:
    """``coerce_argument`` for each pair, by the properties of a tool's ``inputSchema``."""
    props = input_schema.get("properties") if isinstance(input_schema, dict) else None
    props = props if isinstance(props, dict) else {}
    return {key: coerce_argument(key, value, props.get(key)) for key, value in raw.items()}


def tool_input_schema(tools: List[Any], tool: str) -> Optional[Dict[str, Any]]:
    for t in tools:
        if isinstance(t, dict) and t.get("name") == tool and isinstance(t.get("inputSchema"), dict):
            return t["inputSchema"]
    return None


def suggest_names(name: str, known: Iterable[str], limit: int = 3) -> List[str]:
    """Up to ``limit`` of ``known`` closest to ``name`` (a typo, other case, ``-`` for ``_``),
    best first. Suggestions only: nothing is ever run under a name the user did not write."""
    import difflib

    def norm(text: str) -> str:
        return text.lower().replace("-", "_")

    by_norm: Dict[str, List[str]] = {}
    for candidate in known:
        by_norm.setdefault(norm(candidate), []).append(candidate)
    out: List[str] = list(by_norm.get(norm(name), []))
    matcher = difflib.SequenceMatcher()
    matcher.set_seq2(norm(name))
    scored = []
    for i, key in enumerate(by_norm):  # difflib's own ranking, ties in the order given
        matcher.set_seq1(key)
        if matcher.real_quick_ratio() >= 0.6 and matcher.quick_ratio() >= 0.6 and matcher.ratio() >= 0.6:
            scored.append((-matcher.ratio(), i, key))
    for _, _, key in sorted(scored):
        out += [c for c in by_norm[key] if c not in out]
    return [c for c in out if c != name][:limit]


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean: a, b?)`` for the names closest to ``name``; empty when none is close."""
    close = suggest_names(name, known)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def _flag_name(prop: str) -> str:
    """The flag mcporter derives from a property name: ``dryRun`` and ``dry_run`` are ``dry-run``."""
    spelled = "".join("-" + c.lower() if c.isupper() else "-" if c == "_" else c for c in prop)
    return "-".join(part for part in spelled.split("-") if part)


def name_arguments(
    raw: Dict[str, str],
    flags: Dict[str, str],
    positional: List[str],
    input_schema: Any,
    tool: str,
    given: Iterable[str] = (),
) -> Dict[str, str]:
    """Every command-line form as ``{property: text}``: ``key=value`` pairs as written, then
    ``--flag value`` matched to a property (``--dry-run`` is ``dryRun`` or ``dry_run``; a flag
    the schema lacks is a UsageError), then positional values in the schema's property order,
    skipping properties already named (``given``: those of ``--args``)."""
    props = input_schema.get("properties") if isinstance(input_schema, dict) else None
    props = props if isinstance(props, dict) else {}
    named = dict(raw)
    by_flag: Dict[str, str] = {}
    for prop in props:
        by_flag.setdefault(prop, prop)
        by_flag.setdefault(_flag_name(prop), prop)
    for flag, value in flags.items():
        prop = by_flag.get(flag) or by_flag.get(_flag_name(flag))
        if prop is None:
            flags_known = [_flag_name(p) for p in props]
            hint = _did_you_mean(flag, flags_known) or (
                f" (its flags: {', '.join('--' + f for f in flags_known)})" if props else ""
            )
            raise UsageError(f"tool '{tool}' has no parameter --{flag}{hint}")
        named[prop] = value
    if positional:
        taken = set(named) | set(given)
        free = [p for p in props if p not in taken]
        if len(positional) > len(free):
            order = ", ".join(free) or "none"
            raise UsageError(
                f"{len(positional)} positional value(s) for tool '{tool}', but its unnamed parameters "
                f"in order are: {order}; name the values (key=value)"
            )
        named.update(zip(free, positional))
    return named


def _check_tool_known(tools: List[Any], tool: str) -> None:
    """An unknown tool is a UsageError naming the closest ones: it is never auto-corrected."""
    names: List[str] = [t["name"] for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str)]
    if names and tool not in names:
        raise UsageError(f"unknown tool '{tool}'{_did_you_mean(tool, names) or ' (see: list SERVER)'}")


def call_arguments(
    typed: Dict[str, Any],
    raw: Dict[str, str],
    tool: str,
    list_tools: Callable[[], List[Any]],
    flags: Optional[Dict[str, str]] = None,
    positional: Optional[List[str]] = None,
) -> Dict[str, Any]:
    """``typed`` (from ``--args``) with the command line's forms (``key=value`` pairs,
    ``--flag value``, positional values) named and coerced on top, by the tool's schema.

    The tool list (cached by the daemon) is always read: an unknown tool is refused with the
    closest names before anything runs. A server that answers tools/list with an error has
    no schemas: pairs are then typed as before, and flags or positional values are refused."""
    try:
        tools = list_tools()
    except McpError as exc:
        if exc.rpc_code is None:
            raise
        tools = []  # it answered tools/list with an error: no schemas, values typed as before
    _check_tool_known(tools, tool)
    if not raw and not flags and not positional:
        return typed
    schema = tool_input_schema(tools, tool)
    named = name_arguments(raw, flags or {}, positional or [], schema, tool, typed)
    return dict(typed, **coerce_arguments(named, schema))


# ##########################################################################################
# MCP keep-alive service: the daemon's handlers, built on the public host API. One table of
# operations (``_OPERATIONS``) says what each daemon method takes and runs; a ``_KeptServer``
# owns one kept server's life; the service routes requests and fans out the ticks.
# ##########################################################################################


def env_hash(value: Optional[str]) -> Optional[str]:
    """A variable's value as a caller tells it to the daemon: a short digest, never the value."""
    return None if value is None else _sha256(os.fsencode(value)).hexdigest()[:16]


def env_drift(started_with: Dict[str, Optional[str]], caller: Dict[str, Any]) -> List[str]:
    """The ``${VAR}``s a kept server was started with whose value the caller's differs from
    (``caller``: name -> env_hash of its value); a variable the caller did not report is not
    compared (an older client, or mcporter's)."""
    return sorted(v for v, value in started_with.items() if v in caller and caller[v] != env_hash(value))


def server_idle_expired(
    idle_ms: Optional[int], has_client: bool, starting: bool, in_use: int, last_used: Optional[int], now: int
) -> bool:
    """Whether a kept server's own ``idleTimeoutMs`` has run out: it runs, nothing uses it
    or is starting it, and its last use ended at least ``idle_ms`` ago."""
    if not idle_ms or not has_client or starting or in_use or last_used is None:
        return False
    return now - last_used >= idle_ms


def ping_due(
    interval_ms: int, alive: bool, busy: bool, failures: int, last_active: Optional[int], now: int
) -> bool:
    """Whether a kept server should be pinged now: it runs and nothing is using, starting,
    closing or pinging it, and it has been quiet for ``interval_ms``. After a failed ping
    the next goes on the next tick (within a second), so a wedged server is restarted
    after two ping timeouts, not two intervals."""
    if not interval_ms or not alive or busy:
        return False
    if failures:
        return True
    return last_active is not None and now - last_active >= interval_ms


def after_ping(failures: int, ok: bool) -> Tuple[int, bool]:
    """(consecutive failures after this ping, whether to restart the server now)."""
    if ok:
        return 0, False
    return failures + 1, failures + 1 >= _PING_FAILURES_TO_RESTART


def ping_verdict(
    failures: int, ok: bool, answered_before: bool, stopped: bool, heard_since_last_miss: bool
) -> Tuple[int, str]:
    """(consecutive misses after this ping, what it means): "ok"; "unsupported" when a server
    that never answered a ping misses one (no evidence either way: it is not restarted and
    no longer pinged, as some working servers ignore ping), unless the OS reports it stopped;
    else "miss", or "restart" at the second miss in a row. Any answer since the last miss
    (a late one too) shows it alive, and breaks the run."""
    if ok:
        return 0, "ok"
    if not (answered_before or stopped):
        return failures, "unsupported"
    failures, restart = after_ping(0 if heard_since_last_miss else failures, False)
    return failures, "restart" if restart else "miss"


# -- the table of operations ------------------------------------------------------------------

# How a caller's ``timeoutMs`` applies to an operation (``_Operation.timeout``).
_PER_REQUEST = "per-request"  # each MCP request it sends (each page of a list) waits at most this
_START = "start"  # the new server's spawn and handshake
_CLOSE = "close"  # the close's grace steps: half of it each, never more than a normal close

_JSON_KINDS: Dict[str, Any] = {
    "string": str,
    "object": dict,
    "array": list,
    "number": (int, float),
    "boolean": bool,
}


class _Param:
    """One parameter of a daemon method: its name, JSON type, the wording of a type error,
    and, for an object, the JSON type of its values (None: any)."""

    __slots__ = ("name", "kind", "what", "required", "values")

    def __init__(
        self, name: str, kind: str, what: str, required: bool = False, values: Optional[str] = None
    ) -> None:
        self.name, self.kind, self.what, self.required, self.values = name, kind, what, required, values

    def read(self, params: Dict[str, Any]) -> Any:
        """The value in ``params`` (None when absent and optional); HandlerError when mistyped."""
        value = _param(params, self.name, _JSON_KINDS[self.kind], self.what, self.required)
        wanted = _JSON_KINDS.get(self.values or "")
        items = value.values() if isinstance(value, dict) else value
        if value is not None and wanted is not None and not all(isinstance(v, wanted) for v in items):
            raise HandlerError(f"param '{self.name}' must be {self.what}", "bad_request")
        return value


# Every operation takes these first: which server, and how long the caller waits.
_COMMON_PARAMS = (
    _Param("server", "string", "a server name", required=True),
    _Param("timeoutMs", "number", "a number of milliseconds"),
)


class _Operation:
    """One daemon method: its wire name, its parameters (after ``_COMMON_PARAMS``), the MCP
    method it runs, how the caller's timeout applies, and what runs it: ``run(client, args,
    opts)`` on the server's MCP face, or, for the kept server's own life (``mcp`` is None),
    ``manage(kept, args, seconds)`` in the daemon. ``args``: the parameters as read."""

    __slots__ = ("wire", "params", "mcp", "timeout", "run", "manage", "guard", "screen")

    def __init__(
        self,
        wire: str,
        params: Tuple[_Param, ...],
        mcp: Optional[str],
        timeout: str,
        run: Optional[Callable[[McpStdioClient, Dict[str, Any], _CallOptions], Any]] = None,
        manage: Optional[Callable[[_KeptServer, Dict[str, Any], float], Any]] = None,
        guard: Optional[Callable[[ServerSpec, Dict[str, Any]], None]] = None,
        screen: Optional[Callable[[ServerSpec, Any], Any]] = None,
    ) -> None:
        self.wire, self.params, self.mcp, self.timeout = wire, _COMMON_PARAMS + params, mcp, timeout
        self.run, self.manage = run, manage
        self.guard, self.screen = guard, screen  # the config's tool filters: before and after

    def read(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """The declared parameters of a request, type-checked (HandlerError when one is not)."""
        return {p.name: p.read(params) for p in self.params}

    def check(self, spec: ServerSpec, args: Dict[str, Any]) -> None:
        """Refuse, before its server is asked, what the server's config forbids."""
        if self.guard is not None:
            self.guard(spec, args)

    def shown(self, spec: ServerSpec, result: Any) -> Any:
        """The result as the server's config lets a caller see it."""
        return self.screen(spec, result) if self.screen is not None else result

    def seconds(self, args: Dict[str, Any], start: float = _MCP_START_TIMEOUT) -> float:
        """The wait the caller's ``timeoutMs`` gives, as this operation applies it; without one,
        the operation's own default (for a start, ``start``: the server's startupTimeoutMs)."""
        ms = args.get("timeoutMs")
        given = ms / 1000.0 if ms and ms > 0 else None
        if self.timeout == _CLOSE:
            return min(_MCP_CLOSE_GRACE, given / 2) if given else _MCP_CLOSE_GRACE
        if self.timeout == _START:
            return given or start
        return given or _DEFAULT_CALL_TIMEOUT

    def options(
        self,
        args: Dict[str, Any],
        notices: Optional[List[str]] = None,
        on_progress: Optional[Callable[[Dict[str, Any]], None]] = None,
        cancelled: Optional[Any] = None,
    ) -> _CallOptions:
        """How this operation's MCP requests wait, from its parameters and its caller."""
        stall = args.get("stallTimeoutMs")
        return _CallOptions(
            self.seconds(args),
            notices,
            on_progress,
            cancelled,
            stall / 1000.0 if stall and stall > 0 else None,
        )


def _call_tool(client: McpStdioClient, args: Dict[str, Any], opts: _CallOptions) -> Any:
    """``rawArgs`` (text pairs from a command line), ``rawFlags`` and ``rawPositional`` are
    named and typed by the tool's cached schema."""
    typed, raw, tool = args["args"] or {}, args["rawArgs"] or {}, args["tool"]
    flags, positional = args["rawFlags"] or {}, args["rawPositional"] or []
    full = call_arguments(
        typed, raw, tool, lambda: client.tools(_CallOptions(opts.timeout)), flags, positional
    )
    return client.call_tool(tool, full, opts)


def _list_tools(client: McpStdioClient, args: Dict[str, Any], opts: _CallOptions) -> Any:
    if args["full"]:  # each tool as the server wrote it (annotations, title, icons): the bridge
        return [t for t in client.tools(opts) if isinstance(t, dict)]
    keep = (
        ("name", "description", "inputSchema", "outputSchema")
        if args["includeSchema"]
        else ("name", "description")
    )
    tools = [{k: t[k] for k in keep if k in t} for t in client.tools(opts) if isinstance(t, dict)]
    # mcporter's clients get its plain list; ours ask for the server's instructions too.
    return {"tools": tools, "instructions": client.instructions} if args["includeServerInfo"] else tools


def _refuse_filtered_tool(spec: ServerSpec, args: Dict[str, Any]) -> None:
    """``allowedTools``/``blockedTools``: a filtered tool is refused, its server never asked."""
    if not spec.allows_tool(args["tool"]):
        raise HandlerError(spec.tool_refusal(args["tool"]), "config")


def _hide_filtered_tools(spec: ServerSpec, result: Any) -> Any:
    tools = result.get("tools") if isinstance(result, dict) else result
    if isinstance(tools, list):
        tools = [t for t in tools if not isinstance(t, dict) or spec.allows_tool(str(t.get("name")))]
        return dict(result, tools=tools) if isinstance(result, dict) else tools
    return result


_OPERATIONS: Dict[str, _Operation] = {
    op.wire: op
    for op in (
        _Operation(
            "callTool",
            (
                _Param("tool", "string", "a tool name", required=True),
                _Param("args", "object", "an object"),
                _Param("rawArgs", "object", "an object of strings", values="string"),
                _Param("rawFlags", "object", "an object of strings", values="string"),
                _Param("rawPositional", "array", "a list of strings", values="string"),
                _Param("stallTimeoutMs", "number", "a number of milliseconds"),
                # The caller's values of the server's ${VAR}s, hashed (env_hash): the daemon
                # says when it runs the server with others.
                _Param("envHashes", "object", "an object"),
            ),
            "tools/call",
            _PER_REQUEST,
            _call_tool,
            guard=_refuse_filtered_tool,
        ),
        _Operation(
            "listTools",
            (
                _Param("includeSchema", "boolean", "true or false"),
                _Param("includeServerInfo", "boolean", "true or false"),
                _Param("full", "boolean", "true or false"),
            ),
            "tools/list",
            _PER_REQUEST,
            _list_tools,
            screen=_hide_filtered_tools,
        ),
        _Operation(
            "listResources",
            (),
            "resources/list",
            _PER_REQUEST,
            lambda c, a, o: {"resources": c.list_resources(o)},
        ),
        _Operation(
            "readResource",
            (_Param("uri", "string", "a resource URI", required=True),),
            "resources/read",
            _PER_REQUEST,
            lambda c, a, o: c.read_resource(a["uri"], o),
        ),
        _Operation(
            "listResourceTemplates",
            (),
            "resources/templates/list",
            _PER_REQUEST,
            lambda c, a, o: {"resourceTemplates": c.list_resource_templates(o)},
        ),
        _Operation(
            "listPrompts",
            (),
            "prompts/list",
            _PER_REQUEST,
            lambda c, a, o: {"prompts": c.list_prompts(o)},
        ),
        _Operation(
            "getPrompt",
            (_Param("name", "string", "a prompt name", required=True), _Param("args", "object", "an object")),
            "prompts/get",
            _PER_REQUEST,
            lambda c, a, o: c.get_prompt(a["name"], a["args"] or {}, o),
        ),
        _Operation("closeServer", (), None, _CLOSE, manage=lambda kept, a, wait: kept.close_request(wait)),
        _Operation(
            "restartServer", (), None, _START, manage=lambda kept, a, wait: kept.restart_request(wait)
        ),
    )
}


def _param(params: Dict[str, Any], key: str, kind: Any, what: str, required: bool = True) -> Any:
    value = params.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise HandlerError(f"param '{key}' must be {what}", "bad_request")
    return value


# -- one kept server ----------------------------------------------------------------------------


class _Health:
    """A kept server's health record, as ``status`` shows it (guarded by its server's lock).
    Times shown are wall-clock ms; ``quiet_since`` and ``missed_at`` are monotonic, as every
    interval is measured."""

    __slots__ = (
        "started_at",
        "pinging",
        "failures",
        "last_ping_at",
        "last_ping_ok",
        "last_error",
        "restarts",
        "quiet_since",
        "answered",
        "unsupported",
        "missed_at",
    )

    def __init__(self) -> None:
        self.started_at: Optional[int] = None
        self.pinging = False  # a ping is out: one at a time per server
        self.failures = 0  # consecutive failed pings of the current process
        self.last_ping_at: Optional[int] = None
        self.last_ping_ok: Optional[bool] = None
        self.last_error: Optional[str] = None
        self.restarts = 0
        self.new_process()

    def new_process(self) -> None:
        """A new server process starts with a clean record: nothing known of its pings yet."""
        self.failures = 0
        self.quiet_since: Optional[int] = _mono_ms()  # started, used, or pinged (monotonic ms)
        self.answered = False  # it answered a ping: from now on a missed one is evidence
        self.unsupported = False  # it never answered its first: no longer pinged
        self.missed_at: Optional[float] = None  # (monotonic) when the last missed ping went out

    def record(self) -> Dict[str, Any]:
        return {
            "lastPingAt": self.last_ping_at,
            "lastPingOk": self.last_ping_ok,
            "pingFailures": self.failures,
            "pingUnsupported": self.unsupported,
            "lastError": self.last_error,
            "restarts": self.restarts,
        }


class _KeptServer:
    """One kept server's life: start, close, restart, idle close, ping, and its health.

    ``life`` is held while its server starts or closes, so one copy runs at a time; ``fields``
    (never held across I/O) guards the fields and the health record."""

    heard: Optional[Callable[[str, Any], None]] = None  # its notifications, for watchEvents

    def __init__(self, spec: ServerSpec, log: DaemonLog, changed: Callable[[], None]) -> None:
        import threading

        self.spec = spec
        self.log = log
        self.changed = changed  # the host's metadata is out of date (a server started or closed)
        self.life = threading.Lock()
        self.fields = threading.Lock()
        self.client: Optional[McpStdioClient] = None
        self.starting: Optional[McpStdioClient] = None  # mid-handshake: shutdown must end it too
        self.stopping = False  # the daemon is shutting down: no server starts after it
        self.last_used: Optional[int] = None  # wall-clock ms, shown
        self.used_at: Optional[int] = None  # the same moment on the monotonic clock, for idle close
        self.in_use = 0  # requests running on it: never idle while any is
        self.health = _Health()

    @property
    def name(self) -> str:
        return self.spec.name

    # -- start ---------------------------------------------------------------------------------

    def live_client(self, start_timeout: Optional[float] = None) -> McpStdioClient:
        """The running server's client, (re)starting the server when it is not running
        (within ``start_timeout``, else its ``startupTimeoutMs``)."""
        with self.life:
            client = self.client
            if client is not None and client.alive():
                return client
            self._refuse_if_stopping()
            if self.spec.problem:  # an unset ${VAR}: a config error, never a server started wrong
                raise HandlerError(self.spec.problem, "config")
            self._retire(client)
            client = self._start(start_timeout or self.spec.startup_timeout_ms / 1000.0)
        self.changed()
        return client

    def _retire(self, old: Optional[McpStdioClient]) -> None:
        """Let go of a client found exited or broken (caller holds ``life``)."""
        if old is None:
            return
        self.log.event(f"server '{self.name}' exited or broke; restarting it")
        with self.fields:
            self.client = None
            if old.protocol_version:  # it had served; a failed start keeps its own error
                self.health.restarts += 1
                self.health.last_error = f"exited (pid {old.pid})"
        old.close(grace=_RETIRED_CLOSE_GRACE)

    def _start(self, timeout: float) -> McpStdioClient:
        """Start a new copy (caller holds ``life``); it becomes the server unless shutdown began
        during its handshake, which could not see it: then it is closed here."""
        name = self.name
        spec = self.spec
        client = McpStdioClient(
            name,
            spec.command,
            env=spec.env,
            cwd=spec.cwd,
            log=lambda line: self.log.event(f"[{name}] {line}"),
            source=spec.source,
        )
        client.on_server_notification = self.heard
        with self.fields:
            self.starting = client
        try:
            client.start(timeout)
        except McpError as exc:
            with self.fields:
                self.health.last_error = str(exc)
            raise
        finally:
            with self.fields:
                self.starting = None
        if not self._install(client):
            client.close(grace=_RETIRED_CLOSE_GRACE)
            self._refuse_if_stopping()
        self.log.event(f"server '{name}' started (pid {client.pid})")
        if self.heard is not None:
            self.heard(_STARTED_EVENT, {"pid": client.pid})  # a bridge sees a restart at once
        return client

    def _install(self, client: McpStdioClient) -> bool:
        with self.fields:
            if self.stopping:
                return False
            self.client = client
            self.health.started_at = _now_ms()
            self.health.new_process()
            return True

    def _refuse_if_stopping(self) -> None:
        if self.stopping:
            raise HandlerError(f"daemon stopped before server '{self.name}' could start", "daemon_stopped")

    # -- use -----------------------------------------------------------------------------------

    def use(self, method: str, action: Callable[[McpStdioClient], Any]) -> Any:
        """Run ``action`` on the live client; the server is in use (never idle) meanwhile."""
        began = time.monotonic()
        with self.fields:
            self.in_use += 1
        try:
            result = action(self.live_client())
        except McpError as exc:
            self._trace(method, began, f"error: {exc}")
            raise
        finally:
            with self.fields:
                self.in_use -= 1
                self.last_used = _now_ms()  # idle time counts from the end of the last use
                self.used_at = self.health.quiet_since = _mono_ms()
        self._trace(method, began, "ok")
        return result

    def _trace(self, method: str, began: float, outcome: str) -> None:
        if self.log.traces(self.name):
            ms = (time.monotonic() - began) * 1000
            self.log.event(f"{method} {self.name}: {outcome} ({ms:.1f} ms)")

    # -- close and restart ---------------------------------------------------------------------

    def close(self, why: str, grace: float = _MCP_CLOSE_GRACE) -> None:
        with self.life:  # a caller that wants it back waits: never two copies of one server
            with self.fields:
                client, self.client = self.client, None
            self.end(client, why, grace)

    def end(self, client: Optional[McpStdioClient], why: str, grace: float = _MCP_CLOSE_GRACE) -> None:
        if client is not None:
            self.log.event(f"closing server '{self.name}' (pid {client.pid}): {why}")
            client.close(grace)
            self.changed()

    def restart(
        self,
        why: str,
        expected: Optional[McpStdioClient] = None,
        grace: float = _MCP_CLOSE_GRACE,
        start_timeout: Optional[float] = None,
    ) -> Optional[McpStdioClient]:
        """Close the server, then start a new one at once. The close completes under ``life``
        before the start takes it, so two copies never run together. With ``expected``, only
        that process is restarted: None when it was closed or replaced meanwhile (an idle
        close must not be undone by a late health verdict)."""
        with self.life:
            with self.fields:
                client = self.client
                if expected is not None and client is not expected:
                    return None
                self.client = None
                if client is not None:
                    self.health.restarts += 1
            self.end(client, f"restarting: {why}", grace)
        return self.live_client(start_timeout)

    def close_request(self, grace: float) -> bool:
        """``closeServer``: close the server; the next call starts it again."""
        self.close("closeServer request", grace)
        return True

    def restart_request(self, start_timeout: float) -> Dict[str, Any]:
        """``restartServer``: close the server and start a new one at once, kept warm."""
        client = self.client
        was_running = client is not None and client.alive()  # for the caller's wording only
        client = self.restart("restartServer request", start_timeout=start_timeout)
        return {"server": self.name, "pid": client.pid if client else None, "wasRunning": was_running}

    # -- idle close ----------------------------------------------------------------------------

    def idle_due(self) -> bool:
        with self.fields:
            return self._idle_expired() and not self.life.locked()  # locked: starting/closing

    def close_if_idle(self) -> None:
        if not self.life.acquire(blocking=False):
            return  # starting or closing already: look again on the next tick
        try:
            with self.fields:  # a call may have begun since tick() looked
                client = self.client if self._idle_expired() else None
                if client is not None:
                    self.client = None
            self.end(client, f"idle for {self.spec.idle_timeout_ms} ms")
        finally:
            self.life.release()

    def _idle_expired(self) -> bool:
        return server_idle_expired(
            self.spec.idle_timeout_ms,
            self.client is not None,
            self.starting is not None,
            self.in_use,
            self.used_at,
            _mono_ms(),
        )

    # -- health: pings and restarts --------------------------------------------------------------

    def claim_ping(self) -> Optional[McpStdioClient]:
        """The client to ping now, marked as being pinged; None when no ping is due."""
        with self.fields:
            client, health = self.client, self.health
            busy = health.pinging or self.starting is not None or self.in_use > 0 or self.life.locked()
            alive = client is not None and client.alive() and not health.unsupported
            if not ping_due(
                self.spec.health_check_ms, alive, busy, health.failures, health.quiet_since, _mono_ms()
            ):
                return None
            health.pinging = True
            return client

    def check_health(self, client: McpStdioClient) -> None:
        """Ping ``client``; restart it after too many failed pings in a row."""
        sent = time.monotonic()
        try:
            why = self._record_ping(client, _ping_error(client), sent)
            if why is not None:
                self._restart_wedged(client, why)
        finally:
            with self.fields:
                self.health.pinging = False

    def _record_ping(self, client: McpStdioClient, error: Optional[str], sent: float) -> Optional[str]:
        """Note a ping's outcome in the health record; returns why to restart the server, or None."""
        stopped = error is not None and client.pid is not None and process_stopped(client.pid)
        with self.fields:
            if self.client is not client:
                return None  # closed or replaced while the ping was out: its result says nothing
            health = self.health
            health.last_ping_at = _now_ms()
            health.quiet_since = _mono_ms()
            health.last_ping_ok = error is None
            late = client.answered_since(health.missed_at)
            health.failures, verdict = ping_verdict(
                health.failures, error is None, health.answered, stopped, late
            )
            failures = health.failures
            if verdict == "ok":
                health.answered = True
            elif verdict == "unsupported":
                health.unsupported = True
            else:
                health.missed_at = sent
                health.last_error = f"ping failed: {error}"
        if verdict == "unsupported":
            self.log.event(
                f"server '{self.name}' (pid {client.pid}) has not answered a ping since it started: "
                "taken as not supporting ping; no longer pinged, never restarted for it"
            )
        if verdict in ("ok", "unsupported"):
            return None
        self.log.event(
            f"ping of server '{self.name}' (pid {client.pid}) failed ({failures} in a row): {error}"
        )
        return f"failed {failures} pings in a row (last: {error})" if verdict == "restart" else None

    def _restart_wedged(self, client: McpStdioClient, why: str) -> None:
        try:
            self.restart(why, expected=client, grace=_WEDGED_CLOSE_GRACE)
        except Exception as exc:  # the new copy did not start: the next call tries again
            with self.fields:
                self.health.last_error = str(exc)
            self.log.event(f"restart of server '{self.name}' failed: {exc}")

    # -- shutdown and records --------------------------------------------------------------------

    def stop(self) -> List[McpStdioClient]:
        """No start from now on; the running and half-started clients, for shutdown to close."""
        with self.fields:
            self.stopping = True
            victims = [c for c in (self.client, self.starting) if c is not None]
            self.client = None
        return victims

    def wait_idle(self, timeout: float) -> None:
        """Wait (bounded) for a close begun by an idle close or a restart to end its process."""
        if self.life.acquire(timeout=max(0.0, timeout)):
            self.life.release()

    def status(self) -> Dict[str, Any]:
        client = self.client
        alive = client is not None and client.alive()
        with self.fields:
            health = self.health.record()
        return {
            "name": self.name,
            "connected": alive,
            "lastUsedAt": self.last_used,
            "pid": client.pid if alive and client else None,
            "health": health,
        }

    def metadata(self) -> Optional[Dict[str, Any]]:
        """The running server's pid and start time; None when none runs."""
        client = self.client
        pid = client.pid if client is not None and client.alive() else None
        start = process_start_time(pid) if pid is not None else None
        if client is not None and client.pid and start:  # one that just exited has no start time
            return {"pid": client.pid, "pidStartTime": start}
        return None


def _ping_error(client: McpStdioClient) -> Optional[str]:
    """Why a ping failed, or None. An error answer is an answer: a server that does not know
    ``ping`` (some older SDKs) is alive, not wedged."""
    try:
        client.ping(timeout=_PING_TIMEOUT)
    except McpError as exc:
        if exc.code == "runtime_error" and client.alive():
            return None
        return str(exc)
    return None


# -- the service ----------------------------------------------------------------------------


class McpKeepAliveService:
    """Keeps the config's keep-alive servers running inside a ``DaemonHost``."""

    def __init__(self, config: Config, log: DaemonLog) -> None:
        _install_test_clock()
        self.config = config
        self.log = log
        self.host: Optional[DaemonHost] = None
        self._servers = {
            name: _KeptServer(spec, log, self._changed)
            for name, spec in config.servers.items()
            if spec.keep_alive and spec.url is None
        }
        self.events = _ServerEvents()
        for name, kept in self._servers.items():
            kept.heard = self.events.listener(name)

    def attach(self, host: DaemonHost) -> DaemonHost:
        """Bind to the host that serves these handlers (for metadata updates)."""
        self.host = host
        return host

    def _changed(self) -> None:
        if self.host:
            self.host.mark_metadata_dirty()

    def handlers(self) -> Dict[str, Callable[[Dict[str, Any], RequestContext], Any]]:
        """The wire methods this service answers (``_OPERATIONS``, and ``watchEvents``, which
        is about every server and no MCP request), for ``DaemonHost``."""
        handlers = {wire: self._handler(op) for wire, op in _OPERATIONS.items()}
        handlers["watchEvents"] = self.watch_events
        return handlers

    def _handler(self, op: _Operation) -> Callable[[Dict[str, Any], RequestContext], Any]:
        return lambda params, ctx: self.handle(op, params, ctx)

    def _server(self, params: Dict[str, Any]) -> _KeptServer:
        name = _COMMON_PARAMS[0].read(params)
        kept = self._servers.get(name)
        if kept is None:
            if name in self.config.servers:
                raise HandlerError(
                    f"server '{name}' is not managed by the daemon (not keep-alive)", "not_keep_alive"
                )
            raise HandlerError(f"unknown server '{name}'", "unknown_server")
        return kept

    # -- handlers ------------------------------------------------------------------------------

    def handle(self, op: _Operation, params: Dict[str, Any], ctx: RequestContext) -> Any:
        """One request, as the table declares its operation: on the kept server's MCP face
        (the server started when it is not running), or on the kept server's life."""
        kept = self._server(params)
        args = op.read(params)
        op.check(kept.spec, args)  # whichever client asks: what the config forbids never runs
        if op.manage is not None:
            return op.manage(kept, args, op.seconds(args, kept.spec.startup_timeout_ms / 1000.0))
        run = op.run
        assert run is not None
        for var in env_drift(kept.spec.env_refs, args.get("envHashes") or {}):
            ctx.notices.append(
                f"{var} differs from the value server '{kept.name}' was started with; the daemon "
                f"keeps its start-time environment (run: {_PROG} restart, to apply yours)"
            )
        opts = op.options(args, ctx.notices, ctx.report_progress, ctx.cancelled)
        client = kept.client
        starting = client is None or not client.alive()
        if starting:  # the caller's progress line says "starting 'x' (12 s)…" meanwhile
            ctx.report_progress({"progress": 0, "phase": "starting"})

        def act(client: McpStdioClient) -> Any:
            if starting:
                ctx.report_progress({"progress": 0, "phase": "started"})
            return run(client, args, opts)

        try:
            return op.shown(kept.spec, kept.use(ctx.method, act))
        except UsageError as exc:
            raise HandlerError(str(exc), "invalid_arguments") from None

    def watch_events(self, params: Dict[str, Any], ctx: RequestContext) -> Any:
        """``watchEvents``: what kept servers announced after event ``since`` (list changes,
        log messages, starts), waiting up to ``timeoutMs`` for the first, and each running
        server's pid, so a bridge also sees restarts. Without ``since``: at once, the count."""
        since = _param(params, "since", int, "an event number", required=False)
        ms = _param(params, "timeoutMs", (int, float), "a number of milliseconds", required=False)
        wait = min(ms / 1000.0 if ms and ms > 0 else _WATCH_EVENTS_MAX_WAIT, _WATCH_EVENTS_MAX_WAIT)
        stop = lambda: ctx.cancelled.is_set() or self._host_stopping()  # noqa: E731
        seq, events, missed = self.events.wait(since, wait if since is not None else 0.0, stop)
        if self._host_stopping():
            raise HandlerError("daemon is stopping", "daemon_stopped")
        servers = {name: kept.status()["pid"] for name, kept in self._servers.items()}
        return {"seq": seq, "missed": missed, "events": events, "servers": servers}

    def _host_stopping(self) -> bool:
        # The host answers requests "shutting down" once its reason is set; an events wait
        # must end then too, or it would hold the stop back for its whole wait.
        return getattr(getattr(self.host, "_state", None), "reason", None) is not None

    # -- host hooks ----------------------------------------------------------------------------

    def tick(self) -> None:
        """Per-server ``idleTimeoutMs``: close just that server once idle long enough; and
        ping a server quiet for its ``healthCheckMs``. Each close and each ping runs on a
        thread of its own, so a slow close or a wedged server delays nothing else."""
        import threading

        for kept in self._servers.values():
            if kept.idle_due():
                threading.Thread(target=kept.close_if_idle, daemon=True).start()
            client = kept.claim_ping()
            if client is not None:
                threading.Thread(target=kept.check_health, args=(client,), daemon=True).start()

    def shutdown(self) -> None:
        """Close every server in parallel (one grace period, not N), including any still in
        its handshake: a half-started server must not outlive the daemon."""
        import threading

        self.events.close()  # a bridge waiting for events hears the stop now
        threads = [
            threading.Thread(target=kept.end, args=(client, "daemon shutdown"), daemon=True)
            for kept in self._servers.values()
            for client in kept.stop()
        ]
        for t in threads:
            t.start()
        # Long enough for a close's every step, so no server outlives the daemon (bounded).
        deadline = time.monotonic() + _MCP_CLOSE_WORST
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for kept in self._servers.values():
            kept.wait_idle(deadline - time.monotonic())

    def status_extra(self) -> Dict[str, Any]:
        """Hook for ``status``: the config path and each kept server's state and health."""
        return {"configPath": self.config.path, "servers": [kept.status() for kept in self._servers.values()]}

    def metadata_extra(self) -> Dict[str, Any]:
        """Hook for the metadata: config layers and each running server's pid and start time."""
        servers = {}
        for name, kept in self._servers.items():
            record = kept.metadata()
            if record is not None:
                servers[name] = record
        return {
            "configPath": self.config.path,
            "configLayers": [_layer_record(path, data) for path, data in self.config.layers]
            + [
                {"path": f.path, "importKind": f.kind, "servers": sorted(f.entries)}
                for f in self.config.imports
            ],
            "servers": servers,
        }


def _layer_record(path: str, data: Optional[bytes]) -> Dict[str, Any]:
    try:
        mtime_ms: Optional[float] = os.stat(path).st_mtime_ns / 1e6 if data is not None else None
    except OSError:
        mtime_ms = None
    digest = _sha256(data).hexdigest() if data is not None else None
    return {"path": path, "mtimeMs": mtime_ms, "sha256": digest}


# -- server events: what kept servers announce, for bridges (``watchEvents``) ---------------------

_EVENTS_KEPT = 256  # a bridge that falls further behind is told it missed some

_EVENT_TEXT_LIMIT = 64 * 1024  # a log message's data past this is cut (it is kept in memory)

_WATCH_EVENTS_MAX_WAIT = 30.0

_EVENTS_WAIT_SLICE = 0.1  # a waiting watchEvents looks this often whether its caller left

_LIST_CHANGED = {
    "notifications/tools/list_changed": "tools",
    "notifications/resources/list_changed": "resources",
    "notifications/prompts/list_changed": "prompts",
}


_STARTED_EVENT = "mcporter-daemon/started"  # not MCP: the daemon's own word for a server start


def server_event(server: str, method: str, params: Any) -> Optional[Dict[str, Any]]:
    """The event a server's notification makes for bridges, or None: list changes and log
    messages (a message's data cut to a bounded size), and the daemon's own start events."""
    if method == _STARTED_EVENT:
        return {"server": server, "type": "started", "pid": (params or {}).get("pid")}
    if method in _LIST_CHANGED:
        return {"server": server, "type": "listChanged", "list": _LIST_CHANGED[method]}
    if method != "notifications/message" or not isinstance(params, dict):
        return None
    data = params.get("data")
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=True, default=str)
    if len(text) > _EVENT_TEXT_LIMIT:
        data = text[:_EVENT_TEXT_LIMIT] + "… (cut)"
    return {"server": server, "type": "message", "level": params.get("level"), "data": data}


class _ServerEvents:
    """Server events, numbered from 1, the last ``_EVENTS_KEPT`` kept; waiters wake on each."""

    def __init__(self) -> None:
        import collections
        import threading

        self._cond = threading.Condition()
        self._seq = 0
        self._kept: Any = collections.deque(maxlen=_EVENTS_KEPT)
        self._closed = False

    def listener(self, server: str) -> Callable[[str, Any], None]:
        """A server client's ``on_notification``: its events go here."""

        def heard(method: str, params: Any) -> None:
            event = server_event(server, method, params)
            if event is not None:
                self.add(event)

        return heard

    def add(self, event: Dict[str, Any]) -> None:
        with self._cond:
            self._seq += 1
            self._kept.append(dict(event, seq=self._seq))
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait(
        self, since: Optional[int], timeout: float, stop: Callable[[], bool]
    ) -> Tuple[int, List[Dict[str, Any]], bool]:
        """(latest number, events after ``since``, whether some of them are no longer kept),
        waiting up to ``timeout`` for one. A ``since`` this process never gave (None, or past
        its count: another daemon's) gets the count and no events."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while since is not None and self._seq == since and not self._closed and not stop():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, _EVENTS_WAIT_SLICE))
            if since is None or since > self._seq:
                return self._seq, [], False
            events = [e for e in self._kept if e["seq"] > since]
            missed = (events[0]["seq"] if events else self._seq + 1) > since + 1
            return self._seq, events, missed


# ##########################################################################################
# serve: the editor bridge. One stdio MCP server that re-exports the kept servers, every
# request through the daemon: names, aggregated lists, calls, list changes, progress, cancels.
# ServeBridge reads the editor's requests and runs each; the state is split by owner:
#   _ServeTarget    which servers, through which daemon: config, fingerprint, client, flags
#   _EditorSession  the editor's end: output fd and write lock, handshake done, log level
#   _ServeExports   exported names -> (server, name), resource URI and template routes
#   _InflightCalls  the editor's requests at the daemon, by id (what a cancel cuts)
#   _ServeLists     each server's last list and the one fetch running per list
#   _ServeRetries   servers that did not start: reason, next retry, backoff
#   _ServeWatcher   the watcher thread: daemon events and pids, config edits -> list_changed
# ##########################################################################################

_SERVE_NAME_LIMIT = 64  # Claude and OpenAI refuse longer tool names

_SERVE_HASH_CHARS = 10  # a shortened name ends with this much of a hash of the whole one

_SERVE_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")

_SERVE_ESCAPED = "_x"  # an escaped name part starts so; a plain one never starts with "_"

_SERVE_URI_PREFIX = "mcporter-daemon://kept/"  # a URI two servers list: prefix, server, URI

_SERVE_LIST_WAIT = 15.0  # a list is answered without a server still starting; list_changed follows

_SERVE_WATCH_WAIT = 1.0  # one watchEvents wait: a server restart shows within it

_SERVE_CONFIG_CHECK = 0.5  # the config files are looked at this often (an edit adds or removes servers)

_SERVE_CONFIG_REREAD = 10.0  # ... and read again at least this often, changed or not

_SERVE_DAEMON_POLL = 0.5  # with no daemon running, look this often whether one came

_SERVE_RETRY_FIRST = 2.0  # a server that could not start is listed again after this, doubling

_SERVE_RETRY_MAX = 60.0

_SERVE_PROGRESS_MS = 50  # the daemon's progress cadence for an editor that asked for progress

_SERVE_LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")

# The editor's lists: the MCP method (its daemon operation comes from the table of
# operations) and the key of the items in the daemon's answer.
_SERVE_LISTS = {
    "tools": ("tools/list", None),
    "resources": ("resources/list", "resources"),
    "templates": ("resources/templates/list", "resourceTemplates"),
    "prompts": ("prompts/list", "prompts"),
}

_SERVE_LIST_NOTIFICATIONS = (
    "notifications/tools/list_changed",
    "notifications/resources/list_changed",
    "notifications/prompts/list_changed",
)


def _wire_method(mcp_method: str) -> str:
    """The daemon method that runs an MCP method, from the one table of operations."""
    for op in _OPERATIONS.values():
        if op.mcp == mcp_method:
            return op.wire
    raise KeyError(mcp_method)


def _plain_name_part(part: str) -> bool:
    return (
        bool(part)
        and part[0] != "_"
        and part[-1] != "_"
        and "__" not in part
        and all(c in _SERVE_NAME_CHARS or c == "_" for c in part)
    )


def _escape_name_part(part: str) -> str:
    """``part`` as it is when plain; else ``_x`` and the part with every character outside
    ``[A-Za-z0-9-]`` written ``_<hex>-``. Neither form holds ``__`` or ends with ``_``, so
    the first ``__`` of a name always separates the server from the tool."""
    if _plain_name_part(part):
        return part
    return _SERVE_ESCAPED + "".join(c if c in _SERVE_NAME_CHARS else f"_{ord(c):x}-" for c in part)


def _unescape_name_part(part: str) -> Optional[str]:
    """The inverse of ``_escape_name_part``; None for text it never writes."""
    if not part.startswith(_SERVE_ESCAPED):
        return part if _plain_name_part(part) else None
    body, out, i = part[len(_SERVE_ESCAPED) :], [], 0
    while i < len(body):
        if body[i] != "_":
            out.append(body[i])
            i += 1
            continue
        end = body.find("-", i + 1)
        digits = body[i + 1 : end] if end > i else ""
        if not digits or len(digits) > 6 or any(d not in "0123456789abcdef" for d in digits):
            return None
        if int(digits, 16) > 0x10FFFF:
            return None
        out.append(chr(int(digits, 16)))
        i = end + 1
    text = "".join(out)
    return text if _escape_name_part(text) == part else None  # one spelling per name


def serve_name(server: str, name: str) -> str:
    """How ``serve`` exports a server's tool or prompt: ``server__name`` (mcporter's, mcp-hub's
    and metamcp's convention), only ``[A-Za-z0-9_-]``, each part escaped reversibly when it
    needs it, and over 64 characters cut with a stable hash of the whole name at the end."""
    full = _escape_name_part(server) + "__" + _escape_name_part(name)
    if len(full) <= _SERVE_NAME_LIMIT:
        return full
    digest = _sha256(f"{server}\0{name}".encode("utf-8", "surrogatepass")).hexdigest()[:_SERVE_HASH_CHARS]
    return full[: _SERVE_NAME_LIMIT - len(digest) - 2].rstrip("_") + "__" + digest


def parse_serve_name(name: str) -> Optional[Tuple[str, str]]:
    """(server, tool) of a name ``serve_name`` wrote without cutting it, else None (a cut name
    is found in the bridge's map of the names it listed)."""
    cut = name.find("__")
    if cut <= 0:
        return None
    server, item = _unescape_name_part(name[:cut]), _unescape_name_part(name[cut + 2 :])
    if server is None or item is None or serve_name(server, item) != name:
        return None
    return server, item


def wrap_resource_uri(server: str, uri: str) -> str:
    """A URI that two bridged servers both list, exported naming the server (reversibly)."""
    from urllib.parse import quote

    return (
        _SERVE_URI_PREFIX
        + quote(server, safe="", errors="surrogatepass")
        + "/"
        + quote(uri, safe="", errors="surrogatepass")
    )


def unwrap_resource_uri(uri: str) -> Optional[Tuple[str, str]]:
    """(server, URI) of a ``wrap_resource_uri`` URI, else None."""
    from urllib.parse import unquote

    if not uri.startswith(_SERVE_URI_PREFIX):
        return None
    server, sep, rest = uri[len(_SERVE_URI_PREFIX) :].partition("/")
    if not sep or not server:
        return None
    return unquote(server, errors="surrogatepass"), unquote(rest, errors="surrogatepass")


def uri_template_matches(template: str, uri: str) -> bool:
    """Whether ``uri`` can be an expansion of the RFC 6570 ``template``: its literal text as
    written, a simple ``{var}`` any text within one path segment, other expressions
    (``{+var}``, ``{?q}``, ``{/p}``, …) any text."""
    import re

    pattern, i = [], 0
    while True:
        start = template.find("{", i)
        end = template.find("}", start) if start >= 0 else -1
        if end < 0:
            pattern.append(re.escape(template[i:]))
            break
        pattern.append(re.escape(template[i:start]))
        operator = template[start + 1 : start + 2]
        pattern.append(".*" if operator and operator in "+#/.;?&" else "[^/?#]*")
        i = end + 1
    return re.fullmatch("".join(pattern), uri, re.DOTALL) is not None


def export_named(
    lists: Dict[str, List[Any]], bare: bool, allows: Optional[Callable[[str, str], bool]] = None
) -> Tuple[List[Dict[str, Any]], Dict[str, Tuple[str, str]]]:
    """Tools or prompts of each server as the editor sees them, and the map from each exported
    name back to (server, name). Names are ``serve_name``'s (the servers' own with ``bare``),
    descriptions start with ``[server] ``, everything else passes unchanged. ``allows(server,
    name)`` filters; a name met twice keeps its first owner."""
    exported: List[Dict[str, Any]] = []
    names: Dict[str, Tuple[str, str]] = {}
    for server, items in lists.items():
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                continue
            own = item["name"]
            if allows is not None and not allows(server, own):
                continue
            name = own if bare else serve_name(server, own)
            if name in names:
                continue
            names[name] = (server, own)
            entry = dict(item, name=name)
            if not bare:
                described = item.get("description")
                entry["description"] = f"[{server}] {described}" if described else f"[{server}]"
            exported.append(entry)
    return exported, names


def export_resources(
    lists: Dict[str, List[Any]], bare: bool
) -> Tuple[List[Dict[str, Any]], Dict[str, Tuple[str, str]]]:
    """Resources of each server as the editor sees them, and the route of each exported URI:
    (server, the server's URI). A URI only one server lists passes unchanged; one that two
    list is wrapped for each (``wrap_resource_uri``). Names start with ``server__``."""
    owners: Dict[str, List[str]] = {}
    for server, items in lists.items():
        for item in items:
            if isinstance(item, dict) and isinstance(item.get("uri"), str):
                found = owners.setdefault(item["uri"], [])
                if server not in found:
                    found.append(server)
    exported: List[Dict[str, Any]] = []
    routes: Dict[str, Tuple[str, str]] = {}
    for server, items in lists.items():
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("uri"), str):
                continue
            uri = item["uri"]
            shown = wrap_resource_uri(server, uri) if len(owners[uri]) > 1 else uri
            if shown in routes:
                continue
            routes[shown] = (server, uri)
            entry = dict(item, uri=shown)
            if not bare:
                entry["name"] = f"{server}__{item.get('name') or uri}"
            exported.append(entry)
    return exported, routes


def export_templates(
    lists: Dict[str, List[Any]], bare: bool
) -> Tuple[List[Dict[str, Any]], List[Tuple[str, str]]]:
    """Resource templates of each server (names start with ``server__``, templates unchanged),
    and (server, template) pairs for routing reads."""
    exported: List[Dict[str, Any]] = []
    routes: List[Tuple[str, str]] = []
    for server, items in lists.items():
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("uriTemplate"), str):
                continue
            routes.append((server, item["uriTemplate"]))
            entry = dict(item)
            if not bare:
                entry["name"] = f"{server}__{item.get('name') or item['uriTemplate']}"
            exported.append(entry)
    return exported, routes


def route_resource(
    uri: str, routes: Dict[str, Tuple[str, str]], templates: List[Tuple[str, str]], servers: List[str]
) -> Tuple[str, str]:
    """(server, the server's URI) for a ``resources/read``: a wrapped URI names its server; a
    listed one goes where it was listed; else the one server with a matching template, or
    the only server bridged. Otherwise _ServeError naming the candidates, or that none has it."""
    wrapped = unwrap_resource_uri(uri)
    if wrapped is not None:
        if wrapped[0] not in servers:
            raise _ServeError(-32602, f"resource {uri} names server '{wrapped[0]}', which is not bridged")
        return wrapped
    if uri in routes:
        return routes[uri]
    candidates = sorted({server for server, template in templates if uri_template_matches(template, uri)})
    if len(candidates) == 1:
        return candidates[0], uri
    if candidates:
        raise _ServeError(
            -32602, f"resource {uri} matches the templates of several servers: {', '.join(candidates)}"
        )
    if len(servers) == 1:
        return servers[0], uri
    raise _ServeError(-32002, f"no bridged server lists resource {uri} or a template that matches it")


class _ServeError(Exception):
    """A JSON-RPC error answer of the bridge (code, message, data)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code, self.data = code, data


def _rpc_error_of(exc: BaseException) -> Dict[str, Any]:
    """The JSON-RPC error for a failed request: the server's own code and data when it answered
    with an error, else -32603 with the one line naming the cause."""
    if isinstance(exc, _ServeError):
        error: Dict[str, Any] = {"code": exc.code, "message": str(exc)}
        if exc.data is not None:
            error["data"] = exc.data
        return error
    if isinstance(exc, DaemonError):
        code = exc.rpc_code if isinstance(exc.rpc_code, int) and not isinstance(exc.rpc_code, bool) else None
        error = {"code": -32603 if code is None else code, "message": str(exc)}
        if code is not None and exc.data is not None:
            error["data"] = exc.data
        return error
    return {"code": -32603, "message": f"internal error: {type(exc).__name__}: {exc}"}


# -- talking to the daemon: a connection the editor's cancel can cut ------------------------------


class _DaemonCall:
    """One request of the bridge to the daemon (``DaemonClient.request``, at most once). The
    editor's ``notifications/cancelled`` cuts its connection; the daemon hears its caller gone
    and cancels the call at the server."""

    __slots__ = ("sock", "cancelled", "lock")

    def __init__(self) -> None:
        import threading

        self.sock: Optional[_socket.socket] = None
        self.cancelled = False
        self.lock = threading.Lock()

    def on_socket(self, sock: _socket.socket) -> None:
        """``DaemonClient.request``'s hook: each connection it makes, before it is used."""
        with self.lock:
            if self.cancelled:  # not sent (again) once the editor cancelled
                raise DaemonError("cancelled by the editor", code="cancelled")
            self.sock = sock

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(_socket.SHUT_RDWR)  # not close(): the reader still uses the fd
            except OSError:
                pass  # closed already: the request was over


# -- the bridge ---------------------------------------------------------------------------------


class _ServeLists:
    """The servers' lists as last fetched, one fetch per server and list at a time. A fetch that
    outlives the editor's wait is "late": ``done`` says so, and the bridge sends list_changed."""

    def __init__(self, fetch: Callable[[str, str], List[Any]], done: Callable[..., None]) -> None:
        import threading

        self._fetch = fetch
        self._done = done
        self._lock = threading.Lock()
        self._last: Dict[Tuple[str, str], List[Any]] = {}
        self._running: Dict[Tuple[str, str], Any] = {}  # (kind, server) -> threading.Event
        self._late: set = set()
        self._threading = threading

    def gather(self, kind: str, servers: List[str], wait: float) -> Dict[str, List[Any]]:
        """Each server's list: fetched now, waiting up to ``wait`` for each; a server that has not
        answered by then has its last list (if any) and is late."""
        events = [(server, self.start(kind, server)) for server in servers]
        deadline = time.monotonic() + wait
        for _, event in events:
            event.wait(max(0.0, deadline - time.monotonic()))
        out = {}
        with self._lock:
            for server, event in events:
                if not event.is_set():
                    self._late.add((kind, server))
                if (kind, server) in self._last:
                    out[server] = self._last[(kind, server)]
        return out

    def start(self, kind: str, server: str) -> Any:
        with self._lock:
            event = self._running.get((kind, server))
            if event is not None:
                return event
            event = self._running[(kind, server)] = self._threading.Event()
        self._threading.Thread(target=self._run, args=(kind, server, event), daemon=True).start()
        return event

    def forget(self, keep: List[str]) -> None:
        """Drop the lists of servers no longer bridged."""
        with self._lock:
            for key in [k for k in self._last if k[1] not in keep]:
                del self._last[key]

    def _run(self, kind: str, server: str, event: Any) -> None:
        items: Optional[List[Any]] = None
        error: Optional[BaseException] = None
        try:
            items = self._fetch(kind, server)
        except Exception as exc:
            error = exc
        with self._lock:
            del self._running[(kind, server)]
            late = (kind, server) in self._late
            self._late.discard((kind, server))
            if items is not None:
                self._last[(kind, server)] = items
            else:
                self._last.pop((kind, server), None)  # its tools would only fail: not listed
        event.set()
        self._done(kind, server, items, error, late)


class _EditorSession:
    """The editor's end of the session: the fd the protocol goes out on and its write lock,
    whether the handshake is over, and the editor's logging level. Every frame to the editor
    goes out through ``send``, whole and one at a time."""

    def __init__(self, out_fd: int) -> None:
        import threading

        self.out_fd = out_fd
        self._write_lock = threading.Lock()
        self.initialized = threading.Event()
        self._level: Optional[int] = None  # the editor's logging/setLevel, as an index

    def set_level(self, params: Dict[str, Any]) -> Dict[str, Any]:
        level = params.get("level")
        if level not in _SERVE_LOG_LEVELS:
            raise _ServeError(-32602, f"unknown log level {level!r} (one of: {', '.join(_SERVE_LOG_LEVELS)})")
        self._level = _SERVE_LOG_LEVELS.index(str(level))
        return {}

    def send(self, frame: Dict[str, Any]) -> None:
        """One frame on stdout, whole (a 50 MiB result in pieces, never a second full copy);
        a frame that cannot be encoded becomes an error answer. An editor gone: exit quietly."""
        try:
            pieces: Iterable[bytes] = _jsonrpc_pieces(frame) if _looks_large(frame) else [encode_frame(frame)]
        except (TypeError, ValueError, RecursionError) as exc:
            error = {"code": -32603, "message": f"the result cannot be sent as JSON ({type(exc).__name__})"}
            pieces = [encode_frame({"jsonrpc": "2.0", "id": frame.get("id"), "error": error})]
        with self._write_lock:
            try:
                for piece in pieces:
                    view = memoryview(piece)
                    while view:
                        view = view[os.write(self.out_fd, view) :]
            except OSError:
                os._exit(0)  # the editor closed our stdout: nobody is left to answer

    def notify(self, method: str, params: Optional[Dict[str, Any]] = None) -> None:
        frame: Dict[str, Any] = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            frame["params"] = params
        self.send(frame)

    def log(self, level: str, server: str, data: Any) -> None:
        """``notifications/message`` with the server as logger, at or above the editor's level."""
        level = level if level in _SERVE_LOG_LEVELS else "info"
        if self.initialized.is_set() and _editor_wants_log(level, self._level):
            self.notify("notifications/message", {"level": level, "logger": server, "data": data})

    def lists_changed(self, why: str, lists: Tuple[str, ...] = _SERVE_LIST_NOTIFICATIONS) -> None:
        """Tell the editor to list again (only once it finished its handshake)."""
        _serve_log(f"lists changed: {why}")
        if self.initialized.is_set():
            for method in lists:
                self.notify(method)


def _editor_wants_log(level: str, threshold: Optional[int]) -> bool:
    """A message at ``level`` reaches the editor: no level set yet, or at or above the one set."""
    return threshold is None or _SERVE_LOG_LEVELS.index(level) >= threshold


class _ServeExports:
    """What this session exported, as last listed: each exported tool and prompt name's
    (server, own name), each listed resource URI's (server, URI), and the (server, template)
    pairs that route a read no list named."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._names: Dict[str, Dict[str, Tuple[str, str]]] = {"tools": {}, "prompts": {}}
        self._resource_routes: Dict[str, Tuple[str, str]] = {}
        self._template_routes: List[Tuple[str, str]] = []

    def named(self, kind: str, name: str) -> Optional[Tuple[str, str]]:
        with self._lock:
            return self._names[kind].get(name)

    def set_names(self, kind: str, names: Dict[str, Tuple[str, str]]) -> None:
        with self._lock:
            self._names[kind] = names

    def set_resource_routes(self, routes: Dict[str, Tuple[str, str]]) -> None:
        with self._lock:
            self._resource_routes = routes

    def set_template_routes(self, routes: List[Tuple[str, str]]) -> None:
        with self._lock:
            self._template_routes = routes

    def routes(self) -> Tuple[Dict[str, Tuple[str, str]], List[Tuple[str, str]]]:
        with self._lock:
            return self._resource_routes, self._template_routes


class _InflightCalls:
    """The editor's requests now at the daemon, by JSON-RPC id: what its
    ``notifications/cancelled`` cuts."""

    def __init__(self) -> None:
        self._calls: Dict[str, _DaemonCall] = {}

    def start(self, rid: Any) -> _DaemonCall:
        call = self._calls[json.dumps(rid)] = _DaemonCall()
        return call

    def cancel(self, rid: Any) -> None:
        call = self._calls.get(json.dumps(rid))
        if call is not None:
            call.cancel()

    def finish(self, rid: Any) -> None:
        self._calls.pop(json.dumps(rid), None)


class _ServeTarget:
    """Which servers are bridged, and through which daemon: the config as last read and its
    fingerprint, the DaemonClient for it, ``--servers`` and ``--bare``. A config edit swaps
    config, fingerprint and client together, under one lock."""

    def __init__(
        self,
        load: Callable[[], Config],
        client_for: Callable[[Config], DaemonClient],
        only: Optional[List[str]],
        bare: bool,
    ) -> None:
        import threading

        self._load = load
        self._client_for = client_for
        self.only = list(only) if only else None
        self.bare = bare
        self._lock = threading.Lock()
        self.cfg = load()
        self._fingerprint = self.cfg.fingerprint()
        self.client = client_for(self.cfg)
        self._check_selection()

    def served(self) -> List[str]:
        """The servers bridged now: the config's kept stdio servers (``--servers`` narrows)."""
        cfg = self.cfg
        names = [n for n in cfg.keep_alive_servers() if cfg.servers[n].url is None]
        return [n for n in names if n in self.only] if self.only is not None else names

    def _check_selection(self) -> None:
        """``--servers`` must name kept servers, and ``--bare`` exactly one: a usage error at start."""
        cfg = self.cfg
        for name in self.only or []:
            if name in cfg.looping:
                raise ConfigError(
                    f"server '{name}' ({cfg.looping[name]}) runs this tool's own serve; not bridged"
                )
            spec = cfg.servers.get(name)
            if spec is None:
                known = ", ".join(sorted(cfg.servers)) or "none"
                raise ConfigError(f"unknown server '{name}' in --servers (configured: {known})")
            if not spec.keep_alive or spec.url is not None:
                why = "an HTTP server" if spec.url else f"not kept alive ({spec.keep_alive_reason})"
                raise ConfigError(f"server '{name}' is {why}; serve bridges the daemon's kept servers only")
        if self.bare and len(self.served()) != 1:
            raise UsageError(
                f"--bare needs exactly one server, not {len(self.served())} (name it with --servers NAME)"
            )

    def allows(self, server: str, tool: str) -> bool:
        """The server's ``allowedTools``/``blockedTools`` (the daemon applies them too)."""
        spec = self.cfg.servers.get(server)
        return spec is None or spec.allows_tool(tool)

    def instructions(self) -> str:
        servers = self.served()
        named = ", ".join(servers) if servers else "none yet (no keep-alive server is configured)"
        how = (
            "their own names"
            if self.bare
            else "server__tool names (prompts the same; resource names start with server__)"
        )
        return (
            f"Tools, resources and prompts of the MCP servers that mcporter-daemon keeps running for "
            f"{self.cfg.path}: {named}. They are exported under {how}. The servers and their state "
            "are shared with every other editor and script using the daemon, and outlive this session."
        )

    def reload(self) -> Optional[Tuple[List[str], List[str]]]:
        """Read the config again; if it changed, talk to the daemon of the new one and give the
        servers bridged (before, after). None if unchanged or unreadable (mid-save, say)."""
        try:
            cfg = self._load()
            fingerprint = cfg.fingerprint()
        except DaemonError as exc:  # mid-save, say: keep the config we have
            _serve_log(f"config not read again: {exc}")
            return None
        if fingerprint == self._fingerprint:
            return None
        client = self._client_for(cfg)
        with self._lock:
            before = self.served()
            self.cfg, self._fingerprint, self.client = cfg, fingerprint, client
            after = self.served()
        return before, after


def _config_change_text(before: List[str], after: List[str]) -> str:
    """What a config edit did to the bridged servers, for the log."""
    added = ", ".join(s for s in after if s not in before) or "none"
    removed = ", ".join(s for s in before if s not in after) or "none"
    return f"config changed (servers added: {added}; removed: {removed})"


class _ServeRetries:
    """Servers whose tools could not be listed (they did not start): the reason last logged,
    when to list them again, and the backoff, doubling to ``_SERVE_RETRY_MAX``."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self._failed: Dict[str, List[Any]] = {}  # server -> [reason, next retry (monotonic), backoff]

    def note(self, server: str, error: Optional[BaseException]) -> Optional[List[Any]]:
        """Record a listing's outcome (an error, or none: it worked); the entry it had before."""
        with self._lock:
            failed = self._failed.get(server)
            if error is not None:
                reason = str(error) or type(error).__name__
                backoff = min(failed[2] * 2, _SERVE_RETRY_MAX) if failed else _SERVE_RETRY_FIRST
                self._failed[server] = [reason, time.monotonic() + backoff, backoff]
            else:
                self._failed.pop(server, None)
        return failed

    def due(self) -> List[str]:
        """The servers to list again now; each is next due a backoff later, unless it works."""
        now = time.monotonic()
        with self._lock:
            due = [s for s, (_, at, _) in self._failed.items() if at <= now]
            for server in due:
                self._failed[server][1] = now + self._failed[server][2]
        return due


class ServeBridge:
    """``serve``: one editor's MCP session over stdin/stdout, every request through the daemon.

    ``load()`` reads the config; ``client_for(config)`` makes the DaemonClient that auto-starts
    and verifies the daemon. ``only`` narrows the servers (``--servers``); ``bare`` exports the
    one server's tools under their own names; ``timeout`` is a call's (seconds). The state
    lives in the parts the section's banner names; the bridge dispatches and forwards."""

    def __init__(
        self,
        load: Callable[[], Config],
        client_for: Callable[[Config], DaemonClient],
        only: Optional[List[str]] = None,
        bare: bool = False,
        timeout: float = _DEFAULT_CALL_TIMEOUT,
        out_fd: int = 1,
    ) -> None:
        import threading

        self._threading = threading
        self.timeout = timeout
        self._target = _ServeTarget(load, client_for, only, bare)
        self._editor = _EditorSession(out_fd)
        self._exports = _ServeExports()
        self._inflight = _InflightCalls()
        self._retries = _ServeRetries()
        self._lists = _ServeLists(self._fetch, self._fetched)
        self._watcher = _ServeWatcher(self._target, self._editor, self._lists, self._retries)

    @property
    def cfg(self) -> Config:
        return self._target.cfg

    @property
    def client(self) -> DaemonClient:
        return self._target.client

    @property
    def only(self) -> Optional[List[str]]:
        return self._target.only

    @property
    def bare(self) -> bool:
        return self._target.bare

    def attach_output(self, fd: int) -> None:
        """Write the protocol to ``fd`` (``serve`` keeps stdout's fd for it, away from prints)."""
        self._editor.out_fd = fd

    def served(self) -> List[str]:
        """The servers bridged now: the config's kept stdio servers (``--servers`` narrows)."""
        return self._target.served()

    def instructions(self) -> str:
        return self._target.instructions()

    def lists_changed(self, why: str, lists: Tuple[str, ...] = _SERVE_LIST_NOTIFICATIONS) -> None:
        """Tell the editor to list again (only once it finished its handshake)."""
        self._editor.lists_changed(why, lists)

    # -- the session -------------------------------------------------------------------------------

    def run(self, in_fd: int = 0) -> int:
        """Serve until stdin ends (or SIGTERM); the daemon is left as it is."""
        import signal

        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # quietly; in-flight calls are cancelled
        signal.signal(signal.SIGINT, lambda *_: os._exit(0))
        _serve_log(
            f"serving {len(self.served())} kept server(s) of {self.cfg.path}: {', '.join(self.served())}"
        )
        self._threading.Thread(target=self._watcher.run, name="serve-watch", daemon=True).start()
        for line in _read_lines(in_fd):
            if line.strip():
                self._receive(line)
        self._watcher.stop()
        return 0

    def _receive(self, line: str) -> None:
        try:
            msg = json.loads(line)
        except (ValueError, RecursionError):
            self._editor.send(
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}}
            )
            return
        for one in msg if isinstance(msg, list) else [msg]:
            if not isinstance(one, dict):
                self._editor.send(
                    {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "invalid request"}}
                )
            elif isinstance(one.get("method"), str) and "id" in one:
                self._request(one)
            elif isinstance(one.get("method"), str):
                self._notification(one["method"], one.get("params"))
            # else: an answer to a request of ours; the bridge sends none

    def _notification(self, method: str, params: Any) -> None:
        params = params if isinstance(params, dict) else {}
        if method == "notifications/initialized":
            self._editor.initialized.set()
        elif method == "notifications/cancelled":
            self._inflight.cancel(params.get("requestId"))

    def _request(self, msg: Dict[str, Any]) -> None:
        rid, method = msg["id"], msg["method"]
        raw = msg.get("params")
        params: Dict[str, Any] = raw if isinstance(raw, dict) else {}
        quick = {
            "initialize": self._initialize,
            "ping": lambda p: {},
            "logging/setLevel": self._editor.set_level,
        }
        slow = {
            "tools/list": self._tools_list,
            "tools/call": self._tools_call,
            "resources/list": self._resources_list,
            "resources/templates/list": self._templates_list,
            "resources/read": self._resources_read,
            "prompts/list": self._prompts_list,
            "prompts/get": self._prompts_get,
        }
        if method not in ("initialize", "ping"):
            self._editor.initialized.set()  # a client that skipped notifications/initialized is past it
        if method in quick:
            self._answer(rid, lambda: quick[method](params), None)
        elif method in slow:
            call = self._inflight.start(rid)
            handler = slow[method]
            self._threading.Thread(
                target=self._answer, args=(rid, lambda: handler(params, call), call), daemon=True
            ).start()
        else:
            self._editor.send(
                {
                    "jsonrpc": "2.0",
                    "id": rid,
                    "error": {"code": -32601, "message": f"method not found: {method}"},
                }
            )

    def _answer(self, rid: Any, work: Callable[[], Any], call: Optional[_DaemonCall]) -> None:
        """Run one request and send its one answer; none for a request the editor cancelled."""
        try:
            frame: Dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "result": work()}
        except Exception as exc:
            frame = {"jsonrpc": "2.0", "id": rid, "error": _rpc_error_of(exc)}
        finally:
            if call is not None:
                self._inflight.finish(rid)
        if call is None or not call.cancelled:
            large = _looks_large(frame)
            self._editor.send(frame)
            if large:  # an editor session lasts hours: give a large result's memory back now
                del frame
                _release_freed_memory()

    def _initialize(self, params: Dict[str, Any]) -> Dict[str, Any]:
        asked = str(params.get("protocolVersion") or "")
        version = asked if _MCP_OLDEST_VERSION <= asked <= MCP_PROTOCOL_VERSION else MCP_PROTOCOL_VERSION
        # Warm up meanwhile: the daemon and the servers start while the editor finishes its
        # handshake, so its first tools/list finds them running.
        self._threading.Thread(target=self._gather, args=("tools",), daemon=True).start()
        changed = {"listChanged": True}
        return {
            "protocolVersion": version,
            "capabilities": {"tools": changed, "resources": changed, "prompts": changed, "logging": {}},
            "serverInfo": {"name": _PROG, "version": __version__},
            "instructions": self.instructions(),
        }

    # -- lists -----------------------------------------------------------------------------------------

    def _fetch(self, kind: str, server: str) -> List[Any]:
        """One server's list from the daemon (its cache for tools, every page followed). A
        server that answers the list with an error has none (it lacks resources, say)."""
        mcp_method, key = _SERVE_LISTS[kind]
        method = _wire_method(mcp_method)
        params: Dict[str, Any] = {"server": server, "timeoutMs": int(self.timeout * 1000)}
        if kind == "tools":
            params.update(includeSchema=True, full=True)
        overall = self.timeout + _CLIENT_DEADLINE_GRACE
        try:
            result = self.client.request(method, params, overall_timeout=overall)
        except RemoteError as exc:
            if kind != "tools" and exc.rpc_code is not None:
                return []
            raise
        items = result.get(key) if key and isinstance(result, dict) else result
        return list(items) if isinstance(items, list) else []

    def _fetched(
        self, kind: str, server: str, items: Optional[List[Any]], error: Optional[BaseException], late: bool
    ) -> None:
        """After a fetch: log a server that cannot start (once per reason) and retry it later;
        announce a server that came back, or a list that arrived after the editor's answer."""
        if kind != "tools":
            if late and items is not None:
                self.lists_changed(f"{kind} of '{server}' arrived", (_serve_notification(kind),))
            return
        failed = self._retries.note(server, error)
        if error is not None:
            if not failed or failed[0] != str(error):
                _serve_log(f"server '{server}' cannot be listed: {error}")
                self._editor.log("error", server, f"cannot be listed: {error}")
        elif failed:
            self.lists_changed(f"server '{server}' is back")
        elif late:
            self.lists_changed(f"tools of '{server}' arrived")

    def _gather(self, kind: str) -> Dict[str, List[Any]]:
        return self._lists.gather(kind, self.served(), _SERVE_LIST_WAIT)

    def _tools_list(self, params: Dict[str, Any], call: _DaemonCall) -> Dict[str, Any]:
        tools, names = export_named(self._gather("tools"), self.bare, self._target.allows)
        self._exports.set_names("tools", names)
        return {"tools": tools}

    def _prompts_list(self, params: Dict[str, Any], call: _DaemonCall) -> Dict[str, Any]:
        prompts, names = export_named(self._gather("prompts"), self.bare)
        self._exports.set_names("prompts", names)
        return {"prompts": prompts}

    def _resources_list(self, params: Dict[str, Any], call: _DaemonCall) -> Dict[str, Any]:
        resources, routes = export_resources(self._gather("resources"), self.bare)
        self._exports.set_resource_routes(routes)
        return {"resources": resources}

    def _templates_list(self, params: Dict[str, Any], call: _DaemonCall) -> Dict[str, Any]:
        templates, routes = export_templates(self._gather("templates"), self.bare)
        self._exports.set_template_routes(routes)
        return {"resourceTemplates": templates}

    def _resolve(self, kind: str, name: str) -> Tuple[str, str]:
        """(server, its own name) for an exported tool or prompt name: from the last list, else
        from a new one (a name the editor knew from before); a name of a server that could not
        be listed just now goes to that server, which says what it thinks of it."""
        served = self.served()
        hit = self._exports.named(kind, name)
        if hit is not None and hit[0] in served:
            return hit
        listed = self._gather(kind)
        names = export_named(listed, self.bare, self._target.allows if kind == "tools" else None)[1]
        self._exports.set_names(kind, names)
        hit = names.get(name)
        if hit is not None:
            return hit
        parsed = (served[0], name) if self.bare and served else parse_serve_name(name)
        if parsed is not None and parsed[0] in served:
            spec = self.cfg.servers.get(parsed[0])
            if kind == "tools" and spec is not None and not spec.allows_tool(parsed[1]):
                raise _ServeError(-32602, spec.tool_refusal(parsed[1]))  # not listed, and why
            if parsed[0] not in listed:
                return parsed
        what = "tool" if kind == "tools" else "prompt"
        raise _ServeError(-32602, f"unknown {what} '{name}' (bridged servers: {', '.join(served) or 'none'})")

    # -- calls ---------------------------------------------------------------------------------------

    def _tools_call(self, params: Dict[str, Any], call: _DaemonCall) -> Any:
        name, args = params.get("name"), params.get("arguments")
        if not isinstance(name, str) or not isinstance(args, (dict, type(None))):
            raise _ServeError(-32602, "tools/call needs a string 'name' and an object 'arguments'")
        server, tool = self._resolve("tools", name)
        spec = self.cfg.servers.get(server)
        if spec is not None and not spec.allows_tool(tool):
            raise _ServeError(-32602, spec.tool_refusal(tool))
        wire = {"server": server, "tool": tool, "args": args or {}, "timeoutMs": int(self.timeout * 1000)}
        return self._forward(server, "tools/call", wire, params, call)

    def _prompts_get(self, params: Dict[str, Any], call: _DaemonCall) -> Any:
        name, args = params.get("name"), params.get("arguments")
        if not isinstance(name, str) or not isinstance(args, (dict, type(None))):
            raise _ServeError(-32602, "prompts/get needs a string 'name' and an object 'arguments'")
        server, prompt = self._resolve("prompts", name)
        wire = {"server": server, "name": prompt, "args": args or {}, "timeoutMs": int(self.timeout * 1000)}
        return self._forward(server, "prompts/get", wire, params, call)

    def _resources_read(self, params: Dict[str, Any], call: _DaemonCall) -> Any:
        uri = params.get("uri")
        if not isinstance(uri, str):
            raise _ServeError(-32602, "resources/read needs a string 'uri'")
        served = self.served()
        routes, templates = self._exports.routes()
        if uri not in routes and unwrap_resource_uri(uri) is None and len(served) > 1:
            # Not listed yet by this session: list, so a URI two servers share is not guessed.
            self._resources_list({}, call)
            if not templates:
                self._templates_list({}, call)
            routes, templates = self._exports.routes()
        server, own = route_resource(uri, routes, templates, served)
        wire = {"server": server, "uri": own, "timeoutMs": int(self.timeout * 1000)}
        result = self._forward(server, "resources/read", wire, params, call)
        if own != uri and isinstance(result, dict) and isinstance(result.get("contents"), list):
            for content in result["contents"]:  # the editor asked by the wrapped URI: answer so
                if isinstance(content, dict) and content.get("uri") == own:
                    content["uri"] = uri
        return result

    def _forward(
        self, server: str, mcp_method: str, wire: Dict[str, Any], params: Dict[str, Any], call: _DaemonCall
    ) -> Any:
        """One MCP request of the editor, as the daemon operation that runs it: its progress
        under the editor's token, the server's notices (a declined elicitation) as log
        messages, and the result whole."""
        meta = params.get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        on_progress = self._progress_to(token) if isinstance(token, (str, int)) else None
        notices: List[str] = []
        try:
            return self.client.request(
                _wire_method(mcp_method),
                wire,
                progress_ms=_SERVE_PROGRESS_MS if on_progress else _CLIENT_PROGRESS_MS,
                notices=notices,
                overall_timeout=self.timeout + _CLIENT_DEADLINE_GRACE,
                on_progress=on_progress,
                on_socket=call.on_socket,
            )
        finally:
            for notice in notices:
                self._editor.log("warning", server, str(notice))

    def _progress_to(self, token: Any) -> Callable[[Dict[str, Any]], None]:
        """Server progress to the editor under its own token; each daemon progress frame repeats
        the latest report, so only a new one is sent."""
        last: List[Any] = [None]

        def forward(update: Dict[str, Any]) -> None:
            if update != last[0]:
                last[0] = update
                self._editor.notify("notifications/progress", dict(update, progressToken=token))

        return forward


# -- watching: server events, restarts, config edits, the daemon itself -------------------------


class _ServeWatcher:
    """The watcher thread, until stdin ends: the daemon's server events (list changes, log
    messages) and server pids, long-polled; the config, re-read; servers that could not
    start, listed again. Each change it sees becomes list_changed to the editor."""

    def __init__(
        self, target: _ServeTarget, editor: _EditorSession, lists: _ServeLists, retries: _ServeRetries
    ) -> None:
        import threading

        self._target = target
        self._editor = editor
        self._lists = lists
        self._retries = retries
        self._stopping = threading.Event()

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> None:
        watch = _ServeWatch()
        next_config = time.monotonic() + _SERVE_CONFIG_CHECK
        files, reread = _config_files_state(self._target.cfg), time.monotonic() + _SERVE_CONFIG_REREAD
        while not self._stopping.is_set():
            if time.monotonic() >= next_config:
                next_config = time.monotonic() + _SERVE_CONFIG_CHECK
                # A stat of each file first: reading a 2 MB ~/.claude.json twice a second is not.
                now_files = _config_files_state(self._target.cfg)
                if now_files != files or time.monotonic() >= reread:
                    self._check_config()
                    files = _config_files_state(self._target.cfg)
                    reread = time.monotonic() + _SERVE_CONFIG_REREAD
            self._retry_failed()
            try:
                self._watch_once(watch)
            except Exception as exc:  # the watcher must outlive anything underneath
                _serve_log(f"watching the daemon failed: {type(exc).__name__}: {exc}")
                watch.daemon = None
                self._stopping.wait(_SERVE_DAEMON_POLL)

    def _watch_once(self, watch: _ServeWatch) -> None:
        client = self._target.client
        if watch.daemon is None:
            status = client.verified_status()  # never starts one: a stopped daemon stays stopped
            if status is None or not status.get("fresh"):
                self._stopping.wait(_SERVE_DAEMON_POLL)
                return
            why = watch.found_daemon(int(status["pid"]))
            if why:
                self._editor.lists_changed(why)
        params = {"since": watch.seq, "timeoutMs": int(_SERVE_WATCH_WAIT * 1000)}
        try:
            result = client.request(
                "watchEvents",
                params,
                idle_timeout=_SERVE_WATCH_WAIT + _DEFAULT_IDLE_BUDGET,
                progress_ms=None,
                auto_start=False,  # never starts one: a stopped daemon stays stopped
            )
        except RemoteError as exc:
            if exc.code == "unknown_method":  # a daemon without events: its pids show restarts
                self._stopping.wait(_SERVE_WATCH_WAIT)
                result = {"seq": None, "events": [], "servers": _status_pids(client.verified_status())}
            else:  # stopping: its successor is announced when seen
                watch.lost_daemon(announced=True)
                self._stopping.wait(_SERVE_DAEMON_POLL)
                return
        except DaemonError as exc:
            why = watch.lost_daemon(announced=False)
            _serve_log(f"daemon connection lost: {exc}")
            if why:
                self._editor.lists_changed(why)
            return
        self._on_events(watch, result if isinstance(result, dict) else {})

    def _on_events(self, watch: _ServeWatch, result: Dict[str, Any]) -> None:
        served = self._target.served()
        if result.get("missed") and not watch.replay:
            self._editor.lists_changed("missed some server events")
        for event in result.get("events") or []:
            server = event.get("server") if isinstance(event, dict) else None
            if server not in served:
                continue
            if event.get("type") == "listChanged" and event.get("list") in ("tools", "resources", "prompts"):
                kind = str(event["list"])
                self._editor.lists_changed(
                    f"server '{server}' changed its {kind}", (_serve_notification(kind),)
                )
            elif event.get("type") == "message" and not watch.replay:
                self._editor.log(str(event.get("level") or "info"), str(server), event.get("data"))
            elif event.get("type") == "started":
                restarted = watch.note_pids({server: event.get("pid")}, served)
                if restarted:
                    self._editor.lists_changed(f"server '{server}' restarted")
        seq = result.get("seq")
        watch.seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else None
        watch.replay = False
        restarted = watch.note_pids(result.get("servers"), served)
        if restarted:
            self._editor.lists_changed(f"server(s) restarted: {', '.join(restarted)}")

    def _check_config(self) -> None:
        """A config edit (a server added or removed, any change that replaces the daemon):
        read it again, talk to the daemon of the new config, and tell the editor."""
        change = self._target.reload()
        if change is None:
            return
        before, after = change
        self._lists.forget(after)
        self._editor.lists_changed(_config_change_text(before, after))

    def _retry_failed(self) -> None:
        due = self._retries.due()
        served = self._target.served()
        for server in due:
            if server in served:
                self._lists.start("tools", server)


class _ServeWatch:
    """What the watcher knows of the daemon: its pid, the last event number, each server's pid.

    A daemon that went away unannounced (killed) and a different daemon appearing both mean
    the lists may have changed; so does a server with a new pid (restarted)."""

    def __init__(self) -> None:
        self.daemon: Optional[int] = None
        self.last_daemon: Optional[int] = None
        self.seq: Optional[int] = None
        self.replay = False
        self.pids: Dict[str, int] = {}

    def found_daemon(self, pid: int) -> str:
        # From its first event: a server may have changed its list between the daemon's start
        # and this first look. Its older log messages are not this session's (``replay``).
        self.daemon, self.seq, self.replay = pid, 0, True
        before, self.last_daemon = self.last_daemon, pid
        if before is not None and before != pid:
            self.pids = {}
            return f"daemon replaced (pid {before} -> {pid})"
        return ""

    def lost_daemon(self, announced: bool) -> str:
        pid, self.daemon, self.seq = self.daemon, None, None
        if pid is None or announced:
            return ""
        self.pids = {}
        return f"daemon (pid {pid}) went away"

    def note_pids(self, servers: Any, served: List[str]) -> List[str]:
        """The servers whose process changed since the last look (restarted)."""
        restarted = []
        for name, pid in (servers or {}).items() if isinstance(servers, dict) else []:
            if not isinstance(pid, int) or isinstance(pid, bool):
                continue
            before, self.pids[name] = self.pids.get(name), pid
            if before is not None and before != pid and name in served:
                restarted.append(name)
        return restarted


def _config_files_state(cfg: Config) -> List[Any]:
    """(path, mtime, size, inode) of every file the config is read from or could be: its
    layers and each editor config an import would read (a new one counts)."""
    home = os.path.expanduser("~")
    paths = [path for path, _ in cfg.layers]
    for kind in IMPORT_KINDS:
        paths += import_candidates(kind, cfg.root, home, dict(os.environ), sys.platform)
    state: List[Any] = []
    for path in paths:
        try:
            st = os.stat(path)
            state.append((path, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            state.append((path, None))
    return state


def _status_pids(status: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    servers = (status or {}).get("servers") or []
    return {str(s.get("name")): s.get("pid") for s in servers if isinstance(s, dict)}


def _serve_notification(kind: str) -> str:
    return f"notifications/{'resources' if kind == 'templates' else kind}/list_changed"


def _jsonrpc_pieces(frame: Dict[str, Any]) -> Iterable[bytes]:
    """A large frame as ASCII-safe JSON and a newline, in pieces of ``_SEND_CHUNK``, encoded
    as they are written (it came from JSON, so it encodes)."""
    encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
    for chunk in encoder.iterencode(frame):
        for i in range(0, len(chunk), _SEND_CHUNK):
            yield chunk[i : i + _SEND_CHUNK].encode("ascii")
    yield b"\n"


def _serve_log(text: str) -> None:
    """A diagnostic line: stderr only (stdout carries nothing but protocol)."""
    try:
        print(f"{_PROG} serve: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


# ##########################################################################################
# Demo MCP server: the module run as a tiny stateful MCP stdio server (``_demo-server``).
# ##########################################################################################

_DEMO_TOOLS = [
    {
        "name": "counter",
        "description": "Add one to a counter kept in this server process.",
        "inputSchema": {"type": "object", "properties": {}},
    },
    {
        "name": "pid",
        "description": "Return this server's process id.",
        "inputSchema": {"type": "object", "properties": {}},
    },
    {
        "name": "echo",
        "description": "Return the given text.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    },
    {
        "name": "sleep",
        "description": "Sleep for the given seconds, then answer.",
        "inputSchema": {
            "type": "object",
            "properties": {"seconds": {"type": "number"}},
            "required": ["seconds"],
        },
    },
    {
        "name": "fail",
        "description": "Return a tool error (isError).",
        "inputSchema": {"type": "object", "properties": {}},
    },
    {
        "name": "typed",
        "description": "Return the arguments as JSON, to show how each was typed.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "text": {"type": "string"},
                "count": {"type": "integer"},
                "ratio": {"type": "number"},
                "flag": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "meta": {"type": "object"},
                "mode": {"type": "string", "enum": ["fast", "slow"]},
                "note": {"type": ["string", "null"]},
            },
        },
    },
    {
        "name": "media",
        "description": "Return text, an image and an audio clip.",
        "inputSchema": {"type": "object", "properties": {}},
    },
    {
        "name": "links",
        "description": "Return resource links and embedded resources (text and blob).",
        "inputSchema": {"type": "object", "properties": {}},
    },
    {
        "name": "structured",
        "description": "Return structuredContent and no text.",
        "inputSchema": {"type": "object", "properties": {}},
    },
    {
        "name": "progress",
        "description": "Take steps of delay seconds each, reporting progress when asked for it.",
        "inputSchema": {
            "type": "object",
            "properties": {"steps": {"type": "integer"}, "delay": {"type": "number"}},
        },
    },
]

# The demo server appends each notifications/cancelled it receives (JSON, with its wall-clock
# arrival time) to the file this names: how tests see that a call was cancelled, and when.
_DEMO_CANCEL_LOG_VAR = "MCPORTER_DEMO_CANCEL_LOG"

# A 1x1 PNG (70 bytes) and a 52-byte WAV of silence, for the media tool.
_DEMO_PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="

_DEMO_WAV = "UklGRiwAAABXQVZFZm10IBAAAAABAAEAQB8AAEAfAAABAAgAZGF0YQgAAACAgICAgICAgA=="

_DEMO_CONTENT: Dict[str, Dict[str, Any]] = {
    "media": {
        "content": [
            {"type": "text", "text": "a pixel and a beep:"},
            {"type": "image", "data": _DEMO_PNG, "mimeType": "image/png"},
            {"type": "audio", "data": _DEMO_WAV, "mimeType": "audio/wav"},
        ]
    },
    "links": {
        "content": [
            {"type": "resource_link", "uri": "demo://counter", "name": "counter", "mimeType": "text/plain"},
            {"type": "resource_link", "uri": "demo://unnamed"},
            {
                "type": "resource",
                "resource": {"uri": "demo://note", "mimeType": "text/plain", "text": "a note"},
            },
            {
                "type": "resource",
                "resource": {"uri": "demo://pixel", "mimeType": "image/png", "blob": _DEMO_PNG},
            },
        ]
    },
    "structured": {"content": [], "structuredContent": {"answer": 42, "items": ["a", "b"]}},
}

_DEMO_PROMPTS: List[Dict[str, Any]] = [
    {
        "name": "greet",
        "description": "Ask for a greeting.",
        "arguments": [
            {"name": "name", "description": "Who to greet", "required": True},
            {"name": "style", "description": "formal or casual"},
        ],
    },
    {"name": "counter-report", "description": "Report the counter, quoting its resource."},
]

_DEMO_TEMPLATES: List[Dict[str, Any]] = [
    {
        "uriTemplate": "demo://echo/{text}",
        "name": "echo",
        "description": "Reads back the text in its URI.",
        "mimeType": "text/plain",
    },
    {"uriTemplate": "demo://counter/{format}", "name": "counter-as", "description": "The counter."},
]


def _demo_page(items: List[Dict[str, Any]], key: str, params: Dict[str, Any]) -> Dict[str, Any]:
    """One item per page, so a client must follow ``nextCursor`` to see them all."""
    cursor = params.get("cursor")
    i = int(cursor) if isinstance(cursor, str) and cursor.isdigit() else 0
    page: Dict[str, Any] = {key: items[i : i + 1]}
    if i + 1 < len(items):
        page["nextCursor"] = str(i + 1)
    return page


def _demo_prompt(name: str, args: Dict[str, Any], state: Dict[str, int]) -> Dict[str, Any]:
    """``prompts/get``; a bad name or a missing argument raises ValueError (-32602)."""
    if name == "greet":
        if not args.get("name"):
            raise ValueError("prompt 'greet' needs the argument 'name'")
        style = args.get("style") or "casual"
        text = f"Write a {style} greeting for {args['name']}."
        return {
            "description": "A greeting",
            "messages": [{"role": "user", "content": {"type": "text", "text": text}}],
        }
    if name == "counter-report":
        counter = {"uri": "demo://counter", "mimeType": "text/plain", "text": str(state["count"])}
        return {
            "messages": [
                {"role": "user", "content": {"type": "text", "text": "What is the counter at?"}},
                {"role": "assistant", "content": {"type": "resource", "resource": counter}},
            ]
        }
    raise ValueError(f"unknown prompt: {name}")


def _demo_tool(name: str, args: Dict[str, Any], state: Dict[str, Any]) -> Dict[str, Any]:
    def text(value: Any, error: bool = False) -> Dict[str, Any]:
        return {"content": [{"type": "text", "text": str(value)}], "isError": error}

    if name == "counter":
        with state["lock"]:  # each request runs on its own thread: read what this one added
            state["count"] += 1
            count = state["count"]
        return text(count)
    if name == "pid":
        return text(os.getpid())
    if name == "echo":
        return text(args.get("text", ""))
    if name == "sleep":
        seconds = float(args.get("seconds", 0))
        time.sleep(max(0.0, min(seconds, 3600.0)))
        return text(f"slept {args.get('seconds', 0)}")
    if name == "fail":
        return text("failed on purpose", error=True)
    if name == "typed":
        return text(json.dumps(args, sort_keys=True))
    if name in _DEMO_CONTENT:
        return _DEMO_CONTENT[name]
    return text(f"unknown tool: {name}", error=True)


def _demo_progress(args: Dict[str, Any], token: Any, state: Dict[str, Any]) -> Dict[str, Any]:
    """The ``progress`` tool: progress goes out only for a request that carries a token."""
    steps = max(0, min(int(args.get("steps", 3)), 10000))
    delay = max(0.0, min(float(args.get("delay", 0.2)), 3600.0))
    for i in range(1, steps + 1):
        time.sleep(delay)
        if token is not None:
            update = {
                "progressToken": token,
                "progress": i,
                "total": steps,
                "message": f"step {i} of {steps}",
            }
            state["notify"]({"jsonrpc": "2.0", "method": "notifications/progress", "params": update})
    return {"content": [{"type": "text", "text": f"done {steps} steps"}], "isError": False}


def _demo_record_cancel(msg: Dict[str, Any]) -> None:
    path = os.environ.get(_DEMO_CANCEL_LOG_VAR)
    if path and msg.get("method") == "notifications/cancelled":
        with open(path, "a") as f:
            f.write(json.dumps({"at": time.time(), "params": msg.get("params")}) + "\n")


def _demo_answer(msg: Dict[str, Any], state: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    method, params = msg.get("method"), msg.get("params") or {}
    if method == "initialize":
        asked = str(params.get("protocolVersion", ""))
        version = asked if _MCP_OLDEST_VERSION <= asked <= MCP_PROTOCOL_VERSION else MCP_PROTOCOL_VERSION
        return {
            "protocolVersion": version,
            "capabilities": {"tools": {}, "resources": {}, "prompts": {}},
            "serverInfo": {"name": "mcporter-daemon-demo", "version": __version__},
            "instructions": "A demo server: counter counts calls in this process.",
        }
    if method == "tools/list":
        return {"tools": _DEMO_TOOLS}
    if method == "tools/call" and params.get("name") == "progress":
        meta = params.get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        return _demo_progress(params.get("arguments") or {}, token, state)
    if method == "tools/call":
        return _demo_tool(str(params.get("name")), params.get("arguments") or {}, state)
    if method == "resources/list":
        return {"resources": [{"uri": "demo://counter", "name": "counter", "mimeType": "text/plain"}]}
    if method == "resources/read" and params.get("uri") == "demo://pixel":
        return {"contents": [{"uri": "demo://pixel", "mimeType": "image/png", "blob": _DEMO_PNG}]}
    if method == "resources/read":
        uri = str(params.get("uri"))
        text = uri[len("demo://echo/") :] if uri.startswith("demo://echo/") else str(state["count"])
        return {"contents": [{"uri": params.get("uri"), "mimeType": "text/plain", "text": text}]}
    if method == "resources/templates/list":
        return _demo_page(_DEMO_TEMPLATES, "resourceTemplates", params)
    if method == "prompts/list":
        return _demo_page(_DEMO_PROMPTS, "prompts", params)
    if method == "prompts/get":
        return _demo_prompt(str(params.get("name")), params.get("arguments") or {}, state)
    if method == "ping":
        return {}
    return None


def _demo_server_main() -> int:
    """Serve MCP on stdin/stdout; each tool call on its own thread so ``sleep`` blocks nothing.
    Every other request is answered at once on the reading thread, so a second thread in the
    process is always a tool call (how tests know their call is running)."""
    import threading

    write_lock = threading.Lock()
    out = sys.stdout.buffer

    def send(frame: Dict[str, Any]) -> None:
        with write_lock:
            out.write(json.dumps(frame).encode() + b"\n")
            out.flush()

    state: Dict[str, Any] = {"count": 0, "lock": threading.Lock(), "notify": send}

    def reply(msg: Dict[str, Any]) -> None:
        frame: Dict[str, Any] = {"jsonrpc": "2.0", "id": msg["id"]}
        try:
            result = _demo_answer(msg, state)
        except ValueError as exc:  # bad params: invalid params, as MCP SDKs answer
            frame["error"] = {"code": -32602, "message": str(exc)}
        else:
            if result is None:
                frame["error"] = {"code": -32601, "message": f"method not found: {msg.get('method')}"}
            else:
                frame["result"] = result
        send(frame)

    print(f"demo MCP server ready (pid {os.getpid()})", file=sys.stderr, flush=True)
    for line in sys.stdin.buffer:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if isinstance(msg, dict) and "id" in msg and msg.get("method") == "tools/call":
            threading.Thread(target=reply, args=(msg,), daemon=True).start()
        elif isinstance(msg, dict) and "id" in msg and "method" in msg:
            reply(msg)
        elif isinstance(msg, dict):
            _demo_record_cancel(msg)
    return 0


# ##########################################################################################
# Service-manager files: a launchd plist and a systemd user unit that run the foreground host.
# ##########################################################################################


def _service_argv(cfg: Config, paths: DaemonPaths) -> List[str]:
    argv = [sys.executable, os.path.abspath(__file__)]
    argv += ["--config", cfg.path] if cfg.explicit else ["--root", cfg.root]
    return argv + ["start", "--foreground", "--log-file", paths.log]


def _service_env() -> Dict[str, str]:
    # launchd and systemd start with a bare PATH; servers run through npx or uvx need the user's.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    # The variables that decide the state dir, the config layers and keep-alive selection:
    # without them the service daemon would bind where the CLI never looks.
    for name in (
        "HOME",
        "XDG_STATE_HOME",
        "XDG_CONFIG_HOME",
        "MCPORTER_DAEMON_DIR",
        "MCPORTER_KEEPALIVE",
        "MCPORTER_DISABLE_KEEPALIVE",
    ):
        if os.environ.get(name):
            env[name] = os.environ[name]
    return env


def launchd_plist(cfg: Config, paths: DaemonPaths, label: str) -> str:
    """A LaunchAgent: never respawned after a deliberate exit 0 (another daemon already runs)."""
    import plistlib

    doc = {
        "Label": label,
        "ProgramArguments": _service_argv(cfg, paths),
        "WorkingDirectory": cfg.root,
        "EnvironmentVariables": _service_env(),
        "RunAtLoad": True,
        # KeepAlive=true would respawn an "already running, exit 0" instance every 10 s forever.
        "KeepAlive": {"SuccessfulExit": False, "Crashed": True},
        "ThrottleInterval": 10,
        "StandardOutPath": paths.log + ".launchd",
        "StandardErrorPath": paths.log + ".launchd",
        "ProcessType": "Background",
    }
    return plistlib.dumps(doc).decode()


def _systemd_quote(arg: str, expands_dollar: bool = True) -> str:
    """Quote one word for a unit file: ``%`` specifiers always, ``$`` only where systemd
    expands variables (ExecStart=, not Environment=)."""
    escaped = arg.replace("%", "%%")
    if expands_dollar:
        escaped = escaped.replace("$", "$$")
    if arg and all(c.isalnum() or c in "/._-+=:,@" for c in arg):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_unit(cfg: Config, paths: DaemonPaths) -> str:
    """A user unit: restarted on failure only; exit 0 (already running, idle) stays down."""
    env_lines = "".join(
        f"Environment={_systemd_quote(f'{k}={v}', expands_dollar=False)}\n" for k, v in _service_env().items()
    )
    return (
        "[Unit]\n"
        f"Description=mcporter keep-alive daemon for {cfg.path}\n\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={' '.join(_systemd_quote(a) for a in _service_argv(cfg, paths))}\n"
        f"WorkingDirectory={cfg.root.replace('%', '%%')}\n"  # read literally: no quotes
        f"{env_lines}"
        "Restart=on-failure\n"
        "RestartSec=2\n\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )


# ##########################################################################################
# CLI: argument parsing, the commands, output formatting and main().
# ##########################################################################################


def _script_argv() -> List[str]:
    """An argv running this CLI through an import, so Python's bytecode cache is used.

    A script run by path is compiled on every start (about 30 ms for this file)."""
    here = os.path.abspath(__file__)
    name = os.path.splitext(os.path.basename(here))[0]
    if not name.isidentifier() or not here.endswith(".py"):
        return [sys.executable, here]
    code = f"import sys; sys.path.insert(0, {os.path.dirname(here)!r}); from {name} import main; sys.exit(main(sys.argv[1:]))"
    # -S: the stdlib is all we need, and a site-packages .pth can cost tens of ms and MBs.
    return [sys.executable, "-S", "-c", code]


def _config_flags(cfg: Config) -> List[str]:
    """The flags that make a child discover the same config layers as this process: the
    resolved paths (``~`` expanded, made absolute here), since the child runs in the root."""
    flags = ["--config", cfg.path] if cfg.explicit else []
    return flags + ["--root", cfg.root]


def _child_env(paths: DaemonPaths) -> Dict[str, str]:
    """This environment, with the relative paths the child would resolve from another cwd
    made absolute as this process resolved them (the state dir, the home config dir)."""
    env = dict(os.environ)
    env["MCPORTER_DAEMON_DIR"] = paths.base_dir
    if env.get("XDG_CONFIG_HOME"):
        env["XDG_CONFIG_HOME"] = os.path.abspath(env["XDG_CONFIG_HOME"])
    if _MALLOC_MMAP_VAR not in env:
        # glibc only (others ignore it): a fixed mmap threshold stops glibc from raising it
        # after the first large result, so each large result's memory goes back to the OS when
        # freed. A 50 MiB image then peaks at 2.6x in the daemon and leaves it near idle,
        # against 4.4x and 2.5x idle with the moving threshold. Its servers never see it.
        env[_MALLOC_MMAP_VAR] = _DAEMON_MMAP_THRESHOLD
        env[_MALLOC_SET_BY_US] = "1"
    return env


def _log_flags(args: Any) -> List[str]:
    flags = ["--log"] if getattr(args, "log", False) else []
    if getattr(args, "log_servers", None):
        flags += ["--log-servers", args.log_servers]
    return flags


def _cache_bytecode_for_the_daemon() -> None:
    """Write this file's bytecode cache when it is missing or older than the file. A CLI run as
    a script compiles the file without caching it, and the daemon it launches would then compile
    it again and keep the compiler's garbage for life (27 MiB instead of 15 with two servers).
    Imported (``-m``, the console script), the import itself has written the cache."""
    if __name__ != "__main__" or sys.dont_write_bytecode:
        return
    import importlib.util

    here = os.path.abspath(__file__)
    try:
        cached = importlib.util.cache_from_source(here)
    except (ValueError, NotImplementedError):
        return  # no bytecode cache in this interpreter
    try:
        if os.stat(cached).st_mtime >= os.stat(here).st_mtime:
            return
    except OSError:
        pass
    import py_compile

    try:
        py_compile.compile(here, cfile=cached, doraise=True)
    except (OSError, py_compile.PyCompileError):
        pass  # a read-only install: the daemon compiles, then gives the garbage back


def _client(cfg: Config, args: Any) -> DaemonClient:
    paths = DaemonPaths.for_config(cfg.path)
    _adopt_recorded_script_version(paths)  # before the fingerprint: spares hashing this file
    _cache_bytecode_for_the_daemon()
    log_file = getattr(args, "log_file", None) or os.environ.get("MCPORTER_DAEMON_LOG_PATH") or paths.log
    argv = _script_argv() + _config_flags(cfg) + ["start", "--foreground", "--log-file", log_file]
    return DaemonClient(
        paths, cfg.fingerprint(), argv + _log_flags(args), env=_child_env(paths), cwd=cfg.root
    )


def _adopt_recorded_script_version(paths: DaemonPaths) -> None:
    try:
        if paths.check():  # a record from an unsafe directory could vouch for anything
            _adopt_script_version(read_metadata(paths.metadata))
    except UnsafePathError:
        pass  # said by the client's own verification, where it always was


def _load(args: Any) -> Config:
    return load_config(args.config, args.root)


def _nothing_to_keep_warm(cfg: Config) -> Optional[str]:
    """Why no daemon is needed, or None. Not an error: mcporter exits 0 here too, and a
    service manager must not respawn a daemon that has nothing to do."""
    if cfg.keep_alive_servers():
        return None
    return (
        f"{cfg.path}: no keep-alive servers configured; nothing for a daemon to keep warm "
        '(set "lifecycle": "keep-alive" on a server)'
    )


def _server_spec(cfg: Config, name: str) -> ServerSpec:
    spec = cfg.servers.get(name)
    if spec is None:
        hint = (
            _did_you_mean(name, cfg.servers) or f" (configured: {', '.join(sorted(cfg.servers)) or 'none'})"
        )
        raise ConfigError(f"unknown server '{name}' in {cfg.path}{hint}" + _no_config_hint(cfg))
    if spec.url is not None:
        raise ConfigError(
            f"server '{name}' is an HTTP server ({spec.url}); this tool runs stdio servers only"
        )
    if spec.problem:
        raise ConfigError(spec.problem)
    return spec


def _no_config_hint(cfg: Config) -> str:
    """When no mcporter config was found: the project config is looked up from the current
    directory only, so a call from a subdirectory finds none."""
    if cfg.explicit or any(data is not None for _, data in cfg.layers):
        return ""
    return (
        f"; no config file found ({' or '.join(p for p, _ in cfg.layers)}): the project config is "
        "<root>/config/mcporter.json with --root defaulting to the current directory; "
        "pass --root DIR, or --config PATH (or set MCPORTER_CONFIG)"
    )


def _timeout_seconds(args: Any) -> float:
    """``--timeout``, else (for ``call``) ``MCPORTER_CALL_TIMEOUT`` as mcporter reads it, else
    ``MCPORTER_DAEMON_TIMEOUT_MS``; all in milliseconds."""
    if getattr(args, "timeout", None):
        return float(args.timeout)
    default = _env_seconds("MCPORTER_DAEMON_TIMEOUT_MS", _DEFAULT_CALL_TIMEOUT)
    if getattr(args, "command", None) == "call":
        return _env_seconds("MCPORTER_CALL_TIMEOUT", default)
    return default


def _print_json(value: Any) -> None:
    """Indented JSON, written as it is encoded: no second full copy of a large result."""
    out = sys.stdout
    for chunk in json.JSONEncoder(indent=2, ensure_ascii=False).iterencode(value):
        for i in range(0, len(chunk), _SEND_CHUNK):
            out.write(_printable(chunk[i : i + _SEND_CHUNK]))
    out.write("\n")


def _printable(text: str) -> str:
    """Lone surrogates (servers cut strings mid-pair) have no UTF-8 form: print them escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _print_notices(notices: List[str]) -> None:
    for notice in notices:
        print(f"[mcporter] {notice}", file=sys.stderr)


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def progress_text(update: Dict[str, Any], width: int) -> str:
    """One progress line: "3/5 (60%) message", or "3 message" without a total.

    At most ``width - 1`` characters, as a wrapped line cannot be erased by a carriage return.
    Control characters in a server's message show as spaces: it cannot move the cursor or
    start a new line."""
    progress: Any = update.get("progress")  # a finite number: progress_update checked it
    total: Any = update.get("total")
    text = _number(progress)
    if _finite_number(total):
        text += f"/{_number(total)}"
        if total > 0:
            text += f" ({min(100, max(0, int(progress * 100 / total)))}%)"
    message = str(update.get("message") or "")
    message = "".join(" " if ord(c) < 32 or 0x7F <= ord(c) < 0xA0 else c for c in message).strip()
    if message:
        text += " " + message
    return text[: max(0, width - 1)]


_STARTING_LINE_AFTER = 1.0  # a server starting this long gets "starting 'x' (N s)…"

_STARTING_TICK = 0.25  # how often an ephemeral server's starting line is redrawn


class _ProgressLine:
    """Server progress as one updating line on stderr, erased at the end (carriage return,
    clear to end of line).

    An ephemeral server's progress arrives on the client's reader thread, maybe just as the
    call ends: after ``erase`` nothing is drawn again, so no stale line outlives the call.
    """

    _CLEAR = "\r\x1b[K"

    def __init__(self, enabled: bool, server: str = "") -> None:
        import _thread  # not threading: a warm call through the daemon needs no thread

        self.enabled = enabled
        self.server = server
        self.shown = ""
        self.lock = _thread.allocate_lock()
        self.starting_since: Optional[float] = None

    def show(self, update: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        phase = update.get("phase")
        if phase == "starting":
            now = time.monotonic()
            self.starting_since = self.starting_since or now
            elapsed = now - self.starting_since
            if elapsed < _STARTING_LINE_AFTER:  # a quick start does not flash a line
                return
            text = f"starting '{self.server}' ({int(elapsed)} s)…"[: max(0, _stderr_width() - 1)]
        elif phase == "started":
            self.starting_since, text = None, ""
        else:
            text = progress_text(update, _stderr_width())
        with self.lock:
            if self.enabled and text != self.shown:
                self.shown = text
                sys.stderr.write(self._CLEAR + text)
                sys.stderr.flush()

    def erase(self) -> None:
        with self.lock:
            self.enabled = False
            if self.shown:
                self.shown = ""
                sys.stderr.write(self._CLEAR)
                sys.stderr.flush()


def _stderr_width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns or 80
    except (OSError, ValueError, AttributeError):
        return 80


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (ValueError, AttributeError):
        return False


def _run_ephemeral(
    spec: ServerSpec,
    method: str,
    params: Dict[str, Any],
    line: Optional[_ProgressLine] = None,
) -> Any:
    """Spawn, handshake (within its ``startupTimeoutMs``), run the operation as the daemon
    would, shut down: a server that is not kept alive."""
    op = _OPERATIONS[method]
    args = op.read(params)
    op.check(spec, args)  # what the config forbids never starts the server
    opts = op.options(args, on_progress=line.show if line else None)
    run = op.run
    assert run is not None
    with _ended_by_signals():
        client = McpStdioClient(
            spec.name, spec.command, env=spec.env, cwd=spec.cwd, log=lambda line: None, source=spec.source
        )
        _start_showing(client, spec, line)
        try:
            return op.shown(spec, run(client, args, opts))
        finally:
            client.close()


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so the server's group is ended on the
    way out; ``main`` then exits 128 + the signal number, as a shell reports the death."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _ended_by_signals:
    """While an ephemeral server runs, SIGTERM (``timeout 5 …``) and SIGHUP (a closed terminal)
    raise ``_Terminated`` instead of killing this process with the server left running. An
    ignored signal (``nohup``) stays ignored."""

    def __enter__(self) -> None:
        import signal
        import threading

        self.saved: Dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set handlers (a vendored caller's thread)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) == signal.SIG_DFL:
                self.saved[sig] = signal.signal(sig, _raise_terminated)

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


def _raise_terminated(signum: int, _frame: Any) -> None:
    import signal

    for sig in (signal.SIGTERM, signal.SIGHUP):  # once: a second signal must not cut the cleanup
        if signal.getsignal(sig) is _raise_terminated:
            signal.signal(sig, signal.SIG_IGN)
    raise _Terminated(signum)


def _start_showing(client: McpStdioClient, spec: ServerSpec, line: Optional[_ProgressLine]) -> None:
    """Start an ephemeral server; the progress line counts the seconds while it starts."""
    import threading

    done = threading.Event()

    def tick(shown: _ProgressLine) -> None:
        while True:
            shown.show({"progress": 0, "phase": "starting"})
            if done.wait(_STARTING_TICK):
                return

    if line is not None and line.enabled:
        threading.Thread(target=tick, args=(line,), name="starting-line", daemon=True).start()
    try:
        client.start(timeout=spec.startup_timeout_ms / 1000.0)
    finally:
        done.set()
        if line is not None:
            line.show({"progress": 0, "phase": "started"})


def _via_daemon_or_ephemeral(
    cfg: Config,
    args: Any,
    spec: ServerSpec,
    method: str,
    params: Dict[str, Any],
    line: Optional[_ProgressLine] = None,
) -> Any:
    timeout = _timeout_seconds(args)
    if line is not None:
        line.server = spec.name
    params = dict(params, server=spec.name, timeoutMs=int(timeout * 1000))
    if not spec.keep_alive:
        return _run_ephemeral(spec, method, params, line)
    notices: List[str] = []
    try:
        # The idle budget catches a hung daemon; the overall one a daemon whose progress frames
        # outlive the call (its own timeout fires first, so its error arrives within the grace).
        return _client(cfg, args).request(
            method,
            params,
            idle_timeout=_DEFAULT_IDLE_BUDGET,
            notices=notices,
            overall_timeout=timeout + _CLIENT_DEADLINE_GRACE,
            # A server the daemon has to start first gets its start-up budget before the call's.
            start_budget=spec.startup_timeout_ms / 1000.0,
            on_progress=line.show if line else None,
        )
    finally:
        if line:
            line.erase()  # first: a notice would otherwise be written onto the progress line
        _print_notices(notices)


# -- commands ---------------------------------------------------------------------------------


def cmd_start(args: Any) -> int:
    cfg = _load(args)
    idle = _nothing_to_keep_warm(cfg)
    if idle is not None:
        if args.foreground:
            print(_host_line(idle), file=sys.stderr)
        else:
            print(idle)
        return 0
    if args.foreground:
        return _run_foreground(cfg, args)
    client = _client(cfg, args)
    status, started = client.ensure()
    print(f"{'started' if started else 'already running'} (pid {status['pid']})")
    return 0


def _run_foreground(cfg: Config, args: Any) -> int:
    """The host in this process: what launchd, systemd and the detached launcher run."""
    verbose = bool(args.log or args.log_servers or os.environ.get("MCPORTER_DAEMON_LOG") == "1")
    servers_csv = args.log_servers or os.environ.get("MCPORTER_DAEMON_LOG_SERVERS") or ""
    log_path = args.log_file or os.environ.get("MCPORTER_DAEMON_LOG_PATH") or None
    paths = DaemonPaths.for_config(cfg.path).prepare()
    log = DaemonLog(
        log_path,
        verbose=bool(verbose and not servers_csv),
        servers=[s.strip() for s in servers_csv.split(",") if s.strip()],
    )
    service = McpKeepAliveService(cfg, log)
    idle = cfg.daemon_idle_timeout_ms / 1000.0 if cfg.daemon_idle_timeout_ms else None
    host = DaemonHost(
        paths,
        cfg.fingerprint(),
        service.handlers(),
        idle_timeout=idle,
        status_extra=service.status_extra,
        metadata_extra=service.metadata_extra,
        on_tick=service.tick,
        on_shutdown=service.shutdown,
        log=log,
    )
    return service.attach(host).run()


def cmd_stop(args: Any) -> int:
    try:
        client = _client(_load(args), args)
    except ConfigError:
        # Stopping needs only the config's path: a broken or deleted config must not
        # strand the daemon it started.
        path = _explicit_config_path(args.config) or _naming_path(args.root)
        client = DaemonClient(DaemonPaths.for_config(path), "", [])
    print(client.stop(args.timeout))
    return 0


def _naming_path(root: Optional[str]) -> str:
    try:
        return discover_config(None, root)[0]
    except ConfigError:  # an unreadable layer: the project path names the daemon
        return os.path.join(os.path.abspath(root or os.getcwd()), "config", "mcporter.json")


def cmd_restart(args: Any) -> int:
    cfg = _load(args)
    if args.server:
        return _restart_server(cfg, args)
    print(_client(cfg, args).stop(_STOP_WAIT))  # a daemon left with nothing to do goes too
    args.foreground = False
    return cmd_start(args)


def cmd_status(args: Any) -> int:
    cfg = _load(args)
    client = _client(cfg, args)
    status = client.serving_status()
    if status is None:
        out: Dict[str, Any] = {
            "running": False,
            "configPath": cfg.path,
            "metadataPath": client.paths.metadata,
        }
    else:
        out = {"running": True, "metadataPath": client.paths.metadata}
        for key in (
            "pid",
            "socketPath",
            "configPath",
            "startedAt",
            "protocolVersion",
            "fresh",
            "logPath",
            "servers",
        ):
            out[key] = status.get(key)
    foreign = _foreign_daemon(client) if status is None else None
    if foreign:
        out["foreignDaemon"] = foreign
    if args.json:
        _print_json(out)
        return _STATUS_RUNNING if out["running"] else _STATUS_NOT_RUNNING
    if not out["running"]:
        if foreign:
            print(
                f"not running: a daemon that is not ours ({foreign}) serves this config (config {cfg.path})"
            )
        else:
            print(f"not running (config {cfg.path})")
        return _STATUS_NOT_RUNNING
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(out["startedAt"] / 1000))
    print(
        f"running (pid {out['pid']}), {'fresh' if out['fresh'] else 'stale: config changed'}, since {started}"
    )
    print(f"  config: {out['configPath']}\n  socket: {out['socketPath']}\n  log:    {out['logPath']}")
    for s in out["servers"] or []:
        state = f"connected (pid {s.get('pid')})" if s.get("connected") else "idle"
        print(f"  - {s.get('name')}: {state}{_health_text(s.get('health'))}")
    return _STATUS_RUNNING


# ``status`` exits as LSB init scripts and ``systemctl status`` do, so scripts can ask.
_STATUS_RUNNING = 0
_STATUS_NOT_RUNNING = 3


def _foreign_daemon(client: DaemonClient) -> Optional[str]:
    """Who else answers on our socket for this config (mcporter's own daemon, say), in
    words; None when nothing live does. Only asked once our own daemon did not verify."""
    recorded = RecordedDaemon.read(client.paths.metadata)
    if recorded is not None and recorded.is_ours():
        return None  # ours, but hung or stopping: asking again would only wait once more
    probe = probe_live_daemon(client.paths.socket, client.probe_timeout)
    if probe.kind != _PROBE_LIVE:
        return None
    who = "mcporter's daemon" if "fingerprint" not in probe.status else "another daemon"
    return f"{who}, pid {probe.pid}, protocol {probe.status.get('protocolVersion', '?')}"


def _health_text(health: Any) -> str:
    """``; last ping 12:00:01 ok; restarts 1; last error: …`` (empty for a daemon without health)."""
    if not isinstance(health, dict):
        return ""
    at = health.get("lastPingAt")
    if health.get("pingUnsupported"):
        ping = "ping unsupported"
    elif isinstance(at, (int, float)):
        when = time.strftime("%H:%M:%S", time.localtime(at / 1000))
        ping = f"last ping {when} {'ok' if health.get('lastPingOk') else 'failed'}"
    else:
        ping = "not pinged yet"
    text = f"; {ping}; restarts {health.get('restarts') or 0}"
    error = health.get("lastError")
    return text + (f"; last error: {str(error).splitlines()[0][:200]}" if error else "")


def _kept_server(cfg: Config, name: str) -> ServerSpec:
    """The spec of a server the daemon keeps; any other is a usage error (exit 2)."""
    spec = _server_spec(cfg, name)
    if not spec.keep_alive:
        raise ConfigError(
            f"server '{name}' is not kept alive by the daemon ({spec.keep_alive_reason}); "
            "only keep-alive servers can be closed or restarted"
        )
    return spec


def cmd_close(args: Any) -> int:
    cfg = _load(args)
    spec = _kept_server(cfg, args.server)
    client = _client(cfg, args)
    status = client.verified_status()
    if status is None:  # closing must never start a daemon just to close nothing
        print(f"no daemon running for {cfg.path}; server '{spec.name}' is not running")
        return 0
    client.request("closeServer", {"server": spec.name}, auto_start=False)
    print(f"closed server '{spec.name}' (daemon pid {status.get('pid')}); the next call starts it again")
    return 0


def _restart_server(cfg: Config, args: Any) -> int:
    spec = _kept_server(cfg, args.server)
    result = _client(cfg, args).request("restartServer", {"server": spec.name}) or {}
    if result.get("wasRunning"):
        print(f"restarted server '{spec.name}' (pid {result.get('pid')})")
    else:
        print(f"started server '{spec.name}' (pid {result.get('pid')}); it was not running")
    return 0


def _pair_value(key: str, value: str) -> str:
    """``@path`` is the file's text; ``@@...`` escapes a value that starts with ``@``."""
    if value.startswith("@@"):
        return value[1:]
    if not value.startswith("@"):
        return value
    path = os.path.expanduser(value[1:])
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise UsageError(f"argument '{key}': cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"argument '{key}': {path} is not UTF-8 text") from None


def _args_json(args_json: Optional[str]) -> Dict[str, Any]:
    """``--args`` as given (typed as written); ``--args -`` reads the object from stdin."""
    if not args_json:
        return {}
    text = sys.stdin.read() if args_json == "-" else args_json
    where = "stdin (--args -)" if args_json == "-" else "--args"
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise UsageError(f"{where} must be a JSON object")
    return parsed


class _CallForms:
    """A call's arguments as the command line wrote them, before the tool's schema names and
    types them: ``key=value`` pairs, ``--flag value`` flags, and positional values."""

    __slots__ = ("pairs", "flags", "positional")

    def __init__(self) -> None:
        self.pairs: Dict[str, str] = {}
        self.flags: Dict[str, str] = {}
        self.positional: List[str] = []

    def as_tuple(self) -> Tuple[Dict[str, str], Dict[str, str], List[str]]:
        return self.pairs, self.flags, self.positional


def _is_key(text: str) -> bool:
    return bool(text) and not text[0].isdigit() and all(c.isalnum() or c in "_-." for c in text)


def _split_pair(word: str) -> Optional[Tuple[str, str]]:
    """``key=value``, ``key:value`` or ``key: value`` as (key, value); None for a positional
    value. The first of ``=`` and ``:`` separates; a URL (``http://…``) stays a value."""
    cut = min((i for i in (word.find("="), word.find(":")) if i > 0), default=-1)
    if cut < 0 or not _is_key(word[:cut]):
        return None
    value = word[cut + 1 :]
    if word[cut] == ":":
        if value.startswith("//"):
            return None
        value = value.lstrip(" ")
    return word[:cut], value


def _literal_end(text: str, i: int) -> int:
    """Where the argument starting at ``text[i]`` ends: the next top-level comma (or the end),
    past quoted strings and bracketed JSON."""
    depth, quote = 0, ""
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "[{(":
            depth += 1
        elif c in "]})":
            depth -= 1
        elif c == "," and depth == 0:
            return i
        i += 1
    if quote or depth:
        raise UsageError(f"unbalanced {'quote' if quote else 'brackets'} in the call's arguments: {text!r}")
    return i


def _unquote(text: str) -> str:
    """A quoted literal's text (JSON escapes in double quotes; ``\\'`` in single quotes);
    anything else as written."""
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return str(json.loads(text))
        except ValueError:
            raise UsageError(f"bad string literal {text}") from None
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("\\'", "'").replace("\\\\", "\\")
    return text


def _parse_call_expression(text: str, forms: _CallForms) -> str:
    """``server.tool(a: 1, b: "x", 3)``: the target, with its arguments added to ``forms``
    (``name: value`` or ``name=value`` pairs, else positional values; quotes only group)."""
    target, _, rest = text.partition("(")
    body = rest.rstrip()
    if not body.endswith(")"):
        raise UsageError(f"'{text}': the function-call form needs a closing ')'")
    body = body[:-1]
    i = 0
    while i < len(body):
        end = _literal_end(body, i)
        item = body[i:end].strip()
        i = end + 1
        if not item:
            if end < len(body):
                raise UsageError(f"'{text}': an empty argument between commas")
            continue
        pair = None if item[0] in "\"'[{" else _split_pair(item)
        if pair is None:
            forms.positional.append(_unquote(item))
        else:
            forms.pairs[pair[0]] = _unquote(pair[1].strip())
    return target.strip()


# call's own options: flag -> (attribute, takes a value, metavar, help). Any other ``--flag``
# names a tool parameter. One table for the parser and for ``call --help``.
_CALL_OPTIONS: Dict[str, Tuple[str, bool, Optional[str], str]] = {
    "--args": ("args", True, "JSON", "arguments as a JSON object ('-' reads it from stdin)"),
    "--timeout": (
        "timeout",
        True,
        "DURATION",
        "500ms, 30s, 2m; a bare number is ms (default 60s, or MCPORTER_CALL_TIMEOUT ms)",
    ),
    "--stall-timeout": (
        "stall_timeout",
        True,
        "DURATION",
        "fail when the server sends nothing (no answer, no progress) for this long; "
        "progress restarts it, never past --timeout",
    ),
    "--output": ("output", True, "FORMAT", "text (default), markdown, json (the structured value), raw"),
    "--json": ("json", False, None, "print the whole result as JSON (= --output raw)"),
    "--save-images": ("save_images", True, "DIR", "write image and audio blocks to files in DIR"),
    "--progress": ("progress", False, None, "show server progress on stderr also when it is not a TTY"),
}
_OUTPUT_FORMATS = ("text", "markdown", "json", "raw")


class _Namespace:
    """The parsed command line (argparse's Namespace, without importing argparse)."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


def parse_call_line(words: List[str]) -> Any:
    """``call``'s command line, options and arguments in any order: the options as attributes,
    ``target`` (SERVER.TOOL as written) and ``forms`` (a _CallForms). ``--`` ends the options."""
    ns: Any = _Namespace(
        **{dest: (False if not takes else None) for dest, takes, _, _ in _CALL_OPTIONS.values()}
    )
    forms = _CallForms()
    target: Optional[str] = None
    i, options = 0, True
    while i < len(words):
        word = words[i]
        i += 1
        if options and word == "--":
            options = False
            continue
        if options and word.startswith("--") and len(word) > 2:
            flag, eq, inline = word.partition("=")
            option = _CALL_OPTIONS.get(flag)
            if option is not None and not option[1]:
                if eq:
                    raise UsageError(f"{flag} takes no value")
                setattr(ns, option[0], True)
                continue
            if not eq:
                if i >= len(words):
                    raise UsageError(f"{flag} needs a value")
                inline, i = words[i], i + 1
            if option is not None:
                setattr(ns, option[0], inline)
            else:
                forms.flags[flag[2:]] = inline
            continue
        if target is None:
            target = word
            if "(" in word and not word.rstrip().endswith(")"):
                while i < len(words) and not target.rstrip().endswith(")"):  # split by the shell
                    target, i = target + " " + words[i], i + 1
            if "(" in target:
                target = _parse_call_expression(target, forms)
            continue
        pair = _split_pair(word)
        if pair is not None and pair[1] == "" and word.endswith(":") and i < len(words):
            pair, i = (pair[0], words[i]), i + 1  # key: value, as two words
        if pair is None:
            forms.positional.append(word)
        else:
            forms.pairs[pair[0]] = _pair_value(pair[0], pair[1])
    if target is None:
        raise UsageError("call needs SERVER.TOOL")
    ns.target, ns.forms = target, forms
    ns.timeout = parse_duration(ns.timeout, "--timeout") if ns.timeout is not None else None
    if ns.stall_timeout is not None:
        ns.stall_timeout = parse_duration(ns.stall_timeout, "--stall-timeout")
    if ns.output is not None and ns.output not in _OUTPUT_FORMATS:
        raise UsageError(f"--output {ns.output}: choose one of {', '.join(_OUTPUT_FORMATS)}")
    ns.json = ns.json or ns.output in ("json", "raw")  # an error then prints as JSON too
    return ns


# Longest first: "ms" must not read as "m" followed by junk.
_DURATION_UNITS = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0))
_AMBIGUOUS_BELOW_MS = 100  # a bare 5 was seconds before mcporter's milliseconds


def parse_duration(text: str, flag: str = "--timeout") -> float:
    """Seconds, from mcporter's spelling: ``500ms``, ``30s``, ``2m`` (and ``1h``); a bare
    number is milliseconds. A bare number below 100 is refused as ambiguous, with the fix."""
    word = text.strip().lower()
    scale = None
    for unit, factor in _DURATION_UNITS:
        if word.endswith(unit):
            word, scale = word[: -len(unit)].strip(), factor
            break
    try:
        value = float(word)
    except ValueError:
        value = -1.0
    if not (0 <= value < float("inf")) or not word[:1].isdigit() and not word.startswith("."):
        raise UsageError(f"{flag} {text}: not a duration (write 500ms, 30s or 2m)")
    if scale is None:
        if 0 < value < _AMBIGUOUS_BELOW_MS:
            raise UsageError(f"{flag} {text}: write {text.strip()}s or {_number(value * 1000)}")
        scale = 0.001
    return value * scale


def resolve_target(target: str, servers: Iterable[str]) -> Tuple[str, str]:
    """(server, tool) of ``SERVER.TOOL``: the configured name followed by a dot (server names
    may hold dots). Two configured names that both fit are ambiguous: a UsageError naming
    both readings. No configured name fits: the text before the first dot."""
    fits = sorted((n for n in servers if target.startswith(n + ".") and len(target) > len(n) + 1), key=len)
    if len(fits) > 1:
        readings = ", or ".join(f"server '{n}' tool '{target[len(n) + 1 :]}'" for n in reversed(fits))
        raise UsageError(f"'{target}' is ambiguous: {readings}; rename one server in the config")
    if fits:
        return fits[0], target[len(fits[0]) + 1 :]
    server, dot, tool = target.partition(".")
    if not dot or not server or not tool:
        raise UsageError(f"'{target}' is not SERVER.TOOL")
    return server, tool


# Extensions mimetypes lacks on some Pythons (audio/wav before 3.12?) or spells oddly (.jpe).
_MEDIA_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/gif": ".gif",
    "image/webp": ".webp",
    "image/svg+xml": ".svg",
    "audio/wav": ".wav",
    "audio/x-wav": ".wav",
    "audio/mpeg": ".mp3",
    "audio/ogg": ".ogg",
}


def _base64_size(data: Any) -> int:
    """Decoded size of base64 text, without decoding it (an image can be megabytes)."""
    if not isinstance(data, str):
        return 0
    n = len(data) - sum(data.count(ws) for ws in ("\n", "\r", " "))
    pad = 2 if data.rstrip().endswith("==") else 1 if data.rstrip().endswith("=") else 0
    return max(0, n * 3 // 4 - pad)


def _blob_line(kind: str, mime: Any, data: Any, uri: Any = None) -> str:
    words = " ".join(str(w) for w in (kind, uri, mime) if w)
    return f"[{words}, {_base64_size(data)} bytes]"


def _resource_text(res: Any) -> str:
    """An embedded or read resource: its text, or a line naming a blob with its URI and size."""
    res = res if isinstance(res, dict) else {}
    if isinstance(res.get("text"), str):
        return res["text"]
    if "blob" in res:
        return _blob_line("blob", res.get("mimeType"), res.get("blob"), res.get("uri"))
    return f"[resource {res.get('uri')}]"


def _block_text(item: Dict[str, Any]) -> str:
    kind = item.get("type")
    if kind == "text":
        return str(item.get("text", ""))
    if kind in ("image", "audio"):
        return _blob_line(str(kind), item.get("mimeType"), item.get("data"))
    if kind == "resource_link":
        name = item.get("name")
        return f"{item.get('uri')} ({name})" if name else str(item.get("uri"))
    if kind == "resource":
        return _resource_text(item.get("resource"))
    return f"[{kind} {item.get('mimeType') or item.get('uri') or ''}]".replace(" ]", "]")


def content_lines(result: Dict[str, Any], saved: Optional[Dict[int, str]] = None) -> List[str]:
    """What ``call`` prints for a result: one entry per content block (a saved one as the path
    it went to), then ``structuredContent`` as JSON when no block was text.

    A server that breaks the shape still shows what it sent, never nothing: a bare block or
    value as ``content`` is one block, an entry that is no block is shown as text or JSON, and
    a result without ``content`` (or ``structuredContent``) is shown whole."""
    saved = saved or {}
    blocks = result.get("content")
    out: List[str] = []
    has_text = False
    for i, item in enumerate(blocks if isinstance(blocks, list) else [] if blocks is None else [blocks]):
        if isinstance(item, dict) and "type" in item:
            has_text = has_text or item.get("type") == "text"
            out.append(saved[i] if i in saved else _block_text(item))
        elif item is not None:
            out.append(item if isinstance(item, str) else json.dumps(item, indent=2, ensure_ascii=False))
    if not has_text and result.get("structuredContent") is not None:
        out.append(json.dumps(result["structuredContent"], indent=2, ensure_ascii=False))
    elif blocks is None and not out:
        out.append(json.dumps(result, indent=2, ensure_ascii=False))
    return out


def _media_extension(mime: Any) -> str:
    mime = str(mime or "").split(";")[0].strip().lower()
    if mime in _MEDIA_EXTENSIONS:
        return _MEDIA_EXTENSIONS[mime]
    import mimetypes

    return mimetypes.guess_extension(mime) or ".bin"


def _safe_stem(name: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).lstrip(".")
    return stem or "result"


def _write_new_file(directory: str, stem: str, ext: str, data: bytes) -> str:
    """Write ``data`` to a file that did not exist: stem+ext, else stem-2+ext, stem-3+ext, ..."""
    for n in range(1, 10000):
        path = os.path.join(directory, f"{stem}{ext}" if n == 1 else f"{stem}-{n}{ext}")
        try:
            with open(path, "xb") as fh:  # exclusive: never overwrite, even racing another call
                fh.write(data)
            return path
        except FileExistsError:
            continue
    raise DaemonError(f"no free file name for {stem}{ext} in {directory}")


def save_media(result: Dict[str, Any], directory: str, tool: str) -> Dict[int, str]:
    """Write each image and audio block to a new file in ``directory``; {block index: path}."""
    import base64
    import binascii

    blocks = result.get("content")
    media = [
        (i, item)
        for i, item in enumerate(blocks if isinstance(blocks, list) else [])
        if isinstance(item, dict)
        and item.get("type") in ("image", "audio")
        and isinstance(item.get("data"), str)
    ]
    if not media:
        return {}
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise DaemonError(f"--save-images: cannot create {directory}: {exc.strerror or exc}") from None
    saved = {}
    for i, item in media:
        try:
            data = base64.b64decode(item["data"])
        except (binascii.Error, ValueError):
            continue  # not base64: it stays named by its type and size
        try:
            saved[i] = _write_new_file(
                directory, f"{_safe_stem(tool)}-{i}", _media_extension(item.get("mimeType")), data
            )
        except OSError as exc:
            raise DaemonError(f"--save-images: cannot write in {directory}: {exc.strerror or exc}") from None
    return saved


def resource_bytes(result: Dict[str, Any]) -> bytes:
    """A read resource's contents as bytes: text as UTF-8, a blob decoded."""
    import base64

    out = bytearray()
    contents = result.get("contents")
    for item in contents if isinstance(contents, list) else []:
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("text"), str):
            out += item["text"].encode("utf-8", "replace")
        elif isinstance(item.get("blob"), str):
            out += base64.b64decode(item["blob"])
    return bytes(out)


def json_view(result: Dict[str, Any]) -> Any:
    """``--output json``, as mcporter: ``structuredContent``, else the text content parsed as
    JSON (one value, or a list when each of several blocks parses), else the whole result."""
    if result.get("structuredContent") is not None:
        return result["structuredContent"]
    blocks = result.get("content")
    texts = [
        b["text"]
        for b in (blocks if isinstance(blocks, list) else [])
        if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
    ]
    parsed = []
    for text in texts:
        try:
            parsed.append(json.loads(text))
        except ValueError:
            return result
    if len(parsed) == 1:
        return parsed[0]
    return parsed if parsed else result


def _markdown_lines(result: Dict[str, Any], saved: Optional[Dict[int, str]] = None) -> List[str]:
    """``--output markdown``: each block for reading, as Markdown (media as images or links,
    embedded resources and structured content fenced)."""
    saved = saved or {}
    blocks = result.get("content")
    if not isinstance(blocks, list):
        return content_lines(result, saved)  # a broken shape: what the server sent, never nothing
    out: List[str] = []
    has_text = False
    for i, item in enumerate(blocks):
        if not isinstance(item, dict) or "type" not in item:
            out.extend(content_lines({"content": [item]}))
            continue
        kind = item.get("type")
        has_text = has_text or kind == "text"
        if kind in ("image", "audio") and i in saved:
            out.append(f"![{kind}]({saved[i]})" if kind == "image" else f"[{kind}]({saved[i]})")
        elif kind == "resource_link":
            out.append(f"[{item.get('name') or item.get('uri')}]({item.get('uri')})")
        elif kind == "resource" and isinstance((item.get("resource") or {}).get("text"), str):
            res = item["resource"]
            out.append(f"**{res.get('uri')}**\n```\n{res['text'].rstrip()}\n```")
        elif kind == "text":
            out.append(str(item.get("text", "")))
        else:
            out.append(f"*{_block_text(item)}*")
    if not has_text and result.get("structuredContent") is not None:
        out.append(
            "```json\n" + json.dumps(result["structuredContent"], indent=2, ensure_ascii=False) + "\n```"
        )
    return out


def _print_result(result: Dict[str, Any], output: str, saved: Dict[int, str]) -> None:
    if output in ("raw", "json"):
        _print_json(result if output == "raw" else json_view(result))
        for path in saved.values():
            print(f"[mcporter] saved {path}", file=sys.stderr)
        return
    lines = _markdown_lines(result, saved) if output == "markdown" else content_lines(result, saved)
    if lines:
        print(_printable(("\n\n" if output == "markdown" else "\n").join(lines)))


def cmd_call(args: Any) -> int:
    forms: _CallForms = args.forms
    typed = _args_json(args.args)
    cfg = _load(args)
    server, tool = resolve_target(args.target, cfg.servers)
    spec = _server_spec(cfg, server)
    if not spec.allows_tool(tool):
        raise ConfigError(spec.tool_refusal(tool))
    stall = args.stall_timeout if args.stall_timeout and args.stall_timeout > 0 else None
    raw, flags, positional = forms.as_tuple()
    # The daemon names and types the forms itself with its cached tool list: one request.
    params: Dict[str, Any] = {"tool": tool, "args": typed}
    if raw:
        params["rawArgs"] = raw
    if flags:
        params["rawFlags"] = flags
    if positional:
        params["rawPositional"] = positional
    if spec.env_refs:  # so the daemon can say when it runs the server with other values
        params["envHashes"] = {var: env_hash(value) for var, value in spec.env_refs.items()}
    if stall:
        params["stallTimeoutMs"] = int(stall * 1000)
    line = _ProgressLine(args.progress or _stderr_is_tty())
    try:
        result = _via_daemon_or_ephemeral(cfg, args, spec, "callTool", params, line) or {}
    finally:
        line.erase()  # before any result or error line, which would otherwise overwrite it
    saved = save_media(result, args.save_images, tool) if args.save_images else {}
    _print_result(result, args.output or ("raw" if args.json else "text"), saved)
    return 1 if result.get("isError") else 0


def schema_type_text(prop: Any) -> str:
    """A JSON Schema property's type as people read it: ``string[]``, ``"a" | "b"``,
    ``number`` (integers too, as mcporter writes them), ``string | null``, else ``unknown``."""
    if not isinstance(prop, dict):
        return "unknown"
    if isinstance(prop.get("enum"), list) and prop["enum"]:
        return " | ".join(json.dumps(v, ensure_ascii=False) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"], ensure_ascii=False)
    kind = prop.get("type")
    if isinstance(kind, list) and kind:
        return _union_text([dict(prop, type=k) for k in kind])
    for key in ("anyOf", "oneOf"):
        if isinstance(prop.get(key), list) and prop[key]:
            return _union_text(prop[key])
    if kind in ("integer", "number"):
        return "number"
    if kind in ("string", "boolean", "null"):
        return str(kind)
    if kind == "array":
        item = schema_type_text(prop.get("items")) if "items" in prop else "unknown"
        return f"({item})[]" if " | " in item else f"{item}[]"
    if kind == "object" or (kind is None and isinstance(prop.get("properties"), dict)):
        return "object"
    return "unknown"


def _union_text(members: List[Any]) -> str:
    return " | ".join(dict.fromkeys(schema_type_text(m) for m in members))


def _describe_params(schema: Any) -> str:
    """``name: type`` for each required parameter, ``name?: type`` for each optional one."""
    props = (schema or {}).get("properties") or {} if isinstance(schema, dict) else {}
    required = (schema or {}).get("required") or [] if isinstance(schema, dict) else []
    required = set(r for r in required if isinstance(r, str)) if isinstance(required, list) else set()
    if not isinstance(props, dict):
        return ""
    return ", ".join(
        f"{name}{'' if name in required else '?'}: {schema_type_text(prop)}" for name, prop in props.items()
    )


_INSTRUCTIONS_CHARS = 500  # list shows a server's instructions on one line, clipped like mcporter


def _instructions_line(text: str) -> str:
    flat = " ".join(str(text).split())
    if len(flat) > _INSTRUCTIONS_CHARS:
        flat = flat[: _INSTRUCTIONS_CHARS - 1] + "…"
    return f"Instructions: {flat}" if flat else ""


def _source_record(spec: ServerSpec) -> Dict[str, Any]:
    """mcporter's ``source``: where a server is defined (a config layer, or an imported file)."""
    return {
        "kind": "local" if spec.source.endswith(("mcporter.json", "mcporter.jsonc")) else "import",
        "path": spec.source,
    }


def _transport(spec: ServerSpec) -> str:
    import shlex

    return f"HTTP {spec.url}" if spec.url else f"STDIO {shlex.join(spec.command)}"


def _server_tools(cfg: Config, args: Any, spec: ServerSpec) -> Tuple[List[Dict[str, Any]], str]:
    """(the tools its filters let through, its instructions), via the daemon or ephemerally."""
    got = _via_daemon_or_ephemeral(
        cfg, args, spec, "listTools", {"includeSchema": True, "includeServerInfo": True}
    )
    if isinstance(got, list):  # a daemon of an older version: tools only
        got = {"tools": got}
    got = got if isinstance(got, dict) else {}
    tools = [
        t for t in got.get("tools") or [] if isinstance(t, dict) and spec.allows_tool(str(t.get("name")))
    ]
    return tools, str(got.get("instructions") or "")


def cmd_list(args: Any) -> int:
    import shlex

    cfg = _load(args)
    if not args.server and getattr(args, "status", False):
        return _list_status(cfg, args, list(cfg.servers.values()))
    if not args.server:
        rows: List[Dict[str, Any]] = [
            {
                "name": n,
                "keepAlive": s.keep_alive,
                "why": s.keep_alive_reason,
                "command": s.command,
                "url": s.url,
                "source": s.source,
            }
            for n, s in cfg.servers.items()
        ]
        if args.json:
            _print_json(rows)
        for r in [] if args.json else rows:
            mode = "http (unsupported)" if r["url"] else ("keep-alive" if r["keepAlive"] else "ephemeral")
            command = shlex.join(r["command"]).replace("\n", "\\n")  # one line per server
            print(f"{r['name']}: {mode} ({r['why']}) — {command or r['url']}  [{r['source']}]")
        return 0
    if getattr(args, "status", False):
        if args.server not in cfg.servers:
            _server_spec(cfg, args.server)  # the unknown-server error
        return _list_status(cfg, args, [cfg.servers[args.server]])
    spec = _server_spec(cfg, args.server)
    began = time.monotonic()
    tools, instructions = _server_tools(cfg, args, spec)
    if args.json:
        _print_json(
            {
                "mode": "server",
                "name": spec.name,
                "status": "ok",
                "durationMs": int((time.monotonic() - began) * 1000),
                **({"instructions": instructions} if instructions else {}),
                "transport": _transport(spec),
                "source": _source_record(spec),
                "tools": [
                    {k: t[k] for k in ("name", "description", "inputSchema", "outputSchema") if k in t}
                    for t in tools
                ],
            }
        )
        return 0
    if instructions:
        print(_instructions_line(instructions))
    for t in tools:
        desc = (t.get("description") or "").strip().splitlines()
        print(
            f"{spec.name}.{t.get('name')}({_describe_params(t.get('inputSchema'))})"
            + (f" — {desc[0]}" if desc else "")
        )
        if args.schema:
            print("    " + json.dumps(t.get("inputSchema") or {}, indent=2).replace("\n", "\n    "))
    return 0


_LIST_STATUS_WORKERS = 4  # servers list --status spawns at once (kept ones go through the daemon)


def _probe_server(cfg: Config, args: Any, spec: ServerSpec) -> Dict[str, Any]:
    """One server's row for ``list --status``: mcporter's entry (name, status, durationMs,
    transport, source, tools or error)."""
    began = time.monotonic()
    row: Dict[str, Any] = {"name": spec.name}
    try:
        if spec.url:
            row.update(status="unsupported", error="HTTP server: this tool runs stdio servers only")
        else:
            tools, _ = _server_tools(cfg, args, _server_spec(cfg, spec.name))
            row.update(status="ok", tools=[{k: t.get(k) for k in ("name", "description")} for t in tools])
    except DaemonError as exc:
        down = exc.exit_code != 2  # a configuration or usage error is no server being down
        row.update(
            status="offline" if down else "error",
            error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
        )
    row["durationMs"] = int((time.monotonic() - began) * 1000)
    row.update(transport=_transport(spec), source=_source_record(spec), keepAlive=spec.keep_alive)
    return row


def list_status_exit(rows: List[Dict[str, Any]], exit_code: bool) -> int:
    """``--exit-code``: 1 when a server that can run here is down (an HTTP entry, which this
    tool does not run, is no failure of the server)."""
    return 1 if exit_code and any(r.get("status") not in ("ok", "unsupported") for r in rows) else 0


def _list_status(cfg: Config, args: Any, specs: List[ServerSpec]) -> int:
    """Probe every server: kept ones through the daemon, the others spawned, a few at a time."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=_LIST_STATUS_WORKERS) as pool:
        rows = list(pool.map(lambda s: _probe_server(cfg, args, s), specs))
    counts: Dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    if args.json:
        _print_json({"mode": "list", "counts": counts, "servers": rows})
    else:
        for r in rows:
            if r["status"] == "ok":
                n = len(r["tools"])
                what = f"{n} tool{'' if n == 1 else 's'}"
            else:
                what = f"{r['status']}: {r['error']}"
            mode = "keep-alive" if r["keepAlive"] else "ephemeral"
            print(f"- {r['name']} ({what}, {r['durationMs'] / 1000:.1f}s) {mode}  [{r['source']['path']}]")
        summary = "; ".join(f"{n} {k if k != 'ok' else 'healthy'}" for k, n in sorted(counts.items()))
        print(f"Listed {len(rows)} server{'' if len(rows) == 1 else 's'} ({summary or 'none'}).")
    return list_status_exit(rows, getattr(args, "exit_code", False))


def cmd_resources(args: Any) -> int:
    cfg = _load(args)
    spec = _server_spec(cfg, args.server)
    if args.output and not args.uri:
        raise UsageError("resources -o FILE needs the URI of the resource to write")
    if args.templates:
        if args.uri:
            raise UsageError("resources --templates lists templates; it takes no URI")
        return _list_templates(cfg, args, spec)
    if args.uri:
        result = _via_daemon_or_ephemeral(cfg, args, spec, "readResource", {"uri": args.uri})
        if args.output:
            _write_output(args.output, resource_bytes(result or {}))
        elif args.json:
            _print_json(result)
        else:
            for item in (result or {}).get("contents") or []:
                print(_resource_text(item))
        return 0
    result = _via_daemon_or_ephemeral(cfg, args, spec, "listResources", {})
    resources = (result or {}).get("resources") or []
    if args.json:
        _print_json(resources)
        return 0
    for r in resources:
        print(f"{r.get('uri')}  {r.get('name') or ''}" + (f" ({r['mimeType']})" if r.get("mimeType") else ""))
    return 0


def _write_output(path: str, data: bytes) -> None:
    """``-o FILE``: the bytes as they are (``-`` is stdout); a line on stderr says where they went."""
    if path == "-":
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        with open(path, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise DaemonError(f"cannot write {path}: {exc.strerror or exc}") from None
    print(f"wrote {len(data)} bytes to {path}")


def _list_templates(cfg: Config, args: Any, spec: ServerSpec) -> int:
    result = _via_daemon_or_ephemeral(cfg, args, spec, "listResourceTemplates", {})
    templates = [t for t in (result or {}).get("resourceTemplates") or [] if isinstance(t, dict)]
    if args.json:
        _print_json(templates)
        return 0
    for t in templates:
        desc = str(t.get("description") or "").strip().splitlines()
        print(
            f"{t.get('uriTemplate')}  {t.get('name') or ''}"
            + (f" ({t['mimeType']})" if t.get("mimeType") else "")
            + (f" — {desc[0]}" if desc else "")
        )
    return 0


def _parse_prompt_args(pairs: List[str]) -> Dict[str, str]:
    """``key=value`` pairs, values kept as written: MCP prompt arguments are strings."""
    out: Dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"argument '{pair}' is not key=value")
        out[key] = value
    return out


def _prompt_lines(prompt: Dict[str, Any]) -> List[str]:
    """``name(arg, optional?) — description`` and one line per argument."""
    arguments = [a for a in prompt.get("arguments") or [] if isinstance(a, dict)]
    sig = ", ".join(f"{a.get('name')}{'' if a.get('required') else '?'}" for a in arguments)
    desc = str(prompt.get("description") or "").strip().splitlines()
    lines = [f"{prompt.get('name')}({sig})" + (f" — {desc[0]}" if desc else "")]
    for a in arguments:
        about = str(a.get("description") or "").strip().splitlines()
        marker = " (required)" if a.get("required") else ""
        lines.append(f"    {a.get('name')}{marker}" + (f": {about[0]}" if about else ""))
    return lines


def _message_text(message: Dict[str, Any]) -> str:
    """``role: text``; a content other than text is named by its type (and mime type or URI)."""
    content = message.get("content")
    blocks = content if isinstance(content, list) else [content]
    return f"{message.get('role', '?')}: {chr(10).join(content_lines({'content': blocks}))}"


def cmd_prompts(args: Any) -> int:
    cfg = _load(args)
    spec = _server_spec(cfg, args.server)
    if not args.name:
        if args.pairs:
            raise UsageError("arguments need a prompt name: prompts SERVER NAME key=value ...")
        result = _via_daemon_or_ephemeral(cfg, args, spec, "listPrompts", {})
        prompts = [p for p in (result or {}).get("prompts") or [] if isinstance(p, dict)]
        if args.json:
            _print_json(prompts)
        for p in [] if args.json else prompts:
            print("\n".join(_prompt_lines(p)))
        return 0
    arguments = _parse_prompt_args(args.pairs)
    result = _via_daemon_or_ephemeral(cfg, args, spec, "getPrompt", {"name": args.name, "args": arguments})
    if args.json:
        _print_json(result)
        return 0
    for message in (result or {}).get("messages") or []:
        if isinstance(message, dict):
            print(_message_text(message))
    return 0


def cmd_serve(args: Any) -> int:
    """``serve``: the stdio MCP bridge editors register (see ServeBridge). stdout carries only
    protocol: the protocol keeps a copy of fd 1, and fd 1 itself points at stderr from now on."""
    if __name__ == "__main__" and __spec__ is None and not sys.flags.dont_write_bytecode:
        # Run as a script, the module was compiled for this run, and the compiler's memory
        # stays with the process: 35 MiB, against 12 from cached bytecode. A bridge lives as
        # long as the editor, so it runs again, same pid and pipes, through an import.
        argv = _script_argv()
        if "-c" in argv:
            os.execv(argv[0], argv + sys.argv[1:])
    only = [s.strip() for s in (args.servers or "").split(",") if s.strip()] or None
    timeout = _env_seconds("MCPORTER_CALL_TIMEOUT", _timeout_seconds(args))  # a tool call's, as `call`
    bridge = ServeBridge(lambda: _load(args), lambda cfg: _client(cfg, args), only, args.bare, timeout)
    protocol_out = os.dup(1)
    os.dup2(2, 1)
    bridge.attach_output(protocol_out)
    return bridge.run()


def cmd_service(args: Any) -> int:
    cfg = _load(args)
    paths = DaemonPaths.for_config(cfg.path)
    if args.kind == "launchd":
        print(launchd_plist(cfg, paths, args.label or f"com.mcporter.daemon.{paths.key}"), end="")
    else:
        print(systemd_unit(cfg, paths), end="")
    return 0


class _Findings:
    """Doctor's report: one line per finding, each with its fix; counts the failures."""

    def __init__(self) -> None:
        self.failures = 0

    def ok(self, text: str) -> None:
        print(f"ok    {text}")

    def warn(self, text: str, fix: str) -> None:
        print(f"warn  {text} — {fix}")

    def fail(self, text: str, fix: str) -> None:
        self.failures += 1
        print(f"FAIL  {text} — fix: {fix}")


def _doctor_paths(found: _Findings, paths: DaemonPaths) -> None:
    base = paths.base_dir
    if os.path.isdir(base):
        try:
            ensure_private_dir(base)
            found.ok(f"state directory {base} is private")
        except UnsafePathError as exc:
            found.fail(
                str(exc).split("; run:")[0],
                f"chmod 700 {base}, or set MCPORTER_DAEMON_DIR to a directory you own",
            )
    else:
        found.ok(f"state directory {base} will be created (mode 0700)")
    size, limit = len(os.fsencode(paths._preferred)), _sun_path_limit()
    if paths.socket == paths._preferred:
        found.ok(f"socket path is {size} bytes (limit {limit})")
        return
    fallback = os.path.dirname(paths.socket)
    try:
        if os.path.lexists(fallback):
            ensure_private_dir(fallback, refuse_symlink=True)
        found.ok(f"socket path would be {size} bytes (limit {limit}); using fallback {paths.socket}")
    except UnsafePathError as exc:
        found.fail(f"socket path too long and fallback unusable: {exc}", "use a shorter MCPORTER_DAEMON_DIR")


def _doctor_config(found: _Findings, args: Any) -> Optional[Config]:
    try:
        cfg = _load(args)
    except ConfigError as exc:
        found.fail(str(exc), "correct the config file")
        return None
    for path, data in cfg.layers:
        found.ok(f"config layer {path}: {'read' if data is not None else 'absent'}")
        for _verdict, _target, why, fix in _config_path_risks(path) if data is not None else []:
            found.warn(why, f"another user in that group could make it run their command: {fix}")
    _doctor_import_plan(found, cfg)
    for imported in cfg.imports:
        names = ", ".join(sorted(imported.entries)) or "no servers"
        line = f"import {imported.kind} {imported.path}: {names}"
        if imported.note.startswith("skipped"):
            found.warn(f"{line} ({imported.note})", "run under Python 3.11+ to read it")
        elif imported.note:
            found.warn(f"{line} ({imported.note})", "fix the file, or ignore it if it is not an MCP config")
        else:
            found.ok(line)
    for name, source in cfg.looping.items():
        found.ok(
            f"server '{name}' in {source} runs this tool's own `serve`: never imported or started "
            "(the daemon would start a bridge to itself); editors run it"
        )
    found.ok(f"daemon named by {cfg.path}")
    if not cfg.keep_alive_servers():
        found.warn(
            "no keep-alive servers configured", 'set "lifecycle": "keep-alive" on a server to keep it warm'
        )
    return cfg


def _doctor_import_plan(found: _Findings, cfg: Config) -> None:
    """Which editor files each config layer reads: imports are per layer, as in mcporter, so
    ``"imports": []`` in one layer does not stop another layer (or no layer) from importing."""
    for source, order in import_plan(cfg.layers):
        if not order:
            found.ok(f'imports of {source}: off ("imports": [])')
            continue
        home = os.path.expanduser("~")
        files = [
            p
            for kind in order
            for p in import_candidates(kind, cfg.root, home, dict(os.environ), sys.platform)
            if os.path.isfile(p)
        ]
        found.ok(
            f"imports of {source}: {', '.join(order)}; reads {', '.join(files) or 'no file (none exist)'}"
        )


def _doctor_servers(found: _Findings, cfg: Config) -> None:
    import shutil

    for name, spec in cfg.servers.items():
        for key in spec.unknown_keys:
            found.warn(
                f"server '{name}' ({spec.source}): unknown key '{key}' is ignored",
                "check its spelling (e.g. allowedTools, blockedTools, startupTimeoutMs, lifecycle)",
            )
        if spec.problem:
            found.fail(spec.problem, "set the variable, or give a default")
            continue
        if spec.allowed_tools is not None or spec.blocked_tools:
            rule = (
                f"only {', '.join(sorted(spec.allowed_tools)) or 'no tool'} (allowedTools)"
                if spec.allowed_tools is not None
                else f"all but {', '.join(sorted(spec.blocked_tools))} (blockedTools)"
            )
            found.ok(f"server '{name}': tools listed and called: {rule}")
        if spec.url:
            found.warn(f"server '{name}' is HTTP ({spec.url})", "this tool runs stdio servers only")
            continue
        mode = "keep-alive" if spec.keep_alive else "ephemeral"
        unusable_cwd = _cwd_problem(name, spec.cwd, spec.source)
        if unusable_cwd:
            found.fail(unusable_cwd, 'create it, or fix the server\'s "cwd" in the config')
            continue
        path = (spec.env or {}).get("PATH") or os.environ.get("PATH")
        exe = spec.command[0]
        resolved = (
            shutil.which(exe, path=path) if os.sep not in exe else (exe if os.access(exe, os.X_OK) else None)
        )
        if resolved is None:
            found.fail(
                f"server '{name}' ({mode}): command '{exe}' not found",
                "install it or fix its path in the config",
            )
        else:
            found.ok(f"server '{name}': {mode} ({spec.keep_alive_reason}); command resolves to {resolved}")


def _doctor_daemon(found: _Findings, cfg: Config, args: Any) -> None:
    client = _client(cfg, args)
    status = client.serving_status()
    if status is not None:
        if status["fresh"]:
            found.ok(f"daemon running (pid {status['pid']}) and fresh")
        else:
            found.warn(
                f"daemon running (pid {status['pid']}) but stale: config changed since it started",
                "it restarts on the next call, or run: restart",
            )
        return
    recorded = RecordedDaemon.read(client.paths.metadata)
    if recorded is not None and recorded.is_ours():
        found.fail(
            f"daemon pid {recorded.pid} is alive but does not answer",
            "run: stop (it is terminated after a check)",
        )
        return
    found.ok("no daemon running (the next keep-alive call starts one)")
    leftovers = [p for p in (client.paths.metadata, client.paths.socket) if os.path.exists(p)]
    for name, pid, start in recorded.live_servers() if recorded is not None else []:
        if is_our_pid(pid, start):  # a group left without its leader shows as its processes
            leftovers.append(f"MCP server '{name}' pid {pid}")
    if leftovers:
        found.warn(f"leftovers of a dead daemon: {', '.join(leftovers)}", "run: stop (removes them)")


def cmd_doctor(args: Any) -> int:
    found = _Findings()
    found.ok(f"Python {'.'.join(map(str, sys.version_info[:3]))} ({sys.executable})")
    cfg = _doctor_config(found, args)
    if cfg is not None:
        _doctor_paths(found, DaemonPaths.for_config(cfg.path))
        _doctor_servers(found, cfg)
        try:
            _doctor_daemon(found, cfg, args)
        except UnsafePathError:
            pass  # the state directory's finding says why; no record is read from it
        except DaemonError as exc:
            found.fail(str(exc), "see the message")
    print(f"\n{found.failures} problem(s) found." if found.failures else "\nAll checks passed.")
    return 1 if found.failures else 0


def cmd_demo(args: Any) -> int:
    """A tour: a daemon keeps the built-in demo server warm across separate CLI processes."""
    import shutil
    import subprocess
    import tempfile

    tmp = tempfile.mkdtemp(prefix="mcpd-demo-")
    config = os.path.join(tmp, "mcporter.json")
    with open(config, "w") as fh:
        json.dump(
            {
                "mcpServers": {
                    "demo": {
                        "command": sys.executable,
                        "args": [os.path.abspath(__file__), "_demo-server"],
                        "lifecycle": "keep-alive",
                    }
                }
            },
            fh,
            indent=2,
        )
    env = {k: v for k, v in os.environ.items() if k not in ("MCPORTER_CONFIG", "MCPORTER_DISABLE_KEEPALIVE")}
    env["MCPORTER_DAEMON_DIR"] = os.path.join(tmp, "state")
    paths_env = os.environ.get("MCPORTER_DAEMON_DIR")
    os.environ["MCPORTER_DAEMON_DIR"] = env["MCPORTER_DAEMON_DIR"]
    paths = DaemonPaths.for_config(config)

    def run(*words: str) -> str:
        print(f"$ {_PROG} {' '.join(words)}", flush=True)
        done = subprocess.run(
            _script_argv() + ["--config", config, *words], env=env, capture_output=True, text=True, timeout=60
        )
        out = (done.stdout + done.stderr).rstrip()
        print("  " + out.replace("\n", "\n  ") if out else "  (no output)", flush=True)
        if done.returncode not in (0,):
            raise DaemonError(f"demo step '{' '.join(words)}' failed (exit {done.returncode}): {out}")
        return done.stdout.strip()

    print(f"Demo config {config}: one keep-alive server, 'demo', that counts calls in its own process.\n")
    try:
        run("start")
        first = run("call", "demo.counter")
        second = run("call", "demo.counter")
        print(
            f"\nTwo separate CLI processes saw the counter go {first} → {second}: the server stayed warm.\n"
        )
        status = json.loads(run("status", "--json"))
        run("stop")
        left = _demo_leftovers(status)
        print("\nNothing left behind." if not left else f"\nLeft behind: {left}")
        return 0 if not left else 1
    finally:
        _demo_cleanup(paths)
        if paths_env is None:
            os.environ.pop("MCPORTER_DAEMON_DIR", None)
        else:
            os.environ["MCPORTER_DAEMON_DIR"] = paths_env
        shutil.rmtree(tmp, ignore_errors=True)


def _demo_leftovers(status: Dict[str, Any]) -> List[str]:
    pids = [status.get("pid")] + [s.get("pid") for s in status.get("servers") or []]
    gone_by = time.monotonic() + 5
    left = [p for p in pids if _is_pid(p)]
    while left and time.monotonic() < gone_by:
        left = [p for p in left if pid_alive(p)]
        time.sleep(0.02)
    return [f"pid {p}" for p in left]


def _demo_cleanup(paths: DaemonPaths) -> None:
    recorded = RecordedDaemon.read(paths.metadata)
    if recorded is not None and recorded.is_ours():
        recorded.terminate()


# -- parsing ----------------------------------------------------------------------------------


def _parser(prog: str, description: str) -> Any:
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:  # one clear line, exit 2
            raise UsageError(f"{message} (see {_PROG} --help)")

    return Parser(prog=prog, description=description)


def _duration(flag: str) -> Callable[[str], float]:
    return lambda text: parse_duration(text, flag)


def _start_args(sp: Any) -> None:
    sp.add_argument("--foreground", action="store_true", help="run the daemon in this process")
    sp.add_argument("--log", action="store_true", help="trace every call in the log")
    sp.add_argument("--log-file", help="log to this file (0600, rotated at 10 MB)")
    sp.add_argument("--log-servers", help="trace calls of these servers (CSV)")
    sp.set_defaults(func=cmd_start)


def _restart_args(sp: Any) -> None:
    sp.add_argument("server", nargs="?", metavar="SERVER", help="restart just this kept server")
    _start_args(sp)
    sp.set_defaults(func=cmd_restart)


def _close_args(sp: Any) -> None:
    sp.add_argument("server", metavar="SERVER")
    sp.set_defaults(func=cmd_close)


def _stop_args(sp: Any) -> None:
    sp.add_argument(
        "--timeout",
        type=_duration("--timeout"),
        default=_STOP_WAIT,
        metavar="DURATION",
        help="wait this long (500ms, 30s, 2m; a bare number is ms) before signals (default 5s)",
    )
    sp.set_defaults(func=cmd_stop)


def _status_args(sp: Any) -> None:
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)


def _call_args(sp: Any) -> None:
    """For ``call --help`` only: ``parse_call_line`` reads call's command line."""
    sp.add_argument("target", metavar="SERVER.TOOL", help="or the whole call: 'SERVER.TOOL(a: 1, b: \"x\")'")
    sp.add_argument(
        "forms",
        nargs="*",
        metavar="ARG",
        help="key=value, key:value, 'key: value', --key value, --key=value, or a positional value "
        "(in the schema's order); options and arguments mix in any order",
    )
    for flag, (_dest, takes, metavar, text) in _CALL_OPTIONS.items():
        if takes:
            sp.add_argument(flag, metavar=metavar, help=text)
        else:
            sp.add_argument(flag, action="store_true", help=text)


def _output_arg(sp: Any) -> None:
    sp.add_argument("--output", choices=_OUTPUT_FORMATS, help="json or raw: as --json")


def _list_args(sp: Any) -> None:
    sp.add_argument("server", nargs="?")
    sp.add_argument("--json", action="store_true")
    _output_arg(sp)
    sp.add_argument("--schema", action="store_true", help="include full input schemas")
    sp.add_argument("--status", action="store_true", help="probe each server: tool count, health, time")
    sp.add_argument("--exit-code", action="store_true", help="with --status: exit 1 when a server is down")
    sp.add_argument("--timeout", type=_duration("--timeout"), metavar="DURATION")
    sp.set_defaults(func=cmd_list)


def _resources_args(sp: Any) -> None:
    sp.add_argument("server")
    sp.add_argument("uri", nargs="?")
    sp.add_argument("--templates", action="store_true", help="list resource templates")
    sp.add_argument("--json", action="store_true")
    sp.add_argument(
        "-o",
        "--output",
        metavar="FILE|FORMAT",
        help="write the resource read to FILE (text, or a blob decoded); json or raw: as --json",
    )
    sp.add_argument("--timeout", type=_duration("--timeout"), metavar="DURATION")
    sp.set_defaults(func=cmd_resources)


def _prompts_args(sp: Any) -> None:
    sp.add_argument("server", metavar="SERVER")
    sp.add_argument("name", nargs="?", metavar="NAME")
    sp.add_argument("pairs", nargs="*", metavar="key=value")
    sp.add_argument("--json", action="store_true", help="print the whole result as JSON")
    sp.add_argument("--timeout", type=_duration("--timeout"), metavar="DURATION")
    sp.set_defaults(func=cmd_prompts)


def _serve_args(sp: Any) -> None:
    sp.add_argument("--servers", metavar="A,B", help="bridge only these kept servers")
    sp.add_argument("--bare", action="store_true", help="one server's tools under their own names")
    sp.set_defaults(func=cmd_serve)


def _demo_args(sp: Any) -> None:
    sp.set_defaults(func=cmd_demo)


def _doctor_args(sp: Any) -> None:
    sp.set_defaults(func=cmd_doctor)


def _service_args(sp: Any) -> None:
    sp.add_argument("kind", choices=["launchd", "systemd"])
    sp.add_argument("--label", help="launchd label (default com.mcporter.daemon.<key>)")
    sp.set_defaults(func=cmd_service)


# Each command: the function that declares its arguments, and its line in --help. Only the
# command being run gets a parser built (the whole tree costs milliseconds on every call).
_COMMANDS: Dict[str, Tuple[Callable[[Any], None], str]] = {
    "start": (_start_args, "start the daemon (detached unless --foreground)"),
    "restart": (_restart_args, "stop, then start; or restart one kept SERVER inside the daemon"),
    "close": (_close_args, "close one kept SERVER inside the daemon"),
    "stop": (_stop_args, "stop the daemon and its servers"),
    "status": (_status_args, "is a verified daemon running? (exit 0 yes, 3 no)"),
    "call": (_call_args, "call SERVER.TOOL [ARGS ...]"),
    "list": (_list_args, "list servers, or one server's tools"),
    "resources": (_resources_args, "list a server's resources, or read one (alias: resource)"),
    "prompts": (_prompts_args, "list a server's prompts, or get one"),
    "serve": (_serve_args, "a stdio MCP server for editors, re-exporting the kept servers"),
    "demo": (_demo_args, "a self-contained tour on the built-in demo server"),
    "doctor": (_doctor_args, "check the environment and explain what it finds"),
    "service": (_service_args, "print a launchd plist or systemd user unit"),
}
_ALIASES = {"resource": "resources"}
_DAEMON_VERBS = ("start", "stop", "status", "restart")  # ``daemon VERB``: mcporter's spelling


def _build_parser() -> Any:
    """The whole tree, for ``--help`` and ``--version``."""
    p = _parser(_PROG, "Keep MCP stdio servers warm behind one daemon per config.")
    p.add_argument("--config", help="config file (default: discovered as mcporter does)")
    p.add_argument("--root", help="project root holding config/mcporter.json (default: cwd)")
    p.add_argument("--version", action="version", version=f"{_PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=type(p))
    for name, (declare, text) in _COMMANDS.items():
        declare(sub.add_parser(name, help=text))
    sub.add_parser("daemon", help="daemon start|stop|status|restart: the commands above")
    return p


def _command_word(words: List[str]) -> Tuple[str, List[str]]:
    """(command, its arguments): aliases and ``daemon VERB`` resolved."""
    word, rest = words[0], words[1:]
    if word == "daemon":
        if rest[:1] in (["-h"], ["--help"]):
            _build_parser().parse_args(["--help"])  # prints the commands, exits 0
        if not rest or rest[0] not in _DAEMON_VERBS:
            raise UsageError(f"daemon takes one of: {', '.join(_DAEMON_VERBS)} (see {_PROG} --help)")
        word, rest = rest[0], rest[1:]
    word = _ALIASES.get(word, word)
    if word not in _COMMANDS:
        known = list(_COMMANDS) + list(_ALIASES) + ["daemon"]
        raise UsageError(f"unknown command '{word}'{_did_you_mean(word, known)} (see {_PROG} --help)")
    return word, rest


def _parse_command_line(argv: List[str]) -> Any:
    """The parsed command line: the global options, then one command's own parser (``call``'s
    is hand-written, so options and tool arguments mix in any order)."""
    found: Dict[str, Optional[str]] = {"config": None, "root": None}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        flag, eq, value = argv[i].partition("=")
        if flag not in ("--config", "--root"):
            return _build_parser().parse_args(argv)  # help, version, or its usage error
        if not eq:
            if i + 1 >= len(argv):
                raise UsageError(f"{flag} needs a value (see {_PROG} --help)")
            value, i = argv[i + 1], i + 1
        found[flag[2:]] = value
        i += 1
    if i >= len(argv):
        raise UsageError(f"a command is required (see {_PROG} --help)")
    command, rest = _command_word(argv[i:])
    declare, text = _COMMANDS[command]
    wants_help = any(w in ("-h", "--help") for w in rest[: rest.index("--") if "--" in rest else None])
    if command == "call" and not wants_help:
        args = parse_call_line(rest)
        args.func = cmd_call
    else:
        parser = _parser(f"{_PROG} {command}", text)
        declare(parser)
        args = parser.parse_args(rest)
        _output_as_json(args)
    args.command, args.config, args.root = command, found["config"], found["root"]
    return args


def _output_as_json(args: Any) -> None:
    """``--output json|raw`` on ``list`` and ``resources`` is their ``--json``; ``text`` and
    ``markdown`` their default (a resources ``-o`` that names no format is a file)."""
    output = getattr(args, "output", None)
    if output in _OUTPUT_FORMATS:
        args.json = bool(getattr(args, "json", False) or output in ("json", "raw"))
        args.output = None


def _host_line(text: str) -> str:
    """A foreground host's own line: stamped like its log when stderr is a file, since
    that file is the log other daemons append to and a launching client reads by pid."""
    return text if sys.stderr.isatty() else _log_prefix() + text


def _surrogate_safe_stdout() -> None:
    """Print non-UTF-8 paths (surrogate-escaped) as the bytes they are, not as a crash."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="surrogateescape")
        except (ValueError, OSError):
            pass


def main(argv: Optional[List[str]] = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 failed, 2 usage or configuration)."""
    argv = sys.argv[1:] if argv is None else argv
    # Usage errors included: a launched child's argv carries --foreground from the start.
    as_host = "--foreground" in argv
    _surrogate_safe_stdout()
    args = None
    try:
        _require_posix()
        if argv[:1] == ["_demo-server"]:
            # Internal, so kept out of the parser (and out of its "choose from" list).
            return _demo_server_main()
        args = _parse_command_line(argv)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, not at exit: a closed pipe must surface where it is handled
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except DaemonError as exc:
        if os.environ.get("MCPORTER_DEBUG") == "1":
            raise
        if exc.rpc_code is not None and getattr(args, "json", False):
            _print_json({"error": {"message": str(exc), "code": exc.rpc_code, "data": exc.data}})
        line = f"{_PROG}: {exc}"
        print(_host_line(line) if as_host else line, file=sys.stderr)
        return exc.exit_code
    except _Terminated as exc:
        try:  # after SIGHUP the terminal may be gone
            print(f"{_PROG}: terminated by signal {exc.signum}", file=sys.stderr)
        except OSError:
            pass
        return 128 + exc.signum
    except KeyboardInterrupt:
        # One line, and 130 as a shell reports SIGINT. A daemon call is cancelled at its server
        # when our socket closes at exit; an ephemeral one was cancelled on the way out.
        line = f"{_PROG}: interrupted"
        print(_host_line(line) if as_host else line, file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("MCPORTER_DEBUG") == "1":
            raise
        line = f"{_PROG}: unexpected error: {type(exc).__name__}: {exc} (MCPORTER_DEBUG=1 shows more)"
        print(_host_line(line) if as_host else line, file=sys.stderr)
        return 1


def _stdout_closed() -> int:
    """The reader of our output went away (``| head -1``): end quietly, as ``cat`` would. What
    is still buffered goes to /dev/null, so the flush at exit cannot raise again (the recipe in
    Python's signal docs). 141 is a shell's status for a death by SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return 128 + 13


def _exit_without_teardown(code: int) -> None:
    """End a finished CLI run at once. The interpreter's own teardown (freeing every module
    ``site`` and we imported) costs more than a warm ``call`` itself: about 10 ms where a
    ``.pth`` file pulls in pathlib and zipfile. What exit owes the world is done here first:
    the atexit callbacks run (once: running them empties the list), then both streams are
    flushed, what the callbacks wrote included. A run with another thread still alive (a host
    winding down) or a stream that cannot be flushed takes the ordinary exit, which joins
    threads and reports a failed flush as Python does."""
    threading = sys.modules.get("threading")
    run_exitfuncs = getattr(__import__("atexit"), "_run_exitfuncs", None)
    if run_exitfuncs is None or (threading is not None and threading.active_count() > 1):
        sys.exit(code)
    run_exitfuncs()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)


def _console_script() -> None:
    """The installed ``mcporter-daemon`` command: ``main``, then the quick exit."""
    _exit_without_teardown(main())


if __name__ == "__main__":
    _exit_without_teardown(main())
