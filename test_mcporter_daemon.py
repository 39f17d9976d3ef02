"""Tests for mcporter_daemon.py with real processes.

Every test runs the real CLI as subprocesses against its own state dir
(``MCPORTER_DAEMON_DIR``) and its own config file, whose one keep-alive server
is the module's built-in demo MCP server. The demo server is launched through a
``python -c`` wrapper that carries a unique tag on its command line, so a test
can find exactly the MCP server processes that belong to it in /proc.

Conventions:
- no fixed sleeps: ``wait_until`` polls a condition against a deadline;
- every subprocess has an explicit timeout;
- every process a test saw (daemons, MCP servers, its own children) is
  SIGCONTed and SIGKILLed at teardown if still alive, after a pid + start-time
  identity check, never by name.

The pytest process makes itself a child subreaper and reaps orphans in a
background thread. Orphaned daemons and MCP servers are reparented to it
instead of to PID 1, which in some containers never reaps, so a dead process
is really gone instead of lingering as a zombie that ``kill(pid, 0)`` still
reports as alive, as it would be on a system with a normal init.
"""

import ctypes
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MODULE_PATH = HERE / "mcporter_daemon.py"
CLI_TIMEOUT = 45.0  # the client gives up on a slow start after 45 s itself
MARKER_VAR = "MCPORTER_DAEMON_TEST_MARKER"
PID_LINE = re.compile(r"(started|already running) \(pid (\d+)\)")

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/stat").exists(), reason="these tests inspect processes through Linux /proc"
)


def _import_module():
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import mcporter_daemon

    return mcporter_daemon


# ---- process inspection (/proc) -------------------------------------------


class ProcStat:
    __slots__ = ("pid", "state", "ppid", "start")

    def __init__(self, pid, state, ppid, start):
        self.pid, self.state, self.ppid, self.start = pid, state, ppid, start


def proc_stat(pid):
    """State, parent and start time of ``pid``, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    fields = data[data.rfind(")") + 2 :].split()
    try:
        return ProcStat(pid, fields[0], int(fields[1]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def pid_alive(pid):
    """True when ``pid`` exists and is not a zombie (a zombie has already exited)."""
    st = proc_stat(pid)
    return st is not None and st.state not in ("Z", "X")


def pid_stopped(pid):
    st = proc_stat(pid)
    return st is not None and st.state in ("T", "t")


def proc_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def proc_environ(pid):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def all_pids():
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            out.append(int(name))
    return out


def procs_with_tag(tag):
    """Live (non-zombie) pids whose command line has ``tag`` as one argument."""
    found = set()
    for pid in all_pids():
        if tag in proc_cmdline(pid) and pid_alive(pid):
            found.add(pid)
    return found


def procs_with_env_marker(value):
    found = set()
    needle = f"{MARKER_VAR}={value}"
    for pid in all_pids():
        if pid == os.getpid():
            continue
        if needle in proc_environ(pid) and pid_alive(pid):
            found.add(pid)
    return found


def wait_until(predicate, timeout, interval=0.02, message=None):
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises AssertionError naming ``message`` (or the predicate) after ``timeout`` s.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.1f}s waiting for {message or predicate}")
        time.sleep(interval)


# ---- orphan reaper ---------------------------------------------------------

_SPAWN_LOCK = threading.Lock()
_POPENS = []  # Popen objects this process started; Popen reaps those itself


def _become_subreaper():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except Exception:
        return False


def _reap_orphans_once():
    me = os.getpid()
    for pid in all_pids():
        st = proc_stat(pid)
        if st is None or st.ppid != me or st.state != "Z":
            continue
        with _SPAWN_LOCK:
            if any(p.pid == pid and p.returncode is None for p in _POPENS):
                continue  # our own Popen child: Popen.wait/poll reaps it
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        with _SPAWN_LOCK:
            _POPENS[:] = [p for p in _POPENS if p.returncode is None]


def _reaper_loop():
    while True:
        try:
            _reap_orphans_once()
        except Exception:
            pass
        time.sleep(0.02)


@pytest.fixture(scope="session", autouse=True)
def _orphan_reaper():
    if _become_subreaper():
        threading.Thread(target=_reaper_loop, name="orphan-reaper", daemon=True).start()
    yield


def spawn(args, env, cwd, stdout, stderr):
    with _SPAWN_LOCK:
        p = subprocess.Popen(
            args, env=env, cwd=str(cwd), stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
        )
        _POPENS.append(p)
    return p


# ---- test harness ----------------------------------------------------------


class Result:
    def __init__(self, args, rc, out, err, elapsed):
        self.args, self.rc, self.out, self.err, self.elapsed = args, rc, out, err, elapsed

    def __repr__(self):
        return "<{} rc={!r} {:.2f}s\n--- stdout ---\n{}\n--- stderr ---\n{}>".format(
            " ".join(self.args), self.rc, self.elapsed, self.out, self.err
        )


class Harness:
    """One test's world: its state dir, config file, tag, and every pid it saw."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path.resolve()
        # Short state dir: AF_UNIX paths are limited to 108 bytes on Linux.
        self.state_dir = Path(tempfile.mkdtemp(prefix="md", dir="/tmp"))
        self.tag = "mdtag-" + uuid.uuid4().hex
        self.cfg = self.tmp / "mcporter.json"
        self.seen = set()  # (pid, start time) of every process seen, for identity-checked cleanup
        self.stopped = set()
        self.popens = []
        self.expect_no_leftovers = False
        self.extra_markers = []  # env markers of processes started outside this config
        self.stubborn = False
        self.write_config()

    # -- config and paths --

    def demo_server_entry(self):
        """The built-in demo server, run through ``python -c`` so that the tag shows in its
        command line. A stubborn one ignores stdin EOF (as some real MCP servers do): it
        only goes away when signalled."""
        code = (
            "import sys, runpy, time\n"
            "sys.argv = ['mcporter_daemon.py', '_demo-server']\n"
            "try:\n"
            f"    runpy.run_path({str(MODULE_PATH)!r}, run_name='__main__')\n"
            "finally:\n"
            f"    if {self.stubborn!r}:\n"
            "        time.sleep(3600)\n"
        )
        return {"command": sys.executable, "args": ["-c", code, self.tag], "lifecycle": "keep-alive"}

    def config_data(self):
        return {"mcpServers": {"demo": self.demo_server_entry()}}

    def use_stubborn_server(self):
        self.stubborn = True
        self.write_config()

    def write_config(self, data=None):
        self.cfg.write_text(json.dumps(data if data is not None else self.config_data(), indent=2))

    @property
    def key(self):
        return hashlib.sha1(str(Path(self.cfg).resolve()).encode()).hexdigest()[:12]

    def path(self, suffix):
        return self.state_dir / (f"daemon-{self.key}.{suffix}")

    @property
    def socket_path(self):
        return self.path("sock")

    @property
    def meta_path(self):
        return self.path("json")

    def env(self, **extra):
        env = dict(os.environ)
        for k in (
            "MCPORTER_CONFIG",
            "MCPORTER_KEEPALIVE",
            "MCPORTER_DISABLE_KEEPALIVE",
            "MCPORTER_DAEMON_PROBE_TIMEOUT_MS",
        ):
            env.pop(k, None)
        env["MCPORTER_DAEMON_DIR"] = str(self.state_dir)
        env[MARKER_VAR] = self.tag
        env.update(extra)
        return env

    # -- running the CLI --

    def argv(self, *args):
        return [sys.executable, str(MODULE_PATH), "--config", str(self.cfg)] + [str(a) for a in args]

    def popen(self, *args, **kw):
        """Start the CLI; stdout/stderr go to files (a daemon may run for long)."""
        n = len(self.popens)
        out = open(str(self.tmp / f"p{n}.out"), "w+")  # noqa: SIM115 - closed at cleanup
        err = open(str(self.tmp / f"p{n}.err"), "w+")  # noqa: SIM115 - closed at cleanup
        p = spawn(self.argv(*args), self.env(**kw), self.tmp, out, err)
        p.out_file, p.err_file = out, err
        p.out_path, p.err_path = out.name, err.name
        self.popens.append(p)
        self.track(p.pid)
        return p

    def popen_piped(self, *args):
        p = spawn(self.argv(*args), self.env(), self.tmp, subprocess.PIPE, subprocess.PIPE)
        p.text_args = self.argv(*args)
        self.popens.append(p)
        self.track(p.pid)
        return p

    def cli(self, *args, **kw):
        timeout = kw.pop("timeout", CLI_TIMEOUT)
        p = self.popen_piped(*args)
        return communicate_text(p, self.argv(*args), timeout)

    # -- observing --

    def track(self, pid):
        if isinstance(pid, int) and pid > 0:
            st = proc_stat(pid)
            if st is not None:
                self.seen.add((pid, st.start))

    def status(self):
        r = self.cli("status", "--json")
        assert r.rc == 0, r
        data = json.loads(r.out)
        if data.get("running"):
            self.track(data.get("pid"))
            for s in data.get("servers") or []:
                self.track(s.get("pid"))
        return data

    def server_pid_from_status(self, name="demo"):
        for s in self.status().get("servers") or []:
            if s.get("name") == name:
                return s.get("pid")
        return None

    def meta(self):
        try:
            data = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None
        if isinstance(data, dict):
            self.track(data.get("pid"))
            for info in (data.get("servers") or {}).values():
                if isinstance(info, dict):
                    self.track(info.get("pid"))
        return data

    def daemon_pids(self):
        """Live processes running ``start --foreground`` for this test's config."""
        found = set()
        for pid in all_pids():
            argv = proc_cmdline(pid)
            if "--foreground" in argv and any(str(self.cfg) in a for a in argv) and pid_alive(pid):
                found.add(pid)
        for pid in found:
            self.track(pid)
        return found

    def server_pids(self):
        found = procs_with_tag(self.tag)
        for pid in found:
            self.track(pid)
        return found

    def sigstop(self, pid):
        self.stopped.add(pid)
        os.kill(pid, signal.SIGSTOP)
        wait_until(lambda: pid_stopped(pid), 5, message=f"pid {pid} to stop")

    def sigcont(self, pid):
        os.kill(pid, signal.SIGCONT)
        self.stopped.discard(pid)

    # -- teardown --

    def _ours(self, pid):
        st = proc_stat(pid)
        return st is not None and st.state not in ("Z", "X") and (pid, st.start) in self.seen

    def cleanup(self):
        found = self.daemon_pids() | self.server_pids()
        for marker in [self.tag] + self.extra_markers:
            found |= procs_with_env_marker(marker)
        for pid in found:
            self.track(pid)
        leftovers = sorted(set(pid for pid, _ in self.seen if self._ours(pid)))
        described = [f"{pid} {' '.join(proc_cmdline(pid))[:200]}" for pid in leftovers]
        for pid in list(self.stopped) + leftovers:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        for pid in leftovers:
            if self._ours(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        for p in self.popens:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for f in (getattr(p, "out_file", None), getattr(p, "err_file", None), p.stdout, p.stderr):
                if f is not None:
                    f.close()
        try:
            wait_until(
                lambda: not any(pid_alive(pid) for pid in leftovers),
                10,
                message="killed processes to disappear",
            )
        finally:
            shutil.rmtree(str(self.state_dir), ignore_errors=True)
        if self.expect_no_leftovers and described:
            pytest.fail("processes left behind:\n" + "\n".join(described))


def communicate_text(p, args, timeout):
    started = time.monotonic()
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        try:
            out, err = p.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a grandchild holds our pipes open
            out, err = b"", b"(output unavailable: a descendant still holds the pipes)"
        raise AssertionError(
            f"{' '.join(args)} did not finish within {timeout}s\n"
            f"--- stdout ---\n{out.decode(errors='replace')}\n--- stderr ---\n{err.decode(errors='replace')}"
        ) from None
    return Result(
        args,
        p.returncode,
        out.decode("utf-8", "replace"),
        err.decode("utf-8", "replace"),
        time.monotonic() - started,
    )


def read_file(path):
    """Read a child's output file by path (seeking the shared descriptor would move the child's offset)."""
    with open(path) as f:
        return f.read()


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    try:
        yield harness
    finally:
        harness.cleanup()


def call_ok(h, *args):
    r = h.cli("call", *args)
    assert r.rc == 0, r
    return r.out.strip()


def started_pid(result):
    m = PID_LINE.search(result.out)
    assert m, result
    return int(m.group(2))


def assert_one_daemon_tree(h, daemon_pid, servers=1, timeout=10):
    """Exactly one daemon process (``daemon_pid``) and ``servers`` MCP servers, all its children."""
    wait_until(
        lambda: h.daemon_pids() == {daemon_pid},
        timeout,
        message=f"exactly one daemon process {daemon_pid} (now {h.daemon_pids()!r})",
    )
    srv = h.server_pids()
    assert len(srv) == servers, f"expected {servers} MCP server process(es), found {srv!r}"
    for pid in srv:
        st = proc_stat(pid)
        assert st is not None and st.ppid == daemon_pid, (
            f"MCP server {pid} has parent {st and st.ppid!r}, not the daemon {daemon_pid}"
        )


def running_status(h):
    st = h.status()
    assert st.get("running") is True, st
    return st


# ---- wire protocol (raw socket client) ------------------------------------


def raw_request(path, method, params, idle=1.0, progress_ms=None, on_frame=None, overall=60.0):
    """One request over the Unix socket; returns (response, frames_before_it).

    The socket timeout is an idle budget: each recv() gets ``idle`` seconds, so
    every received frame resets it. Raises socket.timeout when the peer is silent.
    """
    req = {"id": "t-" + uuid.uuid4().hex[:8], "method": method, "params": params, "protocolVersion": 2}
    if progress_ms is not None:
        req["progressIntervalMs"] = progress_ms
    deadline = time.monotonic() + overall
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(idle)
        s.connect(str(path))
        s.sendall((json.dumps(req) + "\n").encode())
        buf, frames = b"", []
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                raise EOFError(f"daemon closed the connection after {len(frames)} frames")
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                obj = json.loads(line)
                if obj.get("type") == "progress":
                    frames.append((time.monotonic(), obj))
                    if on_frame is not None:
                        on_frame(len(frames))
                    continue
                return obj, req, frames
        raise AssertionError(f"no response within {overall}s")
    finally:
        s.close()


# ---- basics ----------------------------------------------------------------


def test_paths_match_contract(h, monkeypatch):
    md = _import_module()
    monkeypatch.setenv("MCPORTER_DAEMON_DIR", str(h.state_dir))
    paths = md.DaemonPaths.for_config(str(h.cfg))
    assert Path(paths.socket) == h.socket_path
    assert Path(paths.metadata) == h.meta_path
    assert Path(paths.lock) == h.path("lock")
    assert Path(paths.bind) == h.path("bind")
    assert Path(paths.log) == h.path("log")


def test_status_when_nothing_runs(h):
    r = h.cli("status", "--json")
    assert r.rc == 0, r
    data = json.loads(r.out)
    assert data["running"] is False
    assert h.daemon_pids() == set(), "status must not start a daemon"
    assert not h.socket_path.exists()


def test_status_fields_and_metadata_when_running(h):
    assert call_ok(h, "demo.counter") == "1"
    st = running_status(h)
    for key in (
        "pid",
        "socketPath",
        "metadataPath",
        "configPath",
        "startedAt",
        "protocolVersion",
        "fresh",
        "logPath",
        "servers",
    ):
        assert key in st, f"status --json lacks {key!r}: {st!r}"
    assert Path(st["socketPath"]) == h.socket_path
    assert Path(st["metadataPath"]) == h.meta_path
    assert Path(st["configPath"]).resolve() == h.cfg
    assert st["protocolVersion"] == 2
    assert st["fresh"] is True
    assert isinstance(st["startedAt"], (int, float)) and abs(st["startedAt"] / 1000.0 - time.time()) < 600
    demo = [s for s in st["servers"] if s.get("name") == "demo"]
    assert len(demo) == 1, st
    assert demo[0]["connected"] is True
    assert demo[0]["lastUsedAt"]
    assert h.server_pids() == {demo[0]["pid"]}

    meta = h.meta()
    assert meta is not None
    assert meta["pid"] == st["pid"]
    assert str(meta["pidStartTime"]) == str(proc_stat(st["pid"]).start)
    assert meta["protocolVersion"] == 2
    assert Path(meta["socketPath"]) == h.socket_path
    assert Path(meta["configPath"]).resolve() == h.cfg
    assert meta["fingerprint"]
    assert meta["servers"]["demo"]["pid"] == demo[0]["pid"]
    assert str(meta["servers"]["demo"]["pidStartTime"]) == str(proc_stat(demo[0]["pid"]).start)


def test_state_files_are_private(h):
    call_ok(h, "demo.counter")
    assert stat.S_IMODE(h.state_dir.stat().st_mode) & 0o077 == 0
    assert stat.S_ISSOCK(h.socket_path.stat().st_mode)
    for p in (h.socket_path, h.meta_path, h.path("log")):
        if p.exists():
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, f"{p} is mode {p.stat().st_mode:o}"


def test_call_echo_passes_string_argument(h):
    assert call_ok(h, "demo.echo", "text=hello world") == "hello world"


def test_call_tool_error_exits_1(h):
    r = h.cli("call", "demo.fail")
    assert r.rc == 1, r
    assert "Traceback" not in r.err, r
    # The daemon is still healthy after a tool error.
    assert call_ok(h, "demo.counter") == "1"


# ---- state across CLI processes ------------------------------------------


def test_state_persists_across_cli_processes(h):
    assert call_ok(h, "demo.counter") == "1"
    assert call_ok(h, "demo.counter") == "2"
    first = int(call_ok(h, "demo.pid"))
    second = int(call_ok(h, "demo.pid"))
    assert first == second
    assert h.server_pids() == {first}
    st = running_status(h)
    assert h.server_pid_from_status() == first
    assert_one_daemon_tree(h, st["pid"])


# ---- races -----------------------------------------------------------------


def test_race_foreground_starts_leave_one_survivor(h):
    procs = [h.popen("start", "--foreground") for _ in range(8)]
    wait_until(
        lambda: sum(p.poll() is None for p in procs) <= 1,
        30,
        message="all but one `start --foreground` to exit",
    )
    running = [p for p in procs if p.poll() is None]
    assert len(running) == 1, "no foreground daemon survived: %r" % [
        (p.returncode, read_file(p.err_path)) for p in procs
    ]
    survivor = running[0].pid
    for p in procs:
        if p is running[0]:
            continue
        err = read_file(p.err_path)
        assert p.returncode == 0, f"loser exited {p.returncode!r}: {err}"
        assert f"daemon already running (pid {survivor}); not starting another" in err, err

    st = running_status(h)
    assert st["pid"] == survivor
    assert h.meta()["pid"] == survivor
    assert call_ok(h, "demo.counter") == "1"
    assert running[0].poll() is None
    assert_one_daemon_tree(h, survivor)
    assert h.server_pid_from_status() in h.server_pids()


def test_race_detached_starts_launch_one_daemon(h):
    procs = [h.popen_piped("start") for _ in range(8)]
    results = [communicate_text(p, p.text_args, CLI_TIMEOUT) for p in procs]
    for r in results:
        assert r.rc == 0, r
    pids = set(started_pid(r) for r in results)
    assert len(pids) == 1, "start lines name different daemons: %r" % [r.out for r in results]
    daemon = pids.pop()
    starts = [r for r in results if "started (pid" in r.out]
    assert len(starts) == 1, "expected one `started`, the rest `already running`: %r" % [
        r.out for r in results
    ]
    wait_until(
        lambda: h.daemon_pids() == {daemon},
        10,
        message=f"exactly one daemon process {daemon} (now {h.daemon_pids()!r})",
    )
    assert running_status(h)["pid"] == daemon
    assert h.meta()["pid"] == daemon


def test_race_auto_start_by_parallel_calls(h):
    procs = [h.popen_piped("call", "demo.counter") for _ in range(10)]
    results = [communicate_text(p, p.text_args, CLI_TIMEOUT) for p in procs]
    for r in results:
        assert r.rc == 0, r
    values = sorted(int(r.out.strip()) for r in results)
    assert values == list(range(1, 11)), values
    st = running_status(h)
    assert h.meta()["pid"] == st["pid"]
    assert_one_daemon_tree(h, st["pid"])


def test_race_mixed_starts_and_calls(h):
    fg = [h.popen("start", "--foreground") for _ in range(4)]
    others = []
    for _ in range(4):
        others.append(h.popen_piped("start"))
        others.append(h.popen_piped("call", "demo.counter"))
    results = [communicate_text(p, p.text_args, CLI_TIMEOUT) for p in others]
    for r in results:
        assert r.rc == 0, r
    st = running_status(h)
    daemon = st["pid"]
    values = sorted(int(r.out.strip()) for r in results if "call" in r.args)
    assert values == [1, 2, 3, 4], values
    start_pids = set(started_pid(r) for r in results if "start" in r.args)
    assert start_pids == {daemon}, [r.out for r in results if "start" in r.args]
    # Foreground instances that lost exit 0; at most one (the daemon itself) runs on.
    wait_until(
        lambda: all(p.poll() is not None or p.pid == daemon for p in fg),
        30,
        message="losing `start --foreground` instances to exit",
    )
    for p in fg:
        if p.pid != daemon:
            assert p.returncode == 0, f"loser exited {p.returncode!r}: {read_file(p.err_path)}"
    assert h.meta()["pid"] == daemon
    assert_one_daemon_tree(h, daemon)


# ---- freshness -------------------------------------------------------------


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["edit", "edit-same-mtime"])
def test_config_edit_replaces_daemon(h, keep_mtime):
    assert call_ok(h, "demo.counter") == "1"
    old = running_status(h)
    old_pid, old_server = old["pid"], h.server_pid_from_status()
    assert old_server and pid_alive(old_server)

    before = h.cfg.stat()
    data = h.config_data()
    data["mcpServers"]["other"] = {"command": sys.executable, "args": ["-c", "pass"]}
    data["mcpServers"]["demo"]["env"] = {"MD_TEST_EDIT": "1"}
    h.write_config(data)
    if keep_mtime:
        os.utime(str(h.cfg), ns=(before.st_atime_ns, before.st_mtime_ns))
        assert h.cfg.stat().st_mtime_ns == before.st_mtime_ns
    # A stale daemon is stopped (with its MCP servers) before the new one binds.
    assert call_ok(h, "demo.counter") == "1"
    assert not pid_alive(old_pid), f"stale daemon {old_pid} still running"
    assert not pid_alive(old_server), f"stale daemon's MCP server {old_server} still running"
    new = running_status(h)
    assert new["pid"] != old_pid
    assert new["fresh"] is True
    assert h.meta()["pid"] == new["pid"]
    assert_one_daemon_tree(h, new["pid"])


def test_config_touch_keeps_daemon(h):
    assert call_ok(h, "demo.counter") == "1"
    pid = running_status(h)["pid"]
    t = h.cfg.stat().st_mtime + 100
    os.utime(str(h.cfg), (t, t))
    st = running_status(h)
    assert st["fresh"] is True
    assert call_ok(h, "demo.counter") == "2"
    assert running_status(h)["pid"] == pid
    assert_one_daemon_tree(h, pid)


# ---- metadata damage -------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted"])
def test_damaged_metadata_is_repaired(h, damage):
    assert call_ok(h, "demo.counter") == "1"
    old_pid = running_status(h)["pid"]
    old_server = h.server_pid_from_status()
    text = h.meta_path.read_text()
    if damage == "garbage":
        h.meta_path.write_bytes(b"\x00\xffnot json{{")
    elif damage == "truncated":
        h.meta_path.write_text(text[: len(text) // 2])
    else:
        h.meta_path.unlink()

    value = call_ok(h, "demo.counter")
    meta = h.meta()
    assert meta is not None, "metadata not repaired: %r" % (
        h.meta_path.read_bytes() if h.meta_path.exists() else "absent"
    )
    st = running_status(h)
    assert meta["pid"] == st["pid"]
    if st["pid"] == old_pid:
        assert value == "2", "same daemon but the counter restarted"
        assert meta["servers"]["demo"]["pid"] == old_server
    else:
        assert value == "1"
        assert not pid_alive(old_pid), f"old daemon {old_pid} left running beside {st['pid']}"
        assert not pid_alive(old_server)
    assert_one_daemon_tree(h, st["pid"])


# ---- crashes and hangs ------------------------------------------------------


@pytest.mark.parametrize("server", ["exits-on-eof", "ignores-eof"])
def test_sigkilled_daemon_is_replaced(h, server):
    if server == "ignores-eof":
        h.use_stubborn_server()
    assert call_ok(h, "demo.counter") == "1"
    old_pid = running_status(h)["pid"]
    old_server = h.server_pid_from_status()
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(old_pid), 5, message="SIGKILLed daemon to die")

    assert call_ok(h, "demo.counter") == "1"
    new_pid = running_status(h)["pid"]
    assert new_pid != old_pid
    assert h.meta()["pid"] == new_pid
    # The dead daemon's MCP server is not left as an orphan.
    wait_until(lambda: not pid_alive(old_server), 5, message=f"old MCP server {old_server} to exit")
    assert_one_daemon_tree(h, new_pid)


@pytest.mark.parametrize("server", ["exits-on-eof", "ignores-eof"])
def test_stopped_daemon_is_replaced_and_terminated(h, server):
    if server == "ignores-eof":
        h.use_stubborn_server()
    assert call_ok(h, "demo.counter") == "1"
    old_pid = running_status(h)["pid"]
    old_server = h.server_pid_from_status()
    h.sigstop(old_pid)

    assert call_ok(h, "demo.counter") == "1"
    new = running_status(h)
    assert new["pid"] != old_pid
    assert not pid_alive(old_pid), f"hung daemon {old_pid} not terminated"
    wait_until(lambda: not pid_alive(old_server), 5, message="hung daemon's MCP server to exit")
    assert h.meta()["pid"] == new["pid"]
    assert_one_daemon_tree(h, new["pid"])


def test_killed_mcp_server_is_restarted(h):
    assert call_ok(h, "demo.counter") == "1"
    daemon = running_status(h)["pid"]
    server = h.server_pid_from_status()
    assert server and pid_alive(server)
    os.kill(server, signal.SIGKILL)
    wait_until(lambda: not pid_alive(server), 5, message="MCP server to die")

    assert call_ok(h, "demo.counter") == "1"
    new_server = int(call_ok(h, "demo.pid"))
    assert new_server != server
    st = running_status(h)
    assert st["pid"] == daemon
    assert h.server_pid_from_status() == new_server
    assert_one_daemon_tree(h, daemon)


@pytest.mark.parametrize("how", ["sigcont", "sigterm"])
def test_superseded_daemon_never_removes_replacement_files(h, how):
    r = h.cli("start")
    assert r.rc == 0, r
    a = started_pid(r)
    assert call_ok(h, "demo.counter") == "1"
    a_server = h.server_pid_from_status()
    h.meta()

    h.sigstop(a)
    h.socket_path.unlink()
    h.meta_path.unlink()
    r = h.cli("start")
    assert r.rc == 0, r
    b = started_pid(r)
    assert "started" in r.out, r
    assert b != a
    b_inode = h.socket_path.stat().st_ino

    if how == "sigterm":
        os.kill(a, signal.SIGTERM)
    h.sigcont(a)
    # A daemon that lost its socket path exits within 5 s, with its MCP servers.
    wait_until(
        lambda: not pid_alive(a) and not pid_alive(a_server),
        8,
        message=f"superseded daemon {a} and its server {a_server} to exit",
    )

    assert h.socket_path.exists(), "replacement's socket was removed"
    assert h.socket_path.stat().st_ino == b_inode, "replacement's socket was replaced"
    meta = h.meta()
    assert meta is not None, "replacement's metadata was removed"
    assert meta["pid"] == b
    assert running_status(h)["pid"] == b
    assert call_ok(h, "demo.counter") == "1"
    assert_one_daemon_tree(h, b)


# ---- stop ------------------------------------------------------------------


def test_stop_leaves_nothing(h):
    assert call_ok(h, "demo.counter") == "1"
    daemon = running_status(h)["pid"]
    server = h.server_pid_from_status()
    assert h.socket_path.exists() and h.meta_path.exists()

    r = h.cli("stop")
    assert r.rc == 0, r
    assert r.out.strip() or r.err.strip(), "stop printed nothing"
    assert not pid_alive(daemon), f"daemon {daemon} still running after stop"
    assert not pid_alive(server), f"MCP server {server} still running after stop"
    assert h.daemon_pids() == set()
    assert h.server_pids() == set()
    assert not h.socket_path.exists()
    assert not h.meta_path.exists()
    assert h.status()["running"] is False

    r = h.cli("stop")
    assert r.rc == 0, r
    h.expect_no_leftovers = True


# ---- progress and idle budget ------------------------------------------------


def test_progress_frames_keep_long_call_alive_but_silence_trips_budget(h):
    r = h.cli("start")
    assert r.rc == 0, r
    daemon = started_pid(r)
    sock = Path(h.meta()["socketPath"])
    params = {"server": "demo", "tool": "sleep", "args": {"seconds": 3}, "timeoutMs": 20000}

    t0 = time.monotonic()
    resp, req, frames = raw_request(sock, "callTool", params, idle=1.0, progress_ms=250)
    elapsed = time.monotonic() - t0
    assert resp.get("id") == req["id"] and resp.get("ok") is True, resp
    texts = [c.get("text", "") for c in resp["result"].get("content", [])]
    assert any(t.startswith("slept 3") for t in texts), resp
    assert elapsed >= 2.9
    assert all(f[1].get("id") == req["id"] for f in frames)
    assert len(frames) >= 8, f"only {len(frames)} progress frames in {elapsed:.1f}s"
    gaps = [b[0] - a[0] for a, b in zip(frames, frames[1:])]
    assert max(gaps) < 1.0, gaps

    # Same budget, daemon frozen mid-call: the client times out instead of hanging.
    stopped_at = []

    def freeze(n):
        if n == 2 and not stopped_at:
            h.sigstop(daemon)
            stopped_at.append(time.monotonic())

    with pytest.raises(socket.timeout):
        raw_request(sock, "callTool", params, idle=1.0, progress_ms=250, on_frame=freeze)
    assert stopped_at, "never got two progress frames"
    assert time.monotonic() - stopped_at[0] < 2.5

    # A brand-new request to the frozen daemon also trips the budget.
    t0 = time.monotonic()
    with pytest.raises(socket.timeout):
        raw_request(sock, "status", {}, idle=1.0)
    assert time.monotonic() - t0 < 2.5

    # Thawed, the daemon survived its clients going away and still answers.
    h.sigcont(daemon)
    resp, _, _ = raw_request(sock, "status", {}, idle=10.0)
    assert resp.get("ok") is True and resp["result"]["pid"] == daemon, resp


def test_module_client_idle_budget(h, monkeypatch):
    md = _import_module()
    r = h.cli("start")
    assert r.rc == 0, r
    daemon = started_pid(r)
    monkeypatch.setenv("MCPORTER_DAEMON_DIR", str(h.state_dir))
    client = md.DaemonClient(md.DaemonPaths.for_config(str(h.cfg)), "unused-fingerprint", [])
    params = {"server": "demo", "tool": "sleep", "args": {"seconds": 3}, "timeoutMs": 20000}

    t0 = time.monotonic()
    result = client.request("callTool", params, idle_timeout=1.0, progress_ms=250, auto_start=False)
    assert time.monotonic() - t0 >= 2.9
    assert [c.get("text") for c in result["content"]] == ["slept 3"], result

    stopped_at = []

    def freeze():
        h.sigstop(daemon)
        stopped_at.append(time.monotonic())

    timer = threading.Timer(1.0, freeze)
    timer.start()
    try:
        with pytest.raises(md.DaemonTimeout) as info:
            client.request("callTool", params, idle_timeout=1.0, progress_ms=250, auto_start=False)
    finally:
        timer.join()
    assert isinstance(info.value, TimeoutError)
    assert stopped_at and time.monotonic() - stopped_at[0] < 2.5

    h.sigcont(daemon)
    assert client.request("status", {}, idle_timeout=10.0, auto_start=False)["pid"] == daemon


# ---- demo command ----------------------------------------------------------


def test_demo_command_runs_and_cleans_up(h):
    marker = "demo-" + uuid.uuid4().hex
    h.extra_markers.append(marker)
    demo_tmp = h.tmp / "demo-tmp"
    demo_tmp.mkdir()
    env = h.env(TMPDIR=str(demo_tmp))
    env[MARKER_VAR] = marker  # inherited by whatever `demo` starts
    env.pop("MCPORTER_DAEMON_DIR")
    args = [sys.executable, str(MODULE_PATH), "demo"]
    p = spawn(args, env, h.tmp, subprocess.PIPE, subprocess.PIPE)
    h.popens.append(p)
    r = communicate_text(p, args, 90)
    assert r.rc == 0, r
    # The counter tool's output is printed on lines of its own: 1, then 2.
    values = [int(ln.strip()) for ln in r.out.splitlines() if ln.strip().isdigit()]
    assert values[:2] == [1, 2], r
    left = procs_with_env_marker(marker)
    assert not left, "`demo` left processes behind: %r" % [
        f"{pid} {' '.join(proc_cmdline(pid))}" for pid in left
    ]
    assert list(demo_tmp.iterdir()) == [], "`demo` left files behind"
