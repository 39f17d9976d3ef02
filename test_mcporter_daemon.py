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

import base64
import calendar
import collections
import ctypes
import fcntl
import functools
import hashlib
import json
import os
import platform
import plistlib
import py_compile
import random
import re
import shlex
import shutil
import signal
import socket
import stat
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

# Production waits, shortened for the tests through the module's one private setting (see its
# "Production waits" comment). Set before the module is first imported, here and in every process
# a test launches (they inherit it), since it is read once at import. DAEMON_TEST_WAIT_SCALE=1
# runs the suite on production timings.
os.environ.setdefault("DAEMON_TEST_WAIT_SCALE", "0.1")

# The processes the tests launch load the module's bytecode from its cache (__pycache__, ignored
# by git) instead of compiling it on each of the suite's thousand-odd starts (0.1 s of CPU each),
# even where a sandbox sets PYTHONDONTWRITEBYTECODE.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

# Processes the tests launch start with Ctrl-C's default meaning, as from a user's shell. A
# suite run from a background job (bash ignores SIGINT there) or in a pytest-xdist worker may
# itself ignore SIGINT, and an ignored signal stays ignored across exec: the tests of what
# Ctrl-C does would then test nothing.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

HERE = Path(__file__).resolve().parent
MODULE_PATH = HERE / "mcporter_daemon.py"
# The CLI as the tests run it: main() through an import and without site-packages, as the module
# launches its own daemon (``_script_argv``): the bytecode cache serves it, where a script run by
# path compiles the whole file first, and a crowded site-packages (.pth files) costs tens of ms
# per start. The tests of the script form itself run MODULE_PATH. It ends as the command does
# (``_exit_without_teardown``), so every CLI test checks that quick exit too.
CLI_ARGV = [
    sys.executable,
    "-S",
    "-c",
    f"import sys; sys.path.insert(0, {str(HERE)!r}); import mcporter_daemon as m; "
    "m._exit_without_teardown(m.main())",
]
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


# ##########################################################################################
# Harness and shared helpers: /proc inspection, the orphan reaper, the per-test harness, a raw
# socket client, and helpers several sections share.
# ##########################################################################################


# -- process inspection (/proc) --


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


def _proc_strings(pid, name):
    """The NUL-separated strings of /proc/<pid>/<name> (cmdline, environ); [] when gone."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def proc_cmdline(pid):
    return _proc_strings(pid, "cmdline")


def proc_environ(pid):
    return _proc_strings(pid, "environ")


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


# -- orphan reaper --

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


def spawn(args, env, cwd, stdout, stderr, stdin=subprocess.DEVNULL):
    with _SPAWN_LOCK:
        p = subprocess.Popen(args, env=env, cwd=str(cwd), stdin=stdin, stdout=stdout, stderr=stderr)
        _POPENS.append(p)
    return p


# -- test harness --


class Result:
    def __init__(self, args, rc, out, err, elapsed):
        self.args, self.rc, self.out, self.err, self.elapsed = args, rc, out, err, elapsed

    def __repr__(self):
        return "<{} rc={!r} {:.2f}s\n--- stdout ---\n{}\n--- stderr ---\n{}>".format(
            " ".join(self.args), self.rc, self.elapsed, self.out, self.err
        )

    def ok(self):
        """The stripped stdout of a command that must have succeeded."""
        assert self.rc == 0, self
        return self.out.strip()


class Harness:
    """One test's world: its state dir, config file, tag, and every pid it saw."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path.resolve()
        # Short state dir: AF_UNIX paths are limited to 108 bytes on Linux.
        self.state_dir = Path(tempfile.mkdtemp(prefix="md", dir="/tmp"))
        self.tag = "mdtag-" + uuid.uuid4().hex
        self.cfg = self.tmp / "mcporter.json"
        self.home = self.tmp / "home"
        self.home.mkdir()
        self.seen = set()  # (pid, start time) of every process seen, for identity-checked cleanup
        self.stopped = set()
        self.popens = []
        self.expect_no_leftovers = False
        self.extra_markers = []  # env markers of processes started outside this config
        self.stubborn = False
        self.write_config()

    # -- config and paths --

    def demo_server_entry(self, lifecycle="keep-alive", eof_flag=None):
        """The built-in demo server, run through ``python -c`` so that the tag shows in its
        command line. A stubborn one ignores stdin EOF (as some real MCP servers do): it
        only goes away when signalled. ``lifecycle``: the entry's (None: no such key).
        ``eof_flag``: a file it creates when it sees EOF."""
        after = f"open({str(eof_flag)!r}, 'w').close()\n" if eof_flag is not None else ""
        if self.stubborn:
            after += "time.sleep(3600)\n"
        entry = self.demo_server_with(after=after)
        if lifecycle is None:
            entry.pop("lifecycle")
        else:
            entry["lifecycle"] = lifecycle
        return entry

    def demo_server_with(self, before="", after=""):
        """A config entry running the module's demo server, tagged, through an import and
        without site-packages (as ``CLI_ARGV``): ``before`` runs first, ``after`` once it has ended (stdin EOF),
        both Python source with ``sys``, ``signal`` and ``time`` imported."""
        code = (
            "import signal, sys, time\n"
            f"{before}"
            f"sys.path.insert(0, {str(HERE)!r})\n"
            "from mcporter_daemon import main\n"
            "try:\n"
            "    code = main(['_demo-server'])\n"
            "finally:\n"
            f"{textwrap.indent(after, '    ') or '    pass'}\n"
            "sys.exit(code)\n"
        )
        return {"command": sys.executable, "args": ["-S", "-c", code, self.tag], "lifecycle": "keep-alive"}

    def config_data(self):
        return {"mcpServers": {"demo": self.demo_server_entry()}}

    def use_stubborn_server(self):
        self.stubborn = True
        self.write_config()

    def write_config(self, data=None):
        self.cfg.write_text(json.dumps(data if data is not None else self.config_data(), indent=2))

    def configure(self, servers=None, **top):
        """Write a config: the demo server plus ``servers`` (name -> entry), and top-level keys."""
        data = self.config_data()
        data["mcpServers"].update(servers or {})
        data.update(top)
        self.write_config(data)
        return data

    def root_project(self, name="proj", data=None):
        """A project root with ``config/mcporter.json``; the harness now names that config."""
        root = self.tmp / name
        (root / "config").mkdir(parents=True, exist_ok=True)
        self.cfg = root / "config" / "mcporter.json"
        self.write_config(data)
        return root

    def script_server(self, text, *args, python=sys.executable, lifecycle="keep-alive", name="server"):
        """A config entry for a fake MCP server: ``text`` (its source) saved as a script in this
        test's directory, run by ``python`` with ``args`` and the tag last on its command line.
        ``lifecycle`` None: no such key."""
        script = self.tmp / f"{name}.py"
        script.write_text(text)
        entry = {"command": str(python), "args": [str(script), *map(str, args), self.tag]}
        if lifecycle is not None:
            entry["lifecycle"] = lifecycle
        return entry

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
        """This test's environment: its state dir, a private HOME, no ambient setting of this tool
        (config, keep-alive, logging, timeouts, XDG dirs), and ``extra``."""
        env = dict(os.environ)
        for k in (
            "MCPORTER_CONFIG",
            "MCPORTER_KEEPALIVE",
            "MCPORTER_DISABLE_KEEPALIVE",
            "MCPORTER_DAEMON_PROBE_TIMEOUT_MS",
            "MCPORTER_DAEMON_LOG",
            "MCPORTER_DAEMON_LOG_PATH",
            "MCPORTER_DAEMON_LOG_SERVERS",
            "MCPORTER_DAEMON_TIMEOUT_MS",
            "MCPORTER_DEBUG",
            "XDG_STATE_HOME",
        ):
            env.pop(k, None)
        env["MCPORTER_DAEMON_DIR"] = str(self.state_dir)
        # A private HOME: editor configs (~/.cursor/mcp.json, ~/.claude.json …) are imported.
        env["HOME"] = str(self.home)
        env.pop("XDG_CONFIG_HOME", None)
        env[MARKER_VAR] = self.tag
        env.update({k: str(v) for k, v in extra.items()})
        return env

    # -- running the CLI --

    def argv(self, *args):
        return CLI_ARGV + ["--config", str(self.cfg)] + [str(a) for a in args]

    def popen(self, *args, **kw):
        """Start the CLI; stdout/stderr go to files (a daemon may run for long)."""
        return self.popen_argv(self.argv(*args), self.env(**kw))

    def popen_argv(self, argv, env, cwd=None):
        """Start any long-running process, tracked for cleanup, output in files."""
        n = len(self.popens)
        out = open(str(self.tmp / f"p{n}.out"), "w+")  # noqa: SIM115 - closed at cleanup
        err = open(str(self.tmp / f"p{n}.err"), "w+")  # noqa: SIM115 - closed at cleanup
        p = spawn([str(a) for a in argv], env, cwd or self.tmp, out, err)
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

    def run(
        self, *args, argv=None, env=None, cwd=None, timeout=CLI_TIMEOUT, config=True, stdin=None, **env_extra
    ):
        """Run a command to completion, output captured; the one way a test runs a CLI.

        The command is this module's CLI with ``--config`` (``config=False`` leaves that out,
        for discovery and ``--root``) followed by ``args``; ``argv`` replaces that prefix (another
        program: mcporter, a probe script). ``env`` defaults to ``self.env()``; upper-case
        keyword arguments are added to it. ``stdin``: text for the command's stdin (default:
        none). Tracked for cleanup; returns a ``Result``, or fails once ``timeout`` has passed.
        """
        if argv is None:
            argv = self.argv() if config else list(CLI_ARGV)
        argv = [str(a) for a in list(argv) + list(args)]
        assert all(k.isupper() for k in env_extra), f"not environment names: {sorted(env_extra)}"
        env = dict(self.env() if env is None else env)
        env.update({k: str(v) for k, v in env_extra.items()})
        pipe_in = subprocess.DEVNULL if stdin is None else subprocess.PIPE
        p = spawn(argv, env, cwd or self.tmp, subprocess.PIPE, subprocess.PIPE, stdin=pipe_in)
        self.popens.append(p)
        self.track(p.pid)
        return communicate_text(p, argv, timeout, stdin)

    # -- observing --

    def track(self, pid):
        if isinstance(pid, int) and pid > 0:
            st = proc_stat(pid)
            if st is not None:
                self.seen.add((pid, st.start))

    def status(self, *prefix, env=None):
        """``status --json`` for this config, or for the one the flags ``prefix`` name (then
        without ``--config``); the daemon and its servers are tracked."""
        if prefix:
            r = self.run(*prefix, "status", "--json", env=env, config=False)
        else:
            r = self.run("status", "--json", env=env)
        data = json.loads(r.out)
        assert r.rc == (0 if data.get("running") else 3), r  # LSB: 3 is "not running"
        if data.get("running"):
            self.track(data.get("pid"))
            for s in data.get("servers") or []:
                self.track(s.get("pid"))
        return data

    def meta(self):
        try:
            data = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None
        if isinstance(data, dict):
            self.track(data.get("pid"))
            servers = data.get("servers")
            for info in servers.values() if isinstance(servers, dict) else ():
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

    def wait_serving(self, proc, *prefix, env=None):
        """Wait until ``proc`` is the verified daemon; fail at once if it exits first."""

        def serving():
            if proc.poll() is not None:
                raise AssertionError(
                    f"daemon process exited {proc.returncode} before serving: {Path(proc.err_path).read_text()}"
                )
            return self.status(*prefix, env=env).get("pid") == proc.pid

        wait_until(serving, 20, interval=0.05, message=f"pid {proc.pid} to serve")

    def doctor(self, *args, env=None, config=True):
        """``doctor``: its result and finding lines, each checked for the finding format."""
        r = self.run(*args, "doctor", env=env, config=config)
        findings = [ln for ln in r.out.splitlines() if ln.strip()]
        summary = findings.pop() if findings else ""
        fails = sum(ln.startswith("FAIL") for ln in findings)
        assert summary == (f"{fails} problem(s) found." if fails else "All checks passed."), r
        for line in findings:
            assert line.startswith(("ok    ", "warn  ", "FAIL  ")), f"not a finding line: {line!r}\n{r}"
            if line.startswith("FAIL"):
                assert " — fix: " in line, line
            if line.startswith("warn"):
                assert " — " in line, line
        return r, findings

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


def communicate_text(p, args, timeout, stdin=None):
    started = time.monotonic()
    try:
        out, err = p.communicate(None if stdin is None else stdin.encode(), timeout=timeout)
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
    r = h.run("call", *args)
    assert r.rc == 0, r
    return r.out.strip()


def started_pid(result):
    m = PID_LINE.search(result.out)
    assert m, result
    return int(m.group(2))


def start_daemon(h):
    """``start`` the daemon (detached) and return its pid."""
    r = h.run("start")
    assert r.rc == 0, r
    return started_pid(r)


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


def server_pid(status, name="demo"):
    """The pid of server ``name`` in a ``status --json`` answer, or None."""
    for s in status.get("servers") or []:
        if s.get("name") == name:
            return s.get("pid")
    return None


def assert_replaced(h, old_pid, servers=1):
    """The daemon ``old_pid`` was replaced: it is gone, and a verified daemon with another pid
    serves, named by the metadata, with ``servers`` MCP servers, all its children. Returns the
    new daemon's status."""
    st = running_status(h)
    assert st["pid"] != old_pid, f"daemon {old_pid} still serves; it was not replaced"
    assert not pid_alive(old_pid), f"old daemon {old_pid} left running beside {st['pid']}"
    assert h.meta()["pid"] == st["pid"]
    assert_one_daemon_tree(h, st["pid"], servers)
    return st


def running_status(h):
    st = h.status()
    assert st.get("running") is True, st
    return st


# -- raw socket client --


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


# -- shared test helpers --


def warm_daemon(h, stubborn=False):
    """A daemon with its MCP server warm (one that ignores stdin EOF if ``stubborn``):
    (daemon pid, server pid)."""
    if stubborn:
        h.use_stubborn_server()
    assert call_ok(h, "demo.counter") == "1"
    return running_status(h)["pid"], server_pid(h.status())


PROBE_DEFAULT_S = 2.0  # the daemon's default probe timeout (MCPORTER_DAEMON_PROBE_TIMEOUT_MS)


def vm_rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def assert_prompt_error(r, rc, *needles, within=2.0):
    """An immediate failure: exit ``rc`` within ``within`` s, one stderr line naming the cause."""
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    print(f"  error after {r.elapsed:.3f}s (exit {r.rc}): {lines[0] if lines else '(no stderr)'}")
    assert r.rc == rc, r
    assert "Traceback" not in r.err, r
    assert len(lines) == 1, f"expected exactly one line on stderr: {r!r}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not named in the error: {r!r}"
    assert r.elapsed < within, f"error took {r.elapsed:.2f}s, over {within}s: {r!r}"


def read_frames_until_close(s, timeout):
    """Every frame the daemon sends on ``s`` until it closes the connection."""
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"connection neither answered nor closed within {timeout}s: {buf[:200]!r}")
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            chunk = b""
        except socket.timeout:
            continue
        if not chunk:
            break
        buf += chunk
    return [json.loads(line) for line in buf.split(b"\n") if line.strip()]


def send_raw_bytes(path, payload, timeout=15.0):
    """``payload`` as is on a fresh connection; the frames answered before the daemon closed it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(str(path))
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon may stop reading (oversized request) and close first
        return read_frames_until_close(s, timeout)
    finally:
        s.close()


def assert_error_or_closed(frames, what, code=None, rid="any"):
    """At most one frame; if one, ``ok: false`` with a string ``error.code`` (``code`` if given)."""
    assert len(frames) <= 1, f"{what}: more than one frame: {frames!r}"
    if code is not None:
        assert frames, f"{what}: connection closed without the {code!r} error"
    if not frames:
        return
    frame = frames[0]
    assert isinstance(frame, dict) and frame.get("ok") is False, f"{what}: {frame!r}"
    err = frame.get("error") or {}
    assert isinstance(err.get("code"), str) and err["code"], f"{what}: no error.code in {frame!r}"
    assert isinstance(err.get("message"), str) and err["message"], f"{what}: no message in {frame!r}"
    if code is not None:
        assert err["code"] == code, f"{what}: code {err['code']!r}, expected {code!r}: {frame!r}"
    if rid != "any":
        assert frame.get("id") == rid, f"{what}: id {frame.get('id')!r}, expected {rid!r}"


def write_flag(path, text):
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, str(path))


def socket_ino(path):
    try:
        return os.stat(str(path)).st_ino
    except OSError:
        return None


class StatusLatencyPoller:
    """Polls ``status`` on another thread, recording each round trip and the daemon's VmRSS."""

    def __init__(self, sock, daemon):
        self.sock, self.daemon = sock, daemon
        self.latencies, self.failures, self.rss = [], [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-poller", daemon=True)

    def _run(self):
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                resp, _, _ = raw_request(self.sock, "status", {}, idle=5.0)
                if resp.get("ok") is not True or resp["result"]["pid"] != self.daemon:
                    self.failures.append(repr(resp))
            except Exception as exc:
                self.failures.append(repr(exc))
            self.latencies.append(time.monotonic() - t0)
            self.rss.append(vm_rss_kib(self.daemon) or 0)
            self._stop.wait(0.01)  # polling cadence

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(10)

    def summary(self):
        lat = sorted(self.latencies)
        return (
            f"{len(lat)} status requests, max {lat[-1] * 1000:.1f} ms, median {lat[len(lat) // 2] * 1000:.1f} ms"
            if lat
            else "no status requests"
        )

    def assert_responsive(self, limit=1.0, min_polls=10):
        assert not self.failures, f"status failed meanwhile: {self.failures[:5]}"
        assert len(self.latencies) >= min_polls, f"only {len(self.latencies)} status polls ran"
        assert max(self.latencies) < limit, f"status took up to {max(self.latencies):.3f}s"


# -- daemon logs, files and sockets --

LOG_STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z \[(\d+)\] (.*)$")


LOG_TRACE = re.compile(r"^callTool (\S+): ok \(\d+(\.\d+)? ms\)$")


LOG_BOUND = 10 * 1024 * 1024


def wait_exit(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"pid {proc.pid} did not exit within {timeout}s") from None


def log_lines(path):
    try:
        return Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []


def log_events(lines):
    """(pid, message) of every timestamped line; the stamp must be a real, recent UTC time."""
    out = []
    for line in lines:
        m = LOG_STAMP.match(line)
        if m:
            stamp = calendar.timegm(time.strptime(m.group(1)[:19], "%Y-%m-%dT%H:%M:%S"))
            assert abs(stamp - time.time()) < 3600, f"log time stamp is off: {line}"
            out.append((int(m.group(2)), m.group(3)))
    return out


def traced_servers(lines):
    return [m.group(1) for _, msg in log_events(lines) for m in [LOG_TRACE.match(msg)] if m]


def flag_value(argv, flag):
    assert argv.count(flag) == 1, f"{flag} should appear once in {argv}"
    return argv[argv.index(flag) + 1]


def has_run(argv, run):
    return any(argv[i : i + len(run)] == run for i in range(len(argv)))


def file_mode(path):
    return stat.S_IMODE(os.stat(str(path)).st_mode)


def socket_listeners(path):
    """How many listening AF_UNIX sockets are bound to ``path`` right now (/proc/net/unix)."""
    n = 0
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.rstrip("\n").split(None, 7)
            if len(parts) == 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
                n += 1
    return n


# -- doctor output --


def finding(findings, kind, *parts):
    hits = [ln for ln in findings if ln.startswith(kind) and all(p in ln for p in parts)]
    assert hits, f"no {kind!r} finding with {parts!r} in:\n" + "\n".join(findings)
    return hits[0]


# ##########################################################################################
# Paths: where a daemon's files live, their safety checks, and the script's own identity.
# ##########################################################################################


def test_paths_match_contract(h, monkeypatch):
    md = _import_module()
    monkeypatch.setenv("MCPORTER_DAEMON_DIR", str(h.state_dir))
    paths = md.DaemonPaths.for_config(str(h.cfg))
    assert Path(paths.socket) == h.socket_path
    assert Path(paths.metadata) == h.meta_path
    assert Path(paths.lock) == h.path("lock")
    assert Path(paths.bind) == h.path("bind")
    assert Path(paths.log) == h.path("log")


def test_state_files_are_private(h):
    call_ok(h, "demo.counter")
    assert stat.S_IMODE(h.state_dir.stat().st_mode) & 0o077 == 0
    assert stat.S_ISSOCK(h.socket_path.stat().st_mode)
    for p in (h.socket_path, h.meta_path, h.path("log")):
        if p.exists():
            assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, f"{p} is mode {p.stat().st_mode:o}"


NOBODY_UID = 65534


# Exec argv[1:] as uid/gid 65534 with no supplementary groups (the wrapper runs as root); a
# failed exec names the interpreter and the error (nobody_python says which interpreter).
AS_NOBODY = (
    "import os, sys\n"
    "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
    "try:\n"
    "    os.execv(sys.argv[1], sys.argv[1:])\n"
    "except OSError as exc:\n"
    "    sys.exit(f'as uid 65534, cannot exec {sys.argv[1]!r}: {exc!r}')\n"
)


CONNECT_PROBE = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
    "try:\n"
    "    s.connect(sys.argv[1])\n"
    "    print('connected')\n"
    "except OSError as exc:\n"
    "    print(type(exc).__name__, exc.errno)\n"
)


@pytest.mark.parametrize("unsafe", ["mode-0777", "other-owner"])
def test_unsafe_state_dir_is_refused(h, unsafe):
    if unsafe == "other-owner":
        if os.getuid() != 0:
            pytest.skip("giving the state dir another owner needs root")
        os.chown(str(h.state_dir), NOBODY_UID, NOBODY_UID)
        needles = (str(h.state_dir), f"owned by uid {NOBODY_UID}")
    else:
        os.chmod(str(h.state_dir), 0o777)
        needles = (str(h.state_dir), "0777")
    r = h.run("call", "demo.echo", "text=x")
    assert_prompt_error(r, 2, *needles)
    assert h.daemon_pids() == set()
    assert not h.socket_path.exists()


# -- run as another user (root only) --
def world_executable(path):
    """True when any user can reach and run ``path``: o+x on the file and every directory above it."""
    real = os.path.realpath(path)
    parts = [real] + [str(d) for d in Path(real).parents]
    try:
        return all(os.stat(d).st_mode & stat.S_IXOTH for d in parts)
    except OSError:
        return False


@functools.cache
def nobody_python():
    """An interpreter uid 65534 can run our module with, or skip.

    A system interpreter comes first: CI's pyenv Python lives under /root, which is 0700 here
    and was seen to turn unreachable for uid 65534 between one test and the next, so it is
    only a last resort, and only when every directory above it is world-searchable."""
    if os.getuid() != 0:
        pytest.skip("running as another user (uid 65534) needs root")
    tried = []
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3", sys.executable):
        if not os.path.exists(cand):
            continue
        if not world_executable(cand):
            tried.append(f"{cand}: a directory above it is closed to other users")
            continue
        done = subprocess.run(
            [sys.executable, "-c", AS_NOBODY, cand, str(MODULE_PATH), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode == 0:
            return cand
        tried.append(f"{cand}: {done.stderr.strip()[-200:]}")
    pytest.skip("no Python that uid 65534 can run our module with: " + "; ".join(tried))


def nobody_cli(home):
    """The CLI as uid 65534, from that user's cached bytecode of a copy of the module in
    ``home`` (a directory it owns), as an installed command runs: a timed run then measures
    the tool, not a compile of the whole file under the suite's load."""
    py = nobody_python()
    copy = os.path.join(str(home), "mcporter_daemon.py")
    shutil.copy(str(MODULE_PATH), copy)
    os.chown(copy, NOBODY_UID, NOBODY_UID)
    launcher = f"import sys; sys.path.insert(0, {str(home)!r}); import mcporter_daemon; sys.exit(mcporter_daemon.main())"
    argv = [sys.executable, "-c", AS_NOBODY, py, "-c", launcher]
    env = dict(os.environ, HOME=str(home))
    done = subprocess.run(argv + ["--version"], capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0 and os.path.isdir(os.path.join(str(home), "__pycache__")), done
    return argv


def run_as_nobody_with_long_dir(h, fallback):
    """``call`` as uid 65534 with a 150-byte MCPORTER_DAEMON_DIR, after making the fallback
    socket dir /tmp/mcporter-65534 unusable (``fallback``: "file", "dir-0777", or "symlink" to
    a private directory of uid 65534, which would pass every check made through the link)."""
    fb = f"/tmp/mcporter-{NOBODY_UID}"
    if os.path.lexists(fb):
        pytest.skip(f"{fb} exists already; not ours to change")
    top = tempfile.mkdtemp(prefix="md3n", dir="/tmp")
    made_fb = False
    try:
        os.chmod(top, 0o755)
        long_dir = os.path.join(top, "n" * (150 - len(top) - 1))
        assert len(os.fsencode(long_dir)) == 150
        os.mkdir(long_dir, 0o700)
        os.chown(long_dir, NOBODY_UID, NOBODY_UID)
        cfg = os.path.join(long_dir, "mcporter.json")
        with open(cfg, "w") as f:
            json.dump(h.config_data(), f)
        os.chown(cfg, NOBODY_UID, NOBODY_UID)
        if fallback == "file":
            with open(fb, "x"):
                pass
        elif fallback == "symlink":
            target = os.path.join(top, "planted")
            os.mkdir(target, 0o700)
            os.chown(target, NOBODY_UID, NOBODY_UID)
            os.symlink(target, fb)
        else:
            os.mkdir(fb)
            os.chown(fb, NOBODY_UID, NOBODY_UID)
            os.chmod(fb, 0o777)
        made_fb = True
        key = hashlib.sha1(cfg.encode()).hexdigest()[:12]
        preferred = os.path.join(long_dir, f"daemon-{key}.sock")
        argv = nobody_cli(long_dir) + ["--config", cfg, "call", "demo.echo", "text=x"]
        r = h.run(argv=argv, env=h.env(MCPORTER_DAEMON_DIR=long_dir, HOME=long_dir), cwd=long_dir)
        return r, preferred, fb
    finally:
        if made_fb:
            if os.path.isdir(fb) and not os.path.islink(fb):
                shutil.rmtree(fb, ignore_errors=True)
            else:
                os.unlink(fb)
        shutil.rmtree(top, ignore_errors=True)


def test_socket_path_too_long_without_fallback_is_named(h):
    r, preferred, fb = run_as_nobody_with_long_dir(h, "file")
    assert_prompt_error(r, 2, preferred, "limit of 107", fb)


def test_state_files_private_under_permissive_umask(h):
    state = h.state_dir / "made-by-daemon"  # created by the module, not by the harness
    env = h.env(MCPORTER_DAEMON_DIR=str(state))
    argv = ["/bin/sh", "-c", 'umask 000 && exec "$@"', "sh"] + h.argv("call", "demo.counter")
    r = h.run(argv=argv, env=env)
    assert r.rc == 0 and r.out.strip() == "1", r
    sock = state / f"daemon-{h.key}.sock"
    files = {"socket": sock, "metadata": state / f"daemon-{h.key}.json", "log": state / f"daemon-{h.key}.log"}
    modes = {name: stat.S_IMODE(p.stat().st_mode) for name, p in files.items()}
    dir_mode = stat.S_IMODE(state.stat().st_mode)
    print(
        f"\n  modes under umask 000: dir {dir_mode:04o}, "
        + ", ".join(f"{k} {v:04o}" for k, v in modes.items())
    )
    assert dir_mode == 0o700, f"state dir is {dir_mode:04o}"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    for name, mode in modes.items():
        assert mode & 0o077 == 0, f"{name} {files[name]} is mode {mode:04o}"
    assert modes["metadata"] == 0o600 and modes["log"] == 0o600, modes

    # Another user cannot connect; the same probe as us can (so the probe itself works).
    r = h.run(argv=[sys.executable, "-c", CONNECT_PROBE, sock], env=env)
    assert r.rc == 0 and r.out.strip() == "connected", r
    py = nobody_python()
    r = h.run(argv=[sys.executable, "-c", AS_NOBODY, py, "-c", CONNECT_PROBE, sock], env=env, cwd="/")
    assert r.rc == 0, r
    assert r.out.strip().startswith("PermissionError"), f"uid {NOBODY_UID} could connect: {r!r}"
    r = h.run("stop", env=env)
    assert r.rc == 0, r


def fallback_socket_path(state_dir, key):
    """The /tmp fallback socket of ``state_dir`` and config ``key``: keyed by both, so two state
    dirs never share a daemon."""
    raw = os.fsencode(os.path.abspath(str(state_dir))) + b"\0" + key.encode()
    return f"/tmp/mcporter-{os.getuid()}/{hashlib.sha1(raw).hexdigest()[:16]}.sock"


def test_long_state_dir_uses_tmp_fallback_socket(h):
    uid = os.getuid()
    fb = f"/tmp/mcporter-{uid}"
    existed = os.path.exists(fb)
    long_dir = str(h.state_dir / ("L" * (150 - len(str(h.state_dir)) - 1)))
    assert len(os.fsencode(long_dir)) == 150
    env = h.env(MCPORTER_DAEMON_DIR=long_dir)
    expected = fallback_socket_path(long_dir, h.key)
    try:
        r = h.run("call", "demo.counter", env=env)
        assert r.rc == 0 and r.out.strip() == "1", r
        r = h.run("call", "demo.counter", env=env)
        assert r.rc == 0 and r.out.strip() == "2", r
        meta = json.loads(Path(long_dir, f"daemon-{h.key}.json").read_text())
        assert meta["socketPath"] == expected, meta
        r = h.run("status", "--json", env=env)
        st = json.loads(r.out)
        assert st["running"] is True and st["socketPath"] == expected, st
        assert stat.S_ISSOCK(os.stat(expected).st_mode)
        assert not os.path.exists(os.path.join(long_dir, f"daemon-{h.key}.sock"))
        fb_st = os.stat(fb)
        assert fb_st.st_uid == uid and stat.S_IMODE(fb_st.st_mode) & 0o077 == 0, oct(fb_st.st_mode)
        daemon, server = st["pid"], st["servers"][0]["pid"]
        h.track(daemon)
        h.track(server)

        r = h.run("stop", env=env)
        assert r.rc == 0, r
        assert not pid_alive(daemon) and not pid_alive(server)
        assert not os.path.exists(expected), "stop left the fallback socket behind"
        assert not Path(long_dir, f"daemon-{h.key}.json").exists()
    finally:
        if os.path.exists(expected):
            os.unlink(expected)
        if not existed:
            try:
                os.rmdir(fb)  # only if empty: others may use it meanwhile
            except OSError:
                pass


def test_unsafe_fallback_socket_dir_is_refused(h):
    r, _, fb = run_as_nobody_with_long_dir(h, "dir-0777")
    assert_prompt_error(r, 2, fb, "0777")


def test_non_utf8_config_path_and_state_dir_work(h):
    state = os.fsdecode(os.fsencode(str(h.state_dir)) + b"/state-\xff")
    h.cfg = Path(os.fsdecode(os.fsencode(str(h.tmp)) + b"/cfg-\xfe.json"))
    h.write_config()
    env = h.env(MCPORTER_DAEMON_DIR=state)

    def run(*words):
        return h.run(*words, env=env, timeout=20)

    for expected in ("1", "2"):
        r = run("call", "demo.counter")
        assert r.rc == 0 and r.out.strip() == expected, r
    r = run("status", "--json")
    assert r.rc == 0, r
    st = json.loads(r.out)
    assert st["running"] is True and st["fresh"] is True, st
    daemon, server = st["pid"], st["servers"][0]["pid"]
    h.track(daemon)
    h.track(server)
    assert os.path.isdir(state) and any(n.endswith(".sock") for n in os.listdir(state))
    r = run("stop")
    assert r.rc == 0 and f"stopped (pid {daemon})" in r.out, r
    assert not pid_alive(daemon) and not pid_alive(server)


def test_two_state_dirs_never_share_a_fallback_socket_daemon(h):
    dirs = [str(h.state_dir / (c * (150 - len(str(h.state_dir)) - 1))) for c in "AB"]
    envs = [h.env(MCPORTER_DAEMON_DIR=d) for d in dirs]
    sockets = [fallback_socket_path(d, h.key) for d in dirs]

    def run(i, *words):
        return h.run(*words, env=envs[i], timeout=20)

    try:
        assert run(0, "call", "demo.counter").ok() == "1"
        r = run(1, "status", "--json")
        assert r.rc == 3 and json.loads(r.out)["running"] is False, r
        assert run(1, "call", "demo.counter").ok() == "1", "the second state dir adopted the first's daemon"
        a, b = (json.loads(run(i, "status", "--json").ok()) for i in (0, 1))
        assert a["pid"] != b["pid"] and {a["socketPath"], b["socketPath"]} == set(sockets), (a, b)
        h.track(a["pid"])
        h.track(b["pid"])
        assert "stopped" in run(1, "stop").ok()
        assert pid_alive(a["pid"]) and not pid_alive(b["pid"])
        assert run(0, "call", "demo.counter").ok() == "2"
        assert "stopped" in run(0, "stop").ok()
    finally:
        for path in sockets:
            if os.path.exists(path):
                os.unlink(path)


def test_fallback_socket_dir_that_is_a_symlink_is_refused(h):
    r, _, fb = run_as_nobody_with_long_dir(h, "symlink")
    assert_prompt_error(r, 2, fb, "symbolic link")


def test_read_only_state_dir_is_named_in_one_line(h):
    """A state directory the caller cannot write is one line naming it and why, exit 2, at
    once, for `call` and `start`; `status` (which writes nothing) still answers."""
    top = Path(tempfile.mkdtemp(prefix="mdro", dir="/tmp"))
    state = top / "state"
    try:
        os.chmod(str(top), 0o755)
        state.mkdir(mode=0o700)
        cfg = top / "mcporter.json"
        cfg.write_text(json.dumps(h.config_data()))
        argv = [sys.executable, MODULE_PATH, "--config", cfg]
        if os.getuid() == 0:  # root writes anywhere: the directory is read-only for its owner
            for path in (top, state, cfg):
                os.chown(str(path), NOBODY_UID, NOBODY_UID)
            argv = nobody_cli(top) + ["--config", cfg]
        os.chmod(str(state), 0o500)
        env = h.env(MCPORTER_DAEMON_DIR=str(state), HOME=str(top))
        for words in (["call", "demo.echo", "text=x"], ["start"]):
            r = h.run(*words, argv=argv, env=env, cwd=top)
            assert_prompt_error(r, 2, str(state), "read-only")
        r = h.run("status", argv=argv, env=env, cwd=top)
        assert r.rc == 3 and r.out.startswith("not running"), r  # LSB: 3 is "not running"
        assert os.listdir(str(state)) == []
    finally:
        if state.exists():
            os.chmod(str(state), 0o700)
        shutil.rmtree(str(top), ignore_errors=True)


def _module_copy(path, name):
    """The module as it would be loaded from ``path``: its own globals (digest caches included)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def file_identity(path):
    """What the module vouches for a file by: device, inode, size, mtime and ctime."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def wait_settled(path, seconds):
    """Until ``path`` was last changed more than ``seconds`` ago (its ctime)."""
    wait_until(
        lambda: time.time_ns() - path.stat().st_ctime_ns > seconds * 1e9, seconds + 5, message="ctime to age"
    )


def test_recorded_script_version_is_adopted_only_for_the_file_the_daemon_hashed(tmp_path):
    """A client may take the daemon's recorded script digest instead of hashing the script
    only while the file's identity (device, inode, size, mtime, ctime) is the one hashed."""
    script = tmp_path / "mcporter_daemon.py"
    shutil.copy(str(MODULE_PATH), str(script))
    daemon = _module_copy(script, "md_daemon_side")
    daemon._SCRIPT_RACY_SECONDS = 3600.0  # the file was just written: never vouched for
    version = daemon._script_version()
    assert daemon._SCRIPT_FILE == []
    daemon._SCRIPT_DIGEST.clear()
    daemon._SCRIPT_RACY_SECONDS = 0.05
    wait_settled(script, 0.2)
    assert daemon._script_version() == version
    st = script.stat()
    assert [file_identity(script)] == daemon._SCRIPT_FILE
    record = {"scriptVersion": version, "scriptFile": daemon._SCRIPT_FILE[0]}

    for wrong in (
        {"scriptVersion": version},
        {"scriptVersion": "9.9.9+" + version.split("+")[1], "scriptFile": record["scriptFile"]},
        {"scriptVersion": version, "scriptFile": record["scriptFile"][:4] + [1]},
        None,
    ):
        other = _module_copy(script, "md_client_wrong")
        assert other._adopt_script_version(wrong) is False, wrong
        assert other._SCRIPT_DIGEST == []
    client = _module_copy(script, "md_client_same")
    assert client._adopt_script_version(record) is True
    assert client._script_version() == version

    # The same size and the mtime put back: only the ctime tells, and it does.
    client = _module_copy(script, "md_client_edited")
    data = script.read_bytes()
    edited = data.replace(b"# A file changed this recently", b"# a file changed this recently", 1)
    assert len(edited) == len(data) and edited != data
    script.write_bytes(edited)
    os.utime(str(script), ns=(st.st_atime_ns, st.st_mtime_ns))
    after = script.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert client._adopt_script_version(record) is False
    assert client._script_version() != version


def test_script_hashed_while_racy_is_vouched_for_once_settled_and_an_edit_never(tmp_path):
    """A daemon that hashed its file within seconds of a write (an upgrade by copy, then a
    call) vouches for it later, once the file has settled and still holds those bytes, as it
    does for the file rewritten with the same bytes; a file edited meanwhile is never vouched
    for, and is not hashed again each tick."""
    script = tmp_path / "mcporter_daemon.py"
    shutil.copy(str(MODULE_PATH), str(script))
    daemon = _module_copy(script, "md_daemon_racy")
    daemon._SCRIPT_RACY_SECONDS = 3600.0  # as if hashed the moment after the copy
    version = daemon._script_version()
    assert daemon._SCRIPT_FILE == [] and daemon._vouch_for_script_now() is False
    daemon._SCRIPT_RACY_SECONDS = 0.3
    wait_settled(script, 0.5)
    assert daemon._vouch_for_script_now() is True
    assert [file_identity(script)] == daemon._SCRIPT_FILE
    assert daemon._script_version() == version and daemon._vouch_for_script_now() is False

    # Rewritten with the same bytes (a reinstall): a new identity, vouched for once settled.
    script.write_bytes(script.read_bytes())
    assert daemon._vouch_for_script_now() is False  # racy still
    wait_settled(script, 0.5)
    assert daemon._vouch_for_script_now() is True
    assert [file_identity(script)] == daemon._SCRIPT_FILE

    edited = _module_copy(script, "md_daemon_edited")
    edited._SCRIPT_RACY_SECONDS = 3600.0
    edited._script_version()
    script.write_bytes(script.read_bytes() + b"# edited\n")
    assert edited._vouch_for_script_now() is False  # still racy
    edited._SCRIPT_RACY_SECONDS = 0.3
    wait_settled(script, 0.5)
    hashed = []
    real_hash = edited._hash_script
    edited._hash_script = lambda: hashed.append(1) or real_hash()
    assert [edited._vouch_for_script_now() for _ in range(3)] == [False] * 3
    assert edited._SCRIPT_FILE == [] and len(hashed) == 1


def test_daemon_vouches_for_its_script_after_an_upgrade_and_a_same_bytes_rewrite(h):
    """The usual upgrade: copy the new script, call at once. The daemon it starts could not
    vouch for a file written that moment; it does so once the file settles, so the calls that
    follow take its digest instead of hashing the script themselves, from the same daemon.
    The same after a reinstall of the same bytes."""
    md = _import_module()
    script = h.tmp / "copy" / "mcporter_daemon.py"
    script.parent.mkdir()
    shutil.copy(str(MODULE_PATH), str(script))
    argv = [sys.executable, str(script), "--config", str(h.cfg)]
    r = h.run("call", "demo.counter", argv=argv)
    assert r.rc == 0 and r.out.strip() == "1", r
    first = h.meta()
    assert "scriptFile" not in first  # written just now: not yet safe to vouch for
    # Then a reinstall of the same version, which rewrites the same bytes: the daemon stays.
    for count, rewrite in [(2, False), (3, True)]:
        if rewrite:
            script.write_bytes(script.read_bytes())
        identity = file_identity(script)
        wait_until(
            lambda i=identity: (h.meta() or {}).get("scriptFile") == i,
            md._SCRIPT_RACY_SECONDS + 5,
            message=f"the daemon to vouch for its script (rewritten: {rewrite})",
        )
        r = h.run("call", "demo.counter", argv=argv)
        assert r.rc == 0 and r.out.strip() == str(count) and h.meta()["pid"] == first["pid"], r


def test_edited_script_keeping_size_and_mtime_still_makes_the_daemon_stale(h):
    """A warm call skips hashing the script when the daemon's record vouches for the file;
    an edit that keeps its size and puts its mtime back still makes the next call replace
    the daemon, as any edit of the script does."""
    md = _import_module()
    script = h.tmp / "copy" / "mcporter_daemon.py"
    script.parent.mkdir()
    shutil.copy(str(MODULE_PATH), str(script))
    argv = [sys.executable, str(script), "--config", str(h.cfg)]
    wait_settled(script, md._SCRIPT_RACY_SECONDS + 0.2)  # one changed just now is not vouched for
    r = h.run("call", "demo.counter", argv=argv)
    assert r.rc == 0 and r.out.strip() == "1", r
    first, st = h.meta(), script.stat()
    assert first["scriptFile"] == file_identity(script)
    r = h.run("call", "demo.counter", argv=argv)
    assert r.rc == 0 and r.out.strip() == "2" and h.meta()["pid"] == first["pid"], r

    data = script.read_bytes()
    edited = data.replace(b"# A file changed this recently", b"# a file changed this recently", 1)
    assert len(edited) == len(data) and edited != data
    script.write_bytes(edited)
    os.utime(str(script), ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (script.stat().st_size, script.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    r = h.run("call", "demo.counter", argv=argv)
    assert r.rc == 0 and r.out.strip() == "1", r  # a new daemon, so a new demo server
    second = h.meta()
    assert second["pid"] != first["pid"] and second["scriptVersion"] != first["scriptVersion"]


# ##########################################################################################
# Wire protocol: newline-delimited JSON frames, one request per connection (mcporter v2).
# ##########################################################################################


def _req_line(obj):
    return (json.dumps(obj) + "\n").encode()


# (what, payload, code, rid): what the daemon must answer to one bad line, if anything (code
# None: an error of any code or a closed connection; rid: the id the error carries, "any":
# unchecked).
BAD_INPUT_CASES = [
    ("non-JSON", b"this is not json\n", "invalid_json", None),
    ("invalid UTF-8", b"\xff\xfe\x00\xc3(\n", "invalid_json", None),
    ("empty line", b"\n", None, None),
    ("JSON array", b"[1, 2, 3]\n", "bad_request", None),
    ("JSON string", b'"status"\n', "bad_request", None),
    ("JSON null", b"null\n", "bad_request", None),
    ("deep nesting", b"[" * 200000 + b"]" * 200000 + b"\n", None, "any"),
    ("unknown method", _req_line({"id": "u1", "method": "no.such", "params": {}}), "unknown_method", "u1"),
    ("method not a string", _req_line({"id": "m1", "method": 5}), "bad_request", "m1"),
    ("params a list", _req_line({"id": "p1", "method": "status", "params": [1]}), "bad_request", "p1"),
    (
        "bad protocolVersion",
        _req_line({"id": "v1", "method": "status", "protocolVersion": "2"}),
        "bad_request",
        "v1",
    ),
    (
        "callTool server=5 args='x'",
        _req_line({"id": "t1", "method": "callTool", "params": {"server": 5, "tool": "echo", "args": "x"}}),
        "bad_request",
        "t1",
    ),
    (
        "callTool args='x'",
        _req_line(
            {
                "id": "t2",
                "method": "callTool",
                "params": {"server": "demo", "tool": "echo", "args": "x"},
            }
        ),
        "bad_request",
        "t2",
    ),
    (
        "callTool tool=list",
        _req_line({"id": "t3", "method": "callTool", "params": {"server": "demo", "tool": ["echo"]}}),
        "bad_request",
        "t3",
    ),
    (
        "callTool timeoutMs string",
        _req_line(
            {
                "id": "t4",
                "method": "callTool",
                "params": {"server": "demo", "tool": "echo", "args": {}, "timeoutMs": "soon"},
            }
        ),
        "bad_request",
        "t4",
    ),
    (
        "callTool rawFlags of numbers",
        _req_line(
            {
                "id": "t4f",
                "method": "callTool",
                "params": {"server": "demo", "tool": "echo", "rawFlags": {"a": 1}},
            }
        ),
        "bad_request",
        "t4f",
    ),
    (
        "callTool rawPositional not a list of strings",
        _req_line(
            {
                "id": "t4p",
                "method": "callTool",
                "params": {"server": "demo", "tool": "echo", "rawPositional": [1]},
            }
        ),
        "bad_request",
        "t4p",
    ),
    (
        "readResource uri=7",
        _req_line({"id": "t5", "method": "readResource", "params": {"server": "demo", "uri": 7}}),
        "bad_request",
        "t5",
    ),
    (
        "listTools server=null",
        _req_line({"id": "t6", "method": "listTools", "params": {"server": None}}),
        "bad_request",
        "t6",
    ),
    (
        "unknown server",
        _req_line({"id": "t7", "method": "callTool", "params": {"server": "nope", "tool": "x"}}),
        "unknown_server",
        "t7",
    ),
    ("id an object", _req_line({"id": {"a": 1}, "method": "no.such"}), "unknown_method", None),
    (
        "missing id, bad params",
        _req_line({"method": "callTool", "params": {"server": 5}}),
        "bad_request",
        None,
    ),
]


@pytest.fixture(scope="module")
def bad_input_daemon(tmp_path_factory):
    """One daemon for the bad-input table and its memory and latency check: its own temp state
    dir and config, its processes ended by pid at module end."""
    h = Harness(tmp_path_factory.mktemp("bad-input"))
    try:
        daemon = start_daemon(h)
        assert call_ok(h, "demo.echo", "text=warm") == "warm"
        yield types.SimpleNamespace(h=h, pid=daemon, sock=h.socket_path)
    finally:
        h.cleanup()


@pytest.mark.parametrize(
    "what, payload, code, rid", BAD_INPUT_CASES, ids=[c[0].replace(" ", "-") for c in BAD_INPUT_CASES]
)
def test_bad_socket_input_is_answered(bad_input_daemon, what, payload, code, rid):
    assert_error_or_closed(send_raw_bytes(bad_input_daemon.sock, payload), what, code=code, rid=rid)
    assert pid_alive(bad_input_daemon.pid), f"{what}: the daemon died"


def test_status_without_id_gets_exactly_one_answer(bad_input_daemon):
    # A valid request without an id (and without protocolVersion) gets exactly one answer.
    frames = send_raw_bytes(bad_input_daemon.sock, b'{"method": "status"}\n')
    assert len(frames) == 1 and frames[0].get("ok") is True and frames[0].get("id") is None, frames


def test_bad_socket_input_keeps_status_fast_and_memory_bounded(bad_input_daemon):
    h, daemon, sock = bad_input_daemon.h, bad_input_daemon.pid, bad_input_daemon.sock
    rss_before = vm_rss_kib(daemon)

    poller = StatusLatencyPoller(sock, daemon)
    idle_conns = []
    try:
        poller.start()
        # Slow clients: some send nothing, some half a line; they must not block anyone.
        opened = time.monotonic()
        for i in range(40):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle_conns.append(s)
            s.settimeout(5)
            s.connect(str(sock))
            if i % 2:
                s.sendall(b'{"id": "half", "method": "sta')

        for what, payload, code, rid in BAD_INPUT_CASES:
            assert_error_or_closed(send_raw_bytes(sock, payload), what, code=code, rid=rid)

        # A valid request without an id (and without protocolVersion) gets exactly one answer.
        frames = send_raw_bytes(sock, b'{"method": "status"}\n')
        assert len(frames) == 1 and frames[0].get("ok") is True and frames[0].get("id") is None, frames

        # 40 MiB on one line: answered request_too_large, connection closed.
        big = b'{"id": "big", "method": "status", "params": {"pad": "' + b"a" * (40 << 20) + b'"}}\n'
        t0 = time.monotonic()
        frames = send_raw_bytes(sock, big, timeout=60.0)
        big_took = time.monotonic() - t0
        del big
        assert_error_or_closed(frames, "40 MiB request", code="request_too_large")
        rss_after_big = vm_rss_kib(daemon)

        # The slow clients are dropped once the request deadline passes.
        deadline = _import_module()._REQUEST_READ_DEADLINE
        for s in idle_conns:
            left = opened + deadline + 5.0 - time.monotonic()
            assert_error_or_closed(read_frames_until_close(s, max(left, 0.1)), "slow client")
        dropped_after = time.monotonic() - opened
    finally:
        poller.stop()
        for s in idle_conns:
            s.close()

    rss_after = vm_rss_kib(daemon)
    peak = max(poller.rss + [rss_after_big or 0])
    print(f"\n  status during abuse: {poller.summary()}")
    print(
        f"  daemon VmRSS: before {rss_before / 1024:.1f} MiB, peak while abused {peak / 1024:.1f} MiB, "
        f"after {rss_after / 1024:.1f} MiB; 40 MiB request refused in {big_took:.2f}s; "
        f"slow clients dropped by {dropped_after:.1f}s"
    )
    poller.assert_responsive(1.0)
    assert peak - rss_before < 200 * 1024, f"RSS grew {(peak - rss_before) / 1024:.0f} MiB"

    assert pid_alive(daemon)
    assert running_status(h)["pid"] == daemon
    assert call_ok(h, "demo.echo", "text=still serving") == "still serving"
    assert_one_daemon_tree(h, daemon)


def test_lone_surrogate_result_is_answered_once(h):
    runs = h.tmp / "lone-runs"
    h.configure({"odd": misbehaving_entry(h, runs=runs)})
    r = h.run("call", "odd.lone", timeout=30)
    assert r.rc == 0, r
    assert r.out.strip() == "cut \\ud83d here", r
    r = h.run("call", "--json", "odd.lone", timeout=30)
    assert r.rc == 0 and "\\ud83d" in r.out, r
    assert runs.read_text().splitlines() == ["ran", "ran"], "a tool ran more than once per call"


@pytest.mark.parametrize(
    "params, expected",
    [
        (
            {"progressToken": 1, "progress": 2, "total": 4, "message": "m"},
            {"progress": 2, "total": 4, "message": "m"},
        ),
        ({"progressToken": 1, "progress": 0.5}, {"progress": 0.5}),
        ({"progressToken": 1, "progress": True}, None),  # a bool is no number
        ({"progressToken": 1, "progress": "3"}, None),
        (
            {"progressToken": 1, "progress": 1, "total": "9", "message": 5},
            {"progress": 1},
        ),  # bad extras dropped
        ({"progressToken": 1, "progress": float("nan")}, None),  # Python's json reads NaN
        ({"progressToken": 1, "progress": 1, "total": float("inf")}, {"progress": 1}),
        (None, None),
    ],
)
def test_progress_update_table(params, expected):
    assert _import_module().progress_update(params) == expected


# Each: text json.loads reads (or refuses); ``_json_loads`` must read it (or refuse it) alike.
JSON_LOADS_CASES = [
    '{"a": [1, 2.5, -3e2, true, false, null], "b": {"c": "d"}}',
    '  \t\r\n{"x": 1}\n ',
    '"\\ud800 lone surrogate"',
    "[NaN, Infinity, -Infinity]",
    "123456789012345678901234567890",
    '{"k": "\u00e9\u4e2d"}',
    b'{"id": "b", "ok": true, "result": {"pid": 12}}',
    b'\xef\xbb\xbf{"bom": 1}',
    '\ufeff{"bom": 1}',
    "",
    "{",
    '{"a": 1} {"b": 2}',
    '{"a": 1,}',
    "[1, 2",
    b"\xff\xfe",
    '"\x01 control"',
    "0" * 5000,
]


def _nested(value, levels, kind=list):
    for _ in range(levels):
        value = [value] if kind is list else {"k": value}
    return value


@pytest.mark.parametrize(
    "make, large",
    [
        (lambda big: {"id": "1", "ok": True, "result": {"pid": 1}}, False),
        (lambda big: "x" * 10, False),
        (lambda big: big, True),
        (lambda big: {"result": {"content": [{"type": "image", "data": big}]}}, True),
        (lambda big: {"a": [1, 2.5, None, True], "b": {"c": big[:-1]}}, False),  # exactly a piece
        (lambda big: [{"k": "small"}] * 50 + [{"k": big}], True),  # after many small values
        (lambda big: _nested(big, 8), True),  # the deepest level still looked at
        (lambda big: _nested(big, 8, dict), True),
        (lambda big: _nested(big, 9), False),  # past the bound: not looked at (cheap to ask)
        (lambda big: {big: "a large key is never streamed"}, False),
        (lambda big: (big,), False),  # only what a JSON handler builds: dicts, lists, strings
    ],
    ids=[
        "small-frame",
        "small-str",
        "big-str",
        "image",
        "one-piece",
        "late",
        "depth-8",
        "depth-8-dict",
        "depth-9",
        "key",
        "tuple",
    ],
)
def test_looks_large_table(make, large):
    """Which answers are streamed in pieces (and their memory handed back afterwards)."""
    md = _import_module()
    assert md._looks_large(make("x" * (md._SEND_CHUNK + 1))) is large


@pytest.mark.parametrize("text", JSON_LOADS_CASES)
def test_json_fast_path_reads_as_json_loads(text):
    md = _import_module()
    try:
        expected = ("value", json.loads(text))
    except ValueError as exc:
        expected = ("error", type(exc), str(exc))
    try:
        got = ("value", md._json_loads(text))
    except ValueError as exc:
        got = ("error", type(exc), str(exc))
    assert repr(got) == repr(expected)


@pytest.mark.parametrize(
    "value",
    [
        {"id": "1", "method": "callTool", "params": {"tool": "t", "args": {"s": "\u00e9\ud800", "n": 1.5}}},
        [float("nan"), float("inf"), 10**30, True, None, 'x\n"y'],
        "just a string",
        {1: "int key", 2.5: "float key", None: "null key", False: "bool key"},
        {"bad": object()},
        {"bad": {"deeper": {1, 2}}},
        {(1, 2): "tuple key"},
    ],
)
def test_json_fast_path_writes_as_json_dumps(value):
    md = _import_module()
    try:
        expected = ("text", json.dumps(value, separators=(",", ":"), ensure_ascii=True))
    except (TypeError, ValueError) as exc:
        expected = ("error", type(exc), str(exc))
    try:
        got = ("text", md._json_compact(value))
    except (TypeError, ValueError) as exc:
        got = ("error", type(exc), str(exc))
    assert got == expected


def test_json_fast_path_refuses_a_circular_value_as_json_does():
    md = _import_module()
    loop = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        md._json_compact({"a": loop})


def test_warm_call_imports_neither_json_nor_socket(h):
    """The hot path runs json's and socket's C halves directly: importing the Python halves
    (json compiles patterns through re, socket builds enums) costs milliseconds per call."""
    call_ok(h, "demo.counter")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import mcporter_daemon as md; "
        "sys.argv[1:2] = []; rc = md.main(sys.argv[1:]); "
        "print(sorted(m for m in ('json', 're', 'socket', 'shlex', 'enum') if m in sys.modules), "
        "file=sys.stderr); sys.exit(rc)"
    )
    r = h.run("--config", h.cfg, "call", "demo.counter", argv=[sys.executable, "-S", "-c", code, HERE])
    assert r.rc == 0 and r.out.strip() == "2", r
    assert r.err.strip().splitlines()[-1] == "[]", r


# ##########################################################################################
# Metadata and locks: the atomic metadata file and flock-based locks with bounded waits.
# ##########################################################################################


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


@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted"])
def test_damaged_metadata_is_repaired(h, damage):
    assert call_ok(h, "demo.counter") == "1"
    old_pid = running_status(h)["pid"]
    old_server = server_pid(h.status())
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
        assert_one_daemon_tree(h, st["pid"])
    else:
        assert value == "1"
        assert not pid_alive(old_server)
        assert_replaced(h, old_pid)


def held_flock(path):
    """Hold an exclusive flock on ``path`` (a spawn or bind lock) until the context ends."""

    class Held:
        def __enter__(self):
            self.fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            return self

        def __exit__(self, *exc):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)

    return Held()


def holds_open(pid, path):
    """True when ``pid`` has ``path`` open (it reached the lock it now waits for)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path):
                return True
        except OSError:
            pass
    return False


def write_meta_raw(h, data):
    """Replace the metadata atomically, so a reader sees the planted record whole."""
    tmp = h.tmp / "planted.json.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(str(tmp), str(h.meta_path))


def start_bystander(h):
    """A live process that is not a daemon and records every catchable signal it gets."""
    sig_log = h.tmp / "bystander.signals"
    script = h.tmp / "bystander.py"
    script.write_text(BYSTANDER_SCRIPT)
    proc = h.popen_argv([sys.executable, script, sig_log], h.env())
    wait_until(sig_log.exists, 10, message="bystander to install its signal handlers")
    return proc, sig_log, proc_stat(proc.pid).start


def bystander_record(h, entry):
    """A daemon record (as written by a daemon of another fingerprint) whose pid, and each of
    whose servers, is ``entry`` (a bystander's pid, with or without a start time)."""
    return dict(
        entry,
        protocolVersion=2,
        socketPath=str(h.socket_path),
        configPath=str(h.cfg),
        fingerprint="0" * 32,
        startedAt=int(time.time() * 1000),
        servers={"demo": dict(entry)},
    )


def assert_bystander_untouched(proc, sig_log, start):
    now = proc_stat(proc.pid)
    assert now is not None and now.state not in ("Z", "X", "T", "t") and now.start == start, now
    assert sig_log.read_text() == "", f"bystander was signalled: {sig_log.read_text()!r}"


def malformed(meta, shape, other_pid=None):
    bad = json.loads(json.dumps(meta))
    if shape == "no-start-time":
        del bad["pidStartTime"]
    elif shape == "start-time-number":
        bad["pidStartTime"] = int(bad["pidStartTime"])
    elif shape == "servers-list":
        bad["servers"] = [dict(entry, name=name) for name, entry in meta["servers"].items()]
    elif shape == "servers-string":
        bad["servers"] = "demo"
    elif shape == "server-pid-string":
        bad["servers"]["demo"]["pid"] = str(bad["servers"]["demo"]["pid"])
    elif shape == "pid-string":
        bad["pid"] = str(bad["pid"])
    elif shape == "live-non-daemon":
        bad["pid"], bad["pidStartTime"] = other_pid, str(proc_stat(other_pid).start)
    else:
        raise AssertionError(shape)
    return bad


def metadata_repaired(h, daemon, server):
    meta = h.meta()
    st = proc_stat(daemon)
    return (
        isinstance(meta, dict)
        and meta.get("pid") == daemon
        and st is not None
        and meta.get("pidStartTime") == str(st.start)
        and isinstance(meta.get("servers"), dict)
        and (meta["servers"].get("demo") or {}).get("pid") == server
    )


SERVING_SHAPES = [
    "no-start-time",
    "start-time-number",
    "servers-list",
    "server-pid-string",
    "pid-string",
    "live-non-daemon",
]


@pytest.mark.parametrize("shape", SERVING_SHAPES)
def test_malformed_metadata_of_a_serving_daemon_reads_as_absent_and_is_repaired(h, shape):
    bystander, sig_log, bystander_start = start_bystander(h)
    assert call_ok(h, "demo.counter") == "1"
    daemon = running_status(h)["pid"]
    good = h.meta()
    server = good["servers"]["demo"]["pid"]
    bad = malformed(good, shape, bystander.pid)

    # While the bind lock is held the daemon cannot repair the record, so these see it as planted.
    with held_flock(h.path("bind")):
        write_meta_raw(h, bad)
        st = h.status()
        assert st["running"] is True and st["pid"] == daemon, st
        r = h.run("doctor")
        assert "Traceback" not in r.err and "unexpected error" not in r.err, r
        assert f"daemon running (pid {daemon})" in r.out, r
    released = time.monotonic()
    wait_until(lambda: metadata_repaired(h, daemon, server), 5, message="the daemon to repair its record")
    assert time.monotonic() - released < 3.0, "repair took longer than a housekeeping round or two"

    write_meta_raw(h, bad)
    assert call_ok(h, "demo.counter") == "2"
    write_meta_raw(h, bad)
    r = h.run("stop")
    assert r.rc == 0 and f"stopped (pid {daemon})" in r.out, r
    wait_until(lambda: not pid_alive(daemon) and not pid_alive(server), 10, message="daemon tree gone")
    assert_bystander_untouched(bystander, sig_log, bystander_start)


@pytest.mark.parametrize("shape", ["servers-list", "servers-string"])
def test_malformed_metadata_of_a_dead_daemon_never_crashes_a_command(h, shape):
    assert call_ok(h, "demo.counter") == "1"
    daemon = running_status(h)["pid"]
    good = h.meta()
    server = good["servers"]["demo"]["pid"]
    os.kill(daemon, signal.SIGKILL)
    wait_until(lambda: not pid_alive(daemon) and not pid_alive(server), 10, message="daemon tree gone")

    for words in (("status", "--json"), ("doctor",), ("stop",)):
        write_meta_raw(h, malformed(good, shape))
        r = h.run(*words)
        assert "Traceback" not in r.err and "unexpected error" not in r.err, r
        if words[0] == "stop":
            assert r.rc == 0 and "no daemon running" in r.out, r
        if words[0] == "status":
            assert json.loads(r.out)["running"] is False, r
    write_meta_raw(h, malformed(good, shape))
    assert call_ok(h, "demo.counter") == "1"
    st = assert_replaced(h, daemon)
    assert metadata_repaired(h, st["pid"], server_pid(h.status()))


GOOD_RECORD = {
    "pid": 4242,
    "pidStartTime": "777",
    "socketPath": "/s/daemon.sock",
    "servers": {"demo": {"pid": 4343, "pidStartTime": "778"}},
    "fingerprint": "f",
}


def _record(**changes):
    data = json.loads(json.dumps(GOOD_RECORD))
    for key, value in changes.items():
        if value is KeyError:
            data.pop(key, None)
        else:
            data[key] = value
    return data


@pytest.mark.parametrize(
    "data, valid",
    [
        (_record(), True),
        (_record(servers={}), True),
        (_record(extra=[1, 2]), True),
        (None, False),
        ([GOOD_RECORD], False),
        ("text", False),
        (_record(pid=KeyError), False),
        (_record(pid="4242"), False),
        (_record(pid=True), False),
        (_record(pid=0), False),
        (_record(pid=-1), False),
        (_record(pid=4242.0), False),
        (_record(pidStartTime=KeyError), False),
        (_record(pidStartTime=777), False),
        (_record(pidStartTime=""), False),
        (_record(pidStartTime=None), False),
        (_record(socketPath=KeyError), False),
        (_record(socketPath=None), False),
        (_record(socketPath=["/s"]), False),
        (_record(servers=KeyError), False),
        (_record(servers=[{"name": "demo", "pid": 4343, "pidStartTime": "778"}]), False),
        (_record(servers="demo"), False),
        (_record(servers={"demo": None}), False),
        (_record(servers={"demo": {"pid": "4343", "pidStartTime": "778"}}), False),
        (_record(servers={"demo": {"pid": 4343}}), False),
        (_record(servers={"demo": {"pid": 4343, "pidStartTime": 778}}), False),
    ],
)
def test_validate_metadata_table(data, valid):
    md = _import_module()
    assert (md.validate_metadata(data) is not None) is valid
    if valid:
        assert md.validate_metadata(data) == data


# ##########################################################################################
# Process identity: is a pid alive, is it the process we recorded, and ending it safely.
# ##########################################################################################


BYSTANDER_SCRIPT = """\
import signal, sys, time

log = sys.argv[1]


def note(signum, frame):
    with open(log, "a") as f:
        f.write(signal.Signals(signum).name + "\\n")


for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCONT, signal.SIGQUIT,
            signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM):
    signal.signal(sig, note)
open(log, "a").close()  # ready: every catchable signal is now recorded
while True:
    time.sleep(60)
"""


@pytest.mark.parametrize("start_time", ["wrong", "missing"])
def test_foreign_pid_in_metadata_is_never_signalled(h, start_time):
    sig_log = h.tmp / "bystander.signals"
    script = h.tmp / "bystander.py"
    script.write_text(BYSTANDER_SCRIPT)
    bystander = h.popen_argv([sys.executable, script, sig_log], h.env())
    wait_until(sig_log.exists, 10, message="bystander to install its signal handlers")
    before = proc_stat(bystander.pid)

    def plant():
        entry = {"pid": bystander.pid}
        if start_time == "wrong":
            entry["pidStartTime"] = str(before.start + 1)
        h.meta_path.write_text(json.dumps(bystander_record(h, entry)))
        if h.socket_path.exists():
            h.socket_path.unlink()
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a dead socket file: refused
        stale.bind(str(h.socket_path))
        stale.close()

    def assert_untouched(when):
        now = proc_stat(bystander.pid)
        assert now is not None and now.state not in ("Z", "X"), f"bystander died {when}"
        assert now.state not in ("T", "t"), f"bystander was stopped {when}"
        assert now.start == before.start, f"bystander pid reused {when}"
        assert bystander.poll() is None
        assert sig_log.read_text() == "", f"bystander was signalled {when}: {sig_log.read_text()!r}"

    plant()
    r = h.run("stop")
    assert r.rc == 0, r
    assert "no daemon running" in r.out, r
    assert_untouched("by `stop`")

    plant()
    assert call_ok(h, "demo.counter") == "1"
    assert_untouched("by the next daemon's bind guard")
    daemon = running_status(h)["pid"]
    assert daemon != bystander.pid
    assert h.meta()["pid"] == daemon
    assert_one_daemon_tree(h, daemon)


def test_terminate_process_reports_a_refused_live_pid_as_not_gone(h):
    md = _import_module()
    proc = h.popen_argv([sys.executable, "-c", "import time; time.sleep(120)"], h.env())
    start = str(proc_stat(proc.pid).start)
    assert md.terminate_process(proc.pid, start + "1", grace=0.1) is False
    assert md.terminate_process(proc.pid, None, grace=0.1) is False
    assert pid_alive(proc.pid), "an unverified pid was signalled"
    assert md.terminate_process(proc.pid, start, grace=2.0) is True
    proc.wait(timeout=10)
    assert md.terminate_process(proc.pid, start, grace=0.1) is True


@pytest.mark.parametrize(
    "leader_alive, leader_start, members, ours",
    [
        (False, 100.0, [(11, 10, 100.0), (12, 10, 150.0)], True),  # leader gone, its session, younger
        (True, 100.0, [(11, 10, 150.0)], False),  # the leader runs: its own shutdown applies
        (False, None, [(11, 10, 150.0)], False),  # no recorded start time: no proof
        (False, 100.0, [], False),  # nothing left
        (False, 100.0, [(11, 10, 150.0), (12, 99, 150.0)], False),  # a member of another session
        (False, 100.0, [(11, 10, 99.0)], False),  # older than the leader: not its child
        (False, 100.0, [(11, 10, None)], False),  # start time unknown
    ],
)
def test_leaderless_group_is_ours_table(leader_alive, leader_start, members, ours):
    md = _import_module()
    assert md.leaderless_group_is_ours(10, leader_start, leader_alive, members) is ours


def test_ps_process_facts_path_works_when_forced(monkeypatch):
    """The platform seam's other side: start times, stopped state, children and group members
    from ``ps``, and a leaderless group's survivor ended through it."""
    md = _import_module()
    if not shutil.which("ps"):
        pytest.skip("no ps on this machine")
    monkeypatch.setattr(md, "_ON_PROC", False)
    monkeypatch.setattr(md, "_process_info", md._ps_process_info)
    monkeypatch.setattr(md, "_group_members", md._ps_group_members)
    monkeypatch.setattr(md, "_start_order", md._ps_start_order)
    monkeypatch.setattr(md, "_child_pids", md._ps_child_pids)
    leader = subprocess.Popen(["sh", "-c", "sleep 300 & exec sleep 301"], start_new_session=True)
    survivor = None
    try:
        start = md.process_start_time(leader.pid)
        assert start and re.match(r"\w{3} \w{3} \d+ \d\d:\d\d:\d\d \d{4}$", start), start
        assert md.is_our_pid(leader.pid, start)
        assert not md.is_our_pid(leader.pid, "Mon Jan 1 00:00:00 2001")
        os.kill(leader.pid, signal.SIGSTOP)
        wait_until(lambda: md.process_stopped(leader.pid), 5, message="ps to report the leader stopped")
        os.kill(leader.pid, signal.SIGCONT)
        wait_until(lambda: not md.process_stopped(leader.pid), 5, message="ps to report it running")
        assert leader.pid in md._child_pids(os.getpid())
        members = wait_until(lambda: [m for m in md._group_members(leader.pid) if m[0] != leader.pid], 5)
        survivor = members[0][0]
        assert all(sid == leader.pid for _, sid, _ in md._group_members(leader.pid))
        # The leader dies first (and is reaped); its child lives on in the leaderless group.
        leader.kill()
        leader.wait(5)
        assert pid_alive(survivor)
        md.end_server_group(leader.pid, start, grace=1.0)
        wait_until(lambda: not pid_alive(survivor), 5, message=f"the group's survivor {survivor} to be ended")
    finally:
        for pid in (leader.pid, survivor):
            if pid and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        leader.wait(5)


# ##########################################################################################
# Daemon host: bind guard, concurrent serving, housekeeping, ownership-checked shutdown.
# ##########################################################################################


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
    assert server_pid(h.status()) in h.server_pids()


@pytest.mark.parametrize("server", ["exits-on-eof", "ignores-eof"])
def test_sigkilled_daemon_is_replaced(h, server):
    old_pid, old_server = warm_daemon(h, stubborn=server == "ignores-eof")
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(old_pid), 5, message="SIGKILLed daemon to die")

    assert call_ok(h, "demo.counter") == "1"
    # The dead daemon's MCP server is not left as an orphan.
    wait_until(lambda: not pid_alive(old_server), 5, message=f"old MCP server {old_server} to exit")
    assert_replaced(h, old_pid)


@pytest.mark.parametrize("server", ["exits-on-eof", "ignores-eof"])
def test_stopped_daemon_is_replaced_and_terminated(h, server):
    old_pid, old_server = warm_daemon(h, stubborn=server == "ignores-eof")
    h.sigstop(old_pid)

    assert call_ok(h, "demo.counter") == "1"
    assert not pid_alive(old_pid), f"hung daemon {old_pid} not terminated"
    wait_until(lambda: not pid_alive(old_server), 5, message="hung daemon's MCP server to exit")
    assert_replaced(h, old_pid)


@pytest.mark.parametrize("how", ["sigcont", "sigterm"])
def test_superseded_daemon_never_removes_replacement_files(h, how):
    a = start_daemon(h)
    assert call_ok(h, "demo.counter") == "1"
    a_server = server_pid(h.status())
    h.meta()

    h.sigstop(a)
    h.socket_path.unlink()
    h.meta_path.unlink()
    r = h.run("start")
    assert r.rc == 0 and "started" in r.out, r
    b = started_pid(r)
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


def test_stopped_daemon_reclaimed_within_probe_timeout(h):
    assert call_ok(h, "demo.counter") == "1"
    old_pid = running_status(h)["pid"]
    old_server = server_pid(h.status())
    assert old_server and pid_alive(old_server)
    h.sigstop(old_pid)

    r = h.run("call", "demo.counter")
    limit = PROBE_DEFAULT_S + 0.5
    print(f"\n  stopped daemon reclaimed: next `call` took {r.elapsed:.3f}s (limit {limit:.1f}s)")
    assert r.rc == 0 and r.out.strip() == "1", r
    assert r.elapsed < limit, f"call after SIGSTOP took {r.elapsed:.2f}s, over {limit}s"
    # By the time the call answered, the hung daemon and its MCP server were ended.
    assert not pid_alive(old_pid), f"stopped daemon {old_pid} still exists"
    assert not pid_alive(old_server), f"stopped daemon's MCP server {old_server} still exists"

    # Waking whatever might be left changes nothing: one daemon, one server, the new ones.
    try:
        h.sigcont(old_pid)
    except ProcessLookupError:
        pass  # already reaped
    assert call_ok(h, "demo.counter") == "2"
    assert_replaced(h, old_pid)


def test_busy_daemon_answers_status_and_is_not_replaced(h):
    daemon = start_daemon(h)
    assert call_ok(h, "demo.counter") == "1"  # the MCP server is warm
    server = server_pid(h.status())
    sock = h.socket_path
    ino = socket_ino(sock)

    in_flight = threading.Event()
    box = {}

    def long_call():
        params = {"server": "demo", "tool": "sleep", "args": {"seconds": 5}, "timeoutMs": 30000}
        try:
            box["resp"] = raw_request(
                sock, "callTool", params, idle=10.0, progress_ms=250, on_frame=lambda n: in_flight.set()
            )
        except BaseException as exc:  # reported by the main thread
            box["error"] = exc
        finally:
            in_flight.set()

    t = threading.Thread(target=long_call, name="busy-call", daemon=True)
    t.start()
    assert in_flight.wait(10), "the sleep call never started"
    assert "error" not in box, box

    latencies = []

    def measure_status(n):
        for _ in range(n):
            t0 = time.monotonic()
            resp, _, _ = raw_request(sock, "status", {}, idle=5.0)
            latencies.append(time.monotonic() - t0)
            assert resp.get("ok") is True and resp["result"]["pid"] == daemon, resp

    measure_status(10)
    r_start = h.run("start")
    fg = h.popen("start", "--foreground")
    wait_until(lambda: fg.poll() is not None, 30, message="`start --foreground` to exit")
    measure_status(10)
    still_busy = t.is_alive()

    print(
        f"\n  status during a 5 s call: max {max(latencies) * 1000:.1f} ms, "
        f"median {sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms over {len(latencies)} requests"
    )
    assert still_busy, "the sleep call ended before the concurrent starts were checked"
    assert max(latencies) < 0.5, f"status took up to {max(latencies):.3f}s while busy"
    assert r_start.rc == 0, r_start
    assert f"already running (pid {daemon})" in r_start.out, r_start
    fg_err = read_file(fg.err_path)
    assert fg.returncode == 0, f"`start --foreground` exited {fg.returncode}: {fg_err}"
    assert f"daemon already running (pid {daemon}); not starting another" in fg_err, fg_err

    t.join(30)
    assert not t.is_alive(), "the sleep call never finished"
    assert "error" not in box, f"sleep call failed: {box.get('error')!r}"
    resp = box["resp"][0]
    assert resp.get("ok") is True, resp
    assert [c.get("text") for c in resp["result"]["content"]] == ["slept 5"], resp

    assert running_status(h)["pid"] == daemon
    assert h.meta()["pid"] == daemon
    assert socket_ino(sock) == ino, "the busy daemon's socket was replaced"
    assert server_pid(h.status()) == server
    assert_one_daemon_tree(h, daemon)


SLOW_HOST_SCRIPT = """\
import os, sys, time
sys.path.insert(0, {here!r})
import mcporter_daemon

base, flag = sys.argv[1], sys.argv[2]
paths = mcporter_daemon.DaemonPaths.for_key("slowhost", base)


def slow_extra():
    # While the flag file exists, status answers only after the delay it holds.
    try:
        with open(flag) as f:
            time.sleep(float(f.read()))
    except FileNotFoundError:
        pass
    return {{}}


def echo(params, ctx):
    return {{"pid": os.getpid(), "text": params.get("text")}}


host = mcporter_daemon.DaemonHost(paths, "fp-1", {{"echo": echo}}, status_extra=slow_extra)
sys.exit(host.run())
"""


def start_slow_host(h, probe_ms=300):
    """Write the slow-status host script once; start one instance of it."""
    script = h.tmp / "slow_host.py"
    if not script.exists():
        script.write_text(SLOW_HOST_SCRIPT.format(here=str(HERE)))
    flag = h.tmp / "slow.flag"
    env = h.env(MCPORTER_DAEMON_PROBE_TIMEOUT_MS=str(probe_ms))
    return h.popen_argv([sys.executable, script, h.state_dir, flag], env), flag


def slow_host_socket(h):
    return h.state_dir / "daemon-slowhost.sock"


def wait_slow_host_serving(h, pid):
    sock = slow_host_socket(h)

    def answers():
        try:
            resp, _, _ = raw_request(sock, "echo", {"text": "hi"}, idle=5.0)
        except (OSError, EOFError):
            return None
        return resp.get("ok") and resp["result"]["pid"] == pid

    wait_until(answers, 20, message=f"slow host {pid} to serve")


def stop_slow_host(h, proc):
    """Ask slow host ``proc`` to stop; a failure says what the host said and whether it lives."""
    try:
        resp, _, _ = raw_request(slow_host_socket(h), "stop", {}, idle=5.0)
    except (OSError, EOFError) as exc:
        raise AssertionError(
            f"stop: {exc!r}; host {proc.pid} exit {proc.poll()}; its stderr: {read_file(proc.err_path)}"
        ) from exc
    assert resp.get("ok") is True, resp
    wait_until(lambda: proc.poll() is not None, 10, message=f"slow host {proc.pid} to stop")


def test_alive_daemon_missing_one_probe_is_not_replaced(h):
    first, flag = start_slow_host(h)
    wait_slow_host_serving(h, first.pid)
    sock = slow_host_socket(h)
    ino = socket_ino(sock)

    write_flag(flag, "0.6")  # slower than the 0.3 s probe, faster than the 1 s second probe
    t0 = time.monotonic()
    resp, _, _ = raw_request(sock, "status", {}, idle=5.0)
    slow_status = time.monotonic() - t0
    assert resp.get("ok") is True and resp["result"]["pid"] == first.pid, resp
    assert slow_status >= 0.5, f"the flag did not slow status down ({slow_status:.3f}s)"

    second, _ = start_slow_host(h)
    t0 = time.monotonic()
    wait_until(lambda: second.poll() is not None, 20, message="second host instance to exit")
    took = time.monotonic() - t0
    err = read_file(second.err_path)
    print(
        f"\n  status answered in {slow_status:.3f}s (probe 0.3 s); second instance exited after {took:.2f}s"
    )
    assert second.returncode == 0, f"second instance exited {second.returncode}: {err}"
    assert f"daemon already running (pid {first.pid}); not starting another" in err, err

    assert first.poll() is None, f"slow daemon was ended: {read_file(first.err_path)}"
    assert not pid_stopped(first.pid)
    assert socket_ino(sock) == ino, "the slow daemon's socket was replaced"
    meta = json.loads((h.state_dir / "daemon-slowhost.json").read_text())
    assert meta["pid"] == first.pid, meta
    os.unlink(str(flag))
    resp, _, _ = raw_request(sock, "echo", {"text": "still here"}, idle=5.0)
    assert resp.get("ok") is True and resp["result"] == {"pid": first.pid, "text": "still here"}, resp

    stop_slow_host(h, first)
    assert first.returncode == 0, read_file(first.err_path)


def test_daemon_silent_on_both_probes_is_replaced(h):
    # The contrast to the test above: silent on the first AND the longer second probe is hung.
    first, flag = start_slow_host(h)
    wait_slow_host_serving(h, first.pid)
    write_flag(flag, "30")  # status now takes longer than both probes (0.3 s, then 1 s)

    t0 = time.monotonic()
    second, _ = start_slow_host(h)
    wait_until(lambda: first.poll() is not None, 20, message=f"hung host {first.pid} to be ended")
    took = time.monotonic() - t0
    os.unlink(str(flag))
    print(f"\n  host silent on both probes replaced after {took:.2f}s")
    wait_slow_host_serving(h, second.pid)
    assert second.poll() is None, read_file(second.err_path)
    meta = json.loads((h.state_dir / "daemon-slowhost.json").read_text())
    assert meta["pid"] == second.pid, meta
    stop_slow_host(h, second)


STOP_RACE_HOST = """\
import os, sys, threading, time
sys.path.insert(0, {here!r})
import mcporter_daemon

base, flag, late = sys.argv[1], sys.argv[2], sys.argv[3] == "late"
paths = mcporter_daemon.DaemonPaths.for_key("stoprace", base)
real_remove = mcporter_daemon.remove_metadata_if_owned
real_frame = mcporter_daemon.DaemonHost._shutting_down_frame
stalled, removed = [], threading.Event()


def stalling_remove(path, pid):
    # Once the flag exists, the first removal of the record (the stop's own) stalls, as on a
    # slow disk, while the serving loop sees the daemon marked stopping and winds down.
    if os.path.exists(flag) and not stalled:
        stalled.append(1)
        time.sleep(float(open(flag).read()))
        removed.set()
    return real_remove(path, pid)


def late_frame(self, rid):
    # "late": a thread about to answer "shutting down" is descheduled until just after the
    # stop was answered, when the daemon takes its last steps.
    if late and os.path.exists(flag):
        removed.wait(30)
        time.sleep(0.1)
    return real_frame(self, rid)


mcporter_daemon.remove_metadata_if_owned = stalling_remove
mcporter_daemon.DaemonHost._shutting_down_frame = late_frame
sys.exit(mcporter_daemon.DaemonHost(paths, "fp-1", {{"echo": lambda params, ctx: os.getpid()}}).run())
"""


def test_stop_is_answered_even_when_the_daemon_winds_down_before_its_thread_answers(h):
    """``stop`` marks the daemon stopping, removes its record, then answers. When the thread
    serving it is slow to answer (descheduled, a slow disk), the serving loop may see the mark
    first and finish: the answer must still go out, exactly once, before the process ends.
    (Seen in CI: a busy machine, the stop's caller got a closed connection and no answer.)"""
    md = _import_module()
    script = h.tmp / "stop_race_host.py"
    script.write_text(STOP_RACE_HOST.format(here=str(HERE)))
    flag = h.tmp / "stall.flag"
    host = h.popen_argv([sys.executable, script, h.state_dir, flag, "-"], h.env())
    sock = h.state_dir / "daemon-stoprace.sock"

    def answers():
        try:
            return raw_request(sock, "echo", {}, idle=5.0)[0].get("result") == host.pid
        except (OSError, EOFError):
            return False

    wait_until(answers, 20, message="the host to serve")
    stall = md._DRAIN_WAIT + md._DRAIN_AFTER_CLOSE + 2.0  # past the whole wind-down
    write_flag(flag, str(stall))
    t0 = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(stall + 10)
        s.connect(str(sock))
        s.sendall(b'{"id": "s1", "method": "stop", "params": {}, "protocolVersion": 2}\n')
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    lines = [json.loads(line) for line in data.splitlines() if line.strip()]
    assert lines == [{"id": "s1", "ok": True, "result": True}], (data, read_file(host.err_path))
    wait_until(lambda: host.poll() is not None, stall + 10, message="the host to exit")
    assert host.returncode == 0, read_file(host.err_path)
    assert time.monotonic() - t0 < stall, "the answer waited for the stalled thread"
    assert not (h.state_dir / "daemon-stoprace.json").exists()


def test_requests_taken_in_while_stopping_are_answered_before_the_daemon_exits(h):
    """A request that reaches a stopping daemon is answered "shutting down", so its caller can
    send it again to the next daemon. One whose thread answers only as the daemon takes its
    last steps must still get that answer, not a connection closed by the exit."""
    md = _import_module()
    script = h.tmp / "stop_race_host.py"
    script.write_text(STOP_RACE_HOST.format(here=str(HERE)))
    flag = h.tmp / "stall.flag"
    host = h.popen_argv([sys.executable, script, h.state_dir, flag, "late"], h.env())
    sock = h.state_dir / "daemon-stoprace.sock"
    wait_until(lambda: sock.exists(), 20, message="the host to bind")
    assert raw_request(sock, "echo", {}, idle=5.0)[0].get("result") == host.pid
    write_flag(flag, "1.0")  # the stop's record removal stalls a second: the daemon is stopping
    stopped = []
    stopper = threading.Thread(target=lambda: stopped.append(raw_request(sock, "stop", {}, idle=10.0)[0]))
    stopper.start()
    try:
        wait_until(lambda: "shutting down: stop request" in read_file(host.err_path), 10, message="wind-down")
        late, _, _ = raw_request(sock, "echo", {}, idle=10.0)
    finally:
        stopper.join(15)
    assert late.get("ok") is False and late["error"]["code"] == "shutting_down", late
    assert stopped == [{"id": stopped[0]["id"], "ok": True, "result": True}], stopped
    wait_until(lambda: host.poll() is not None, md._DRAIN_WAIT + 10, message="the host to exit")
    assert host.returncode == 0, read_file(host.err_path)


HANG_UP_LISTENER = """\
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
s.listen(64)
open(sys.argv[2], "w").close()
while True:
    conn, _ = s.accept()
    conn.close()  # as an older daemon at its connection cap does: no word at all
"""


def test_bare_close_from_the_recorded_live_owner_is_not_taken_for_death(h):
    """A socket that accepts and closes without a word, held by the very process the record
    names (alive, not stopped), is alive but slow: a starter leaves it, never terminates it."""
    script = h.tmp / "hang_up.py"
    script.write_text(HANG_UP_LISTENER)
    ready = h.tmp / "listening"
    h.state_dir.chmod(0o700)
    owner = h.popen_argv([sys.executable, script, h.socket_path, ready], h.env())
    wait_until(ready.exists, 10, message="the hanging-up listener to bind")
    record = {
        "pid": owner.pid,
        "pidStartTime": str(proc_stat(owner.pid).start),
        "socketPath": str(h.socket_path),
        "servers": {},
    }
    h.meta_path.write_text(json.dumps(record))
    r = h.run("start", "--foreground", MCPORTER_DAEMON_PROBE_TIMEOUT_MS="300", timeout=20)
    print(f"\n  starter beside a bare-closing live owner: exit {r.rc} after {r.elapsed:.2f}s")
    assert owner.poll() is None, "the live owner was terminated on a bare close"
    assert r.rc == 0, r
    assert f"daemon already running (pid {owner.pid}); not starting another" in r.err, r
    assert socket_ino(h.socket_path) is not None and json.loads(h.meta_path.read_text()) == record


def test_next_daemon_ends_eof_ignoring_server_of_sigkilled_daemon(h):
    eof_flag = h.tmp / "server-saw-eof"
    h.stubborn = True
    h.write_config({"mcpServers": {"demo": h.demo_server_entry(eof_flag=eof_flag)}})
    old_pid, old_server = warm_daemon(h)
    assert h.meta()["servers"]["demo"]["pid"] == old_server

    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(old_pid), 5, message="SIGKILLed daemon to die")
    # The server got EOF on stdin and ignores it: it outlives its daemon.
    wait_until(eof_flag.exists, 10, message="the MCP server to see stdin EOF")
    assert pid_alive(old_server), "the EOF-ignoring server exited by itself; the test proves nothing"

    assert call_ok(h, "demo.counter") == "1"
    # Ended by the next daemon before it bound, so already gone when the call answers.
    assert not pid_alive(old_server), f"orphaned MCP server {old_server} still running"
    log = h.path("log").read_text()
    assert f"ending server 'demo' (pid {old_server}) left by a dead daemon" in log, log[-2000:]
    assert_replaced(h, old_pid)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_daemon_exits_when_its_socket_path_is_lost(h, how):
    assert call_ok(h, "demo.counter") == "1"
    daemon = running_status(h)["pid"]
    server = server_pid(h.status())
    assert server and pid_alive(server)
    listener = None
    try:
        t0 = time.monotonic()
        h.socket_path.unlink()
        if how == "replaced":
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(h.socket_path))
            listener.listen(16)
            ours = socket_ino(h.socket_path)
        wait_until(
            lambda: not pid_alive(daemon) and not pid_alive(server),
            10,
            message=f"daemon {daemon} and MCP server {server} to exit after losing the socket",
        )
        took = time.monotonic() - t0
        print(f"\n  socket {how}: daemon and its MCP server gone after {took:.2f}s (limit 5 s)")
        assert took < 5.0, f"daemon lingered {took:.2f}s after its socket was {how}"
        assert not h.meta_path.exists(), "the exiting daemon left its metadata behind"
        if how == "replaced":
            assert socket_ino(h.socket_path) == ours, "the exiting daemon removed another listener's socket"

        # The next call works. A listener that accepts but never answers is taken over after
        # two silent probes (its owner unknown); a short probe timeout keeps that quick.
        r = h.run("call", "demo.counter", MCPORTER_DAEMON_PROBE_TIMEOUT_MS="300")
        print(f"  next call took {r.elapsed:.2f}s")
        assert r.rc == 0 and r.out.strip() == "1", r
    finally:
        if listener is not None:
            listener.close()
    assert_replaced(h, daemon)


def test_connection_burst_is_served(h):
    # 200 clients connect at once, each as the module's own client does (a connect with a
    # timeout, i.e. non-blocking underneath), then each sends one line.
    daemon = start_daemon(h)
    sock = h.socket_path
    poller = StatusLatencyPoller(sock, daemon).start()
    conns, refused = [], []
    try:
        for i in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(15)
            try:
                s.connect(str(sock))
            except OSError as exc:
                refused.append(f"{type(exc).__name__}: {exc}")
                s.close()
                continue
            conns.append((i, s))
        for i, s in conns:
            line = {"id": f"b{i}", "method": "status"} if i % 2 == 0 else None
            s.sendall((json.dumps(line) + "\n").encode() if line else b"{oops\n")
        for i, s in conns:
            frames = read_frames_until_close(s, 15)
            if i % 2 == 0:
                assert len(frames) == 1 and frames[0].get("ok") is True, (i, frames)
                assert frames[0]["id"] == f"b{i}" and frames[0]["result"]["pid"] == daemon, frames
            else:
                assert_error_or_closed(frames, f"burst garbage {i}", code="invalid_json")
    finally:
        poller.stop()
        for _, s in conns:
            s.close()
    print(f"\n  200-connection burst: {len(refused)} connects refused; status meanwhile: {poller.summary()}")
    assert not refused, f"{len(refused)} of 200 connects refused, e.g. {refused[0]}"
    poller.assert_responsive(1.0, min_polls=1)
    assert running_status(h)["pid"] == daemon


def test_log_servers_flag_traces_only_chosen_servers(h):
    h.configure({"other": h.demo_server_entry()})
    daemon = started_pid(h.run("start", "--log-servers", "demo"))
    assert call_ok(h, "demo.counter") == "1"
    assert call_ok(h, "other.counter") == "1"
    assert call_ok(h, "demo.echo", "text=hi") == "hi"
    st = running_status(h)
    demo, other = server_pid(st, "demo"), server_pid(st, "other")
    log = h.path("log")
    assert Path(st["logPath"]) == log
    h.run("stop").ok()

    lines = log_lines(log)
    events = log_events(lines)
    assert traced_servers(lines) == ["demo", "demo"], lines
    assert any(pid == daemon and msg.startswith("bound ") for pid, msg in events), lines
    assert (daemon, "shutting down: stop request") in events, lines
    # Each MCP server's stderr reaches the log under its name, stamped like every line.
    assert (daemon, f"[demo] demo MCP server ready (pid {demo})") in events, lines
    assert (daemon, f"[other] demo MCP server ready (pid {other})") in events, lines
    assert file_mode(log) == 0o600


def test_log_flag_and_log_file_trace_every_server(h):
    h.configure({"other": h.demo_server_entry()})
    custom = h.tmp / "logs" / "daemon.log"
    custom.parent.mkdir()
    daemon = started_pid(h.run("start", "--log", "--log-file", custom))
    call_ok(h, "demo.counter")
    call_ok(h, "other.counter")
    assert Path(running_status(h)["logPath"]) == custom
    lines = log_lines(custom)
    assert sorted(traced_servers(lines)) == ["demo", "other"], lines
    assert any(pid == daemon and msg.startswith("bound ") for pid, msg in log_events(lines)), lines
    assert file_mode(custom) == 0o600


def test_log_environment_variables(h):
    h.configure({"other": h.demo_server_entry()})
    custom = h.tmp / "env.log"
    env = h.env(MCPORTER_DAEMON_LOG_PATH=custom, MCPORTER_DAEMON_LOG_SERVERS="other")
    # An auto-starting call passes the environment's choices on to the daemon it launches.
    assert h.run("call", "demo.counter", env=env).ok() == "1"
    assert h.run("call", "other.counter", env=env).ok() == "1"
    st = h.status(env=env)
    assert Path(st["logPath"]) == custom
    lines = log_lines(custom)
    assert traced_servers(lines) == ["other"], lines
    assert (st["pid"], f"[demo] demo MCP server ready (pid {server_pid(st, 'demo')})") in log_events(lines), (
        lines
    )
    assert file_mode(custom) == 0o600


def test_log_env_verbose_foreground_logs_to_stderr(h):
    env = h.env(MCPORTER_DAEMON_LOG="1")
    fg = h.popen_argv(h.argv("start", "--foreground"), env, h.tmp)
    h.wait_serving(fg)
    assert call_ok(h, "demo.counter") == "1"
    server = server_pid(h.status())

    def traced():
        lines = log_lines(fg.err_path)
        return lines if "demo" in traced_servers(lines) else None

    lines = wait_until(traced, 5, message="a call trace on the foreground daemon's stderr")
    events = log_events(lines)
    assert any(pid == fg.pid and msg.startswith("bound ") for pid, msg in events), lines
    assert (fg.pid, f"[demo] demo MCP server ready (pid {server})") in events, lines
    assert not h.path("log").exists() or "callTool" not in h.path("log").read_text()
    fg.send_signal(signal.SIGTERM)
    assert wait_exit(fg, 10) == 0
    assert (fg.pid, "shutting down: signal 15") in log_events(log_lines(fg.err_path))


def test_log_records_lifecycle_events_with_reasons(h):
    log = h.path("log")
    a = started_pid(h.run("start"))
    data = h.config_data()
    data["mcpServers"]["demo"]["env"] = {"MD_OPS_EDIT": "1"}
    h.write_config(data)
    assert call_ok(h, "demo.counter") == "1"
    b = running_status(h)["pid"]
    assert b != a
    h.sigstop(b)
    assert call_ok(h, "demo.counter") == "1"
    c = running_status(h)["pid"]
    assert c not in (a, b)
    h.run("stop").ok()

    events = log_events(log_lines(log))

    def first(pid, prefix):
        for i, (p, msg) in enumerate(events):
            if p == pid and msg.startswith(prefix):
                return i
        raise AssertionError(f"no log line from pid {pid} starting {prefix!r}:\n{events!r}")

    # A stale daemon is stopped, with the reason, before its successor binds.
    stale = first(b, f"stopping stale daemon pid {a} (fingerprint changed)")
    assert stale < first(a, "shutting down: stop request") < first(b, "bound ")
    # A stopped (hung) daemon is terminated, with the reason, before its successor binds.
    assert first(c, f"terminating hung daemon pid {b}: stopped") < first(c, "bound ")
    assert first(c, "shutting down: stop request") < first(c, "daemon exited")
    assert first(a, "bound ") < stale


def test_daemon_log_rotates_at_10_mb_keeping_one_old_file(tmp_path):
    md = _import_module()
    path = tmp_path / "daemon.log"
    log = md.DaemonLog(str(path))
    filler = "x" * 1000
    n = (25 * LOG_BOUND) // (10 * 1010)  # about 25 MB: two rotations
    for i in range(n):
        log.write(f"{i:08d} {filler}")
    log.event("after the rotations")
    assert path.stat().st_size <= LOG_BOUND
    old = Path(str(path) + ".1")
    assert old.exists()
    assert LOG_BOUND - 2048 < old.stat().st_size <= LOG_BOUND + 2048
    assert not Path(str(path) + ".2").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["daemon.log", "daemon.log.1"]
    assert file_mode(path) == 0o600 and file_mode(old) == 0o600
    # No line is lost or split across the last rotation.
    seq = [int(ln[:8]) for ln in old.read_text().splitlines() + path.read_text().splitlines()[:-1]]
    assert seq == list(range(seq[0], n)), "lines lost across the rotation"
    assert path.read_text().splitlines()[-1].endswith("after the rotations")


def test_daemon_log_rotates_under_a_real_daemon(h):
    # A server that writes 11 MB to stderr at start: the daemon's log must stay bounded.
    chatty = h.demo_server_with(
        before="line = 'e' * 1023 + '\\n'\nfor _ in range(11 * 1024):\n    sys.stderr.write(line)\nsys.stderr.flush()\n"
    )
    h.write_config({"mcpServers": {"chatty": chatty}})
    daemon = started_pid(h.run("start"))
    assert call_ok(h, "chatty.counter") == "1"
    log, old = h.path("log"), Path(str(h.path("log")) + ".1")
    assert old.exists(), "no rotation after 11 MB of server stderr"
    assert not Path(str(log) + ".2").exists()
    assert log.stat().st_size <= LOG_BOUND
    assert file_mode(log) == 0o600 and file_mode(old) == 0o600
    server = server_pid(h.status(), "chatty")
    assert (daemon, f"[chatty] demo MCP server ready (pid {server})") in log_events(log_lines(log))
    # The detached daemon's own stderr follows the rotation (tracebacks land in the live log).
    assert os.readlink(f"/proc/{daemon}/fd/2") == str(log)
    h.run("stop").ok()
    assert (daemon, "shutting down: stop request") in log_events(log_lines(log))


def test_daemon_idle_timeout_shuts_daemon_down(h):
    h.configure(daemonIdleTimeoutMs=1000)
    daemon = started_pid(h.run("start"))
    assert call_ok(h, "demo.counter") == "1"
    server = server_pid(h.status())
    wait_until(lambda: not pid_alive(daemon), 6, message=f"idle daemon {daemon} to exit")
    wait_until(lambda: not pid_alive(server), 5, message="its MCP server to exit")
    assert not h.socket_path.exists() and not h.meta_path.exists()
    assert h.status()["running"] is False
    assert (daemon, "shutting down: idle for 1s") in log_events(log_lines(h.path("log")))
    h.expect_no_leftovers = True


def slow_server_entry(h, before_handshake=0.0, ignore_term=False):
    """The demo server, tagged, that ignores stdin EOF (so closing it takes the full grace),
    optionally sleeps before its handshake and optionally ignores SIGTERM too."""
    before = "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else ""
    return h.demo_server_with(
        before=before + f"time.sleep({before_handshake!r})\n", after="time.sleep(3600)\n"
    )


class ServerCopyWatch:
    """Samples this test's MCP server processes on a thread; remembers the most seen at once."""

    def __init__(self, h):
        self.h, self.most, self.seen_together = h, 0, set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="server-watch", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            now = {pid for pid in self.h.server_pids() if (st := proc_stat(pid)) and st.state != "Z"}
            if len(now) > self.most:
                self.most, self.seen_together = len(now), now
            self._stop.wait(0.005)

    def stop(self):
        self._stop.set()
        self._thread.join(5)
        return self.most


def shutting_down(h):
    """The daemon's answer is "shutting down" (it is still closing its servers)."""
    try:
        resp, _, _ = raw_request(h.socket_path, "status", {}, idle=2.0)
    except (OSError, EOFError):
        return False
    return (resp.get("error") or {}).get("code") == "shutting_down"


def test_stop_during_server_start_leaves_no_orphan(h):
    """A stop while a server is still in its handshake ends that server, and the caller that
    was waiting for it gets one line saying the daemon stopped — no retry, no new daemon."""
    h.write_config({"mcpServers": {"demo": slow_server_entry(h, before_handshake=60)}})
    h.expect_no_leftovers = True
    caller = h.popen("call", "demo.counter")
    wait_until(lambda: h.server_pids(), 20, message="the server to be starting")
    (server,) = h.server_pids()
    r = h.run("stop")
    assert r.rc == 0 and r.out.startswith("stopped (pid "), r
    wait_until(lambda: not pid_alive(server), 3, message=f"the half-started server {server} to be gone")
    assert wait_exit(caller, 20) == 1
    err = read_file(caller.err_path).strip()
    assert len(err.splitlines()) == 1 and "daemon stopped" in err, err
    assert h.daemon_pids() == set(), "the caller must not start a new daemon after stop"
    assert not h.meta_path.exists() and not h.socket_path.exists()


def test_slow_server_close_never_delays_status(h):
    """A per-server idle close that takes seconds runs beside the accept loop: status stays fast."""
    entry = slow_server_entry(h, ignore_term=True)  # EOF and SIGTERM ignored: two close grace steps
    entry["lifecycle"] = {"mode": "keep-alive", "idleTimeoutMs": 200}
    h.write_config({"mcpServers": {"demo": entry}})
    assert call_ok(h, "demo.counter") == "1"
    daemon = running_status(h)["pid"]
    (server,) = h.server_pids()
    poller = StatusLatencyPoller(str(h.socket_path), daemon).start()
    try:
        wait_until(lambda: not pid_alive(server), 15, message="the idle server to be closed")
    finally:
        poller.stop()
    print(poller.summary())
    poller.assert_responsive(limit=1.0, min_polls=20)


def spawn_limited(h, argv, limits, env=None, stderr=subprocess.PIPE):
    """Start ``argv`` with resource limits set in the child (fault injection), tracked."""
    import resource

    def preexec():
        for which, value in limits.items():
            resource.setrlimit(which, (value, resource.getrlimit(which)[1]))  # soft: a test may lift it

    with _SPAWN_LOCK:
        p = subprocess.Popen(
            [str(a) for a in argv],
            env=env or h.env(),
            cwd=str(h.tmp),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=preexec,
        )
        _POPENS.append(p)
    h.popens.append(p)
    h.track(p.pid)
    return p


class StderrLines:
    """Collects a child's stderr lines on a thread (a pipe: no file size limit applies)."""

    def __init__(self, stream):
        self.lines = []
        threading.Thread(target=self._run, args=(stream,), daemon=True).start()

    def _run(self, stream):
        for raw in iter(stream.readline, b""):
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def text(self):
        return "\n".join(self.lines)


def test_metadata_write_failure_is_logged_and_retried(h):
    """A full disk (RLIMIT_FSIZE) during a metadata rewrite: the daemon logs it, keeps serving
    and writes the record once it can."""
    import resource

    probe = h.popen("start", "--foreground")
    wait_until(lambda: h.meta() is not None, 20, message="a first daemon's metadata")
    size = h.meta_path.stat().st_size  # without servers; a rewrite listing the server is larger
    assert h.run("stop").rc == 0
    wait_exit(probe, 10)

    daemon = spawn_limited(h, h.argv("start", "--foreground"), {resource.RLIMIT_FSIZE: size + 8})
    log = StderrLines(daemon.stderr)
    wait_until(lambda: (h.meta() or {}).get("pid") == daemon.pid, 20, message="the limited daemon's metadata")
    assert call_ok(h, "demo.counter") == "1"
    wait_until(lambda: "File too large" in log.text(), 10, message="the rewrite to fail")
    assert call_ok(h, "demo.counter") == "2", "the daemon must keep serving (same server)"
    assert daemon.poll() is None and running_status(h)["pid"] == daemon.pid, log.text()
    assert "cannot write metadata" in log.text() and "Traceback" not in log.text(), log.text()

    hard = resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE, (hard, hard))  # space freed
    wait_until(lambda: "demo" in ((h.meta() or {}).get("servers") or {}), 10, message="the retried rewrite")
    # Logged after the write; the collecting thread may not have read it yet.
    wait_until(lambda: "metadata written again" in log.text(), 5, message="the rewrite to be logged")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_accept_survives_fd_exhaustion_without_spinning(h):
    """Out of fds (RLIMIT_NOFILE), accept() backs off instead of spinning, and the daemon
    serves again once descriptors are free."""
    import resource

    daemon = spawn_limited(
        h, h.argv("start", "--foreground"), {resource.RLIMIT_NOFILE: 48}, stderr=subprocess.DEVNULL
    )
    wait_until(lambda: (h.meta() or {}).get("pid") == daemon.pid, 20, message="the limited daemon to serve")
    hogs = []
    try:
        for _ in range(80):  # idle connections: each accepted one holds a daemon fd
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(str(h.socket_path))
            hogs.append(s)
        wait_until(
            lambda: len(os.listdir(f"/proc/{daemon.pid}/fd")) >= 46,
            10,
            message="the daemon to run out of fds",
        )
        before, t0 = cpu_seconds(daemon.pid), time.monotonic()
        time.sleep(1.5)  # a window to measure CPU over, not a settle wait
        used = cpu_seconds(daemon.pid) - before
        window = time.monotonic() - t0
        assert used < 0.3 * window, (
            f"daemon used {used:.2f}s CPU in {window:.2f}s while out of fds (spinning)"
        )
    finally:
        for s in hogs:
            s.close()
    st = running_status(h)
    assert st["pid"] == daemon.pid and daemon.poll() is None
    assert call_ok(h, "demo.counter") == "1"


VENDORED_RERUN_SCRIPT = """\
import os, signal, sys, threading
sys.path.insert(0, {here!r})
import mcporter_daemon

base = sys.argv[1]


def fds():
    return len(os.listdir("/proc/self/fd"))


def run_once(n):
    paths = mcporter_daemon.DaemonPaths.for_key("rerun", base)
    host = mcporter_daemon.DaemonHost(paths, "fp", {{"ping": lambda params, ctx: "pong"}})

    def stop_when_serving():
        while mcporter_daemon.read_metadata(paths.metadata) is None:
            threading.Event().wait(0.01)
        host.request_stop("test")

    threading.Thread(target=stop_when_serving, daemon=True).start()
    assert host.run() == 0


before = fds()
for n in range(3):
    run_once(n)
print("fds", before, fds())
print("sigint", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
try:
    os.kill(os.getpid(), signal.SIGINT)
    signal.sigtimedwait([], 0) if hasattr(signal, "sigtimedwait") else None
    print("no KeyboardInterrupt")
except KeyboardInterrupt:
    print("KeyboardInterrupt")
"""


def test_vendored_host_run_restores_signals_and_closes_its_pipe(h):
    script = h.tmp / "rerun.py"
    script.write_text(VENDORED_RERUN_SCRIPT.format(here=str(HERE)))
    args = [sys.executable, str(script), str(h.state_dir)]
    p = spawn(args, h.env(), h.tmp, subprocess.PIPE, subprocess.PIPE)
    h.popens.append(p)
    r = communicate_text(p, args, 60)
    assert r.rc == 0, r
    lines = r.out.splitlines()
    fds = lines[0].split()
    assert fds[1] == fds[2], f"each run leaked descriptors: {lines[0]}"
    assert lines[1:] == ["sigint True", "KeyboardInterrupt"], r


@pytest.mark.parametrize(
    "idle_timeout, active, idle_for, expected",
    [
        (None, 0, 1e9, False),  # no idle timeout configured
        (0, 0, 1e9, False),
        (10.0, 0, 9.99, False),
        (10.0, 0, 10.0, True),
        (10.0, 0, 50.0, True),
        (10.0, 1, 50.0, False),  # a request still running is activity
        (10.0, 3, 10.0, False),
    ],
)
def test_idle_expired_table(idle_timeout, active, idle_for, expected):
    assert _import_module().idle_expired(idle_timeout, active, idle_for) is expected


@pytest.mark.parametrize("previous, expected", [(0.0, 0.05), (0.05, 0.1), (0.4, 0.8), (0.8, 1.0), (1.0, 1.0)])
def test_accept_backoff_table(previous, expected):
    assert _import_module().accept_backoff(previous) == pytest.approx(expected)


def test_log_line_time_stamp_comes_from_one_clock_read(tmp_path, monkeypatch):
    md = _import_module()
    monkeypatch.setattr(md.time, "time", lambda: 86400.5)  # 1970-01-02T00:00:00.500Z
    log = md.DaemonLog(str(tmp_path / "x.log"))
    log.event("hello")
    line = (tmp_path / "x.log").read_text().splitlines()[-1]
    assert line == f"1970-01-02T00:00:00.500Z [{os.getpid()}] hello", line


SOCK = GOOD_RECORD["socketPath"]


MATCH_METAS = {
    "record": (GOOD_RECORD, True),
    "none": (None, False),
    "other-socket": (_record(socketPath="/x"), False),
}


MATCH_STATUSES = {
    "same": ({"pid": 4242, "socketPath": SOCK}, True),
    "none": (None, False),
    "other-pid": ({"pid": 4243, "socketPath": SOCK}, False),
    "other-socket": ({"pid": 4242, "socketPath": "/x"}, False),
    "pid-string": ({"pid": "4242", "socketPath": SOCK}, False),
    "not-a-dict": ([4242, SOCK], False),
}


MATCH_FACTS = {
    "running": (("777", "S"), True),
    "busy": (("777", "R"), True),
    "gone": ((None, None), False),
    "reused": (("999", "S"), False),
    "zombie": (("777", "Z"), False),
    "stopped": (("777", "T"), False),
    "traced": (("777", "t"), False),
}


@pytest.mark.parametrize("fact", sorted(MATCH_FACTS))
@pytest.mark.parametrize("answer", sorted(MATCH_STATUSES))
@pytest.mark.parametrize("meta", sorted(MATCH_METAS))
def test_status_matches_table(meta, answer, fact):
    md = _import_module()
    record, record_ok = MATCH_METAS[meta]
    status, status_ok = MATCH_STATUSES[answer]
    facts, facts_ok = MATCH_FACTS[fact]
    assert md.record_is_live(record, SOCK, facts) is (record_ok and facts_ok)
    assert md.status_matches(record, status, SOCK, facts) is (record_ok and facts_ok and status_ok)


SET_HOST_SCRIPT = """\
import os, sys
sys.path.insert(0, {here!r})
import mcporter_daemon

base, runs = sys.argv[1], sys.argv[2]


def bag(params, ctx):
    with open(runs, "a") as f:
        f.write("ran\\n")
    return {{1, 2}}  # not JSON


def crash(params, ctx):
    with open(runs, "a") as f:
        f.write("ran\\n")
    os._exit(1)  # after the request was delivered: the caller must not send it again


handlers = {{"bag": bag, "crash": crash}}
host = mcporter_daemon.DaemonHost(mcporter_daemon.DaemonPaths.for_key("sethost", base), "fp-set", handlers)
sys.exit(host.run())
"""


def set_host_client(h, md, runs):
    """A client that auto-starts the vendored set/crash host (tagged, so cleanup finds it)."""
    script = h.tmp / "set_host.py"
    script.write_text(SET_HOST_SCRIPT.format(here=str(HERE)))
    paths = md.DaemonPaths.for_key("sethost", str(h.state_dir))
    return md.DaemonClient(paths, "fp-set", [sys.executable, str(script), str(h.state_dir), str(runs), h.tag])


def test_unencodable_handler_result_gets_an_error_and_runs_once(h):
    md = _import_module()
    runs = h.tmp / "set-runs"
    client = set_host_client(h, md, runs)
    try:
        with pytest.raises(md.RemoteError) as info:
            client.request("bag", {}, idle_timeout=10.0)
        assert info.value.code == "unencodable_result" and "set" in str(info.value), info.value
        assert runs.read_text().splitlines() == ["ran"], "the handler ran more than once"
        assert client.request("status", {}, idle_timeout=10.0)["pid"] in h.server_pids()
    finally:
        h.server_pids()
        client.stop()


def sleep_request(seconds):
    """A raw callTool of demo.sleep without progressIntervalMs: no frames whose send could fail."""
    req = {
        "id": "raw",
        "method": "callTool",
        "params": {"server": "demo", "tool": "sleep", "args": {"seconds": seconds}},
    }
    return (json.dumps(req) + "\n").encode()


def test_half_closed_caller_is_answered_and_a_closed_one_cancelled(h):
    entry, log = cancel_log_entry(h)
    h.write_config({"mcpServers": {"demo": entry}})
    server = int(call_ok(h, "demo.pid"))
    # Done writing but still reading (as `nc -N` does): the caller is still there.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(20)
        s.connect(str(h.socket_path))
        s.sendall(sleep_request(1))
        s.shutdown(socket.SHUT_WR)
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    answer = json.loads(data)
    assert answer.get("ok") is True and answer["result"]["content"][0]["text"] == "slept 1", answer
    assert cancellations(log) == []
    # Closed while the call runs: nothing is ever sent on it, yet the server is told to cancel.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(h.socket_path))
    s.sendall(sleep_request(3))
    wait_until(lambda: thread_count(server) >= 2, 10, message="the server to run the call")
    went = time.time()
    s.close()
    seen = wait_until(lambda: cancellations(log), 5, message="the server to get notifications/cancelled")
    took = seen[0]["at"] - went
    print(
        f"\nclosed socket (keep-alive): caller gone -> server saw notifications/cancelled in {took * 1000:.0f} ms"
    )
    assert took < 1.0, f"cancelled {took:.2f}s after the caller went away"
    wait_until(lambda: thread_count(server) == 1, 10, message="the cancelled sleep to end")
    assert int(call_ok(h, "demo.pid")) == server


# plan_takeover(probe, fresh, owner_ours, owner_stopped) for every combination of its inputs,
# written out rather than derived, so that a change to the decision has to change this table.
#   probe: "live" (answers status for this socket path, its pid alive), "stopping" (answers
#          "shutting down" with a live pid), "silent" (the first
#          probe timed out), "silent-twice" (the second, longer probe too), "busy" (answered
#          `busy`), "closed" (accepted, then closed without a frame), "busy-twice" (a second
#          probe after a busy or closed first one got no answer either) or "dead" (refused,
#          no socket file, an error answer, another socket path, or a dead pid);
#   fresh: the live answer's fingerprint is this host's (no answer has no fingerprint, so
#          False is what the bind guard passes unless the probe is live);
#   owner_ours / owner_stopped: the metadata's pid is alive with the recorded start time, and
#          the OS reports it stopped (state T). The bind guard asks for "stopped" only of an
#          owner that is ours; a "stopped" owner that is not ours must be ignored all the same,
#          since nothing is ever signalled on a pid that is not ours (verified peer).
PLAN_TAKEOVER_TABLE = [
    # probe, fresh, owner_ours, owner_stopped, plan
    ("live", False, False, False, "stop-then-bind"),  # stale stops first: stopped before rebind
    ("live", False, False, True, "stop-then-bind"),  # "stopped" of a pid not ours changes nothing
    ("live", False, True, False, "stop-then-bind"),
    # Live, but the owner is ours and stopped (only after a second probe: a stopped owner is not
    # probed). It is hung "whatever it answers": the answer came before the stop, or from another
    # daemon; the decision is not told which, and ends the stopped owner either way.
    ("live", False, True, True, "terminate-then-bind"),
    ("live", True, False, False, "reconcile"),  # hands off the living: keep it, fix the metadata
    ("live", True, False, True, "reconcile"),  # "stopped" of a pid not ours changes nothing
    ("live", True, True, False, "reconcile"),
    ("live", True, True, True, "terminate-then-bind"),  # stopped beats a fresh answer, as above
    # Stopping: it answered "shutting down" with its pid. It still owns its servers, so the
    # starter waits for that pid to go (stop is a barrier), fresh or not, ours or not...
    ("stopping", False, False, False, "wait-then-bind"),
    ("stopping", False, False, True, "wait-then-bind"),
    ("stopping", False, True, False, "wait-then-bind"),
    ("stopping", True, False, False, "wait-then-bind"),
    ("stopping", True, False, True, "wait-then-bind"),
    ("stopping", True, True, False, "wait-then-bind"),
    # ...unless the owner is ours and the OS says it is stopped: it would never finish stopping.
    ("stopping", False, True, True, "terminate-then-bind"),
    ("stopping", True, True, True, "terminate-then-bind"),
    # One timeout is no proof of a hang (a busy or loaded daemon is slow): ask again, longer.
    ("silent", False, False, False, "probe-again"),
    ("silent", False, False, True, "probe-again"),  # not ours: its state is no evidence
    ("silent", False, True, False, "probe-again"),  # ours and running: maybe just busy
    ("silent", False, True, True, "terminate-then-bind"),  # ours and stopped: hung, no second probe
    ("silent", True, False, False, "probe-again"),  # (fresh without an answer: ignored)
    ("silent", True, False, True, "probe-again"),
    ("silent", True, True, False, "probe-again"),
    ("silent", True, True, True, "terminate-then-bind"),
    # Silent twice: hung. End it when it is ours; an owner we cannot verify is left alone and
    # only its socket file is replaced (it exits when it notices: no socket, no daemon).
    ("silent-twice", False, False, False, "bind"),
    ("silent-twice", False, False, True, "bind"),
    ("silent-twice", False, True, False, "terminate-then-bind"),
    ("silent-twice", False, True, True, "terminate-then-bind"),
    ("silent-twice", True, False, False, "bind"),
    ("silent-twice", True, False, True, "bind"),
    ("silent-twice", True, True, False, "terminate-then-bind"),
    ("silent-twice", True, True, True, "terminate-then-bind"),
    # Busy: it answered `busy` (at its connection or memory cap). Whoever answers is alive, so
    # never bind over it at first sight, ours or not: ask again, longer...
    ("busy", False, False, False, "probe-again"),
    ("busy", False, False, True, "probe-again"),
    ("busy", False, True, False, "probe-again"),
    ("busy", True, False, False, "probe-again"),  # (fresh without a status answer: ignored)
    ("busy", True, False, True, "probe-again"),
    ("busy", True, True, False, "probe-again"),
    # ...unless the owner is ours and stopped: the OS's word is proof of a hang.
    ("busy", False, True, True, "terminate-then-bind"),
    ("busy", True, True, True, "terminate-then-bind"),
    # Closed: accepted, then closed without a word (an older daemon at its cap does this). From
    # the pid the record names alive it is a sign of life: ask again. With no live owner on
    # record, nothing proves anyone serves there: plainly stale.
    ("closed", False, False, False, "bind"),
    ("closed", False, False, True, "bind"),
    ("closed", False, True, False, "probe-again"),
    ("closed", False, True, True, "terminate-then-bind"),
    ("closed", True, False, False, "bind"),
    ("closed", True, False, True, "bind"),
    ("closed", True, True, False, "probe-again"),
    ("closed", True, True, True, "terminate-then-bind"),
    # Busy twice (busy or closed, then no answer again): alive but slow, not hung. Only the
    # OS's "stopped", or silence on both probes, is proof; this starter leaves it serving.
    ("busy-twice", False, False, False, "leave"),
    ("busy-twice", False, False, True, "leave"),
    ("busy-twice", False, True, False, "leave"),
    ("busy-twice", False, True, True, "terminate-then-bind"),
    ("busy-twice", True, False, False, "leave"),
    ("busy-twice", True, False, True, "leave"),
    ("busy-twice", True, True, False, "leave"),
    ("busy-twice", True, True, True, "terminate-then-bind"),
    # Dead socket: nothing to keep. An owner that is still ours and alive no longer answers on
    # this path (its socket was removed or replaced): end it with its MCP servers before
    # binding, rather than let two daemons run until it notices.
    ("dead", False, False, False, "bind"),
    ("dead", False, False, True, "bind"),
    ("dead", False, True, False, "terminate-then-bind"),
    ("dead", False, True, True, "terminate-then-bind"),
    ("dead", True, False, False, "bind"),
    ("dead", True, False, True, "bind"),
    ("dead", True, True, False, "terminate-then-bind"),
    ("dead", True, True, True, "terminate-then-bind"),
]


def _plan_row_id(row):
    probe, fresh, ours, stopped, _ = row
    return "-".join([probe, "fresh" if fresh else "stale", "ours" if ours else "foreign"]) + (
        "-stopped" if stopped else ""
    )


def test_plan_takeover_table_covers_every_input_combination():
    combos = [row[:4] for row in PLAN_TAKEOVER_TABLE]
    every = [
        (probe, fresh, ours, stopped)
        for probe in ("live", "stopping", "silent", "silent-twice", "busy", "closed", "busy-twice", "dead")
        for fresh in (False, True)
        for ours in (False, True)
        for stopped in (False, True)
    ]
    assert sorted(combos) == sorted(every), "each combination exactly once"


@pytest.mark.parametrize(
    ("probe", "fresh", "owner_ours", "owner_stopped", "plan"),
    PLAN_TAKEOVER_TABLE,
    ids=[_plan_row_id(row) for row in PLAN_TAKEOVER_TABLE],
)
def test_plan_takeover_table(probe, fresh, owner_ours, owner_stopped, plan):
    md = _import_module()
    assert md.plan_takeover(probe, fresh, owner_ours, owner_stopped) == plan


def signal_disposition(pid, sig):
    """How process ``pid`` treats ``sig``: "ignored", "caught" or "default" (/proc status masks)."""
    masks = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("SigIgn", "SigCgt"):
            masks[name] = int(value.strip(), 16)
    bit = 1 << (int(sig) - 1)
    if masks.get("SigIgn", 0) & bit:
        return "ignored"
    return "caught" if masks.get("SigCgt", 0) & bit else "default"


# Exec argv[1:] with SIGHUP ignored, as `nohup` leaves it.
WITH_SIGHUP_IGNORED = (
    "import os, signal, sys\n"
    "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


@pytest.mark.parametrize("inherited", ["ignored", "default"])
def test_sighup_ignored_under_nohup_stays_ignored(h, inherited):
    """A foreground daemon started under nohup keeps SIGHUP ignored: a hangup leaves it and its
    warm servers serving. Without nohup, SIGHUP is a graceful shutdown, as SIGTERM is."""
    argv = h.argv("start", "--foreground")
    if inherited == "ignored":
        argv = [sys.executable, "-c", WITH_SIGHUP_IGNORED] + argv
    fg = h.popen_argv(argv, h.env())
    wait_until(lambda: (h.meta() or {}).get("pid") == fg.pid, CLI_TIMEOUT, message="the daemon to bind")
    assert call_ok(h, "demo.counter") == "1"
    server = server_pid(running_status(h))
    expected = "ignored" if inherited == "ignored" else "caught"
    assert signal_disposition(fg.pid, signal.SIGHUP) == expected
    fg.send_signal(signal.SIGHUP)
    if inherited == "ignored":
        assert call_ok(h, "demo.counter") == "2", "the hangup cost the warm state"
        st = running_status(h)
        assert (st["pid"], server_pid(st)) == (fg.pid, server)
        assert fg.poll() is None
        return
    assert fg.wait(timeout=CLI_TIMEOUT) == 0, read_file(fg.err_path)
    assert not pid_alive(server), "the daemon's server outlived its SIGHUP shutdown"
    assert not h.meta_path.exists() and not h.socket_path.exists()


# ##########################################################################################
# Daemon client: verified status, ensure (spawn lock, detached launch), requests, stop.
# ##########################################################################################


def test_status_when_nothing_runs(h):
    r = h.run("status", "--json")
    assert r.rc == 3, r  # LSB, as systemctl: 3 is "not running"
    data = json.loads(r.out)
    assert data["running"] is False
    r = h.run("status")
    assert r.rc == 3 and r.out.startswith("not running"), r
    assert h.daemon_pids() == set(), "status must not start a daemon"
    assert not h.socket_path.exists()


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


def test_stop_leaves_nothing(h):
    assert call_ok(h, "demo.counter") == "1"
    daemon = running_status(h)["pid"]
    server = server_pid(h.status())
    assert h.socket_path.exists() and h.meta_path.exists()

    r = h.run("stop")
    assert r.rc == 0, r
    assert r.out.strip() or r.err.strip(), "stop printed nothing"
    assert not pid_alive(daemon), f"daemon {daemon} still running after stop"
    assert not pid_alive(server), f"MCP server {server} still running after stop"
    assert h.daemon_pids() == set()
    assert h.server_pids() == set()
    assert not h.socket_path.exists()
    assert not h.meta_path.exists()
    assert h.status()["running"] is False

    r = h.run("stop")
    assert r.rc == 0, r
    h.expect_no_leftovers = True


def test_progress_frames_keep_long_call_alive_but_silence_trips_budget(h):
    daemon = start_daemon(h)
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
    daemon = start_daemon(h)
    monkeypatch.setenv("MCPORTER_DAEMON_DIR", str(h.state_dir))
    client = md.DaemonClient(md.DaemonPaths.for_config(str(h.cfg)), "unused-fingerprint", [])
    # A call twice as long as the client's 1 s idle budget: progress frames keep it going.
    params = {"server": "demo", "tool": "sleep", "args": {"seconds": 2}, "timeoutMs": 20000}

    t0 = time.monotonic()
    result = client.request("callTool", params, idle_timeout=1.0, progress_ms=250, auto_start=False)
    assert time.monotonic() - t0 >= 1.9
    assert [c.get("text") for c in result["content"]] == ["slept 2"], result

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


# -- the core as the README vendors it --


def readme_vendoring_example():
    """Exactly the first ```python block under the README's "Vendoring" heading."""
    readme = (HERE / "README.md").read_text()
    section = readme.split("\n## Vendoring\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Vendoring section has no python block"
    return match.group(1)


CORE_END_MARKER = (
    "# ==== The vendorable core ends here. Everything below is MCP: config, servers, the CLI. ===="
)


def test_vendorable_core_comes_first_and_says_nothing_of_mcp():
    """Everything from the first section banner down to the core's end line is free of MCP (the
    README tells vendors they may copy down to that line), and uses nothing defined below it."""
    import ast

    text = MODULE_PATH.read_text()
    lines = text.split("\n")
    assert lines.count(CORE_END_MARKER) == 1, "the core's end line must appear exactly once"
    assert CORE_END_MARKER in (HERE / "README.md").read_text(), "the README names the core's end line"
    start = next(i for i, ln in enumerate(lines) if ln.startswith("# Constants and errors"))
    end = lines.index(CORE_END_MARKER)
    mentions = re.compile(r"(?<![A-Za-z])(?:MCP|mcp|Mcp)(?![A-Za-z])|\bMcp[A-Z]")
    found = [f"{i + 1}: {lines[i].strip()}" for i in range(start, end) if mentions.search(lines[i])]
    assert not found, "the core mentions MCP:\n" + "\n".join(found)
    # Nor this tool: its name, env prefix, state dir, handler error codes and call timeout
    # are the MCP part's to set (DaemonApp), so a vendored copy carries none of them.
    ours = re.compile(
        r"mcporter[-_]daemon|MCPORTER_|pydaemon|\.mcporter|/tmp/mcporter|_DEFAULT_CALL_TIMEOUT"
        r"|\b(unknown_server|not_keep_alive|command_not_found|invalid_arguments)\b"
    )
    found = [f"{i + 1}: {lines[i].strip()}" for i in range(start, end) if ours.search(lines[i])]
    assert not found, "the core names this tool:\n" + "\n".join(found)
    tree = ast.parse(text)
    below = set()
    for node in tree.body:
        if node.lineno > end + 1:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                below.add(node.name)
            elif isinstance(node, ast.Assign):
                below.update(t.id for t in node.targets if isinstance(t, ast.Name))
    used = sorted(
        {
            (n.lineno, n.id)
            for n in ast.walk(tree)
            if isinstance(n, ast.Name) and n.lineno <= end and n.id in below
        }
    )
    assert not used, f"the core uses names defined below it: {used}"


def vendorable_core_text():
    """The module down to (and with) the core's end line: what the README lets vendors copy."""
    text = MODULE_PATH.read_text()
    return text[: text.index(CORE_END_MARKER) + len(CORE_END_MARKER)] + "\n"


def test_vendorable_core_alone_star_imports_its_api(h):
    """The core cut at its end line is a module of its own: ``from core import *`` binds every
    name its ``__all__`` lists, that list names no MCP, and it holds every ``md.`` name the
    README's example uses (the vendoring API the README names)."""
    work = h.tmp / "core-only"
    work.mkdir()
    (work / "core.py").write_text(vendorable_core_text())
    probe = (
        "import json, core\n"
        "from core import *\n"
        "missing = [n for n in core.__all__ if n not in globals()]\n"
        "print(json.dumps({'all': core.__all__, 'missing': missing}))\n"
    )
    r = h.run(argv=[sys.executable, "-c", probe], cwd=work)
    assert r.rc == 0, r
    found = json.loads(r.out)
    assert found["missing"] == [], found
    assert not [n for n in found["all"] if re.search(r"mcp|main", n, re.I)], found["all"]
    used = set(re.findall(r"\bmd\.(\w+)", readme_vendoring_example()))
    used |= set(re.findall(r"`md\.(\w+)", (HERE / "README.md").read_text()))
    assert used and used <= set(found["all"]), sorted(used - set(found["all"]))


def test_readme_vendoring_example_runs_as_is(h):
    """The README's example, run against the core alone (the file cut at its end line)."""
    work = h.tmp / "vendor"
    work.mkdir()
    (work / "mcporter_daemon.py").write_text(vendorable_core_text())
    (work / "example.py").write_text(readme_vendoring_example())
    tmp = h.tmp / "vendor-tmp"  # the example keeps its state under tempfile.gettempdir()
    tmp.mkdir()
    marker = "vendor-" + uuid.uuid4().hex
    h.extra_markers.append(marker)
    env = h.env(TMPDIR=str(tmp))
    env[MARKER_VAR] = marker  # inherited by the daemon the example starts
    env.pop("MCPORTER_DAEMON_DIR")
    args = [sys.executable, "example.py"]
    p = spawn(args, env, work, subprocess.PIPE, subprocess.PIPE)
    h.popens.append(p)
    r = communicate_text(p, args, 60)
    assert r.rc == 0, r
    lines = r.out.splitlines()
    m = re.match(r"hello, vendor from daemon pid (\d+)$", lines[0]) if lines else None
    assert m, r
    daemon = int(m.group(1))
    assert daemon != p.pid, "the answer must come from a separate daemon process"
    assert lines[1:] == [f"stopped (pid {daemon})"], r
    wait_until(lambda: not pid_alive(daemon), 5, message="the example's daemon to exit")
    assert not procs_with_env_marker(marker), "the example left processes behind"
    assert list(tmp.iterdir()) == [], "the example left files behind"
    assert sorted(x.name for x in work.iterdir() if x.name != "__pycache__") == [
        "example.py",
        "mcporter_daemon.py",
    ]


def test_daemon_child_start_failure_is_shown_at_once(h):
    bad_log = "/nonexistent/dir/x.log"
    r = h.run("call", "demo.echo", "text=x", MCPORTER_DAEMON_LOG_PATH=bad_log)
    assert_prompt_error(r, 1, f"cannot open log file {bad_log}")
    assert h.daemon_pids() == set()


def test_idle_shutdown_racing_starters_never_strands_a_caller(h):
    """Callers strike around the idle deadline and while the idle daemon shuts down; every one
    is served, and at no moment do two daemons serve (listen on the socket path) at once. A
    daemon that gave up its socket and is closing its servers is exiting, not serving."""
    h.configure(daemonIdleTimeoutMs=400)
    sock = str(h.socket_path)
    peak = [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], socket_listeners(sock))
            done.wait(0.003)

    watcher = threading.Thread(target=watch, name="listener-watch", daemon=True)
    watcher.start()
    # Moments to strike, in seconds after the previous burst: around the 400 ms idle deadline and
    # across the host's housekeeping tick that acts on it. Each burst is three commands 40 ms
    # apart. These delays are the race's input, not a synchronisation.
    tick = _import_module()._SOCKET_CHECK_INTERVAL
    offsets = [0.30, 0.38, 0.42, 0.5] + [0.4 + tick * k for k in (0.4, 0.6, 0.8, 1.0)]
    results = []

    def idle_shutdowns():
        events = log_events(log_lines(h.path("log")))
        return [pid for pid, msg in events if msg.startswith("shutting down: idle")]

    try:
        # Until every offset has been struck and three idle shutdowns raced (10 s at most).
        end, i, last = time.monotonic() + 10, 0, time.monotonic()
        while time.monotonic() < end and (i < len(offsets) or len(idle_shutdowns()) < 3):
            if i % 3 == 1 and h.meta_path.exists():
                # While the daemon shuts down: as soon as it gives up its metadata.
                wait_until(lambda: not h.meta_path.exists(), 5, interval=0.002, message="idle shutdown")
                t0 = time.monotonic()
            else:
                t0 = last + offsets[i % len(offsets)]
            procs = []
            for j, word in enumerate(["call", "call", "start" if i % 2 else "call"]):
                time.sleep(max(0.0, t0 + 0.04 * j - time.monotonic()))
                procs.append(h.popen_piped(*(["start"] if word == "start" else ["call", "demo.counter"])))
            results += [communicate_text(p, p.text_args, CLI_TIMEOUT) for p in procs]
            last = time.monotonic()
            h.daemon_pids()
            i += 1
    finally:
        done.set()
        watcher.join(5)
    assert [r for r in results if r.rc != 0] == []
    for r in results:
        if "start" in r.args:
            started_pid(r)
        else:
            assert r.out.strip().isdigit(), r
    assert peak[0] == 1, f"{peak[0]} daemons listened on {sock} at the same time (0: watcher saw none)"
    idled = idle_shutdowns()
    assert len(idled) >= 3, f"the race was not exercised: only {len(idled)} idle shutdowns"
    # Nothing is left once the last daemon idles out.
    wait_until(
        lambda: not (h.daemon_pids() or h.server_pids() or h.socket_path.exists() or h.meta_path.exists()),
        10,
        message="the last daemon to idle out and leave nothing behind",
    )
    h.expect_no_leftovers = True


def test_starter_waits_for_a_stopping_daemon(h):
    """Stop is a barrier: a call arriving while the old daemon still closes its server gets a
    new daemon only after the old pid is gone, so two copies of the server never run."""
    h.write_config({"mcpServers": {"demo": slow_server_entry(h)}})
    assert call_ok(h, "demo.counter") == "1"
    old = running_status(h)["pid"]
    watch = ServerCopyWatch(h)
    resp, _, _ = raw_request(h.socket_path, "stop", {}, idle=5.0)
    assert resp.get("ok") is True, resp
    assert shutting_down(h), "the stopping daemon should answer 'shutting down' while it closes its server"
    r = h.run("call", "demo.counter")
    most = watch.stop()
    assert r.rc == 0 and r.out.strip() == "1", r
    assert not pid_alive(old), "the old daemon should be gone before its successor serves"
    assert most == 1, f"two copies of the MCP server ran at once: {sorted(watch.seen_together)}"
    assert running_status(h)["pid"] != old


def test_second_stop_waits_for_the_same_daemon(h):
    h.write_config({"mcpServers": {"demo": slow_server_entry(h)}})
    call_ok(h, "demo.counter")
    daemon = running_status(h)["pid"]
    first = h.popen("stop")
    wait_until(lambda: shutting_down(h), 10, message="the daemon to be shutting down")
    r = h.run("stop")
    assert r.rc == 0, r
    assert r.out.strip() == f"stopped (pid {daemon})", r
    assert not pid_alive(daemon), "the second stop returned while the daemon still ran"
    assert wait_exit(first, 15) == 0, read_file(first.err_path)
    assert read_file(first.out_path).strip() == f"stopped (pid {daemon})"


def test_stop_waits_out_its_timeout_before_escalating(h):
    """A daemon that cannot answer at once (here: SIGSTOPped for a while) is asked to stop
    and given the whole --timeout; it is signalled only after that."""
    call_ok(h, "demo.counter")
    daemon = running_status(h)["pid"]
    h.sigstop(daemon)
    env = dict(MCPORTER_DAEMON_PROBE_TIMEOUT_MS="200")
    stopper = h.popen("stop", "--timeout", "20s", **env)
    # Well past the 200 ms status probe: the old client had SIGKILLed it by now.
    time.sleep(2.0)  # a window in which nothing may happen, not a settle wait
    assert pid_alive(daemon) and pid_stopped(daemon), "stop signalled a daemon before its timeout"
    assert stopper.poll() is None
    h.sigcont(daemon)
    assert wait_exit(stopper, 20) == 0, read_file(stopper.err_path)
    assert read_file(stopper.out_path).strip() == f"stopped (pid {daemon})"
    log = read_file(h.path("log"))
    assert f"[{daemon}] shutting down: stop request" in log, log[-2000:]


@pytest.mark.parametrize(
    "kind, answered, recorded, recorded_ours, expected",
    [
        ("live", 10, 10, True, 10),
        ("live", 10, 11, False, 10),  # it answered on our socket: wait for the one that answered
        ("live", 10, None, False, 10),
        ("stopping", 10, None, False, 10),  # a concurrent stop removed the metadata already
        ("stopping", 10, 10, True, 10),
        ("silent", None, 10, True, 10),  # slow or hung, but the metadata proves it ours
        ("silent", None, 10, False, None),  # a pid we cannot verify is no target
        ("silent", None, None, False, None),
        ("dead", None, 10, True, 10),  # its socket is gone but the process lives on
        ("dead", None, 10, False, None),
        ("dead", None, None, False, None),
        ("busy", 10, None, False, 10),  # at its caps, it named itself on our socket
        ("busy", 10, 10, True, 10),
        ("busy", None, 10, True, 10),  # a busy answer without a pid: the record's, when ours
        ("busy", None, 10, False, None),
        ("closed", None, 10, True, 10),  # a bare close: only the record can name it
        ("closed", None, 10, False, None),
        ("closed", None, None, False, None),
    ],
)
def test_stop_target_table(kind, answered, recorded, recorded_ours, expected):
    assert _import_module().stop_target(kind, answered, recorded, recorded_ours) == expected


@pytest.mark.parametrize("kind", ["live", "stopping", "silent", "dead"])
@pytest.mark.parametrize("verified", [True, False])
@pytest.mark.parametrize("gone", [True, False])
def test_plan_stop_escalation_table(kind, verified, gone):
    expected = {
        # gone: nothing to do, whatever else is true
        (True, True): "stopped",
        (True, False): "stopped",
        # still there after the timeout: signal only what the metadata proves ours
        (False, True): "terminate",
        (False, False): "still-stopping" if kind == "stopping" else "refuse",
    }[(gone, verified)]
    assert _import_module().plan_stop_escalation(kind, verified, gone) == expected


RESOLUTION_CASES = [
    "tilde-config",
    "relative-config-with-root",
    "relative-env-config-with-root",
    "relative-daemon-dir",
    "relative-xdg-state-home",
]


@pytest.mark.parametrize("case", RESOLUTION_CASES)
def test_launched_daemon_resolves_what_its_client_resolved(h, case):
    root = h.tmp / "elsewhere"  # the child runs here, so a cwd-relative path would move
    root.mkdir()
    env = h.env()
    args = ["--config", str(h.cfg), "--root", str(root)]
    if case == "tilde-config":
        h.cfg = h.home / "cfg.json"
        h.write_config()
        args = ["--config", "~/cfg.json"]
    elif case == "relative-config-with-root":
        args = ["--config", h.cfg.name, "--root", str(root)]
    elif case == "relative-env-config-with-root":
        env["MCPORTER_CONFIG"] = h.cfg.name
        args = ["--root", str(root)]
    elif case == "relative-daemon-dir":
        env["MCPORTER_DAEMON_DIR"] = os.path.relpath(str(h.state_dir), str(h.tmp))
    else:
        env.pop("MCPORTER_DAEMON_DIR")
        env["XDG_STATE_HOME"] = "xdg-state"

    def run(*words):
        return h.run(*args, *words, env=env, cwd=h.tmp, config=False, timeout=20)

    first = run("call", "demo.counter")
    assert first.rc == 0 and first.out.strip() == "1", first
    assert first.elapsed < 10, first
    assert run("call", "demo.counter").ok() == "2"
    st = json.loads(run("status", "--json").ok())
    assert st["running"] is True and st["fresh"] is True, st
    h.track(st["pid"])
    assert os.path.isabs(st["socketPath"]) and os.path.isabs(st["configPath"]), st
    state = (
        h.tmp / "xdg-state" / "mcporter" / "pydaemon" if case == "relative-xdg-state-home" else h.state_dir
    )
    assert st["metadataPath"].startswith(str(state) + "/"), st
    r = run("stop")
    assert r.rc == 0 and f"stopped (pid {st['pid']})" in r.out, r
    assert not pid_alive(st["pid"])


def test_config_edited_while_its_daemon_launches_is_served_at_once(h):
    # The spawn lock holds the caller after it read the config and before it launches.
    with held_flock(h.path("lock")):
        caller = h.popen("call", "demo.counter")
        wait_until(lambda: holds_open(caller.pid, h.path("lock")), 10, message="caller at the spawn lock")
        data = h.config_data()
        data["note"] = "edited after the caller read it"
        h.write_config(data)
    released = time.monotonic()
    rc = wait_exit(caller, 20)
    waited = time.monotonic() - released
    assert rc == 0 and read_file(caller.out_path).strip() == "1", read_file(caller.err_path)
    assert waited < 10, f"served {waited:.1f}s after the launch"
    assert call_ok(h, "demo.counter") == "2"  # the launched daemon serves the edited config
    st = running_status(h)
    assert st["fresh"] is True
    assert_one_daemon_tree(h, st["pid"])


def test_start_that_adopts_a_running_daemon_says_already_running(h):
    daemon = start_daemon(h)
    good = h.meta()
    # The client launches a child only when it cannot verify the daemon: hide the record
    # while the bind lock keeps both the daemon (repair) and the child (bind guard) waiting.
    with held_flock(h.path("bind")):
        h.meta_path.unlink()
        starter = h.popen("start")
        wait_until(lambda: len(h.daemon_pids()) == 2, 10, message="the launched child")
        child = (h.daemon_pids() - {daemon}).pop()
        write_meta_raw(h, good)
        rc = wait_exit(starter, 20)
    out = read_file(starter.out_path)
    assert rc == 0 and out.strip() == f"already running (pid {daemon})", out + read_file(starter.err_path)
    wait_until(lambda: not pid_alive(child), 10, message="the launched child to exit")
    assert_one_daemon_tree(h, daemon, servers=0)


NOISE_WRITER = """\
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
while True:
    os.write(fd, b"2026-01-01T00:00:00.000Z [%d] noise from another daemon\\n" % os.getpid())
    time.sleep(0.001)
"""


def test_start_error_quotes_the_launched_childs_own_line(h):
    log = h.path("log")
    noise = h.popen_argv([sys.executable, "-c", NOISE_WRITER, log], h.env())
    wait_until(lambda: log.exists() and b"noise" in log.read_bytes(), 10, message="another writer")
    bad_log = "/nonexistent/dir/x.log"
    r = h.run("call", "demo.echo", "text=x", MCPORTER_DAEMON_LOG_PATH=bad_log)
    assert "noise" not in r.err, r
    assert_prompt_error(r, 1, f"cannot open log file {bad_log}")
    noise.kill()


HANG_HOST_SCRIPT = """\
import sys, time
sys.path.insert(0, {here!r})
import mcporter_daemon

cfg = mcporter_daemon.load_config(sys.argv[1])


def hang(params, ctx):
    time.sleep(3600)  # progress frames flow the whole time


host = mcporter_daemon.DaemonHost(
    mcporter_daemon.DaemonPaths.for_config(cfg.path), cfg.fingerprint(), {{"callTool": hang}}
)
sys.exit(host.run())
"""


DEAF_HANDLER_HOST_SCRIPT = """\
import sys, time
sys.path.insert(0, {here!r})
import mcporter_daemon


def hang(params, ctx):
    time.sleep(3600)  # ignores ctx.cancelled


paths = mcporter_daemon.DaemonPaths.for_key("deafhandler", sys.argv[1])
# Idle this long after its last request (long enough for the test to connect on a loaded machine).
host = mcporter_daemon.DaemonHost(paths, "fp", {{"hang": hang}}, idle_timeout=2.0)
sys.exit(host.run())
"""


def test_cancelled_handler_that_never_returns_does_not_pin_the_daemon(h):
    """A vendored handler that ignores ctx.cancelled is let go a few seconds after its caller
    left: it no longer counts as work in flight, so an idle daemon still shuts down."""
    script = h.tmp / "deaf_handler_host.py"
    script.write_text(DEAF_HANDLER_HOST_SCRIPT.format(here=str(HERE)))
    host = h.popen_argv([sys.executable, script, h.state_dir], h.env())
    sock_path = h.state_dir / "daemon-deafhandler.sock"
    wait_until(lambda: sock_path.exists(), 20, message="the host to bind")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(sock_path))
    req = {"id": "x", "method": "hang", "params": {}, "protocolVersion": 2, "progressIntervalMs": 100}
    s.sendall((json.dumps(req) + "\n").encode())
    assert b"progress" in s.recv(4096)  # the handler runs
    s.close()  # the caller goes away
    # Before: the stuck handler counted as in flight forever, so the idle host never left.
    assert wait_exit(host, 20) == 0, read_file(host.err_path)


def test_progress_frames_never_extend_a_call_past_its_timeout(h):
    script = h.tmp / "hang_host.py"
    script.write_text(HANG_HOST_SCRIPT.format(here=str(HERE)))
    host = h.popen_argv([sys.executable, script, h.cfg, h.tag], h.env())
    wait_until(lambda: h.status().get("pid") == host.pid, 20, message="the hanging host to serve")
    r = h.run("call", "--timeout", "1s", "demo.counter", timeout=15)
    assert r.rc == 1 and "Traceback" not in r.err, r
    grace = _import_module()._CLIENT_DEADLINE_GRACE  # the CLI's own deadline past the call's
    assert r.elapsed < 1 + grace + 1.5, f"waited {r.elapsed:.2f}s for a 1 s call: {r!r}"
    assert host.poll() is None, "the host must survive its caller giving up"


def test_delivered_request_is_not_sent_again_when_the_daemon_dies(h):
    md = _import_module()
    runs = h.tmp / "crash-runs"
    client = set_host_client(h, md, runs)
    client.ensure()
    first = h.server_pids()
    with pytest.raises(md.TransportError) as info:
        client.request("crash", {}, idle_timeout=10.0)
    assert "without answering" in str(info.value), info.value
    assert runs.read_text().splitlines() == ["ran"], "a delivered request was sent again"
    assert len(first) == 1 and not (h.server_pids() - first), "a second host was started to resend it"


def test_stop_finds_a_stopped_daemon_whose_metadata_is_torn(h):
    """`stop` never says "no daemon running" while a process holds the socket: with the record
    torn and the daemon SIGSTOPped, the owner lock names it; proved ours (pid + start time), it
    is ended with its server once the stop's timeout has passed."""
    daemon, server = warm_daemon(h)
    h.sigstop(daemon)
    h.meta_path.write_text('{"pid": ' + str(daemon))  # torn mid-write
    r = h.run("stop")
    print(f"\n  stop said {r.out.strip()!r} after {r.elapsed:.2f}s")
    assert r.rc == 0 and r.out.strip() == f"terminated unresponsive daemon (pid {daemon})", r
    assert not pid_alive(daemon) and not pid_alive(server), "stop returned before its daemon was gone"
    assert not h.socket_path.exists() and not h.meta_path.exists()


VENDORED_CLIENT_SCRIPT = """\
import json, os, sys
sys.path.insert(0, {here!r})
import mcporter_daemon as md

key, fingerprint, probe_s, method, params, launch = sys.argv[1:7]
paths = md.DaemonPaths.for_key(key, os.environ["MCPORTER_DAEMON_DIR"])
client = md.DaemonClient(paths, fingerprint, json.loads(launch), probe_timeout=float(probe_s) or None)
try:
    print(json.dumps(client.request(method, json.loads(params), idle_timeout=10.0)))
except md.DaemonError as exc:
    print(f"{{type(exc).__name__}}: {{exc}}", file=sys.stderr)
    sys.exit(1)
"""


def run_vendored_client(h, key, fingerprint, launch, method="status", params=None, probe_s=0.0):
    """A vendoring program's client in its own process (it launches and reaps its daemon
    itself), sending one request; returns the Result."""
    script = h.tmp / "vendored_client.py"
    script.write_text(VENDORED_CLIENT_SCRIPT.format(here=str(HERE)))
    args = [key, fingerprint, probe_s, method, json.dumps(params or {}), json.dumps([str(a) for a in launch])]
    return h.run(*args, argv=[sys.executable, script], timeout=60)


def test_client_uses_the_daemon_its_launched_child_found_serving(h):
    """The launched child finds a live, fresh daemon and exits 0 naming it: the client
    verifies that daemon (patiently: it is merely slow) and sends there, rather than fail a
    call that was never delivered."""
    md = _import_module()
    first, flag = start_slow_host(h)
    wait_slow_host_serving(h, first.pid)
    write_flag(flag, "0.6")  # status slower than this client's 0.3 s probe, not than the child's
    launch = [sys.executable, h.tmp / "slow_host.py", h.state_dir, flag, h.tag]
    r = run_vendored_client(h, "slowhost", "fp-1", launch, "echo", {"text": "hi"}, probe_s=0.3)
    h.server_pids()  # track the launched child for cleanup
    log = read_file(md.DaemonPaths.for_key("slowhost", str(h.state_dir)).log)
    assert f"daemon already running (pid {first.pid}); not starting another" in log, log
    assert r.rc == 0 and json.loads(r.out) == {"pid": first.pid, "text": "hi"}, r
    assert first.poll() is None
    os.unlink(str(flag))
    stop_slow_host(h, first)


def test_call_is_served_when_the_record_names_its_daemon_with_a_wrong_start_time(h):
    """A record naming the serving daemon's pid with another start time verifies no daemon: the
    launched child finds the daemon live and fresh, repairs the record, and the call is served
    by the warm server (it used to fail with "daemon already running")."""
    daemon, server = warm_daemon(h)
    meta = h.meta()
    meta["pidStartTime"] = "1"
    h.meta_path.write_text(json.dumps(meta))
    r = h.run("call", "demo.counter")
    assert r.rc == 0 and r.out.strip() == "2", r
    assert h.meta()["pidStartTime"] == str(proc_stat(daemon).start)
    assert server_pid(h.status()) == server
    assert_one_daemon_tree(h, daemon)


DYING_HOST_SCRIPT = """\
import os, signal, sys
sys.path.insert(0, {here!r})
import mcporter_daemon

how = sys.argv[2]


def die():
    # Asked its first status, right after binding: as a host killed in that moment.
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


paths = mcporter_daemon.DaemonPaths.for_key("dying", sys.argv[1])
sys.exit(mcporter_daemon.DaemonHost(paths, "fp-d", {{}}, status_extra=die).run())
"""


@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("sigkill", "was killed by signal 9 (SIGKILL) right after binding"),
        ("exit", "exited with code 3 right after binding"),
    ],
)
def test_launched_daemon_dying_right_after_binding_is_named(h, how, said):
    script = h.tmp / "dying_host.py"
    script.write_text(DYING_HOST_SCRIPT.format(here=str(HERE)))
    r = run_vendored_client(h, "dying", "fp-d", [sys.executable, script, h.state_dir, how, h.tag])
    print(f"\n  {r.err.strip()}")
    m = re.search(r"launched daemon \(pid (\d+)\)", r.err)
    assert r.rc == 1 and m, r
    expected = f"DaemonStartError: daemon failed to start: the launched daemon (pid {m.group(1)}) {said}"
    assert r.err.strip() == expected, r


LAUNCH_FAILURE_TABLE = [
    # pid, exit code (negative: killed by that signal), bound, its last log line, what is said
    (
        7,
        -9,
        True,
        "bound /s.sock (plan: bind)",
        "the launched daemon (pid 7) was killed by signal 9 (SIGKILL) right after binding",
    ),
    (7, -15, False, "", "the launched daemon (pid 7) was killed by signal 15 (SIGTERM) before it was ready"),
    (
        7,
        3,
        True,
        "bound /s.sock (plan: bind)",
        "the launched daemon (pid 7) exited with code 3 right after binding",
    ),
    (
        7,
        0,
        True,
        "shutting down: stop request",
        "the launched daemon (pid 7) exited with code 0 right after binding; its last log line: shutting down: stop request",
    ),
    (
        7,
        1,
        False,
        "cannot open log file /x.log: No such file",
        "cannot open log file /x.log: No such file",
    ),  # its own
    (7, 1, False, "", "the launched daemon (pid 7) exited with code 1 before it was ready"),
    (7, 0, False, "", "the launched daemon (pid 7) exited with code 0 before it was ready"),
]


@pytest.mark.parametrize(("pid", "code", "bound", "last", "said"), LAUNCH_FAILURE_TABLE)
def test_launch_failure_text_table(pid, code, bound, last, said):
    assert _import_module().launch_failure_text(pid, code, bound, last) == said


# -- core structure: the recorded daemon, error codes --

GOOD_RECORD = {
    "pid": 4242,
    "pidStartTime": "777",
    "socketPath": "/s.sock",
    "servers": {"a": {"pid": 4243, "pidStartTime": "778"}},
}

# RecordedDaemon.from_record(data): the record's identity and servers, or None for anything
# validate_metadata rejects (one table row per way a record can be unusable).
RECORDED_DAEMON_TABLE = [
    ("whole", GOOD_RECORD, (4242, "777", "/s.sock", ["a"])),
    ("no servers running", dict(GOOD_RECORD, servers={}), (4242, "777", "/s.sock", [])),
    ("absent", None, None),
    ("not an object", [GOOD_RECORD], None),
    ("pid a string", dict(GOOD_RECORD, pid="4242"), None),
    ("pid a bool", dict(GOOD_RECORD, pid=True), None),
    ("no start time", dict(GOOD_RECORD, pidStartTime=""), None),
    ("start time a number", dict(GOOD_RECORD, pidStartTime=777), None),
    ("no socket path", {k: v for k, v in GOOD_RECORD.items() if k != "socketPath"}, None),
    ("servers a list", dict(GOOD_RECORD, servers=[]), None),
    ("a server without a start time", dict(GOOD_RECORD, servers={"a": {"pid": 1}}), None),
]


@pytest.mark.parametrize(
    ("data", "expected"),
    [row[1:] for row in RECORDED_DAEMON_TABLE],
    ids=[row[0] for row in RECORDED_DAEMON_TABLE],
)
def test_recorded_daemon_from_record_table(data, expected):
    recorded = _import_module().RecordedDaemon.from_record(data)
    if expected is None:
        assert recorded is None
        return
    assert (recorded.pid, recorded.start_time, recorded.socket_path, sorted(recorded.servers)) == expected
    assert recorded.record is data  # read once: the status checks see the very same record


# _TakeoverFacts without an owner (nothing to look up): what a probe is heard as, and the plan.
# A first silent, busy or closed probe may ask for a second. The second one without an answer
# is "silent-twice" only when the first was silent too (a hang); after a busy or closed first
# one (a sign of life) it is "busy-twice". None: no second probe.
TAKEOVER_FACTS_TABLE = [
    # first probe, second probe, fingerprint in the answer, heard as, plan
    ("live", None, "fp", "live", "reconcile"),
    ("live", None, "other", "live", "stop-then-bind"),
    ("stopping", None, None, "stopping", "wait-then-bind"),
    ("silent", None, None, "silent", "probe-again"),
    ("busy", None, None, "busy", "probe-again"),
    ("closed", None, None, "closed", "bind"),  # no live owner on record: plainly stale
    ("silent", "silent", None, "silent-twice", "bind"),
    ("silent", "busy", None, "busy-twice", "leave"),
    ("silent", "closed", None, "busy-twice", "leave"),
    ("busy", "silent", None, "busy-twice", "leave"),
    ("busy", "busy", None, "busy-twice", "leave"),
    ("silent", "live", "fp", "live", "reconcile"),
    ("busy", "dead", None, "dead", "bind"),
]


@pytest.mark.parametrize(("first", "second", "fingerprint", "kind", "plan"), TAKEOVER_FACTS_TABLE)
def test_takeover_facts_table(first, second, fingerprint, kind, plan):
    md = _import_module()
    facts = md._TakeoverFacts(None)
    assert (facts.owner_ours, facts.owner_stopped) == (False, False)
    status = {"fingerprint": fingerprint} if fingerprint else None
    facts.heard(md.ProbeResult(first, None if second else status))
    if second is not None:
        facts.heard(md.ProbeResult(second, status), second=True)
    facts.decide("fp")
    assert (facts.kind, facts.plan) == (kind, plan)


def test_daemon_error_code_is_defined_once():
    """``code`` is DaemonError's; subclasses pass theirs to its constructor."""
    md = _import_module()
    errors = [v for v in vars(md).values() if isinstance(v, type) and issubclass(v, md.DaemonError)]
    assert [e.__name__ for e in errors if "code" in vars(e)] == ["DaemonError"]
    assert MODULE_PATH.read_text().count("self.code = ") == 1
    assert md.RemoteError("m", "config", 5, {"d": 1}).code == "config"
    assert md.HandlerError("m", "mine").code == "mine"
    assert md.TransportError("m").code == "runtime_error"


# ##########################################################################################
# Config: discovery, JSONC, server entries, editor imports and the config fingerprint.
# ##########################################################################################


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["edit", "edit-same-mtime"])
def test_config_edit_replaces_daemon(h, keep_mtime):
    assert call_ok(h, "demo.counter") == "1"
    old = running_status(h)
    old_pid, old_server = old["pid"], server_pid(h.status())
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
    assert assert_replaced(h, old_pid)["fresh"] is True


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


BAD_JSON_CONFIG = '{\n  "mcpServers": {\n    "demo": {"command": "x" "args": []}\n  }\n}\n'


def test_invalid_json_config_names_line_and_column(h):
    h.cfg.write_text(BAD_JSON_CONFIG)
    try:
        json.loads(BAD_JSON_CONFIG)
    except ValueError as exc:
        where = (exc.lineno, exc.colno)
    r = h.run("call", "demo.echo", "text=x")
    assert_prompt_error(r, 2, str(h.cfg), f"line {where[0]}", f"column {where[1]}")
    assert h.daemon_pids() == set(), "a daemon started on a config it cannot parse"


@pytest.mark.parametrize(
    "servers, named",
    [
        ({"demo": {"command": 5, "lifecycle": "keep-alive"}}, "mcpServers.demo.command"),
        ({"demo": {"command": "x", "args": "--flag", "lifecycle": "keep-alive"}}, "mcpServers.demo.args"),
        ({"demo": {"command": "x", "env": {"A": 1}, "lifecycle": "keep-alive"}}, "mcpServers.demo.env"),
        ({"demo": {"command": "x", "lifecycle": 7}}, "mcpServers.demo.lifecycle"),
        ([], "mcpServers"),
    ],
    ids=["command-int", "args-str", "env-int", "lifecycle-int", "servers-list"],
)
def test_config_with_wrong_types_is_one_line_error(h, servers, named):
    h.write_config({"mcpServers": servers})
    r = h.run("call", "demo.echo", "text=x")
    assert_prompt_error(r, 2, str(h.cfg), named)
    assert h.daemon_pids() == set()


@pytest.mark.parametrize("lifecycle", ["keep-alive", "ephemeral"])
def test_missing_server_command_is_named_at_once(h, lifecycle):
    missing = f"/nonexistent/mcp-server-{uuid.uuid4().hex[:8]}"
    h.write_config({"mcpServers": {"demo": {"command": missing, "lifecycle": lifecycle}}})
    r = h.run("call", "demo.echo", "text=x")
    assert_prompt_error(r, 2, missing, "not found")


def demo_import_entry(h, shape="mcpServers"):
    """The tagged demo server as an editor config writes it (no lifecycle: editors have none)."""
    entry = {k: v for k, v in h.demo_server_entry().items() if k != "lifecycle"}
    if shape == "opencode":  # opencode: one command list, under "mcp"
        return {"type": "local", "command": [entry["command"]] + entry["args"]}
    return entry


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def list_rows(h, **env):
    return {row["name"]: row for row in json.loads(h.run("list", "--json", env=h.env(**env)).ok())}


def test_imports_read_each_editor_format(h):
    home, root = h.home, h.tmp
    files = {
        "cur": write_json(root / ".cursor" / "mcp.json", {"mcpServers": {"cur": demo_import_entry(h)}}),
        "cc": write_json(
            home / ".claude.json",
            {
                "numStartups": 7,
                "projects": {
                    str(root): {"mcpServers": {"cc": demo_import_entry(h)}},
                    "/elsewhere": {"mcpServers": {"other-project": demo_import_entry(h)}},
                },
            },
        ),
        "ccs": write_json(home / ".claude" / "settings.json", {"mcpServers": {"ccs": demo_import_entry(h)}}),
        "cd": write_json(
            home / ".config" / "Claude" / "settings.json", {"mcpServers": {"cd": demo_import_entry(h)}}
        ),
        "ws": write_json(
            home / ".codeium" / "windsurf" / "mcp_config.json", {"mcpServers": {"ws": demo_import_entry(h)}}
        ),
        "oc": write_json(root / "opencode.json", {"mcp": {"oc": demo_import_entry(h, "opencode")}}),
        "vs": write_json(
            root / ".vscode" / "mcp.json", {"servers": {"vs": dict(demo_import_entry(h), type="stdio")}}
        ),
    }
    codex = home / ".codex" / "config.toml"
    codex.parent.mkdir(parents=True)
    entry = demo_import_entry(h)
    codex.write_text(
        "[mcp_servers.cx]\n"
        f"command = {json.dumps(entry['command'])}\n"
        f"args = [{', '.join(json.dumps(a) for a in entry['args'])}]\n"
    )
    rows = list_rows(h)
    for name, path in files.items():
        assert name in rows, (name, sorted(rows))
        assert rows[name]["source"] == str(path), rows[name]
        assert rows[name]["keepAlive"] is False, "an imported server is ephemeral unless selected"
    assert "other-project" not in rows, "Claude Code entries of another project must not be imported"
    if sys.version_info >= (3, 11):
        assert rows["cx"]["source"] == str(codex)
    else:
        assert "cx" not in rows
        doctor = h.run("doctor", env=h.env())
        assert "tomllib" in doctor.out + doctor.err, doctor
    assert call_ok(h, "cur.echo", "text=imported") == "imported"
    assert h.daemon_pids() == set(), "an ephemeral imported server needs no daemon"
    text = h.run("list", env=h.env()).ok()
    assert f"[{files['vs']}]" in text, text


def test_config_and_imports_with_a_byte_order_mark_are_read(h):
    """Editors on Windows save JSON with a UTF-8 byte order mark: the config and an imported
    file read as without it; a mark alone is an empty file, and bad UTF-8 is still refused."""
    data = h.config_data()
    h.cfg.write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode())
    write_json(h.tmp / ".cursor" / "mcp.json", {"mcpServers": {"cur": demo_import_entry(h)}})
    cursor = h.tmp / ".cursor" / "mcp.json"
    cursor.write_bytes(b"\xef\xbb\xbf" + cursor.read_bytes())
    assert sorted(list_rows(h)) == ["cur", "demo"]
    cursor.write_bytes(b"\xef\xbb\xbf")
    assert sorted(list_rows(h)) == ["demo"]
    h.cfg.write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode()[:-1] + b"\xff}")
    r = h.run("list", env=h.env())
    assert r.rc == 2 and "not valid UTF-8" in r.err, r


def test_imports_precedence_and_switches(h):
    home, root = h.home, h.tmp
    write_json(
        root / ".cursor" / "mcp.json",
        {"mcpServers": {"dup": demo_import_entry(h), "cur": demo_import_entry(h)}},
    )
    vscode = write_json(root / ".vscode" / "mcp.json", {"servers": {"dup": demo_import_entry(h)}})
    cursor = root / ".cursor" / "mcp.json"
    assert list_rows(h)["dup"]["source"] == str(cursor), "among imports the first seen (cursor) wins"

    data = h.config_data()
    data["imports"] = ["vscode"]
    h.write_config(data)
    assert list_rows(h)["dup"]["source"] == str(vscode), "a layer's imports list puts its kinds first"

    data["mcpServers"]["cur"] = h.demo_server_entry()
    h.write_config(data)
    rows = list_rows(h)
    assert rows["cur"]["source"] == str(h.cfg) and rows["cur"]["keepAlive"] is True, "config entries win"

    data["imports"] = []
    h.write_config(data)
    assert sorted(list_rows(h)) == ["cur", "demo"], '"imports": [] turns imports off'

    data["imports"] = ["nope"]
    h.write_config(data)
    r = h.run("list", env=h.env())
    assert r.rc == 2 and "nope" in r.err and len(r.err.strip().splitlines()) == 1, r
    del home


def test_imported_file_edits_make_the_daemon_stale_but_touch_does_not(h):
    cursor = write_json(h.tmp / ".cursor" / "mcp.json", {"mcpServers": {"cur": demo_import_entry(h)}})
    env = dict(MCPORTER_KEEPALIVE="cur")
    r = h.run("call", "cur.counter", env=h.env(**env))
    assert r.ok() == "1"
    first = h.status(env=h.env(**env))
    assert first["running"] and first["fresh"], first
    stamp = cursor.stat().st_mtime_ns
    os.utime(str(cursor), ns=(stamp + 5_000_000_000, stamp + 5_000_000_000))
    again = h.status(env=h.env(**env))
    assert again["pid"] == first["pid"] and again["fresh"], "a touch is not a change"
    doc = json.loads(cursor.read_text())
    doc["mcpServers"]["cur"]["env"] = {"EDITED": "1"}
    write_json(cursor, doc)
    stale = h.status(env=h.env(**env))
    assert stale["pid"] == first["pid"] and stale["fresh"] is False, stale
    assert h.run("call", "cur.counter", env=h.env(**env)).ok() == "1", "a new daemon, a new server"
    assert h.status(env=h.env(**env))["pid"] != first["pid"]


def test_doctor_lists_the_import_files_it_read(h):
    cursor = write_json(h.tmp / ".cursor" / "mcp.json", {"mcpServers": {"cur": demo_import_entry(h)}})
    broken = h.home / ".cursor" / "mcp.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{ not json")
    r = h.run("doctor", env=h.env())
    text = r.out + r.err
    assert f"import cursor {cursor}: cur" in text, text
    assert f"import cursor {broken}" in text and "ignored" in text, text


@pytest.mark.parametrize(
    "configured, expected",
    [
        (None, ["cursor", "claude-code", "claude-desktop", "codex", "windsurf", "opencode", "vscode"]),
        ([], []),
        (["vscode"], ["vscode", "cursor", "claude-code", "claude-desktop", "codex", "windsurf", "opencode"]),
        (
            ["codex", "cursor"],
            ["codex", "cursor", "claude-code", "claude-desktop", "windsurf", "opencode", "vscode"],
        ),
    ],
)
def test_import_order_table(configured, expected):
    assert _import_module().import_order(configured) == expected


@pytest.mark.parametrize(
    "kind, platform, expected",
    [
        (
            "cursor",
            "linux",
            [
                "/r/.cursor/mcp.json",
                "/h/.cursor/mcp.json",
                "/h/AppData/Roaming/Cursor/User/mcp.json",
                "/h/Library/Application Support/Cursor/User/mcp.json",
            ],
        ),
        (
            "claude-code",
            "linux",
            [
                "/r/.claude/settings.local.json",
                "/r/.claude/settings.json",
                "/r/.claude/mcp.json",
                "/h/.claude/settings.local.json",
                "/h/.claude/settings.json",
                "/h/.claude/mcp.json",
                "/h/.claude.json",
            ],
        ),
        ("claude-desktop", "linux", ["/h/.config/Claude/settings.json"]),
        ("claude-desktop", "darwin", ["/h/Library/Application Support/Claude/settings.json"]),
        ("codex", "linux", ["/r/.codex/config.toml", "/h/.codex/config.toml"]),
        (
            "windsurf",
            "linux",
            [
                "/h/.codeium/windsurf/mcp_config.json",
                "/h/.codeium/windsurf-next/mcp_config.json",
                "/h/.windsurf/mcp_config.json",
                "/h/.config/.codeium/windsurf/mcp_config.json",
            ],
        ),
        (
            "opencode",
            "linux",
            [
                "/r/opencode.jsonc",
                "/r/opencode.json",
                "/r/.openai/config.json",
                "/h/.config/openai/config.json",
                "/h/.config/opencode/opencode.jsonc",
                "/h/.config/opencode/opencode.json",
            ],
        ),
        (
            "vscode",
            "linux",
            [
                "/r/.vscode/mcp.json",
                "/h/.config/Code/User/mcp.json",
                "/h/.config/Code - Insiders/User/mcp.json",
            ],
        ),
        (
            "vscode",
            "darwin",
            [
                "/r/.vscode/mcp.json",
                "/h/Library/Application Support/Code/User/mcp.json",
                "/h/Library/Application Support/Code - Insiders/User/mcp.json",
            ],
        ),
    ],
)
def test_import_candidates_table(kind, platform, expected):
    assert _import_module().import_candidates(kind, "/r", "/h", {"HOME": "/h"}, platform) == expected


CMD = {"command": "srv", "args": ["-x"]}


@pytest.mark.parametrize(
    "doc, kind, path, expected",
    [
        ({"mcpServers": {"a": CMD}}, "cursor", "/r/.cursor/mcp.json", ["a"]),
        ({"servers": {"a": CMD}}, "vscode", "/r/.vscode/mcp.json", ["a"]),
        ({"mcp": {"a": {"command": ["srv"]}}}, "opencode", "/r/opencode.json", ["a"]),
        ({"mcpServers": {"a": CMD}}, "opencode", "/r/opencode.json", []),  # opencode reads "mcp" only
        ({"a": CMD}, "cursor", "/r/.cursor/mcp.json", ["a"]),  # a root-level map, legacy style
        ({"a": CMD}, "claude-code", "/h/.claude/settings.json", []),  # settings need a container
        ({"a": CMD}, "claude-code", "/h/.claude.json", ["a"]),
        ({"projects": {"/r": {"mcpServers": {"p": CMD}}}}, "claude-code", "/h/.claude.json", ["p"]),
        ({"projects": {"/other": {"mcpServers": {"p": CMD}}}}, "claude-code", "/h/.claude.json", []),
        ({"mcpServers": {"a": {"args": ["x"]}}}, "cursor", "/r/.cursor/mcp.json", []),  # no command, no url
        ({"mcpServers": {"a": {"url": "http://127.0.0.1:9/"}}}, "cursor", "/r/.cursor/mcp.json", ["a"]),
        ({"mcp_servers": {"c": CMD}}, "codex", "/h/.codex/config.toml", ["c"]),
        ([1, 2], "cursor", "/r/.cursor/mcp.json", []),
    ],
)
def test_extract_import_entries_table(doc, kind, path, expected):
    assert sorted(_import_module().extract_import_entries(doc, kind, path, "/r")) == expected


# -- tool filters, ${VAR} everywhere, start-up budget, config ownership, per-layer imports --


def slow_demo_entry(h, delay, **extra):
    """The demo server behind a shell that waits ``delay`` seconds first: a slow start-up."""
    demo = h.demo_server_entry()
    script = f'sleep {delay}; exec "$0" "$@"'
    entry = {"command": "sh", "args": ["-c", script, demo["command"]] + demo["args"]}
    entry.update(extra)
    return entry


@pytest.mark.parametrize(
    "allowed, blocked, tool, expected",
    [
        (None, None, "anything", True),
        (None, ["delete_file"], "delete_file", False),
        (None, ["delete_file"], "read_file", True),
        (["read_file"], None, "read_file", True),
        (["read_file"], None, "delete_file", False),
        ([], None, "read_file", False),  # an empty allow-list allows nothing, as in mcporter
        (None, ["Read_File"], "read_file", True),  # exact names
    ],
)
def test_allows_tool_table(allowed, blocked, tool, expected):
    m = _import_module()
    entry = {"command": "x"}
    if allowed is not None:
        entry["allowedTools"] = allowed
    if blocked is not None:
        entry["blocked_tools"] = blocked  # mcporter's snake_case spelling is read too
    spec = m._parse_server("s", entry, "/c.json", "/", {})
    assert spec.allows_tool(tool) is expected
    assert bool(spec.tool_refusal(tool)) is (not expected)


@pytest.mark.parametrize("lifecycle", ["keep-alive", "ephemeral"])
def test_blocked_and_allowed_tools_are_hidden_and_refused(h, lifecycle):
    entry = h.demo_server_entry(lifecycle)
    h.write_config({"mcpServers": {"demo": dict(entry, blockedTools=["counter", "sleep"])}})
    listed = h.run("list", "demo").ok()
    assert "demo.echo(" in listed and "demo.counter(" not in listed and "demo.sleep(" not in listed, listed
    names = [t["name"] for t in json.loads(h.run("list", "demo", "--json").ok())["tools"]]
    assert "counter" not in names and "echo" in names, names
    r = h.run("call", "demo.counter")
    assert_prompt_error(r, 2, "counter", "blockedTools", str(h.cfg))
    if lifecycle == "keep-alive":
        # Any client of the daemon is refused too, and the server never sees the call: a
        # 5 s sleep would answer after 5 s, the refusal comes at once.
        assert call_ok(h, "demo.echo", "text=warm") == "warm"
        began = time.monotonic()
        resp = raw_request(
            h.socket_path, "callTool", {"server": "demo", "tool": "sleep", "args": {"seconds": 5}}
        )[0]
        assert resp["ok"] is False and "blockedTools" in resp["error"]["message"], resp
        assert time.monotonic() - began < 2.0
        listed = raw_request(h.socket_path, "listTools", {"server": "demo"})[0]["result"]
        assert "counter" not in [t["name"] for t in listed], listed
    h.write_config({"mcpServers": {"demo": dict(entry, allowedTools=["echo"])}})
    assert [t["name"] for t in json.loads(h.run("list", "demo", "--json").ok())["tools"]] == ["echo"]
    assert_prompt_error(h.run("call", "demo.pid"), 2, "pid", "allowedTools")
    assert call_ok(h, "demo.echo", "text=ok") == "ok"


def test_allowed_and_blocked_tools_together_is_a_config_error(h):
    entry = dict(h.demo_server_entry(), allowedTools=["echo"], blockedTools=["pid"])
    h.write_config({"mcpServers": {"demo": entry}})
    r = h.run("call", "demo.echo", "text=x")
    assert_prompt_error(r, 2, str(h.cfg), "allowedTools or blockedTools, not both")
    assert h.daemon_pids() == set()


@pytest.mark.parametrize(
    "value, environ, expected, missing",
    [
        ("${A}", {"A": "1"}, "1", []),
        ("x-${A}-${B}", {"A": "1", "B": "2"}, "x-1-2", []),
        ("${A:-dflt}", {}, "dflt", []),
        ("${A:-dflt}", {"A": ""}, "dflt", []),  # empty takes the default, as in mcporter
        ("${A}", {"A": ""}, "", []),  # set but empty: empty, not an error
        ("${A}", {}, "", ["A"]),  # unset, no default: named
        ("${input:token}", {}, "${input:token}", []),  # VS Code's syntax is not a variable
        ("${A", {"A": "1"}, "${A", []),
        ("$A ${A}", {"A": "1"}, "$A 1", []),
    ],
)
def test_expand_placeholders_table(value, environ, expected, missing):
    got_missing, refs = [], {}
    assert _import_module()._expand_placeholders(value, environ, refs, got_missing) == expected
    assert got_missing == missing


def test_placeholders_expand_in_command_args_and_cwd(h):
    work = h.tmp / "work dir"
    work.mkdir()
    entry = dict(h.demo_server_entry())
    entry["command"] = "${MD_PY}"
    entry["args"] = entry["args"][:-1] + ["${MD_TAG}", "${MD_UNSET:-fallback}"]
    entry["cwd"] = "${MD_WORK}"
    h.write_config({"mcpServers": {"demo": entry}})
    env = dict(MD_PY=sys.executable, MD_TAG=h.tag, MD_WORK=str(work))
    r = h.run("call", "demo.pid", **env)
    assert r.rc == 0, r
    pid = int(r.out)
    argv = proc_cmdline(pid)
    assert argv[0] == sys.executable and argv[-2:] == [h.tag, "fallback"], argv
    assert os.readlink(f"/proc/{pid}/cwd") == str(work)
    # A variable that is unset and has no default: a config error naming it, not an empty
    # argument, and only for the server that uses it.
    assert h.run("stop").rc == 0
    r = h.run("call", "demo.pid", MD_PY=sys.executable, MD_WORK=str(work))
    assert_prompt_error(r, 2, "MD_TAG", "not set", str(h.cfg))
    assert h.daemon_pids() == set(), "no daemon starts for a server that cannot run"
    h.write_config({"mcpServers": {"demo": entry, "other": h.demo_server_entry("ephemeral")}})
    assert call_ok(h, "other.echo", "text=unaffected") == "unaffected"
    r, findings = h.doctor(env=h.env(MD_PY=sys.executable))
    finding(findings, "FAIL", "MD_TAG", "not set")


def test_doctor_names_unknown_server_keys(h):
    entry = dict(
        h.demo_server_entry(), blockTools=["x"], startupTimeoutMs=90000, description="known to mcporter"
    )
    h.write_config({"mcpServers": {"demo": entry}})
    r, findings = h.doctor()
    finding(findings, "warn", "'blockTools'", "demo")
    assert not [ln for ln in findings if "'startupTimeoutMs'" in ln], findings
    assert not [ln for ln in findings if "'description'" in ln], findings


@pytest.mark.parametrize("lifecycle", ["keep-alive", "ephemeral"])
def test_startup_timeout_ms_is_the_start_budget(h, lifecycle):
    assert _import_module().ServerSpec("x", "c").startup_timeout_ms == 60_000, "mcporter's default"
    slow = slow_demo_entry(h, 1.5, lifecycle=lifecycle, startupTimeoutMs=500)
    h.write_config({"mcpServers": {"slow": slow}})
    r = h.run("call", "slow.counter")
    assert r.rc == 1 and "timed out after 0.5s" in r.err, r
    assert r.elapsed < 4, r
    h.write_config({"mcpServers": {"slow": dict(slow, startupTimeoutMs=20_000)}})
    r = h.run("call", "slow.counter", "--progress")
    assert r.rc == 0 and r.out.strip() == "1", r
    # The progress line counts the seconds while the server starts, then is erased.
    assert "starting 'slow' (1 s)…" in r.err, repr(r.err)
    assert r.err.endswith("\r\x1b[K") or r.err.rstrip("\n").endswith("\r\x1b[K"), repr(r.err)


def test_kept_server_start_is_not_counted_in_the_call_timeout(h):
    """A first start (an npx download) longer than the call's timeout plus the client's grace:
    the daemon reports the start, and the client waits for it within startupTimeoutMs."""
    slow = slow_demo_entry(h, 4.5, lifecycle="keep-alive", startupTimeoutMs=30_000)
    h.write_config({"mcpServers": {"slow": slow}})
    r = h.run("call", "slow.counter", MCPORTER_DAEMON_TIMEOUT_MS=1000)
    assert r.rc == 0 and r.out.strip() == "1", r
    assert r.elapsed > 4.5, r


def test_startup_timeout_ms_must_be_positive(h):
    h.write_config({"mcpServers": {"demo": dict(h.demo_server_entry(), startupTimeoutMs=0)}})
    assert_prompt_error(h.run("call", "demo.pid"), 2, "startupTimeoutMs", str(h.cfg))


@pytest.mark.parametrize(
    "mode, owner, is_dir, verdict",
    [
        (0o100644, 1000, False, ""),
        (0o100644, 0, False, ""),  # root's file: fine for anyone
        (0o100666, 1000, False, "refuse"),
        (0o100664, 1000, False, "warn"),
        (0o100644, 2000, False, "refuse"),
        (0o040777, 1000, True, "refuse"),
        (0o041777, 0, True, ""),  # /tmp: sticky, nobody else can replace a file in it
        (0o040775, 1000, True, "warn"),
    ],
)
def test_config_path_risk_table(mode, owner, is_dir, verdict):
    assert _import_module().config_path_risk(mode, owner, 1000, is_dir)[0] == verdict


def assert_config_refused(h, needle, fix):
    for args in (("call", "demo.pid"), ("list",), ("start",)):
        r = h.run(*args)
        assert_prompt_error(r, 2, needle, fix)
    assert h.daemon_pids() == set()


def test_world_writable_config_or_dir_is_refused(h):
    cfg_dir = h.tmp / "cfgdir"
    cfg_dir.mkdir(mode=0o755)
    h.cfg = cfg_dir / "mcporter.json"
    h.write_config()
    os.chmod(str(h.cfg), 0o666)
    assert_config_refused(h, str(h.cfg), f"chmod go-w {h.cfg}")
    os.chmod(str(h.cfg), 0o644)
    os.chmod(str(cfg_dir), 0o777)
    assert_config_refused(h, str(cfg_dir), f"chmod go-w {cfg_dir}")
    os.chmod(str(cfg_dir), 0o775)  # group-writable: many systems default to umask 002
    os.chmod(str(h.cfg), 0o664)
    assert call_ok(h, "demo.echo", "text=ok") == "ok"
    r, findings = h.doctor()
    finding(findings, "warn", str(h.cfg), "group")
    finding(findings, "warn", str(cfg_dir), "group")


def test_config_owned_by_another_user_is_refused(h):
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    os.chown(str(h.cfg), 65534, 65534)
    assert_config_refused(h, str(h.cfg), "uid 65534")
    os.chown(str(h.cfg), 0, 0)
    assert call_ok(h, "demo.echo", "text=ok") == "ok"


def test_home_layer_ownership_is_checked_too(h):
    home_cfg = write_json(h.home / ".mcporter" / "mcporter.json", {"mcpServers": {}})
    root = h.root_project()
    os.chmod(str(home_cfg), 0o646)
    r = h.run("list", env=h.env(), config=False, cwd=root)
    assert_prompt_error(r, 2, str(home_cfg), "chmod go-w")


def test_imports_are_per_config_layer(h):
    """As mcporter: each layer reads imports by its own "imports"; "imports": [] in the
    project does not stop a home config without the key from importing."""
    home_cfg = write_json(h.home / ".mcporter" / "mcporter.json", {"mcpServers": {}})
    root = h.root_project(data={"imports": [], "mcpServers": {"demo": h.demo_server_entry()}})
    cursor = write_json(root / ".cursor" / "mcp.json", {"mcpServers": {"cur": demo_import_entry(h)}})

    def names():
        r = h.run("list", "--json", env=h.env(), config=False, cwd=root)
        return sorted(row["name"] for row in json.loads(r.ok()))

    assert names() == ["cur", "demo"], "the home layer still imports"
    r = h.run("doctor", env=h.env(), config=False, cwd=root)
    finding(r.out.splitlines(), "ok", f"imports of {home_cfg}", "cursor", str(cursor))
    finding(r.out.splitlines(), "ok", f"imports of {h.cfg}: off")
    write_json(home_cfg, {"imports": [], "mcpServers": {}})
    assert names() == ["demo"], "both layers off: nothing imported"
    write_json(h.cfg, {"mcpServers": {"demo": h.demo_server_entry()}})
    assert names() == ["cur", "demo"], "the project layer imports by default"


def test_no_config_error_names_root_and_env(h):
    sub = h.tmp / "project" / "src"
    sub.mkdir(parents=True)
    r = h.run("call", "demo.pid", env=h.env(), config=False, cwd=sub)
    assert_prompt_error(r, 2, "unknown server 'demo'", "--root", "MCPORTER_CONFIG", "current directory")


@pytest.mark.parametrize(
    "command",
    [
        "npx -y pkg",
        "  a\tb\r\nc  ",
        "",
        "a\x0bb c",
        "x\u00a0y z",
        'a "b c"',
        "a 'b c' d",
        "a\\ b",
        "a#b c",
        "é ü",
    ],
)
def test_string_command_splits_as_shlex_does(command):
    """A string ``command`` is split like a shell would (shlex); the quick split for text
    without quotes or backslashes must agree with it."""
    import shlex

    md = _import_module()
    assert md._split_command(command) == shlex.split(command)


# ##########################################################################################
# MCP stdio client: one spawned server, JSON-RPC over its stdin/stdout, answered promptly.
# ##########################################################################################


def test_request_content_never_reaches_a_shell(h):
    marks = [h.tmp / f"pwned-{uuid.uuid4().hex}" for _ in range(8)]
    text = (
        f"$(touch {marks[0]}); `touch {marks[1]}`; | touch {marks[2]} & touch {marks[3]}; "
        f"> {marks[4]} ${{HOME}} $HOME * ' \" \\"
    )
    r = h.run("call", "demo.echo", f"text={text}")
    assert r.rc == 0, r
    assert r.out == text + "\n", r
    r = h.run("call", "demo.echo", "--args", json.dumps({"text": text}))
    assert r.rc == 0 and r.out == text + "\n", r

    bad_server = f"demo;touch {marks[5]}"
    r = h.run("call", f"{bad_server}.echo")
    if "." not in bad_server:
        assert_prompt_error(r, 2, f"unknown server '{bad_server}'")
    assert r.rc == 2 and "Traceback" not in r.err, r
    bad_tool = f"echo;touch {marks[6]}"
    r = h.run("call", f"demo.{bad_tool}")
    assert_prompt_error(r, 2, f"unknown tool '{bad_tool}'")  # refused before the server is asked
    r = h.run("call", f"demo.$(touch {marks[7]})")
    assert r.rc == 2 and "Traceback" not in r.err, r

    sock = Path(h.meta()["socketPath"])
    resp, _, _ = raw_request(sock, "callTool", {"server": f"$(touch {marks[5]})", "tool": "echo"}, idle=10.0)
    assert resp.get("ok") is False and resp["error"]["code"] == "unknown_server", resp
    params = {"server": "demo", "tool": "echo", "args": {"text": text}, "command": ["touch", str(marks[4])]}
    resp, _, _ = raw_request(sock, "callTool", params, idle=10.0)
    assert resp.get("ok") is True and resp["result"]["content"][0]["text"] == text, resp

    created = [str(m) for m in marks if m.exists()]
    assert not created, f"request content reached a shell: {created}"
    # Only the configured command runs: the daemon's sole child is the demo server.
    daemon = running_status(h)["pid"]
    children = {pid for pid in all_pids() if (proc_stat(pid) or ProcStat(0, "", 0, 0)).ppid == daemon}
    children = {pid for pid in children if pid_alive(pid)}
    assert children == h.server_pids(), f"daemon children {children} are not just the demo server"
    assert_one_daemon_tree(h, daemon)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_call_timeout_fails_fast(h, how):
    h.configure({"eph": h.demo_server_entry("ephemeral")})
    daemon = started_pid(h.run("start"))
    env = h.env(MCPORTER_DAEMON_TIMEOUT_MS="1000") if how == "env" else h.env()
    flags = ("--timeout", "1s") if how == "flag" else ()
    for server in ("demo", "eph"):
        r = h.run("call", *flags, f"{server}.sleep", "seconds=5", env=env, timeout=20)
        assert r.rc == 1, r
        assert r.elapsed < 4.5, r
        assert "timed out" in r.err and "Traceback" not in r.err, r
        assert len(r.err.strip().splitlines()) == 1, r
    # The daemon survived the timeout and still serves.
    assert call_ok(h, "demo.counter") == "1"
    assert running_status(h)["pid"] == daemon
    wait_until(lambda: len(h.server_pids()) == 1, 10, message="the ephemeral server to exit")


@pytest.mark.parametrize("lifecycle", ["keep-alive", "ephemeral"])
def test_jsonrpc_error_keeps_code_and_data_and_names_the_server_once(h, lifecycle):
    schema_server(h, lifecycle=lifecycle)
    line = one_error_line(h.run("call", "t.boom"), 1, "boom happened", "-32099")
    assert line.count("server 't'") == 1, line
    r = h.run("call", "t.boom", "--json")
    assert r.rc == 1, r
    error = json.loads(r.out)["error"]
    assert error["code"] == -32099 and error["data"] == {"why": "testing"}, r
    assert "boom happened" in error["message"]
    line = one_error_line(h.run("call", "t.die"), 1, "exited")
    assert line.count("server 't'") == 1, line


# A small MCP stdio server that misbehaves on purpose: the one builder of the tests' hostile
# servers. argv: tag, mode, runs file; it notes what it saw ("ping", "pong", "held", ...) in
# ``<runs>.events``. Modes: "normal"; "deaf" stops reading stdin once it has listed its tools;
# "batch" sends each answer inside a JSON-RPC batch, between a log notification and a ping of
# its own; "ignore-ping" never answers ping; "late-ping" answers its first ping at once and each
# later one after $LATE_PING_S seconds. Tools: pid; echo (its arguments as JSON: the default);
# die (exits while a grandchild, tagged, holds its stdout); lone (a lone surrogate in the text;
# counts its runs); nest (lines nested ``depths`` levels deep before its answer); close_stdout
# (closes stdout and lives on, the call unanswered); close_stdout_soon (answers, then does the
# same); flood (``mib`` MiB of ``piece`` repeated on stderr, the piece once for 0, then
# answers); raw (answers with ``result`` as the whole result); hold (answered once an ``ask``
# is); ask (asks for input, with a related-request reference when ``ref`` names one, and
# answers once the client has).
MISBEHAVING_SERVER = r"""
import json, os, subprocess, sys, threading, time

mode, runs, tag = sys.argv[1], sys.argv[2], sys.argv[3]
out_lock = threading.Lock()
pings, held, asking = 0, [], {}


def send(obj):
    if mode == "batch" and "result" in obj:
        log = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "batched"}}
        obj = [log, obj, {"jsonrpc": "2.0", "id": "srv-ping", "method": "ping"}]
    with out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")  # ensure_ascii: "\ud83d" stays an escape
        sys.stdout.flush()


def answer(rid, result):
    send({"jsonrpc": "2.0", "id": rid, "result": result})


def text(rid, value):
    answer(rid, {"content": [{"type": "text", "text": value}]})


def note(event):
    with open(runs + ".events", "a") as f:
        f.write(event + "\n")


def live_on_without_stdout():
    os.close(1)
    note("stdout closed")
    time.sleep(300)


for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg:
        continue
    rid, method, params = msg["id"], msg.get("method"), msg.get("params") or {}
    if method is None:  # the client's answer to a request of ours
        note("pong" if rid == "srv-ping" else "answered")
        if rid in asking:
            text(asking.pop(rid), json.dumps(msg.get("result")))
            for other in held:
                text(other, "released")
            held.clear()
        continue
    if method == "initialize":
        answer(rid, {"protocolVersion": params.get("protocolVersion"), "capabilities": {"tools": {}},
                     "serverInfo": {"name": "misbehaving", "version": "1"}})
        continue
    if method == "tools/list":
        answer(rid, {"tools": []})
        if mode == "deaf":
            time.sleep(3600)  # never reads stdin again (after the daemon cached its tool list)
        continue
    if method == "ping":
        pings += 1
        note("ping")
        if mode == "late-ping" and pings > 1:
            threading.Timer(float(os.environ["LATE_PING_S"]), answer, (rid, {})).start()
        elif mode != "ignore-ping":
            answer(rid, {})
        continue
    name, args = params.get("name"), params.get("arguments") or {}
    if name == "die":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", tag])
        with open(runs, "w") as f:
            f.write(str(child.pid))
        os._exit(3)
    if name == "lone":
        with open(runs, "a") as f:
            f.write("ran\n")
    if name == "nest":
        for depth in args["depths"]:
            data = "[" * depth + "]" * depth
            with out_lock:
                sys.stdout.write('{"jsonrpc": "2.0", "method": "notifications/message", "params": '
                                 '{"level": "info", "data": ' + data + '}}\n')
    elif name == "close_stdout":
        live_on_without_stdout()
    elif name == "flood":
        unit = args.get("piece", "x").encode()
        block = unit * max(1, 65536 // len(unit))
        left = int(float(args.get("mib", 0)) * 1024 * 1024) or len(unit)  # mib 0: the piece once
        while left > 0:
            left -= sys.stderr.buffer.write(block[:left])
        sys.stderr.flush()
    elif name == "raw":
        answer(rid, args["result"])
        continue
    elif name == "hold":
        held.append(rid)
        note("held")
        continue
    elif name == "ask":
        ask = {"message": args.get("question", "What is your password?"),
               "requestedSchema": {"type": "object", "properties": {"password": {"type": "string"}}}}
        ref = args.get("ref")
        if ref == "token":
            ask["_meta"] = {"progressToken": params["_meta"]["progressToken"]}
        elif ref == "id":
            ask["_meta"] = {"io.modelcontextprotocol/related-request-id": rid}
        asking["ask-" + str(rid)] = rid
        send({"jsonrpc": "2.0", "id": "ask-" + str(rid), "method": "elicitation/create", "params": ask})
        continue
    value = {"pid": str(os.getpid()), "lone": "cut \ud83d here"}.get(name, json.dumps(params.get("arguments")))
    text(rid, value)
    if name == "close_stdout_soon":
        live_on_without_stdout()
"""


def misbehaving_entry(h, mode="normal", runs=None, lifecycle="keep-alive"):
    runs = runs or h.tmp / f"runs-{mode}"
    return h.script_server(MISBEHAVING_SERVER, mode, runs, lifecycle=lifecycle, name="misbehaving_server")


def sh_wrapped_demo_entry(h, lifecycle="keep-alive"):
    """The demo server started as ``sh -c 'sleep 300 & exec server'``: the group leader (the
    server, by exec) exits on stdin EOF while the sleep it started lives on."""
    demo = h.demo_server_entry()
    script = 'sleep 300 & exec "$0" "$@"'
    return {
        "command": "/bin/sh",
        "args": ["-c", script, demo["command"]] + demo["args"],
        "lifecycle": lifecycle,
    }


def group_pids(pgid):
    """Live (non-zombie) processes in process group ``pgid``."""
    found = set()
    for pid in all_pids():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read().decode("utf-8", "replace")
        except OSError:
            continue
        fields = data[data.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            found.add(pid)
    return found


def tracked_group(h, leader):
    """The leader's group (leader and the sleep it started), tracked for cleanup."""
    members = wait_until(
        lambda: len(group_pids(leader)) == 2 and group_pids(leader), 10, message="group of 2"
    )
    for pid in members:
        h.track(pid)
    return members


@pytest.mark.parametrize("how", ["stop", "ephemeral", "idle-close", "bind-guard-reap"])
def test_server_process_group_is_gone_even_when_leader_exits_first(h, how):
    lifecycle = {"ephemeral": "ephemeral", "idle-close": {"mode": "keep-alive", "idleTimeoutMs": 500}}
    h.write_config({"mcpServers": {"demo": sh_wrapped_demo_entry(h, lifecycle.get(how, "keep-alive"))}})
    if how == "ephemeral":
        call = h.popen("call", "demo.sleep", "seconds=3")
        leader = wait_until(lambda: h.server_pids(), 10, message="the ephemeral server to run").pop()
        members = tracked_group(h, leader)
        assert call.wait(timeout=20) == 0, read_file(call.err_path)
    else:
        leader = int(call_ok(h, "demo.pid"))
        members = tracked_group(h, leader)
        daemon = running_status(h)["pid"]
        if how == "stop":
            r = h.run("stop")
            assert r.rc == 0, r
        elif how == "bind-guard-reap":
            os.kill(daemon, signal.SIGKILL)
            # The leader exits on stdin EOF first; the sleep it started lives on.
            wait_until(lambda: not pid_alive(leader), 10, message="the leader to exit on stdin EOF")
            assert group_pids(leader), "the sleep died with its leader; the test proves nothing"
            assert call_ok(h, "demo.counter") == "1"
            h.status()
    wait_until(lambda: not group_pids(leader), 5, message=f"group {sorted(members)} to be gone")


def test_server_dying_mid_call_fails_the_call_at_once(h):
    runs = h.tmp / "grandchild.pid"
    h.configure({"dying": misbehaving_entry(h, runs=runs)})
    first = int(call_ok(h, "dying.pid"))
    r = h.run("call", "--timeout", "8s", "dying.die", timeout=30)
    grandchild = int(runs.read_text())
    h.track(grandchild)
    assert r.rc == 1, r
    assert "exited" in r.err and "Traceback" not in r.err, r
    assert r.elapsed < 3.0, f"a dead server's call took {r.elapsed:.2f}s to fail: {r!r}"
    # Its group goes with it, and the next call starts a new server.
    wait_until(lambda: not pid_alive(grandchild), 5, message="the grandchild holding stdout to be ended")
    second = int(call_ok(h, "dying.pid"))
    assert second != first
    assert call_ok(h, "demo.counter") == "1"


def test_server_that_stops_reading_fails_calls_within_their_timeout(h):
    h.configure({"deaf": misbehaving_entry(h, "deaf")})
    assert call_ok(h, "demo.counter") == "1"
    big = "x" * 100_000  # two of them: more than a pipe holds, each under the argv limit
    t0 = time.monotonic()
    first = h.popen("call", "--timeout", "2s", "deaf.echo", f"a={big}", f"b={big}")
    deaf = wait_until(lambda: server_pid(h.status(), "deaf"), 10, message="the deaf server to start")
    second = h.popen("call", "--timeout", "2s", "deaf.echo", "text=small")
    t1 = time.monotonic()
    # Another server of the same daemon is served meanwhile.
    r = h.run("call", "demo.counter")
    assert r.rc == 0 and r.out.strip() == "2" and r.elapsed < 2.0, r
    for p, began in ((first, t0), (second, t1)):
        try:
            rc = p.wait(timeout=12)
        except subprocess.TimeoutExpired:
            pytest.fail(f"call still waiting after {time.monotonic() - began:.1f}s (timeout 2 s)")
        elapsed = time.monotonic() - began
        err = read_file(p.err_path)
        assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert elapsed < 2 + 2.0, f"call failed after {elapsed:.2f}s (timeout 2 s): {err}"
    # The half-written frame broke that server: it is ended, and the next call starts another.
    wait_until(lambda: not pid_alive(deaf), 5, message=f"broken server {deaf} to be ended")
    r = h.run("call", "--timeout", "1s", "deaf.echo", "text=small")
    assert r.rc == 1 and "timed out" in r.err, r
    assert server_pid(h.status(), "deaf") not in (None, deaf)


# A stdlib MCP server for these tests. argv: mode. "dying" writes to stderr and exits during
# start-up; "logging" sends notifications/message during a call; "blob" returns an image of
# `kib` KiB of seeded random bytes (the test makes the same bytes to compare).
DIAG_SERVER = r"""
import base64, json, random, sys

mode = sys.argv[1]
if mode == "dying":
    sys.stderr.write("loading settings\nfatal: API_KEY not set\n")
    sys.stderr.flush()
    sys.exit(3)


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


made = {}
for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg:
        continue
    method, params = msg.get("method"), msg.get("params") or {}
    if method == "initialize":
        result = {"protocolVersion": params.get("protocolVersion"), "capabilities": {"tools": {}, "logging": {}},
                  "serverInfo": {"name": "diag", "version": "1"}}
    elif method == "tools/list":
        result = {"tools": []}
    elif method == "tools/call" and mode == "logging":
        send({"jsonrpc": "2.0", "method": "notifications/message",
              "params": {"level": "warning", "logger": "db", "data": "pool is 90% full"}})
        send({"jsonrpc": "2.0", "method": "notifications/message",
              "params": {"level": "info", "data": {"rows": 3}}})
        result = {"content": [{"type": "text", "text": "logged"}]}
    elif method == "tools/call" and mode == "blob":
        kib = int((params.get("arguments") or {}).get("kib", 1))
        if kib not in made:  # made and encoded once per size: a benchmark times the relay
            made.clear()
            data = base64.b64encode(random.Random(kib).randbytes(kib * 1024)).decode()
            made[kib] = json.dumps({"content": [{"type": "image", "mimeType": "image/png", "data": data}]})
        sys.stdout.write('{"jsonrpc": "2.0", "id": ' + json.dumps(msg["id"]) + ', "result": ' + made[kib] + "}\n")
        sys.stdout.flush()
        continue
    else:
        result = {}
    send({"jsonrpc": "2.0", "id": msg["id"], "result": result})
"""


def diag_entry(h, mode, lifecycle="keep-alive"):
    return h.script_server(DIAG_SERVER, mode, lifecycle=lifecycle or None, name="diag_server")


@pytest.mark.parametrize("lifecycle", ["keep-alive", "ephemeral"])
def test_server_that_dies_at_start_is_reported_with_its_stderr(h, lifecycle):
    h.configure({"dying": diag_entry(h, "dying", lifecycle)})
    r = h.run("call", "dying.anything")
    assert r.rc == 1, r
    err = r.err.strip()
    assert len(err.splitlines()) == 1, err
    assert "exited (exit code 3)" in err and "fatal: API_KEY not set" in err, err
    assert err.count("server 'dying'") == 1, f"doubled prefix: {err}"
    assert r.elapsed < 5, r


@pytest.mark.parametrize("lifecycle", ["keep-alive", "ephemeral"])
def test_server_that_dies_at_once_is_reported_with_its_exit_and_stderr_every_time(h, lifecycle):
    """However fast a server dies (a shell wrapper that refuses to start, /bin/false), the error
    names its exit code and its last stderr lines, kept or not; this used to race."""
    wrapper = "echo 'fatal: GITHUB_TOKEN is not set' >&2; exit 3"
    h.configure(
        {
            "gh": {"command": "/bin/sh", "args": ["-c", wrapper, h.tag], "lifecycle": lifecycle},
            "no": {"command": "/bin/false", "args": [h.tag], "lifecycle": lifecycle},
        },
    )
    for _ in range(8):
        line = one_error_line(h.run("call", "gh.search"), 1, "exit code 3", "fatal: GITHUB_TOKEN is not set")
        assert line.count("server 'gh'") == 1 and "not running" not in line, line
        line = one_error_line(h.run("call", "no.anything"), 1, "server 'no'", "exit code 1")
        assert "not running" not in line, line
    assert call_ok(h, "demo.counter") == "1"


@pytest.mark.parametrize("lifecycle", ["keep-alive", "ephemeral"])
def test_missing_server_cwd_is_named_with_its_config_and_checked_by_doctor(h, lifecycle):
    missing = h.tmp / "no-such-dir"
    h.configure({"gone": dict(h.demo_server_entry(lifecycle), cwd=str(missing))})
    r = h.run("call", "gone.counter", env=h.env())
    assert_prompt_error(r, 2, f"working directory {missing} does not exist", "server 'gone'", f"from {h.cfg}")
    assert "not found" not in r.err, r
    _, findings = h.doctor()
    finding(findings, "FAIL", "server 'gone'", f"working directory {missing} does not exist")
    finding(findings, "ok    ", "server 'demo'")
    missing.mkdir()
    _, findings = h.doctor()
    assert not [ln for ln in findings if ln.startswith("FAIL")], findings
    assert call_ok(h, "gone.counter") == "1"


@pytest.mark.parametrize(
    "params, callers, owner",
    [
        ({"message": "?"}, [7], 7),  # one caller in flight: the question can only be its
        ({"message": "?"}, [7, 8], None),  # two, and nothing says whose: nobody's
        ({"message": "?"}, [], None),
        ({"_meta": {"io.modelcontextprotocol/related-request-id": 8}}, [7, 8], 8),
        ({"_meta": {"relatedRequestId": 7}}, [7, 8], 7),
        ({"_meta": {"progressToken": 8}}, [7, 8], 8),  # our progress token is the request id
        ({"_meta": {"relatedRequestId": 9}}, [7], None),  # names a request no caller waits for
        ({"_meta": {"relatedRequestId": True}}, [7], 7),  # a bool names nothing
        (None, [7], 7),
    ],
)
def test_notice_owner_table(params, callers, owner):
    assert _import_module().notice_owner(params, callers) == owner


@pytest.mark.parametrize(
    "line, count, complaint",
    [
        ('{"jsonrpc": "2.0", "id": 1, "result": {}}\r', 1, ""),
        ('[{"jsonrpc": "2.0", "id": 1, "result": {}}, {"jsonrpc": "2.0", "method": "x"}]', 2, ""),
        ('[{"id": 1, "result": {}}, 5]', 1, "non-object"),
        ("[]", 0, "non-object"),
        ("5", 0, "non-object"),
        ("Server starting on stdio", 0, "non-JSON"),
        pytest.param("[" * 100_000 + "]" * 100_000, 0, "nested too deeply", id="nested-100000-deep"),
        ("   ", 0, ""),
    ],
)
def test_parse_messages_table(line, count, complaint):
    messages, why = _import_module()._parse_messages(line)
    assert len(messages) == count and all(isinstance(m, dict) for m in messages)
    assert (complaint in why) if complaint else why == "", why


@pytest.mark.parametrize(
    "code, words",
    [(3, "exit code 3"), (0, "exit code 0"), (-9, "killed by signal 9 (SIGKILL)"), (-15, "(SIGTERM)")],
)
def test_exit_words_table(code, words):
    assert words in _import_module()._exit_words(code)


def test_stderr_lines_split_at_cr_and_lf_and_cap_a_long_line():
    md = _import_module()
    cap = md._STDERR_LINE_CAP
    r, w = os.pipe()
    data = b"a\r\nb\rc\n\n" + b"x" * (3 * cap + 5) + b"\ntail\xff"

    def write():
        with os.fdopen(w, "wb") as f:
            f.write(data)

    writer = threading.Thread(target=write)
    writer.start()
    with os.fdopen(r, "rb") as f:
        lines = list(md._stderr_lines(f.fileno()))
    writer.join()
    assert lines[:3] == ["a", "b", "c"], lines[:3]
    assert lines[3].startswith("x" * cap) and "truncated" in lines[3] and len(lines[3]) < cap + 100
    assert lines[4:] == ["tail\ufffd"], [ln[:50] for ln in lines]


def test_server_log_notifications_reach_the_daemon_log(h):
    h.configure({"talk": diag_entry(h, "logging")})
    assert call_ok(h, "talk.anything") == "logged"
    log = read_file(h.path("log"))
    assert "[talk] (warning db) pool is 90% full" in log, log[-2000:]
    assert '[talk] (info) {"rows": 3}' in log, log[-2000:]


def test_daemon_gets_a_fixed_mmap_threshold_and_its_servers_do_not(h):
    """The daemon a CLI launches runs with glibc's mmap threshold fixed (large results go back
    to the OS when freed); its MCP servers see the user's environment without it."""
    assert call_ok(h, "demo.counter") == "1"
    daemon = running_status(h)["pid"]
    (server,) = h.server_pids()
    assert "MALLOC_MMAP_THRESHOLD_=1048576" in proc_environ(daemon)
    assert not any(
        v.startswith(("MALLOC_MMAP_THRESHOLD_=", "MCPORTER_DAEMON_MALLOC_TUNED="))
        for v in proc_environ(server)
    )
    r = h.run("stop")
    assert r.rc == 0, r
    # A user's own setting is left as it is, for both.
    assert h.run("call", "demo.counter", MALLOC_MMAP_THRESHOLD_="262144").rc == 0
    daemon = running_status(h)["pid"]
    (server,) = h.server_pids()
    assert "MALLOC_MMAP_THRESHOLD_=262144" in proc_environ(daemon)
    assert "MALLOC_MMAP_THRESHOLD_=262144" in proc_environ(server)


@pytest.mark.parametrize("how", ["json", "save-images"])
def test_large_result_arrives_intact(h, how):
    """A result larger than the daemon's 1 MiB send pieces (so it is streamed) arrives byte for
    byte, through --json and through --save-images."""
    import base64
    import random

    kib = 3 * 1024 + 7
    expected = random.Random(kib).randbytes(kib * 1024)
    h.configure({"big": diag_entry(h, "blob")})
    if how == "json":
        r = h.run("call", "big.blob", f"kib={kib}", "--json")
        assert r.rc == 0, r.err
        block = json.loads(r.out)["content"][0]
        assert block["mimeType"] == "image/png"
        assert base64.b64decode(block["data"]) == expected
    else:
        shots = h.tmp / "shots"
        r = h.run("call", "big.blob", f"kib={kib}", "--save-images", shots)
        assert r.rc == 0, r
        (path,) = r.out.split()
        assert Path(path).read_bytes() == expected
    assert call_ok(h, "big.blob", "kib=1") == f"[image image/png, {1024} bytes]"


def paced_kib(seconds):
    """A blob size (KiB) whose base64 answer, read as ``slow_read_blob`` reads, takes ``seconds``."""
    return int(seconds / 0.01 * 16 * 3 / 4)


def slow_read_blob(h, kib, on_first_bytes=lambda: None, pause=0.01):
    """Call ``big.blob`` for ``kib`` KiB on a socket with a small receive buffer and read the
    answer as a slow reader does (16 KiB per ``pause`` at most); ``on_first_bytes`` runs once
    the answer has begun to arrive. Returns (every byte until the daemon closed, seconds taken)."""
    req = {
        "id": "slow",
        "method": "callTool",
        "params": {"server": "big", "tool": "blob", "args": {"kib": kib}},
    }
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.settimeout(30)
    try:
        s.connect(str(h.socket_path))
        s.sendall((json.dumps(req) + "\n").encode())
        began = time.monotonic()
        chunks = [s.recv(16 * 1024)]
        on_first_bytes()
        while chunks[-1]:
            time.sleep(pause)  # a slow reader
            chunks.append(s.recv(16 * 1024))
    finally:
        s.close()
    return b"".join(chunks), time.monotonic() - began


def assert_whole_blob(data, kib, took):
    assert data.endswith(b"\n"), f"answer cut off after {len(data)} bytes and {took:.1f}s"
    frame = json.loads(data)
    assert frame["ok"] is True, frame.get("error")
    assert len(frame["result"]["content"][0]["data"]) == 4 * ((kib * 1024 + 2) // 3)  # base64 length


def test_slow_reader_still_gets_a_large_answer_whole(h):
    """A caller that takes its time reading a large answer (a busy machine, a slow pipe) gets
    all of it: the daemon bounds how long no byte moves, not the whole transfer."""
    send_idle = _import_module()._SEND_IDLE
    kib = paced_kib(1.25 * send_idle)  # the paced read outlasts the send limit
    h.configure({"big": diag_entry(h, "blob")})
    assert call_ok(h, "big.blob", "kib=1")  # the daemon and its server run
    data, took = slow_read_blob(h, kib)
    assert_whole_blob(data, kib, took)
    assert took > send_idle, (
        f"the read took only {took:.1f}s; the test must outlast the {send_idle} s send limit"
    )


def test_answer_being_sent_when_a_stop_comes_goes_out_whole(h):
    """A call already answered, its large answer still going out to a slow reader, when a
    ``stop`` arrives: the daemon stops, but only once that answer is out, whole. (The answer
    counted as work in flight only until it started to go out; a stop could end the process
    halfway through it.)"""
    md = _import_module()
    kib = paced_kib(md._DRAIN_WAIT + md._DRAIN_AFTER_CLOSE + 1.5)  # outlasts the wind-down
    h.configure({"big": diag_entry(h, "blob")})
    assert call_ok(h, "big.blob", "kib=1")
    daemon = h.meta()["pid"]
    stopped = []
    data, took = slow_read_blob(
        h, kib, lambda: stopped.append(raw_request(h.socket_path, "stop", {}, idle=10.0)[0])
    )
    assert stopped[0].get("ok") is True, stopped
    assert_whole_blob(data, kib, took)
    wait_until(lambda: not pid_alive(daemon), 10, message="the daemon to exit")


def test_reader_trickling_an_answer_does_not_hold_a_stopping_daemon(h):
    """The other side of the test above: a reader just fast enough that no piece of its answer
    ever times out (each 1 MiB piece has the send limit to go out, ``sendall``'s own budget)
    gets a bounded time once a stop has come; then the daemon exits, answer finished or not.
    Stopping has a deadline."""
    md = _import_module()
    h.configure({"big": diag_entry(h, "blob")})
    assert call_ok(h, "big.blob", "kib=1")
    daemon = h.meta()["pid"]
    stopped = []

    def stop():
        stopped.append((time.monotonic(), raw_request(h.socket_path, "stop", {}, idle=10.0)[0]))

    # 12 MiB of base64 at 16 KiB per 30 ms (about 0.5 MB/s, a piece in 2 s) takes 23 s whole.
    kib = 9000
    data, _ = slow_read_blob(h, kib, stop, pause=0.03)
    closed = time.monotonic()
    assert stopped[0][1].get("ok") is True, stopped
    bound = md._DRAIN_WAIT + 2 * md._DRAIN_AFTER_CLOSE + md._SEND_IDLE
    assert closed - stopped[0][0] < bound + 3, f"the stopping daemon held on {closed - stopped[0][0]:.1f}s"
    assert len(data) < 4 * kib * 1024 // 3, "the whole answer went out: the reader was not slow enough"
    wait_until(lambda: not pid_alive(daemon), 10, message="the daemon to exit")


CLEAR_LINE = "\r\x1b[K"


def cancel_log_entry(h, lifecycle="keep-alive"):
    """The demo server, recording each notifications/cancelled it gets in ``cancel.log``."""
    log = h.tmp / "cancel.log"
    entry = dict(h.demo_server_entry(), lifecycle=lifecycle, env={"MCPORTER_DEMO_CANCEL_LOG": str(log)})
    return entry, log


def cancellations(log):
    try:
        return [json.loads(line) for line in log.read_text().splitlines()]
    except FileNotFoundError:
        return []


def thread_count(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("Threads:")))
    except (OSError, StopIteration, ValueError):
        return 0


def run_with_pty_stderr(h, *args, timeout=60):
    """Run the CLI with stderr on a pseudo-terminal: (rc, stdout, what the terminal got)."""
    import pty

    master, slave = pty.openpty()
    try:
        p = spawn(h.argv(*args), h.env(), h.tmp, subprocess.PIPE, slave)
    finally:
        os.close(slave)
    h.popens.append(p)
    h.track(p.pid)
    out_box = []
    reader = threading.Thread(target=lambda: out_box.append(p.stdout.read()), daemon=True)
    reader.start()
    term = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the terminal's other side has closed it
                break
            if not chunk:
                break
            term += chunk
    finally:
        os.close(master)
    rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
    reader.join(10)
    return rc, (out_box[0] if out_box else b"").decode(), term.decode("utf-8", "replace")


def progress_lines(term):
    """The progress texts drawn, in order (each starts with ``\\r`` + clear)."""
    return [part for part in term.split(CLEAR_LINE) if part]


def test_progress_extends_the_stall_budget_but_never_the_timeout(h):
    assert call_ok(h, "demo.pid")
    # Progress every 0.4 s keeps a 1.6 s call alive under a 1 s stall budget.
    r = h.run("call", "--stall-timeout", "1s", "demo.progress", "steps=4", "delay=0.4")
    assert r.rc == 0 and r.out.strip() == "done 4 steps", r
    # Silence (no answer, no progress) for the stall budget fails the call.
    r = h.run("call", "--stall-timeout", "1s", "demo.sleep", "seconds=8", timeout=20)
    assert r.rc == 1 and "no progress" in r.err and len(r.err.strip().splitlines()) == 1, r
    assert r.elapsed < 1 + 2.0, r
    # Progress never carries a call past its --timeout.
    r = h.run(
        "call",
        "--timeout",
        "2s",
        "--stall-timeout",
        "1s",
        "demo.progress",
        "steps=50",
        "delay=0.2",
        timeout=20,
    )
    assert r.rc == 1 and "timed out after 2s" in r.err, r
    assert r.elapsed < 2 + 2.0, r


@pytest.mark.parametrize(
    "now, deadline, heard, idle, expected",
    [
        (0.0, 60.0, 0.0, None, (60.0, "timeout")),  # no idle budget: the deadline alone
        (0.0, 60.0, 0.0, 10.0, (10.0, "stalled")),  # silent since the send
        (25.0, 60.0, 20.0, 10.0, (30.0, "stalled")),  # progress at 20 s moved it on
        (55.0, 60.0, 55.0, 10.0, (60.0, "timeout")),  # progress never passes the deadline
        (0.0, 5.0, 0.0, 10.0, (5.0, "timeout")),  # a budget longer than the call: the deadline
        (0.0, 10.0, 0.0, 10.0, (10.0, "timeout")),  # equal: reported as the timeout it is
    ],
)
def test_call_expiry_table(now, deadline, heard, idle, expected):
    # ``now`` stays in the table as the moment each row describes; the decision does not read it.
    assert _import_module().call_expiry(deadline, heard, idle) == expected


# ##########################################################################################
# Tool arguments: ``key=value`` pairs typed by the tool's inputSchema (daemon and ephemeral).
# ##########################################################################################


def test_call_echo_passes_string_argument(h):
    assert call_ok(h, "demo.echo", "text=hello world") == "hello world"


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# A stdlib MCP server for the schema cache and error paths. Its tools/list reads the type of
# show's `value` from a file at each listing (and never announces a change by itself), and
# counts the listings; `changed` announces list_changed; `boom` answers with a JSON-RPC
# error; `die` exits mid-call.
SCHEMA_SERVER = r"""
import json, os, sys

schema_file = sys.argv[1]
lists = 0


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def tool(name):
    return {"name": name, "inputSchema": {"type": "object", "properties": {}}}


for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    method, rid, params = msg.get("method"), msg.get("id"), msg.get("params") or {}
    if rid is None:
        continue
    if method == "initialize":
        result = {
            "protocolVersion": params.get("protocolVersion"),
            "capabilities": {"tools": {"listChanged": True}},
            "serverInfo": {"name": "schema-test", "version": "0"},
        }
    elif method == "tools/list":
        lists += 1
        with open(schema_file) as f:
            kind = f.read().strip()
        show = {"name": "show", "inputSchema": {"type": "object", "properties": {"value": {"type": kind}}}}
        result = {"tools": [show] + [tool(n) for n in ("lists", "changed", "boom", "die")]}
    elif method == "tools/call":
        name, args = params.get("name"), params.get("arguments") or {}
        if name == "boom":
            error = {"code": -32099, "message": "boom happened", "data": {"why": "testing"}}
            send({"jsonrpc": "2.0", "id": rid, "error": error})
            continue
        if name == "die":
            sys.stderr.write("dying on purpose\n")
            sys.stderr.flush()
            os._exit(3)
        if name == "changed":
            send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        text = {"show": json.dumps(args.get("value")), "lists": str(lists)}.get(name, name)
        result = {"content": [{"type": "text", "text": text}]}
    elif method == "ping":
        result = {}
    else:
        send({"jsonrpc": "2.0", "id": rid, "error": {"code": -32601, "message": "no such method"}})
        continue
    send({"jsonrpc": "2.0", "id": rid, "result": result})
"""


def schema_server(h, kind="string", lifecycle="keep-alive"):
    """Configure the schema test server as `t` (beside the demo server); returns its type file."""
    kind_file = h.tmp / "value-type"
    kind_file.write_text(kind)
    entry = h.script_server(SCHEMA_SERVER, kind_file, lifecycle=lifecycle, name="schema_server")
    h.configure({"t": entry})
    return kind_file


def one_error_line(r, rc, *needles):
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert r.rc == rc and len(lines) == 1 and "Traceback" not in r.err, r
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in the error: {r!r}"
    return lines[0]


@pytest.mark.parametrize(
    "prop, raw, expected",
    [
        (None, "123", 123),
        (None, "abc", "abc"),
        ({}, "[1]", [1]),
        ({"type": "widget"}, "5", 5),
        ({"type": "string"}, "123", "123"),
        ({"type": "string"}, "007", "007"),
        ({"type": "string"}, "true", "true"),
        ({"type": "string"}, '{"a": 1}', '{"a": 1}'),
        ({"type": "integer"}, "7", 7),
        ({"type": "integer"}, "-3.0", -3),
        ({"type": "number"}, "0.5", 0.5),
        ({"type": "number"}, "1e3", 1000.0),
        ({"type": "number"}, "12", 12),
        ({"type": "boolean"}, "true", True),
        ({"type": "boolean"}, "False", False),
        ({"type": "array"}, '["a", 1]', ["a", 1]),
        ({"type": "object"}, '{"k": 1}', {"k": 1}),
        ({"type": ["string", "null"]}, "null", "null"),
        ({"type": ["string", "null"]}, "42", "42"),
        ({"type": ["integer", "null"]}, "null", None),
        ({"type": ["integer", "null"]}, "4", 4),
        ({"type": ["integer", "boolean"]}, "true", True),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, "5", 5),
        ({"enum": ["a", "b"]}, "a", "a"),
        ({"enum": [1, 2]}, "2", 2),
        ({"type": "string", "enum": ["1", "2"]}, "1", "1"),
        ({"type": "integer", "enum": [1, 2]}, "2", 2),
        ({"type": "array", "items": {"type": "string"}}, "one", ["one"]),  # a bare value: one item
        ({"type": "array", "items": {"type": "string"}}, '["a", "b"]', ["a", "b"]),
        ({"type": ["array", "null"], "items": {"type": "string"}}, "x y", ["x y"]),
    ],
)
def test_coerce_argument_table(prop, raw, expected):
    md = _import_module()
    value = md.coerce_argument("p", raw, prop)
    assert value == expected and type(value) is type(expected), (prop, raw, value)


@pytest.mark.parametrize(
    "prop, raw, message",
    [
        ({"type": "integer"}, "abc", "parameter 'p' expects an integer, got 'abc'"),
        ({"type": "integer"}, "3.5", "expects an integer"),
        ({"type": "integer"}, "true", "expects an integer"),
        ({"type": "number"}, "NaN", "expects a number"),
        ({"type": "number"}, '"1"', "expects a number"),
        ({"type": "boolean"}, "yes", "expects a boolean (true or false)"),
        ({"type": "array"}, "a,b", "expects a JSON array"),
        ({"type": "object"}, "[]", "expects a JSON object"),
        ({"type": ["integer", "boolean"]}, "x", "expects an integer or a boolean (true or false)"),
        ({"type": "string", "enum": ["fast", "slow"]}, "medium", "parameter 'p' must be one of: fast, slow"),
        ({"type": "integer", "enum": [1, 2]}, "3", "must be one of: 1, 2"),
        ({"enum": [True]}, "1", "must be one of: true"),
        ({"type": "array", "items": {"type": "integer"}}, "5", "expects a JSON array"),  # not strings
        ({"type": "array", "items": {"type": "string"}}, "[oops", "expects a JSON array"),  # meant JSON
    ],
)
def test_coerce_argument_errors_table(prop, raw, message):
    md = _import_module()
    with pytest.raises(md.UsageError) as info:
        md.coerce_argument("p", raw, prop)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("lifecycle", ["keep-alive", "ephemeral"])
def test_call_arguments_follow_the_schema(h, lifecycle):
    h.configure({"eph": h.demo_server_entry("ephemeral")})
    server = "demo" if lifecycle == "keep-alive" else "eph"
    out = call_ok(
        h,
        f"{server}.typed",
        "text=123",
        "count=7",
        "ratio=0.5",
        "flag=true",
        'tags=["a","b"]',
        'meta={"k": 1}',
        "mode=slow",
        "note=null",
    )
    assert json.loads(out) == {
        "text": "123",
        "count": 7,
        "ratio": 0.5,
        "flag": True,
        "tags": ["a", "b"],
        "meta": {"k": 1},
        "mode": "slow",
        "note": "null",
    }, out
    assert call_ok(h, f"{server}.echo", "text=007") == "007"
    assert call_ok(h, f"{server}.echo", "text=true") == "true"
    # Not in the schema: the old rule, JSON when it parses.
    assert json.loads(call_ok(h, f"{server}.typed", "extra=5", "other=x")) == {"extra": 5, "other": "x"}
    # key=@path is the file's text, typed like any value; @@ escapes a leading @.
    (h.tmp / "n.txt").write_text("12\n")
    (h.tmp / "t.txt").write_text("line one\nline two\n")
    out = call_ok(h, f"{server}.typed", "count=@n.txt", f"text=@{h.tmp / 't.txt'}", "note=@@me")
    assert json.loads(out) == {"count": 12, "text": "line one\nline two\n", "note": "@me"}, out
    # --args - reads an object from stdin; the pairs are typed on top of it.
    r = h.run(
        "call", f"{server}.typed", "count=2", "--args", "-", stdin='{"count": 1, "meta": {"from": "stdin"}}'
    )
    assert r.rc == 0 and json.loads(r.out) == {"count": 2, "meta": {"from": "stdin"}}, r
    # A value that does not parse, or is outside its enum: one line, exit 2, naming it.
    one_error_line(h.run("call", f"{server}.typed", "count=abc"), 2, "'count'", "integer", "'abc'")
    one_error_line(h.run("call", f"{server}.typed", "flag=yes"), 2, "'flag'", "boolean")
    one_error_line(h.run("call", f"{server}.typed", "tags=[a,b"), 2, "'tags'", "array")
    assert json.loads(call_ok(h, f"{server}.typed", "tags=a,b")) == {"tags": ["a,b"]}  # one item
    one_error_line(h.run("call", f"{server}.typed", "mode=medium"), 2, "'mode'", "fast, slow", "medium")
    one_error_line(h.run("call", f"{server}.typed", "count=@missing.txt"), 2, "missing.txt")
    one_error_line(h.run("call", f"{server}.typed", "--args", "-", stdin="[1]"), 2, "JSON object")
    if lifecycle == "keep-alive":
        assert call_ok(h, "demo.counter") == "1", "a usage error must not cost the server its state"


SCHEMA_ABC = {
    "type": "object",
    "properties": {
        "firstName": {"type": "string"},
        "dry_run": {"type": "boolean"},
        "count": {"type": "integer"},
    },
}


@pytest.mark.parametrize(
    "raw, flags, positional, given, expected",
    [
        ({"count": "1"}, {}, [], (), {"count": "1"}),
        ({}, {"first-name": "Ada"}, [], (), {"firstName": "Ada"}),  # kebab-case: the camelCase name
        ({}, {"firstName": "Ada", "dry-run": "true"}, [], (), {"firstName": "Ada", "dry_run": "true"}),
        ({}, {"dry_run": "false"}, [], (), {"dry_run": "false"}),
        ({}, {}, ["Ada", "true", "3"], (), {"firstName": "Ada", "dry_run": "true", "count": "3"}),
        ({"firstName": "Ada"}, {}, ["true"], (), {"firstName": "Ada", "dry_run": "true"}),  # named skipped
        ({}, {"count": "2"}, ["Ada"], ("dry_run",), {"count": "2", "firstName": "Ada"}),  # --args skipped
        ({"other": "x"}, {}, [], (), {"other": "x"}),  # a pair the schema lacks: sent as written
    ],
)
def test_name_arguments_table(raw, flags, positional, given, expected):
    md = _import_module()
    assert md.name_arguments(raw, flags, positional, SCHEMA_ABC, "t", given) == expected


@pytest.mark.parametrize(
    "flags, positional, schema, message",
    [
        (
            {"frist-name": "x"},
            [],
            SCHEMA_ABC,
            "tool 't' has no parameter --frist-name (did you mean: first-name?)",
        ),
        ({"zzz": "x"}, [], SCHEMA_ABC, "its flags: --first-name, --dry-run, --count"),
        ({"a": "x"}, [], None, "tool 't' has no parameter --a"),
        ({}, ["a", "b", "c", "d"], SCHEMA_ABC, "4 positional value(s) for tool 't'"),
        ({}, ["a"], None, "unnamed parameters in order are: none"),
    ],
)
def test_name_arguments_errors_table(flags, positional, schema, message):
    md = _import_module()
    with pytest.raises(md.UsageError) as info:
        md.name_arguments({}, flags, positional, schema, "t")
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "name, known, expected",
    [
        ("get_curent_time", ["get_current_time", "convert_time"], ["get_current_time"]),
        ("get-current-time", ["get_current_time"], ["get_current_time"]),  # - for _
        ("Echo", ["echo", "echoes", "sleep"], ["echo", "echoes"]),  # case first
        ("countr", ["counter", "count", "pid"], ["counter", "count"]),
        ("zzz", ["counter", "pid"], []),
        ("a", ["ab", "ac", "ad", "ae"], ["ab", "ac", "ad"]),  # at most three
        ("echo", ["echo"], []),  # never the name itself
    ],
)
def test_suggest_names_table(name, known, expected):
    assert _import_module().suggest_names(name, known) == expected


@pytest.mark.parametrize("lifecycle", ["keep-alive", "ephemeral"])
def test_call_forms_follow_the_schema(h, lifecycle):
    """Every form mcporter accepts, typed by the schema as key=value is, mixed with options."""
    h.configure({"eph": h.demo_server_entry("ephemeral")})
    server = "demo" if lifecycle == "keep-alive" else "eph"
    want = {"text": "123", "count": 7, "flag": True, "tags": ["a"]}
    for words in [
        ("text=123", "count=7", "flag=true", "tags=a"),
        ("text:123", "count:7", "flag: true", "tags:a"),
        ("text:", "123", "count:", "7", "--flag", "true", "--tags", "a"),
        ("--text=123", "--count", "7", "--flag=true", '--tags=["a"]'),
        ("123", "7", "--flag", "true", "tags=a"),  # positional values: text, count in schema order
        ("--output", "json", "text=123", "--timeout", "30s", "count=7", "--json", "flag=true", "tags=a"),
    ]:
        out = call_ok(h, f"{server}.typed", *words)
        assert json.loads(out) == want, (words, out)
    out = call_ok(h, f'{server}.typed(text: 123, count: 7, flag: true, tags: "a")', "--timeout", "30s")
    assert json.loads(out) == want, out
    out = call_ok(h, f'{server}.typed("123", 7, ratio=0.5)')
    assert json.loads(out) == {"text": "123", "count": 7, "ratio": 0.5}, out
    assert call_ok(h, f'{server}.echo(text: "a, b (c)")') == "a, b (c)"
    assert call_ok(h, f"{server}.echo", "--", "--not-a-flag") == "--not-a-flag"
    assert call_ok(h, f"{server}.echo", "https://example.com/x?y=1") == "https://example.com/x?y=1"
    one_error_line(h.run("call", f"{server}.typed", "--cuont", "7"), 2, "--cuont", "did you mean: count")
    one_error_line(h.run("call", f"{server}.echo", "a", "b"), 2, "2 positional value(s)", "text")
    one_error_line(h.run("call", f"{server}.typed", "--count", "x"), 2, "'count'", "integer")
    one_error_line(h.run("call", f"{server}.echo(text: 'x'"), 2, "closing ')'")
    if lifecycle == "keep-alive":
        assert call_ok(h, "demo.counter") == "1", "a usage error must not cost the server its state"


def test_schema_cache_is_per_server_process_and_follows_list_changed(h):
    kind_file = schema_server(h, "string")
    assert call_ok(h, "t.show", "value=5") == '"5"'
    assert call_ok(h, "t.lists") == "1"
    assert call_ok(h, "t.show", "value=6") == '"6"'
    assert call_ok(h, "t.lists") == "1", "a warm call must not list the tools again"
    r = h.run("list", "t", "--json", "--schema")
    assert r.rc == 0 and json.loads(r.out)["tools"][0]["inputSchema"]["properties"]["value"] == {
        "type": "string"
    }, r
    assert call_ok(h, "t.lists") == "1", "listTools is answered from the same cache"
    # The server changes its schema without saying so: the cache still holds the old one.
    kind_file.write_text("number")
    assert call_ok(h, "t.show", "value=7") == '"7"'
    # ... until it announces notifications/tools/list_changed.
    assert call_ok(h, "t.changed") == "changed"
    assert call_ok(h, "t.show", "value=8") == "8"
    assert call_ok(h, "t.lists") == "2"
    # A restarted server is listed afresh: its schema may differ from the old process's.
    kind_file.write_text("string")
    old = server_pid(running_status(h), "t")
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: not pid_alive(old), 10, message=f"server {old} to die")
    assert call_ok(h, "t.show", "value=9") == '"9"'
    assert server_pid(running_status(h), "t") not in (None, old)
    assert call_ok(h, "t.lists") == "1"


# ##########################################################################################
# MCP keep-alive service: the daemon's handlers, built on the public host API.
# ##########################################################################################


def test_state_persists_across_cli_processes(h):
    assert call_ok(h, "demo.counter") == "1"
    assert call_ok(h, "demo.counter") == "2"
    first = int(call_ok(h, "demo.pid"))
    second = int(call_ok(h, "demo.pid"))
    assert first == second
    assert h.server_pids() == {first}
    st = running_status(h)
    assert server_pid(h.status()) == first
    assert_one_daemon_tree(h, st["pid"])


def test_killed_mcp_server_is_restarted(h):
    assert call_ok(h, "demo.counter") == "1"
    daemon = running_status(h)["pid"]
    server = server_pid(h.status())
    assert server and pid_alive(server)
    os.kill(server, signal.SIGKILL)
    wait_until(lambda: not pid_alive(server), 5, message="MCP server to die")

    assert call_ok(h, "demo.counter") == "1"
    new_server = int(call_ok(h, "demo.pid"))
    assert new_server != server
    st = running_status(h)
    assert st["pid"] == daemon
    assert server_pid(h.status()) == new_server
    assert_one_daemon_tree(h, daemon)


def test_resources_list_and_read(h):
    h.configure({"eph": h.demo_server_entry("ephemeral")})
    r = h.run("resources", "demo", env=h.env())
    assert r.ok().splitlines() == ["demo://counter  counter (text/plain)"], r
    assert call_ok(h, "demo.counter") == "1"
    assert call_ok(h, "demo.counter") == "2"
    assert h.run("resources", "demo", "demo://counter", env=h.env()).ok() == "2"
    listed = json.loads(h.run("resources", "demo", "--json", env=h.env()).ok())
    assert [x["uri"] for x in listed] == ["demo://counter"]
    read = json.loads(h.run("resources", "demo", "demo://counter", "--json", env=h.env()).ok())
    assert [c.get("text") for c in read["contents"]] == ["2"], read
    # An ephemeral server is a fresh process each time: its counter reads 0.
    assert h.run("resources", "eph", "demo://counter", env=h.env()).ok() == "0"
    r = h.run("resources", "nosuch", env=h.env())
    assert r.rc == 2 and "nosuch" in r.err and "Traceback" not in r.err, r


def test_close_server_request_closes_just_that_server(h):
    h.configure({"other": h.demo_server_entry()})
    assert call_ok(h, "demo.counter") == "1"
    assert call_ok(h, "demo.counter") == "2"
    assert call_ok(h, "other.counter") == "1"
    st = running_status(h)
    daemon, demo, other = st["pid"], server_pid(st, "demo"), server_pid(st, "other")
    resp, _, _ = raw_request(h.socket_path, "closeServer", {"server": "demo"}, idle=10.0)
    assert resp.get("ok") is True, resp
    wait_until(lambda: not pid_alive(demo), 5, message=f"closed server {demo} to exit")
    assert pid_alive(other) and pid_alive(daemon)
    st = running_status(h)
    assert st["pid"] == daemon
    assert [s["connected"] for s in st["servers"] if s["name"] == "demo"] == [False]
    wait_until(lambda: "demo" not in (h.meta() or {}).get("servers", {}), 5, message="metadata update")
    assert call_ok(h, "demo.counter") == "1"
    new = server_pid(running_status(h), "demo")
    assert new and new != demo
    assert call_ok(h, "other.counter") == "2"
    resp, _, _ = raw_request(h.socket_path, "closeServer", {"server": "nosuch"}, idle=10.0)
    assert resp.get("ok") is False and resp["error"]["code"] == "unknown_server", resp


def test_server_idle_timeout_closes_just_that_server(h):
    demo = h.demo_server_entry({"mode": "keep-alive", "idleTimeoutMs": 500})
    h.configure({"demo": demo, "other": h.demo_server_entry()})
    assert call_ok(h, "other.counter") == "1"
    server = int(call_ok(h, "demo.pid"))
    h.track(server)
    st = running_status(h)
    daemon, other = st["pid"], server_pid(st, "other")
    assert other and pid_alive(other)
    wait_until(lambda: not pid_alive(server), 5, message=f"idle server {server} to be closed")
    assert pid_alive(daemon) and pid_alive(other)
    st = running_status(h)
    assert st["pid"] == daemon
    assert {s["name"]: s["connected"] for s in st["servers"]} == {"demo": False, "other": True}
    wait_until(lambda: "demo" not in (h.meta() or {}).get("servers", {}), 5, message="metadata update")
    assert f"closing server 'demo' (pid {server}): idle" in h.path("log").read_text()
    assert call_ok(h, "demo.counter") == "1"
    assert int(call_ok(h, "demo.pid")) != server
    assert call_ok(h, "other.counter") == "2"


def test_server_idle_timeout_spares_a_server_in_use(h):
    # Idle long enough that the next CLI process arrives in time on a loaded machine.
    demo = h.demo_server_entry({"mode": "keep-alive", "idleTimeoutMs": 1500})
    h.configure({"demo": demo})
    assert call_ok(h, "demo.counter") == "1"
    server = server_pid(h.status())
    # A call that runs far longer than the idle timeout is activity, not idleness.
    r = h.run("call", "demo.sleep", "seconds=2.5")
    assert r.rc == 0 and r.out.strip() == "slept 2.5", r
    assert call_ok(h, "demo.counter") == "2", "the server was closed while in use"
    assert server_pid(h.status()) == server


def health_entry(h, check_ms, mode="keep-alive"):
    """The demo server with its own ping interval (``lifecycle.healthCheckMs``)."""
    return h.demo_server_entry({"mode": mode, "healthCheckMs": check_ms})


def server_status(h, name):
    for s in h.status().get("servers") or []:
        if s.get("name") == name:
            return s
    raise AssertionError(f"server {name!r} not in status")


def log_messages(h):
    return [msg for _, msg in log_events(log_lines(h.path("log")))]


def test_idle_server_is_pinged_and_status_shows_health(h):
    h.configure({"demo": health_entry(h, 200), "quiet": health_entry(h, 0)})
    assert call_ok(h, "demo.counter") == "1"
    assert call_ok(h, "quiet.counter") == "1"
    server = server_pid(h.status(), "demo")
    used = server_status(h, "demo")["lastUsedAt"]

    def pinged_after_use():
        s = server_status(h, "demo")
        health = s["health"]
        return health["lastPingOk"] is True and health["lastPingAt"] > used and s

    s = wait_until(pinged_after_use, 10, interval=0.05, message="an ok ping of the idle server")
    assert s["pid"] == server and s["connected"] is True
    assert s["lastUsedAt"] == used, "a ping is not a use: it must not hold off idleTimeoutMs"
    assert s["health"]["restarts"] == 0 and s["health"]["lastError"] is None, s
    quiet = server_status(h, "quiet")["health"]
    assert quiet["lastPingAt"] is None and quiet["lastPingOk"] is None, "healthCheckMs 0 turns pings off"
    lines = h.run("status", env=h.env()).ok().splitlines()
    demo_line = [ln for ln in lines if ln.startswith("  - demo:")]
    assert len(demo_line) == 1 and re.search(
        rf"connected \(pid {server}\); last ping \d\d:\d\d:\d\d ok; restarts 0$", demo_line[0]
    ), lines
    assert [ln for ln in lines if ln.startswith("  - quiet:")][0].endswith("; not pinged yet; restarts 0")
    # Pings left the server's state alone: same process, same counter.
    assert call_ok(h, "demo.counter") == "2"
    assert server_pid(h.status(), "demo") == server


def test_wedged_server_is_restarted_after_two_failed_pings(h):
    h.configure({"demo": health_entry(h, 300), "other": health_entry(h, 0)})
    assert call_ok(h, "demo.counter") == "1"
    assert call_ok(h, "other.counter") == "1"
    st = running_status(h)
    daemon, wedged, other = st["pid"], server_pid(st, "demo"), server_pid(st, "other")
    h.sigstop(wedged)
    wedged_at = time.monotonic()

    # While its pings time out, the daemon serves others at once: pings are off housekeeping.
    wait_until(
        lambda: server_status(h, "demo")["health"]["pingFailures"] >= 1,
        15,
        interval=0.05,
        message="the first failed ping",
    )
    began = time.monotonic()
    assert call_ok(h, "other.counter") == "2"
    other_call = time.monotonic() - began

    def restarted():
        s = server_status(h, "demo")
        return s["connected"] and s["pid"] not in (None, wedged) and s

    s = wait_until(restarted, 40, interval=0.05, message="the wedged server to be restarted")
    took = time.monotonic() - wedged_at
    print(f"\nwedge-to-restart: {took:.2f} s (healthCheckMs 300, ping timeout 5 s, two pings)")
    print(f"call to another server during the wedge: {other_call * 1000:.0f} ms")
    assert other_call < 3.0, f"a call to another server waited {other_call:.2f}s behind a wedged one"
    h.track(s["pid"])
    assert s["health"]["restarts"] == 1, s
    assert "ping" in s["health"]["lastError"] and "timed out" in s["health"]["lastError"], s
    wait_until(lambda: not pid_alive(wedged), 10, message=f"wedged server {wedged} to be ended")
    messages = log_messages(h)
    for n in (1, 2):
        assert any(
            m.startswith(f"ping of server 'demo' (pid {wedged}) failed ({n} in a row)") for m in messages
        ), messages
    assert any(
        m.startswith(f"closing server 'demo' (pid {wedged}): restarting: failed 2 pings in a row")
        for m in messages
    ), messages
    # One copy at a time, the daemon untouched, the other server untouched.
    assert running_status(h)["pid"] == daemon
    assert h.server_pids() == {s["pid"], other}
    assert call_ok(h, "demo.counter") == "1", "the restarted server is a new process"
    assert call_ok(h, "other.counter") == "3"


def test_close_and_restart_server_commands(h):
    h.configure({"other": h.demo_server_entry(), "eph": h.demo_server_entry("ephemeral")})
    # No daemon: close says so, exits 0 and starts none.
    r = h.run("close", "demo", env=h.env())
    assert r.rc == 0 and "no daemon running" in r.out, r
    assert h.daemon_pids() == set() and not h.meta_path.exists()

    assert call_ok(h, "demo.counter") == "1"
    assert call_ok(h, "demo.counter") == "2"
    assert call_ok(h, "other.counter") == "1"
    st = running_status(h)
    daemon, first, other = st["pid"], server_pid(st, "demo"), server_pid(st, "other")

    r = h.run("close", "demo", env=h.env())
    assert r.rc == 0 and f"closed server 'demo' (daemon pid {daemon})" in r.out, r
    wait_until(lambda: not pid_alive(first), 5, message=f"closed server {first} to exit")
    st = running_status(h)
    assert st["pid"] == daemon and server_pid(st, "other") == other
    assert [s["connected"] for s in st["servers"] if s["name"] == "demo"] == [False]
    assert call_ok(h, "demo.counter") == "1", "the next call starts a new server"
    second = server_pid(h.status(), "demo")
    assert second and second != first

    r = h.run("restart", "demo", env=h.env())
    assert r.rc == 0, r
    m = re.fullmatch(r"restarted server 'demo' \(pid (\d+)\)", r.out.strip())
    assert m, r
    third = int(m.group(1))
    h.track(third)
    assert third != second and not pid_alive(second), "restart ends the old server before it answers"
    # Restart starts the new copy at once: it runs before any call.
    st = running_status(h)
    assert st["pid"] == daemon and server_pid(st, "demo") == third
    assert server_status(h, "demo")["health"]["restarts"] == 1
    assert h.server_pids() == {third, other}
    assert call_ok(h, "demo.counter") == "1"
    assert call_ok(h, "other.counter") == "2", "the other server was left alone"
    assert f"closing server 'demo' (pid {second}): restarting: restartServer request" in log_messages(h)

    # Closed, then restarted: it starts, and says it was not running.
    assert h.run("close", "demo", env=h.env()).rc == 0
    wait_until(lambda: not pid_alive(third), 5, message=f"closed server {third} to exit")
    r = h.run("restart", "demo", env=h.env())
    assert r.rc == 0 and "it was not running" in r.out, r
    assert running_status(h)["pid"] == daemon

    for args in (("close", "eph"), ("restart", "eph"), ("close", "nosuch"), ("restart", "nosuch")):
        r = h.run(*args, env=h.env())
        assert r.rc == 2 and len(r.err.strip().splitlines()) == 1 and args[1] in r.err, r
        assert "Traceback" not in r.err
    assert running_status(h)["pid"] == daemon

    # Without SERVER, restart still restarts the whole daemon.
    r = h.run("restart", env=h.env())
    assert r.rc == 0, r
    assert started_pid(r) != daemon


# A server of an older SDK that answers every request but initialize with an error, ping too.
NO_PING_SERVER = """\
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg:
        continue
    if msg.get("method") == "initialize":
        out = {"result": {"protocolVersion": "2024-11-05", "capabilities": {}, "serverInfo": {"name": "np"}}}
    else:
        out = {"error": {"code": -32601, "message": "Method not found"}}
    sys.stdout.write(json.dumps(dict(out, jsonrpc="2.0", id=msg["id"])) + "\\n")
    sys.stdout.flush()
"""


def test_error_answer_to_ping_is_alive_not_wedged(h):
    lifecycle = {"mode": "keep-alive", "healthCheckMs": 100}
    entry = h.script_server(NO_PING_SERVER, lifecycle=lifecycle, name="no_ping_server")
    h.write_config({"mcpServers": {"old": entry}})
    r = h.run("restart", "old")
    assert r.rc == 0, r
    server = server_status(h, "old")["pid"]
    h.track(server)
    seen = set()

    def three_pings():
        health = server_status(h, "old")["health"]
        seen.add(health["lastPingAt"])
        return len(seen - {None}) >= 3 and health

    health = wait_until(three_pings, 15, interval=0.05, message="three pings of a server without ping")
    assert health["lastPingOk"] is True and health["restarts"] == 0, health
    assert server_status(h, "old")["pid"] == server


@pytest.mark.parametrize(
    "interval_ms, alive, busy, failures, last_active, now, due",
    [
        (1000, True, False, 0, 0, 1000, True),  # quiet for the whole interval
        (1000, True, False, 0, 0, 999, False),  # not yet
        (1000, True, False, 1, 900, 1000, True),  # a failed ping is retried without waiting out the interval
        (1000, True, True, 1, 0, 5000, False),  # in use, starting, closing or already pinged
        (1000, False, False, 0, 0, 5000, False),  # not running: the next call starts it
        (0, True, False, 0, 0, 10**9, False),  # healthCheckMs 0: never
        (1000, True, False, 0, None, 5000, False),  # no activity recorded yet
    ],
)
def test_ping_due_table(interval_ms, alive, busy, failures, last_active, now, due):
    md = _import_module()
    assert md.ping_due(interval_ms, alive, busy, failures, last_active, now) is due


@pytest.mark.parametrize(
    "failures, ok, expected",
    [
        (0, True, (0, False)),
        (1, True, (0, False)),  # an answer clears the record
        (0, False, (1, False)),  # one lost ping may be a hiccup
        (1, False, (2, True)),  # two in a row: restart
        (5, False, (6, True)),
    ],
)
def test_after_ping_table(failures, ok, expected):
    assert _import_module().after_ping(failures, ok) == expected


@pytest.mark.parametrize(
    "failures, ok, answered_before, stopped, heard_since, expected",
    [
        (0, True, False, False, False, (0, "ok")),
        (1, True, True, False, False, (0, "ok")),
        (0, False, False, False, False, (0, "unsupported")),  # never answered: no evidence either way
        (0, False, False, True, False, (1, "miss")),  # ...unless the OS reports it stopped
        (1, False, False, True, False, (2, "restart")),
        (0, False, True, False, False, (1, "miss")),  # answered before: a miss counts
        (1, False, True, False, False, (2, "restart")),  # two in a row
        (1, False, True, False, True, (1, "miss")),  # a late answer since broke the run
    ],
)
def test_ping_verdict_table(failures, ok, answered_before, stopped, heard_since, expected):
    md = _import_module()
    assert md.ping_verdict(failures, ok, answered_before, stopped, heard_since) == expected


@pytest.mark.parametrize("idle_ms", [None, 0, 1000])
@pytest.mark.parametrize("has_client", [True, False])
@pytest.mark.parametrize("starting", [True, False])
@pytest.mark.parametrize("in_use", [0, 1])
@pytest.mark.parametrize("last_used", [None, 0, 500])
def test_server_idle_expired_table(idle_ms, has_client, starting, in_use, last_used):
    now = 1500  # 1500 ms after 0, 1000 ms after 500
    expected = bool(
        idle_ms
        and has_client
        and not starting
        and not in_use
        and last_used is not None
        and now - last_used >= idle_ms
    )
    if (idle_ms, has_client, starting, in_use, last_used) == (1000, True, False, 0, 500):
        assert expected, "exactly idle_ms ago counts as expired"
    assert (
        _import_module().server_idle_expired(idle_ms, has_client, starting, in_use, last_used, now)
        is expected
    )


def test_progress_reaches_the_caller_in_the_daemons_progress_frames(h):
    assert call_ok(h, "demo.pid")
    params = {"server": "demo", "tool": "progress", "args": {"steps": 3, "delay": 0.3}}
    resp, _, frames = raw_request(h.socket_path, "callTool", params, idle=10.0, progress_ms=50)
    assert resp.get("ok") is True, resp
    seen = [f["progress"] for _, f in frames if "progress" in f]
    assert {"progress": 1, "total": 3, "message": "step 1 of 3"} in seen, frames
    assert all(set(f) <= {"type", "id", "progress"} for _, f in frames), frames


def kill_caller(h, how, lifecycle):
    """Start a 2 s demo.sleep (twice the 1 s the cancel may take), wait until the server runs
    it, signal its caller;
    return (the moment it was signalled, the caller's process, the server pid)."""
    if lifecycle == "keep-alive":
        server = int(call_ok(h, "demo.pid"))
        # The thread that answered demo.pid may still be ending: it must not pass for our call's.
        wait_until(lambda: thread_count(server) == 1, 10, message="the demo.pid thread to end")
    proc = h.popen("call", "demo.sleep", "seconds=2")
    if lifecycle == "ephemeral":
        server = wait_until(lambda: h.server_pids(), 10, message="the ephemeral server to run").pop()
    # The demo server runs each tool call on a thread of its own (and nothing else): a second
    # thread is our call, not the tool list an ephemeral call reads first.
    wait_until(lambda: thread_count(server) >= 2, 10, message="the server to run the call")
    went = time.time()
    os.kill(proc.pid, {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}[how])
    return went, proc, server


@pytest.mark.parametrize(
    "how, lifecycle",
    [
        ("sigkill", "keep-alive"),
        ("sigterm", "keep-alive"),
        ("sigint", "keep-alive"),
        ("sigint", "ephemeral"),
    ],
)
def test_caller_going_away_cancels_its_call_at_the_server_within_1s(h, how, lifecycle):
    entry, log = cancel_log_entry(h, lifecycle)
    h.write_config({"mcpServers": {"demo": entry}})
    went, proc, server = kill_caller(h, how, lifecycle)
    seen = wait_until(lambda: cancellations(log), 5, message="the server to get notifications/cancelled")
    took = seen[0]["at"] - went
    print(f"\n{how} ({lifecycle}): caller gone -> server saw notifications/cancelled in {took * 1000:.0f} ms")
    assert took < 1.0, f"cancelled {took:.2f}s after the caller went away"
    params = seen[0]["params"]
    assert isinstance(params["requestId"], int) and params.get("reason"), seen
    rc = wait_exit(proc, 5)
    err = read_file(proc.err_path)
    expected = {"sigkill": -signal.SIGKILL, "sigterm": -signal.SIGTERM, "sigint": 130}[how]
    assert rc == expected, (rc, err)
    if how == "sigint":
        assert err.splitlines() == ["mcporter-daemon: interrupted"], repr(err)
    if lifecycle == "keep-alive":
        # The late answer (the sleep ends after 2 s) is dropped; the same server serves on.
        wait_until(lambda: thread_count(server) == 1, 10, message="the cancelled sleep to end")
        assert int(call_ok(h, "demo.pid")) == server
        assert len(cancellations(log)) == 1


# A server that answers nothing but initialize ("mute": not even that). "init-only" also outlives
# the end of its input and ignores SIGTERM, so only the close's SIGKILL ends it. argv: mode, tag.
SILENT_SERVER = r"""
import json, signal, sys, time

mode = sys.argv[1]
if mode == "init-only":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("method") == "initialize" and mode == "init-only":
        result = {"protocolVersion": msg["params"]["protocolVersion"], "serverInfo": {"name": "silent"},
                  "capabilities": {"tools": {}, "resources": {}, "prompts": {}}}
        sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}) + "\n")
        sys.stdout.flush()
time.sleep(3600)
"""

# How much past its timeoutMs a request through the daemon may take to fail (or end).
TIMEOUT_GRACE = 1.5


def silent_daemon(h, mode):
    """A running daemon keeping one SILENT_SERVER ("silent") in ``mode``."""
    entry = h.script_server(SILENT_SERVER, mode, name="silent_server")
    h.write_config({"mcpServers": {"silent": entry}})
    start_daemon(h)


def timed_request(h, method, params):
    t0 = time.monotonic()
    resp, _, _ = raw_request(h.socket_path, method, params, idle=10.0, overall=10.0)
    return resp, time.monotonic() - t0


@pytest.mark.parametrize(
    "method, params",
    [
        ("callTool", {"tool": "anything"}),
        ("listTools", {}),
        ("listResources", {}),
        ("readResource", {"uri": "silent://x"}),
        ("listResourceTemplates", {}),
        ("listPrompts", {}),
        ("getPrompt", {"name": "anything"}),
    ],
)
def test_every_mcp_operation_honours_timeout_ms_through_the_daemon(h, method, params):
    silent_daemon(h, "init-only")
    resp, _ = timed_request(h, "restartServer", {"server": "silent"})  # started before the clock runs
    assert resp.get("ok") is True, resp
    resp, took = timed_request(h, method, dict(params, server="silent", timeoutMs=1000))
    assert resp.get("ok") is False and resp["error"]["code"] == "operation_timeout", resp
    assert "timed out after 1s" in resp["error"]["message"], resp
    assert took < 1 + TIMEOUT_GRACE, f"{method} failed after {took:.2f}s (timeoutMs 1000)"


def test_restart_server_honours_timeout_ms_for_the_new_servers_handshake(h):
    silent_daemon(h, "mute")
    resp, took = timed_request(h, "restartServer", {"server": "silent", "timeoutMs": 1000})
    assert resp.get("ok") is False and resp["error"]["code"] == "operation_timeout", resp
    assert "initialize timed out after 1s" in resp["error"]["message"], resp
    assert took < 1 + TIMEOUT_GRACE, f"restartServer failed after {took:.2f}s (timeoutMs 1000)"
    wait_until(lambda: not h.server_pids(), 5, message="the half-started server to be ended")


def test_close_server_honours_timeout_ms_for_its_grace_steps(h):
    silent_daemon(h, "init-only")
    resp, _ = timed_request(h, "restartServer", {"server": "silent"})
    assert resp.get("ok") is True, resp
    server = resp["result"]["pid"]
    resp, took = timed_request(h, "closeServer", {"server": "silent", "timeoutMs": 1000})
    assert resp.get("ok") is True, resp
    assert took < 1 + TIMEOUT_GRACE, f"closeServer took {took:.2f}s (timeoutMs 1000)"
    assert not pid_alive(server), f"server {server} outlived its close"


@pytest.mark.parametrize(
    "wire, timeout_ms, expected",
    [
        ("callTool", 1500, 1.5),  # each request waits the caller's timeout
        ("listResources", None, "_DEFAULT_CALL_TIMEOUT"),  # none given: the default call timeout
        ("readResource", 0, "_DEFAULT_CALL_TIMEOUT"),  # zero or less is none
        ("restartServer", 1500, 1.5),  # the new server's handshake
        ("restartServer", None, "_MCP_START_TIMEOUT"),  # none given: the usual start-up timeout
        ("closeServer", 100, 0.05),  # half of it for each grace step
        ("closeServer", 10**9, "_MCP_CLOSE_GRACE"),  # never longer than a normal close
        ("closeServer", None, "_MCP_CLOSE_GRACE"),
    ],
)
def test_operation_timeout_table(wire, timeout_ms, expected):
    md = _import_module()
    seconds = getattr(md, expected) if isinstance(expected, str) else expected
    assert md._OPERATIONS[wire].seconds({"timeoutMs": timeout_ms}) == seconds


@pytest.mark.parametrize(
    "started_with, caller, expected",
    [
        ({"TOKEN": "a"}, {"TOKEN": "a"}, []),
        ({"TOKEN": "a"}, {"TOKEN": "b"}, ["TOKEN"]),
        ({"TOKEN": "a"}, {"TOKEN": None}, ["TOKEN"]),  # the caller has it unset
        ({"TOKEN": None}, {"TOKEN": "a"}, ["TOKEN"]),
        ({"TOKEN": None}, {"TOKEN": None}, []),
        ({"TOKEN": "a"}, {}, []),  # an older client (or mcporter) reports nothing
        ({"A": "1", "B": "2"}, {"A": "x", "B": "2", "C": "3"}, ["A"]),
    ],
)
def test_env_drift_table(started_with, caller, expected):
    m = _import_module()
    hashed = {k: v if k not in caller or v is None else m.env_hash(v) for k, v in caller.items()}
    assert m.env_drift(started_with, hashed) == expected


def test_caller_with_another_env_value_is_told_once_not_restarted(h):
    entry = dict(h.demo_server_entry(), env={"MD_TOKEN": "${MD_TOKEN}", "MD_MODE": "${MD_MODE:-x}"})
    h.write_config({"mcpServers": {"demo": entry}})
    r = h.run("call", "demo.pid", MD_TOKEN="first")
    assert r.rc == 0 and r.err == "", r
    pid = int(r.out)
    r = h.run("call", "demo.pid", MD_TOKEN="second")
    assert r.rc == 0 and int(r.out) == pid, "the call is served by the same server process"
    lines = r.err.splitlines()
    assert len(lines) == 1 and "MD_TOKEN" in lines[0] and "restart" in lines[0], r
    assert "second" not in r.err and "first" not in r.err, "values are never shown"
    r = h.run("call", "demo.pid", MD_TOKEN="first")
    assert r.rc == 0 and r.err == "", "the same values: nothing to say"
    r = h.run("call", "demo.pid", MD_TOKEN="first", MD_MODE="y")
    assert "MD_MODE" in r.err and "MD_TOKEN" not in r.err, r
    assert h.run("restart", MD_TOKEN="second").ok()
    r = h.run("call", "demo.pid", MD_TOKEN="second")
    assert r.rc == 0 and r.err == "" and int(r.out) != pid, r


# ##########################################################################################
# serve: the stdio MCP bridge editors register, re-exporting the kept servers.
# ##########################################################################################


# -- names, URIs and routes: the bridge's pure decisions --

# (server, tool, exported name): plain names as they are; anything else escaped reversibly
# (``_x`` then ``_<hex>-`` per character outside [A-Za-z0-9-]); long names cut with a hash.
SERVE_NAME_TABLE = [
    ("demo", "counter", "demo__counter"),
    ("chrome-devtools", "take_snapshot", "chrome-devtools__take_snapshot"),
    ("fs", "read.file", "fs___xread_2e-file"),
    ("a.b", "x", "_xa_2e-b__x"),
    ("srv", "a__b", "srv___xa_5f-_5f-b"),
    ("srv", "_private", "srv___x_5f-private"),
    ("srv", "trailing_", "srv___xtrailing_5f-"),
    ("srv", "_xfoo", "srv___x_5f-xfoo"),
    ("my server", "hello world", "_xmy_20-server___xhello_20-world"),
    ("srv", "café/ünï", "srv___xcaf_e9-_2f-_fc-n_ef-"),
    ("srv", "emoji😀", "srv___xemoji_1f600-"),
    ("srv", "", "srv___x"),
    ("srv", "-dash-", "srv__-dash-"),
    ("s", "t" * 61, "s__" + "t" * 61),  # exactly 64: kept whole
]

SERVE_LONG_PAIRS = [
    ("s", "t" * 62),
    ("server-" * 10, "tool"),
    ("x", "ä" * 40),
    ("srv", "a" * 50 + "_" + "b" * 20),
]


def test_serve_names_are_escaped_bounded_and_round_trip():
    md = _import_module()
    valid = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
    for server, tool, expected in SERVE_NAME_TABLE:
        name = md.serve_name(server, tool)
        assert name == expected, (server, tool, name)
        assert valid.match(name), name
        assert md.parse_serve_name(name) == (server, tool), name
    for server, tool in SERVE_LONG_PAIRS:
        name = md.serve_name(server, tool)
        assert valid.match(name) and len(name) <= 64, name
        assert name == md.serve_name(server, tool), "the hash suffix is stable"
        assert md.parse_serve_name(name) != (server, tool)  # a cut name is found in the map
    # No two pairs share a name, and the bridge's map takes every name (cut ones too) back.
    pairs = [(s, t) for s, t, _ in SERVE_NAME_TABLE] + SERVE_LONG_PAIRS + [("srv", "a_b"), ("srv_a", "b")]
    lists = {}
    for server, tool in pairs:
        lists.setdefault(server, []).append({"name": tool, "description": "d", "inputSchema": {}})
    tools, names = md.export_named(lists, bare=False)
    assert len(tools) == len(pairs) == len(names)
    assert {names[t["name"]] for t in tools} == set(pairs)
    assert all(t["description"] == f"[{names[t['name']][0]}] d" for t in tools)
    # Text the escaper never writes is refused, not guessed.
    for junk in ("demo", "__x", "a___b", "a__b__c", "a__b_", "a___xb", "a___x_zz-", "a___x_41-", "_y__b"):
        assert md.parse_serve_name(junk) is None, junk


def test_serve_exports_pass_schemas_through_and_filter():
    md = _import_module()
    tool = {
        "name": "hello",
        "title": "Hello",
        "description": "Say hello.",
        "inputSchema": {"type": "object", "properties": {"who": {"type": "string"}}},
        "outputSchema": {"type": "object"},
        "annotations": {"readOnlyHint": True},
    }
    tools, names = md.export_named(
        {"a": [tool, {"name": "secret"}], "b": [dict(tool, description="")]}, False
    )
    assert [t["name"] for t in tools] == ["a__hello", "a__secret", "b__hello"]
    assert tools[0] == dict(tool, name="a__hello", description="[a] Say hello.")
    assert tools[2]["description"] == "[b]"
    tools, names = md.export_named({"a": [tool, {"name": "secret"}]}, False, lambda s, t: t != "secret")
    assert [t["name"] for t in tools] == ["a__hello"] and names == {"a__hello": ("a", "hello")}
    tools, names = md.export_named({"a": [tool]}, True)
    assert tools == [tool] and names == {"hello": ("a", "hello")}


def test_serve_resource_uris_and_routes():
    md = _import_module()
    for server, uri in [("a", "file:///x y"), ("we ird/", "demo://c?q=1#f"), ("a", "")]:
        wrapped = md.wrap_resource_uri(server, uri)
        assert wrapped.startswith("mcporter-daemon://kept/") and " " not in wrapped
        assert md.unwrap_resource_uri(wrapped) == (server, uri)
    assert md.unwrap_resource_uri("demo://counter") is None
    for template, uri, matches in [
        ("demo://echo/{text}", "demo://echo/hi", True),
        ("demo://echo/{text}", "demo://echo/a/b", False),
        ("demo://echo/{+path}", "demo://echo/a/b", True),
        ("file:///{path}.txt", "file:///notes.txt", True),
        ("file:///{path}.txt", "file:///notes.md", False),
        ("db://{table}{?limit}", "db://users?limit=3", True),
        ("x.y://{a}", "xzy://b", False),  # literal text is literal, dots included
    ]:
        assert md.uri_template_matches(template, uri) is matches, (template, uri)
    resources, routes = md.export_resources(
        {
            "a": [{"uri": "demo://c", "name": "c"}, {"uri": "a://only"}],
            "b": [{"uri": "demo://c", "name": "c"}],
        },
        bare=False,
    )
    shown = {r["uri"]: r["name"] for r in resources}
    assert shown == {
        md.wrap_resource_uri("a", "demo://c"): "a__c",
        "a://only": "a__a://only",
        md.wrap_resource_uri("b", "demo://c"): "b__c",
    }
    templates = [("a", "demo://echo/{t}"), ("b", "demo://echo/{t}"), ("b", "b://{x}")]
    route = md.route_resource
    assert route("a://only", routes, templates, ["a", "b"]) == ("a", "a://only")
    assert route(md.wrap_resource_uri("b", "demo://c"), routes, templates, ["a", "b"]) == ("b", "demo://c")
    assert route("b://thing", routes, templates, ["a", "b"]) == ("b", "b://thing")
    assert route("zz://x", routes, [], ["a"]) == ("a", "zz://x")
    with pytest.raises(md._ServeError, match="several servers: a, b"):
        route("demo://echo/hi", routes, templates, ["a", "b"])
    with pytest.raises(md._ServeError, match="no bridged server"):
        route("zz://x", routes, templates, ["a", "b"])
    with pytest.raises(md._ServeError, match="not bridged"):
        route(md.wrap_resource_uri("c", "x://y"), routes, templates, ["a", "b"])


def test_serve_log_threshold_config_change_and_retry_backoff():
    md = _import_module()
    for level, threshold, wanted in [
        ("debug", None, True),  # no logging/setLevel yet: everything
        ("warning", md._SERVE_LOG_LEVELS.index("warning"), True),
        ("info", md._SERVE_LOG_LEVELS.index("warning"), False),
        ("emergency", md._SERVE_LOG_LEVELS.index("error"), True),
    ]:
        assert md._editor_wants_log(level, threshold) is wanted, (level, threshold)
    assert md._config_change_text(["a", "b"], ["b", "c"]) == "config changed (servers added: c; removed: a)"
    assert md._config_change_text(["a"], ["a"]) == "config changed (servers added: none; removed: none)"
    retries = md._ServeRetries()
    assert retries.note("s", RuntimeError("down")) is None  # the first failure: logged
    entries = [retries.note("s", RuntimeError("down")) for _ in range(12)]
    assert entries[0][0] == "down" and entries[0][2] == md._SERVE_RETRY_FIRST
    assert entries[1][2] == 2 * md._SERVE_RETRY_FIRST, "the backoff doubles"
    assert entries[-1][2] == md._SERVE_RETRY_MAX, "up to its cap"
    assert retries.due() == [], "not listed again before the backoff"
    assert retries.note("s", RuntimeError(""))[0] == "down"
    assert retries.note("s", None)[0] == "RuntimeError", "an empty message is named by its type"
    assert retries.note("s", None) is None  # listed fine: forgotten


def test_loop_guard_recognises_commands_that_run_serve():
    md = _import_module()
    for argv, loops in [
        (["python3", "/opt/mcporter_daemon.py", "serve"], True),
        (["python3", "/opt/mcporter_daemon.py", "--config", "x.json", "serve", "--servers", "a"], True),
        (["mcporter-daemon", "serve"], True),
        (["python3", "-m", "mcporter_daemon", "serve"], True),
        (["sh", "-c", "exec python3 ~/bin/mcporter_daemon.py serve --bare"], True),
        (["python3", str(MODULE_PATH.resolve()), "serve"], True),
        (["python3", "/opt/mcporter_daemon.py", "_demo-server"], False),
        (["python3", "/opt/mcporter_daemon.py", "call", "serve.tool"], False),
        (["npx", "mcporter", "serve"], False),
        (["python3", "server.py", "serve"], False),
        (["uvx", "some-mcp", "--mode", "serve"], False),
    ]:
        assert md.runs_serve_bridge(argv) is loops, argv


def test_server_events_for_bridges():
    md = _import_module()
    assert md.server_event("a", "notifications/tools/list_changed", None) == {
        "server": "a",
        "type": "listChanged",
        "list": "tools",
    }
    assert md.server_event("a", "notifications/prompts/list_changed", {})["list"] == "prompts"
    assert md.server_event("a", "notifications/message", {"level": "error", "data": {"x": 1}}) == {
        "server": "a",
        "type": "message",
        "level": "error",
        "data": {"x": 1},
    }
    cut = md.server_event("a", "notifications/message", {"level": "info", "data": "x" * 100_000})
    assert len(cut["data"]) < 70_000 and cut["data"].endswith("(cut)")
    assert md.server_event("a", "notifications/progress", {"progress": 1}) is None
    events = md._ServerEvents()
    seq, got, missed = events.wait(None, 0, lambda: False)
    assert (seq, got, missed) == (0, [], False)
    events.add({"server": "a", "type": "message"})
    seq, got, missed = events.wait(0, 5, lambda: False)
    assert seq == 1 and [e["seq"] for e in got] == [1] and not missed
    started = time.monotonic()
    assert events.wait(1, 0.2, lambda: False) == (1, [], False)
    assert time.monotonic() - started < 2
    for _ in range(300):
        events.add({"server": "a", "type": "message"})
    seq, got, missed = events.wait(1, 0, lambda: False)
    assert seq == 301 and missed and len(got) == 256


# -- the bridge as an editor drives it --

# A stdlib MCP server for the bridge tests. Tools with a title, annotations and an output schema
# (passed through as written), names that need escaping, one past 64 characters; `grow` adds a
# tool and announces list_changed; `shout` logs two messages mid-call; `blob` returns `kib` KiB
# of text as structuredContent.
SERVE_TEST_SERVER = r"""
import json, sys

TOOLS = [
    {"name": "hello", "title": "Hello", "description": "Say hello.",
     "inputSchema": {"type": "object", "properties": {"who": {"type": "string"}}},
     "outputSchema": {"type": "object", "properties": {"greeting": {"type": "string"}}},
     "annotations": {"readOnlyHint": True, "idempotentHint": True}},
    {"name": "read.file/x", "inputSchema": {"type": "object"}},
    {"name": "a__b", "inputSchema": {"type": "object"}},
    {"name": "long_" + "n" * 70, "inputSchema": {"type": "object"}},
    {"name": "grow", "inputSchema": {"type": "object"}},
    {"name": "shout", "inputSchema": {"type": "object"}},
    {"name": "blob", "inputSchema": {"type": "object", "properties": {"kib": {"type": "integer"}}}},
]
grown = []


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg or "method" not in msg:
        continue
    method, params = msg["method"], msg.get("params") or {}
    if method == "initialize":
        result = {"protocolVersion": params.get("protocolVersion"), "serverInfo": {"name": "t", "version": "1"},
                  "capabilities": {"tools": {"listChanged": True}, "logging": {}}}
    elif method == "tools/list":
        result = {"tools": TOOLS + grown}
    elif method == "tools/call":
        name, args = params.get("name"), params.get("arguments") or {}
        if name == "grow":
            grown.append({"name": "grown_%d" % len(grown), "inputSchema": {"type": "object"}})
            send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        if name == "shout":
            send({"jsonrpc": "2.0", "method": "notifications/message",
                  "params": {"level": "warning", "logger": "db", "data": "pool is 90% full"}})
            send({"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "debug", "data": "noise"}})
        if name == "blob":
            size = int(args.get("kib", 1)) * 1024
            text = ("ABCDEFGHIJKLMNOPQRSTUVWXYZ" * (size // 26 + 1))[:size]
            result = {"content": [], "structuredContent": {"size": len(text), "text": text}}
        elif name == "hello":
            greeting = "hello " + str(args.get("who", "you"))
            result = {"content": [{"type": "text", "text": greeting}], "structuredContent": {"greeting": greeting}}
        else:
            result = {"content": [{"type": "text", "text": "called " + str(name)}]}
    else:
        send({"jsonrpc": "2.0", "id": msg["id"], "error": {"code": -32601, "message": "no " + method}})
        continue
    send({"jsonrpc": "2.0", "id": msg["id"], "result": result})
"""


def serve_test_entry(h):
    return h.script_server(SERVE_TEST_SERVER, name="serve_test_server")


class ServeSession:
    """A ``serve`` process driven as an editor drives it: JSON-RPC lines on its stdin; every
    line it writes on stdout is kept, parsed (anything that is not JSON-RPC fails the test)."""

    def __init__(self, h, *args, env=None, argv=None):
        self.h = h
        argv = argv or h.argv("serve", *args)
        self.err_path = h.tmp / f"serve-{uuid.uuid4().hex[:6]}.err"
        self.err_file = open(str(self.err_path), "w+")  # noqa: SIM115 - closed in close()
        self.p = spawn(
            [str(a) for a in argv], env or h.env(), h.tmp, subprocess.PIPE, self.err_file, subprocess.PIPE
        )
        h.popens.append(self.p)
        h.track(self.p.pid)
        self.lines = []  # every stdout line, parsed
        self.junk = []
        self.cond = threading.Condition()
        self.next_id = 1
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.p.stdout:
            try:
                msg = json.loads(raw)
                assert isinstance(msg, dict) and msg.get("jsonrpc") == "2.0"
            except (ValueError, AssertionError):
                msg = None
            with self.cond:
                if msg is None:
                    self.junk.append(raw)
                else:
                    self.lines.append(msg)
                self.cond.notify_all()

    def send(self, obj):
        self.p.stdin.write((json.dumps(obj) + "\n").encode())
        self.p.stdin.flush()

    def start(self, method, params=None):
        rid = self.next_id
        self.next_id += 1
        frame = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            frame["params"] = params
        self.send(frame)
        return rid

    def answer(self, rid, timeout=30):
        return self.wait(
            lambda m: m.get("id") == rid and ("result" in m or "error" in m), timeout, f"answer {rid}"
        )

    def request(self, method, params=None, timeout=30):
        """The result of one request; AssertionError on an error answer."""
        msg = self.answer(self.start(method, params), timeout)
        assert "result" in msg, msg
        return msg["result"]

    def notify(self, method, params=None):
        frame = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            frame["params"] = params
        self.send(frame)

    def mark(self):
        with self.cond:
            return len(self.lines)

    def wait(self, predicate, timeout, what, since=0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for msg in self.lines[since:]:
                    if predicate(msg):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"serve: no {what} within {timeout}s; got {self.lines[since:]!r}")
                self.cond.wait(left)

    def notifications(self, method, since=0):
        with self.cond:
            return [m for m in self.lines[since:] if m.get("method") == method and "id" not in m]

    def initialize(self, version="2025-06-18"):
        result = self.request(
            "initialize",
            {
                "protocolVersion": version,
                "capabilities": {},
                "clientInfo": {"name": "test-editor", "version": "1"},
            },
        )
        self.notify("notifications/initialized")
        return result

    def tool_names(self):
        return [t["name"] for t in self.request("tools/list")["tools"]]

    def call(self, name, args=None, timeout=30, **params):
        return self.request("tools/call", dict(params, name=name, arguments=args or {}), timeout=timeout)

    def stderr(self):
        return read_file(self.err_path)

    def close(self, timeout=10):
        """End the session as an editor does (stdin closed); the exit code."""
        self.p.stdin.close()
        rc = self.p.wait(timeout=timeout)
        self.err_file.close()
        assert not self.junk, f"serve wrote non-protocol lines on stdout: {self.junk!r}"
        return rc


def serve_text(result):
    return "".join(c.get("text", "") for c in result.get("content") or [])


def test_serve_handshake_calls_and_state_shared_with_cli_and_bridges(h):
    """One editor session: handshake, tools with their names and schemas, calls; the counter
    lives in the daemon's server and continues through the CLI, a second editor at once, and
    a new bridge after this one exits (which leaves the daemon running)."""
    h.configure({"other": serve_test_entry(h)})
    s = ServeSession(h)
    init = s.initialize("2024-11-05")
    assert init["protocolVersion"] == "2024-11-05"
    assert init["capabilities"]["tools"] == {"listChanged": True}
    assert init["capabilities"]["resources"] == {"listChanged": True}
    assert init["capabilities"]["prompts"] == {"listChanged": True}
    assert init["serverInfo"]["name"] == "mcporter-daemon"
    assert "demo" in init["instructions"] and "other" in init["instructions"], init
    assert s.request("ping") == {}
    tools = {t["name"]: t for t in s.request("tools/list")["tools"]}
    assert tools["demo__counter"]["description"] == "[demo] Add one to a counter kept in this server process."
    assert tools["demo__echo"]["inputSchema"]["required"] == ["text"]
    hello = tools["other__hello"]
    assert hello["title"] == "Hello" and hello["annotations"] == {
        "readOnlyHint": True,
        "idempotentHint": True,
    }
    assert hello["outputSchema"]["properties"]["greeting"] == {"type": "string"}
    assert {"other___xread_2e-file_2f-x", "other___xa_5f-_5f-b"} <= set(tools), sorted(tools)
    long_name = [n for n in tools if n.startswith("other__long_")]
    assert len(long_name) == 1 and len(long_name[0]) == 64, sorted(tools)
    assert all(re.match(r"^[A-Za-z0-9_-]{1,64}$", n) for n in tools), sorted(tools)
    # Escaped and cut names reach the right tool; the result arrives whole.
    assert serve_text(s.call("other___xa_5f-_5f-b")) == "called a__b"
    assert serve_text(s.call(long_name[0])) == "called long_" + "n" * 70
    result = s.call("other__hello", {"who": "bridge"})
    assert result["structuredContent"] == {"greeting": "hello bridge"}, result
    assert serve_text(s.call("demo__counter")) == "1"
    assert call_ok(h, "demo.counter") == "2"
    # A second editor at the same time: its own session and ids, the same servers.
    s2 = ServeSession(h)
    s2.initialize()
    slow = s.start("tools/call", {"name": "demo__sleep", "arguments": {"seconds": 0.5}})
    assert serve_text(s2.call("demo__counter")) == "3"
    assert serve_text(s.answer(slow)["result"]) == "slept 0.5"
    daemon = running_status(h)["pid"]
    assert s.close() == 0 and s2.close() == 0
    assert running_status(h)["pid"] == daemon, "the bridge left the daemon alone"
    s3 = ServeSession(h)
    init = s3.initialize("2099-01-01")  # a version it does not know: it offers its newest
    assert init["protocolVersion"] == "2025-11-25"
    assert serve_text(s3.call("demo__counter")) == "4"
    s3.p.send_signal(signal.SIGTERM)  # as an editor ends it: quietly, the daemon left alone
    assert s3.p.wait(timeout=10) == 0
    assert "Traceback" not in s3.stderr() and not s3.junk
    assert running_status(h)["pid"] == daemon
    assert call_ok(h, "demo.counter") == "5"
    err = s.stderr()
    assert "demo" in err, err  # diagnostics go to stderr


def test_serve_unknown_tool_and_bad_input_are_errors_not_crashes(h):
    s = ServeSession(h)
    s.initialize()
    msg = s.answer(s.start("tools/call", {"name": "demo__nope", "arguments": {}}))
    assert msg["error"]["code"] == -32602 and "unknown tool" in msg["error"]["message"], msg
    msg = s.answer(s.start("tools/call", {"name": "nobody__x", "arguments": {}}))
    assert "unknown tool" in msg["error"]["message"], msg
    msg = s.answer(s.start("no/such/method"))
    assert msg["error"]["code"] == -32601, msg
    s.p.stdin.write(b"this is not json\n")
    s.p.stdin.flush()
    s.wait(lambda m: (m.get("error") or {}).get("code") == -32700, 10, "parse error")
    assert serve_text(s.call("demo__echo", {"text": "still here"})) == "still here"
    assert s.close() == 0


def test_serve_flags_select_servers_and_bare_names(h):
    h.configure({"other": serve_test_entry(h)})
    s = ServeSession(h, "--servers", "other", "--bare")
    s.initialize()
    names = s.tool_names()
    assert "hello" in names and "a__b" in names and not any(n.startswith("demo") for n in names), names
    assert serve_text(s.call("a__b")) == "called a__b"
    assert s.close() == 0
    s = ServeSession(h, "--servers", "demo")
    s.initialize()
    assert all(n.startswith("demo__") for n in s.tool_names())
    assert s.close() == 0
    for args, expected in [
        (["--bare"], "--bare needs exactly one server"),
        (["--servers", "nope"], "unknown server 'nope'"),
    ]:
        r = h.run("serve", *args, timeout=20)
        assert r.rc == 2 and r.out == "" and expected in r.err, r
        assert len(r.err.strip().splitlines()) == 1, r
    # allowedTools / blockedTools apply as in `call`: not listed, refused without asking.
    h.configure({"demo": dict(h.demo_server_entry(), blockedTools=["counter", "sleep"])})
    s = ServeSession(h)
    s.initialize()
    names = s.tool_names()
    assert "demo__echo" in names and "demo__counter" not in names and "demo__sleep" not in names, names
    msg = s.answer(s.start("tools/call", {"name": "demo__counter", "arguments": {}}))
    assert msg["error"]["code"] == -32602 and "blockedTools" in msg["error"]["message"], msg
    assert s.close() == 0


def test_serve_server_that_cannot_start_and_config_edits(h):
    """Servers that cannot start are listed without (their reasons logged to the editor and
    stderr) and do not hold up the others; one that comes back is announced (list_changed)
    and listed; adding a server to the config sends list_changed within 2 s."""
    ready = h.tmp / "ready"
    late = h.demo_server_with(
        before=f"import os\nif not os.path.exists({str(ready)!r}):\n    sys.exit('not ready yet')\n"
    )
    h.configure(
        {"broken": {"command": str(h.tmp / "no-such-server"), "lifecycle": "keep-alive"}, "late": late}
    )
    s = ServeSession(h)
    s.initialize()
    began = time.monotonic()
    names = s.tool_names()
    assert "demo__counter" in names and not any(n.startswith(("broken", "late")) for n in names), names
    assert time.monotonic() - began < 5
    logged = s.wait(lambda m: (m.get("params") or {}).get("logger") == "broken", 10, "log message")
    assert logged["method"] == "notifications/message" and logged["params"]["level"] == "error", logged
    assert "command not found" in logged["params"]["data"], logged
    logged = s.wait(lambda m: (m.get("params") or {}).get("logger") == "late", 10, "log message")
    assert "not ready yet" in logged["params"]["data"], logged
    wait_until(lambda: "command not found" in s.stderr(), 5, message="the reason on stderr")
    mark = s.mark()
    ready.touch()
    s.wait(lambda m: m.get("method") == "notifications/tools/list_changed", 15, "list_changed", since=mark)
    assert "late__counter" in s.tool_names()
    mark = s.mark()
    h.configure({"added": serve_test_entry(h)})
    edited = time.monotonic()
    s.wait(lambda m: m.get("method") == "notifications/tools/list_changed", 10, "list_changed", since=mark)
    assert time.monotonic() - edited < 2 + 0.5, "list_changed within 2 s of the edit"
    names = s.tool_names()
    assert (
        "added__hello" in names
        and "demo__counter" in names
        and not any(n.startswith("broken") for n in names)
    )
    assert serve_text(s.call("added__hello", {"who": "new"})) == "hello new"
    assert s.close() == 0


def start_long_progress_call(s, token, mark, what):
    """A 30-second ``demo__progress`` call through the bridge, under progress ``token``; its
    request id, once its first progress has arrived after ``mark``."""
    call = {
        "name": "demo__progress",
        "arguments": {"steps": 300, "delay": 0.1},
        "_meta": {"progressToken": token},
    }
    rid = s.start("tools/call", call)
    s.wait(lambda m: m.get("method") == "notifications/progress", 10, what, since=mark)
    return rid


def test_serve_list_changed_after_restarts_crashes_and_daemon_kill(h):
    """list_changed within 2 s of: the server's own, `restart SERVER`, a crashed server coming
    back, the daemon SIGKILLed (the next call starts another and works), and its replacement."""
    h.configure({"other": serve_test_entry(h)})
    s = ServeSession(h)
    s.initialize()
    assert serve_text(s.call("demo__counter")) == "1"
    assert "other__hello" in s.tool_names()

    def expect_list_changed(mark, what):
        began = time.monotonic()
        s.wait(lambda m: m.get("method") == "notifications/tools/list_changed", 10, what, since=mark)
        return time.monotonic() - began

    mark = s.mark()
    s.call("other__grow")  # the server announces its own change
    assert expect_list_changed(mark, "list_changed from the server") < 2
    assert "other__grown_0" in s.tool_names()

    mark = s.mark()
    r = h.run("restart", "demo")
    assert r.rc == 0, r
    assert expect_list_changed(mark, "list_changed after restart SERVER") < 2 + 0.5
    assert serve_text(s.call("demo__counter")) == "1", "a new server process"

    mark = s.mark()
    crashed = server_pid(running_status(h), "demo")
    os.kill(crashed, signal.SIGKILL)
    wait_until(lambda: server_pid(h.status(), "demo") != crashed, 5, message="the daemon to see the crash")
    assert serve_text(s.call("demo__counter")) == "1", "the next call restarts it"
    assert expect_list_changed(mark, "list_changed after a crash") < 2 + 0.5

    daemon = running_status(h)["pid"]
    mark = s.mark()
    inflight = start_long_progress_call(s, 1, mark, "progress: in the daemon")
    os.kill(daemon, signal.SIGKILL)
    killed = time.monotonic()
    msg = s.answer(inflight, timeout=10)
    assert "error" in msg and "daemon" in msg["error"]["message"], msg
    s.wait(lambda m: m.get("method") == "notifications/tools/list_changed", 10, "list_changed", since=mark)
    assert time.monotonic() - killed < 2 + 0.5
    assert serve_text(s.call("demo__counter")) == "1", "the next call starts a new daemon"
    assert running_status(h)["pid"] != daemon
    assert s.close() == 0


def test_serve_progress_cancel_and_server_messages(h):
    """Progress reaches the editor under its token; the editor's cancel reaches the server as
    notifications/cancelled within 1 s (no answer follows); the server's log messages come
    with the server as logger, filtered by the editor's logging/setLevel; a large result
    arrives whole."""
    cancel_log = h.tmp / "cancels.jsonl"
    h.configure({"other": serve_test_entry(h)})
    s = ServeSession(h, env=h.env(MCPORTER_DEMO_CANCEL_LOG=str(cancel_log)))
    s.initialize()
    mark = s.mark()
    result = s.call("demo__progress", {"steps": 3, "delay": 0.2}, _meta={"progressToken": "tok-1"})
    assert serve_text(result) == "done 3 steps"
    progress = s.notifications("notifications/progress", since=mark)
    assert progress and all(p["params"]["progressToken"] == "tok-1" for p in progress), progress
    assert progress[-1]["params"]["progress"] <= 3 and progress[-1]["params"]["total"] == 3

    mark = s.mark()
    rid = start_long_progress_call(s, 7, mark, "progress: at the server")
    s.notify("notifications/cancelled", {"requestId": rid, "reason": "user pressed stop"})
    cancelled_at = time.time()
    wait_until(
        lambda: cancel_log.exists() and cancel_log.read_text().strip(), 5, message="the server's cancel"
    )
    arrived = json.loads(cancel_log.read_text().splitlines()[0])["at"]
    assert arrived - cancelled_at < 1.0, f"cancel reached the server after {arrived - cancelled_at:.2f}s"
    assert serve_text(s.call("demo__echo", {"text": "after"})) == "after"
    assert not [m for m in s.lines if m.get("id") == rid], "a cancelled request gets no answer"

    mark = s.mark()
    assert s.request("logging/setLevel", {"level": "info"}) == {}
    s.call("other__shout")
    msg = s.wait(lambda m: m.get("method") == "notifications/message", 10, "server message", since=mark)
    assert msg["params"] == {"level": "warning", "logger": "other", "data": "pool is 90% full"}, msg
    s.call("other__hello")  # the debug line, filtered, never arrives (it was sent before this)
    assert all(m["params"]["level"] != "debug" for m in s.notifications("notifications/message", since=mark))

    big = s.call("other__blob", {"kib": 3 * 1024}, timeout=60)
    assert big["structuredContent"]["size"] == 3 * 1024 * 1024
    assert big["structuredContent"]["text"][:52] == "ABCDEFGHIJKLMNOPQRSTUVWXYZ" * 2
    assert s.close() == 0


def test_serve_call_timeout_cancels_and_keeps_the_server(h):
    """A call past its timeout fails with one error; its server is told to cancel and is
    kept (the same process answers the next call)."""
    cancel_log = h.tmp / "cancels.jsonl"
    s = ServeSession(
        h, env=h.env(MCPORTER_DAEMON_TIMEOUT_MS="1500", MCPORTER_DEMO_CANCEL_LOG=str(cancel_log))
    )
    s.initialize()
    before = serve_text(s.call("demo__pid"))
    msg = s.answer(s.start("tools/call", {"name": "demo__sleep", "arguments": {"seconds": 30}}), timeout=15)
    assert "timed out" in msg["error"]["message"], msg
    wait_until(
        lambda: cancel_log.exists() and cancel_log.read_text().strip(), 5, message="the server's cancel"
    )
    assert serve_text(s.call("demo__pid")) == before
    assert s.close() == 0


def test_serve_resources_templates_and_prompts(h):
    h.configure({"twin": h.demo_server_entry()})
    s = ServeSession(h)
    s.initialize()
    resources = s.request("resources/list")["resources"]
    by_name = {r["name"]: r["uri"] for r in resources}
    assert set(by_name) == {"demo__counter", "twin__counter"}, resources
    assert by_name["demo__counter"] != by_name["twin__counter"], "a URI both list is wrapped per server"
    assert serve_text(s.call("twin__counter")) == "1"
    read = s.request("resources/read", {"uri": by_name["twin__counter"]})
    assert read["contents"][0]["text"] == "1" and read["contents"][0]["uri"] == by_name["twin__counter"], read
    assert s.request("resources/read", {"uri": by_name["demo__counter"]})["contents"][0]["text"] == "0"
    templates = s.request("resources/templates/list")["resourceTemplates"]
    assert {t["name"] for t in templates} == {
        "demo__echo",
        "demo__counter-as",
        "twin__echo",
        "twin__counter-as",
    }
    msg = s.answer(s.start("resources/read", {"uri": "demo://echo/hi"}))
    assert "several servers: demo, twin" in msg["error"]["message"], msg
    prompts = {p["name"]: p for p in s.request("prompts/list")["prompts"]}
    assert {"demo__greet", "twin__counter-report"} <= set(prompts), prompts
    got = s.request("prompts/get", {"name": "twin__greet", "arguments": {"name": "Ada"}})
    assert got["messages"][0]["content"]["text"] == "Write a casual greeting for Ada.", got
    assert s.close() == 0
    # One server bridged: a URI matching its template passes unchanged.
    s = ServeSession(h, "--servers", "demo")
    s.initialize()
    assert s.request("resources/read", {"uri": "demo://echo/hi"})["contents"][0]["text"] == "hi"
    assert s.request("resources/list")["resources"][0]["uri"] == "demo://counter"
    assert s.close() == 0


def test_serve_loop_guard_cursor_config_that_lists_serve_itself(h):
    """Cursor's mcp.json registers the bridge; imported, that entry would make the daemon start
    a bridge to itself. It is never imported or started, and doctor says why."""
    cursor = h.tmp / ".cursor"
    cursor.mkdir()
    bridge_entry = {"command": sys.executable, "args": [str(MODULE_PATH), "serve"]}
    other = dict(h.demo_server_entry())
    other.pop("lifecycle")
    (cursor / "mcp.json").write_text(json.dumps({"mcpServers": {"kept": bridge_entry, "cursor-demo": other}}))
    env = h.env(MCPORTER_KEEPALIVE="kept,cursor-demo")  # asked to keep it: refused all the same
    r = h.run("list", env=env)  # the project root is the cwd: .cursor/mcp.json is imported
    assert r.rc == 0 and "cursor-demo" in r.out and "kept" not in r.out.replace("keep-alive", ""), r
    r = h.run("doctor", env=env)
    assert "server 'kept'" in r.out and "own `serve`" in r.out and "never imported or started" in r.out, r
    r = h.run("serve", "--servers", "kept", env=env, timeout=20)
    assert r.rc == 2 and "runs this tool's own serve" in r.err, r
    s = ServeSession(h, env=env)
    s.initialize()
    names = s.tool_names()
    assert "cursor-demo__counter" in names and not any(n.startswith("kept__") for n in names), names
    served = [srv["name"] for srv in running_status(h)["servers"]]
    assert "kept" not in served and "cursor-demo" in served, served
    assert s.close() == 0


# -- real clients: the MCP Python SDK (1.x and 2.x), mcporter 0.12.3, the MCP inspector CLI --

# An SDK ClientSession over stdio to `serve` (argv: the bridge's command as JSON): lists, calls,
# reads a resource, gets a prompt, gets progress, has an elicitation declined, cancels a long
# call, and calls again. Prints what it saw as one JSON object.
SERVE_SDK_CLIENT = r"""
import importlib.metadata as metadata
import json
import os
import sys
import time

import anyio
import mcp.types as types
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

V1 = metadata.version("mcp").startswith("1.")


def dump(model):
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def text(result):
    return "".join(getattr(c, "text", "") for c in result.content)


async def main():
    argv = json.loads(sys.argv[1])
    out = {"version": metadata.version("mcp"), "progress": [], "logs": []}
    server = StdioServerParameters(command=argv[0], args=argv[1:], env=dict(os.environ))

    async def on_log(params):
        out["logs"].append(dump(params))

    async with stdio_client(server) as (read, write):
        async with ClientSession(read, write, logging_callback=on_log) as session:
            out["init"] = dump(await session.initialize())
            out["tools"] = [t.name for t in (await session.list_tools()).tools]
            out["counter"] = text(await session.call_tool("demo__counter", {}))
            resources = (await session.list_resources()).resources
            out["resources"] = [str(r.uri) for r in resources]
            out["read"] = dump(await session.read_resource(resources[0].uri))["contents"][0]["text"]
            prompt = await session.get_prompt("demo__greet", {"name": "Ada"})
            out["prompt"] = dump(prompt)["messages"][0]["content"]["text"]

            async def progress(value, total, message):
                out["progress"].append(value)

            done = await session.call_tool("demo__progress", {"steps": 3, "delay": 0.2}, progress_callback=progress)
            out["progressResult"] = text(done)
            out["ask"] = text(await session.call_tool("fast__ask", {}))

            # A long call cancelled once its progress shows it running: 2.x sends
            # notifications/cancelled itself when its wait ends; with 1.x the client sends it.
            started = anyio.Event()

            async def first_progress(value, total, message):
                started.set()

            long_args = {"steps": 300, "delay": 0.1}
            if V1:
                rid = session._request_id
                async with anyio.create_task_group() as tg:

                    async def long_call():
                        await session.call_tool("demo__progress", long_args, progress_callback=first_progress)

                    tg.start_soon(long_call)
                    await started.wait()
                    params = types.CancelledNotificationParams(requestId=rid, reason="user pressed stop")
                    note = types.CancelledNotification(method="notifications/cancelled", params=params)
                    out["cancelledAt"] = time.time()
                    await session.send_notification(types.ClientNotification(note))
                    tg.cancel_scope.cancel()
            else:
                try:
                    await session.call_tool(
                        "demo__progress", long_args, read_timeout_seconds=1.0, progress_callback=first_progress
                    )
                except Exception as exc:
                    out["cancelledAt"] = time.time()
                    out["cancelError"] = type(exc).__name__
            out["after"] = text(await session.call_tool("demo__echo", {"text": "after"}))
    print(json.dumps(out))


anyio.run(main)
"""


def test_serve_real_sdk_client(h, mcp_sdk):
    cancel_log = h.tmp / "cancels.jsonl"
    h.configure({"fast": fastmcp_entry(h, mcp_sdk, FASTMCP_SERVER)})
    client = h.tmp / "sdk_client.py"
    client.write_text(SERVE_SDK_CLIENT)
    env = h.env(MCPORTER_DEMO_CANCEL_LOG=str(cancel_log))
    r = h.run(
        client, json.dumps([str(a) for a in h.argv("serve")]), argv=[mcp_sdk.python], env=env, timeout=120
    )
    assert r.rc == 0, r
    out = json.loads(r.out.strip().splitlines()[-1])
    assert out["init"]["serverInfo"]["name"] == "mcporter-daemon", out
    assert out["init"]["capabilities"]["tools"] == {"listChanged": True}, out
    assert "demo__counter" in out["tools"] and "fast__filler_59" in out["tools"], out["tools"]
    assert out["counter"] == "1"
    assert out["resources"] == ["demo://counter"] and out["read"] == "1", out
    assert out["prompt"] == "Write a casual greeting for Ada.", out
    assert out["progressResult"] == "done 3 steps" and out["progress"] and out["progress"][-1] <= 3, out
    assert out["ask"] == "elicitation: decline", out
    assert any(m["logger"] == "fast" and "declined" in str(m["data"]) for m in out["logs"]), out["logs"]
    arrived = json.loads(cancel_log.read_text().splitlines()[0])["at"]
    assert arrived - out["cancelledAt"] < 1.0, (
        f"cancel reached the server {arrived - out['cancelledAt']:.2f}s later"
    )
    assert out["after"] == "after", out
    # The state is the daemon's: the CLI sees the counter the editor moved.
    assert call_ok(h, "demo.counter") == "2"


def test_serve_real_mcporter_client(h, mcporter_cli):
    """mcporter 0.12.3's ad-hoc stdio server: `list` and `call` through the bridge."""
    bridge = " ".join(shlex.quote(str(a)) for a in h.argv("serve"))
    env = h.env(HOME=str(h.home))
    r = h.run("list", "--stdio", bridge, argv=mcporter_cli.argv, env=env, timeout=60)
    assert r.rc == 0, r
    assert "function demo__counter()" in r.out and "function demo__echo(text: string)" in r.out, r
    r = h.run("call", "--stdio", bridge, "demo__counter", argv=mcporter_cli.argv, env=env, timeout=60)
    assert r.rc == 0 and r.out.strip() == "1", r
    r = h.run(
        "call", "--stdio", bridge, "demo__echo", "text=through mcporter", argv=mcporter_cli.argv, env=env
    )
    assert r.rc == 0 and r.out.strip() == "through mcporter", r
    assert call_ok(h, "demo.counter") == "2"


INSPECTOR_VERSION = "1.0.3"


@pytest.fixture(scope="session")
def inspector_cli():
    """@modelcontextprotocol/inspector-cli from npm, pinned."""
    node, npm = require_node()
    package = f"@modelcontextprotocol/inspector-cli@{INSPECTOR_VERSION}"

    def check(dest):
        version = npm_package_version(dest, "@modelcontextprotocol/inspector-cli")
        return {"inspector-cli": version} if version == INSPECTOR_VERSION else None

    cached_install("inspector", npm_installer(npm, [package]), check)
    build = (
        real_cache_dir() / "inspector" / "node_modules" / "@modelcontextprotocol" / "inspector-cli" / "build"
    )
    return types.SimpleNamespace(argv=[node, str(build / "cli.js")], cwd=build)


def test_serve_real_inspector_cli(h, inspector_cli):
    """The MCP inspector's CLI mode against the bridge: tools/list and tools/call."""
    # It reads its package.json by a cwd-relative test, so it runs from its build folder. Its
    # stdio servers get only -e variables (and a default set), so the bridge's come that way;
    # the config too, as its own --config would take ours.
    keep = {
        "MCPORTER_CONFIG": str(h.cfg),
        "MCPORTER_DAEMON_DIR": str(h.state_dir),
        "HOME": str(h.home),
        MARKER_VAR: h.tag,
    }
    flags = [f for k, v in keep.items() for f in ("-e", f"{k}={v}")]
    base = inspector_cli.argv + ["--cli"] + flags + [sys.executable, str(MODULE_PATH), "serve"]
    r = h.run("--method", "tools/list", argv=base, cwd=inspector_cli.cwd, timeout=60)
    assert r.rc == 0, r
    listed = json.loads(r.out[r.out.index("{") :])
    assert "demo__counter" in [t["name"] for t in listed["tools"]], listed
    r = h.run(
        "--method",
        "tools/call",
        "--tool-name",
        "demo__echo",
        "--tool-arg",
        "text=inspected",
        argv=base,
        cwd=inspector_cli.cwd,
        timeout=60,
    )
    assert r.rc == 0, r
    assert json.loads(r.out[r.out.index("{") :])["content"][0]["text"] == "inspected", r
    assert call_ok(h, "demo.echo", "text=cli") == "cli"


# ##########################################################################################
# Demo MCP server: the module run as a tiny stateful MCP stdio server (``_demo-server``).
# ##########################################################################################


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


DEMO_PROMPT_LINES = [
    "greet(name, style?) — Ask for a greeting.",
    "    name (required): Who to greet",
    "    style: formal or casual",
    "counter-report() — Report the counter, quoting its resource.",
]


DEMO_TEMPLATE_LINES = [
    "demo://echo/{text}  echo (text/plain) — Reads back the text in its URI.",
    "demo://counter/{format}  counter-as — The counter.",
]


def test_prompts_and_templates_on_the_demo_server(h):
    h.configure({"eph": h.demo_server_entry("ephemeral")})
    # The demo server pages one item per page: every list below followed nextCursor.
    assert h.run("prompts", "demo", env=h.env()).ok().splitlines() == DEMO_PROMPT_LINES
    listed = json.loads(h.run("prompts", "demo", "--json", env=h.env()).ok())
    assert [p["name"] for p in listed] == ["greet", "counter-report"]
    assert listed[0]["arguments"][0] == {"name": "name", "description": "Who to greet", "required": True}
    r = h.run("prompts", "demo", "greet", "name=Ada", "style=formal", env=h.env())
    assert r.ok() == "user: Write a formal greeting for Ada.", r
    # Prompt arguments are strings, sent as written.
    assert (
        h.run("prompts", "demo", "greet", "name=42", env=h.env()).ok()
        == "user: Write a casual greeting for 42."
    )
    got = json.loads(h.run("prompts", "demo", "greet", "name=Ada", "--json", env=h.env()).ok())
    assert got["description"] == "A greeting" and got["messages"][0]["role"] == "user", got
    # Through the daemon: the kept server's state shows in the prompt.
    assert call_ok(h, "demo.counter") == "1"
    r = h.run("prompts", "demo", "counter-report", env=h.env())
    assert r.ok().splitlines() == ["user: What is the counter at?", "assistant: 1"], r
    r = h.run("prompts", "demo", "greet", env=h.env())
    assert r.rc == 1 and "'name'" in r.err and len(r.err.strip().splitlines()) == 1, r

    assert h.run("resources", "demo", "--templates", env=h.env()).ok().splitlines() == DEMO_TEMPLATE_LINES
    templates = json.loads(h.run("resources", "demo", "--templates", "--json", env=h.env()).ok())
    assert [t["uriTemplate"] for t in templates] == ["demo://echo/{text}", "demo://counter/{format}"]
    assert h.run("resources", "demo", "demo://echo/hello", env=h.env()).ok() == "hello"

    # The new wire methods, as a raw client sends them.
    resp, _, _ = raw_request(h.socket_path, "listPrompts", {"server": "demo"}, idle=10.0)
    assert resp["ok"] and [p["name"] for p in resp["result"]["prompts"]] == ["greet", "counter-report"], resp
    params = {"server": "demo", "name": "greet", "args": {"name": "Bo"}}
    resp, _, _ = raw_request(h.socket_path, "getPrompt", params, idle=10.0)
    assert resp["ok"] and resp["result"]["messages"][0]["content"]["text"].endswith("for Bo."), resp
    resp, _, _ = raw_request(h.socket_path, "listResourceTemplates", {"server": "demo"}, idle=10.0)
    assert resp["ok"] and len(resp["result"]["resourceTemplates"]) == 2, resp

    # An ephemeral server: a fresh process each time, no daemon needed.
    assert h.run("prompts", "eph", env=h.env()).ok().splitlines() == DEMO_PROMPT_LINES
    r = h.run("prompts", "eph", "counter-report", env=h.env())
    assert r.ok().splitlines() == ["user: What is the counter at?", "assistant: 0"], r
    assert h.run("resources", "eph", "--templates", env=h.env()).ok().splitlines() == DEMO_TEMPLATE_LINES

    for args in (("prompts", "nosuch"), ("resources", "demo", "demo://x", "--templates")):
        r = h.run(*args, env=h.env())
        assert r.rc == 2 and len(r.err.strip().splitlines()) == 1 and "Traceback" not in r.err, r


class _YieldingState(dict):
    """The demo server's state, handing the GIL over on every read: on Python 3.10+ threads
    switch only at calls and backward jumps, so an unlocked read-modify-write race would
    otherwise stay hidden (in-process, since only that can widen the window)."""

    def __getitem__(self, key):
        value = super().__getitem__(key)
        time.sleep(0.0005)
        return value


def test_demo_counter_is_atomic_under_concurrent_calls():
    md = _import_module()
    state = _YieldingState(count=0, lock=threading.Lock())

    def one(_):
        return int(md._demo_tool("counter", {}, state)["content"][0]["text"])

    with ThreadPoolExecutor(16) as pool:
        values = list(pool.map(one, range(200)))
    assert sorted(values) == list(range(1, 201)), f"{len(values) - len(set(values))} duplicate counts"


# ##########################################################################################
# Service-manager files: a launchd plist and a systemd user unit that run the foreground host.
# ##########################################################################################


# -- systemd unit syntax (systemd.syntax(7), systemd.service(5), load-fragment.c) -----------
def parse_unit(text):
    sections, current = {}, None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a unit file line: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(sections, section, key):
    values = [v for k, v in sections.get(section, []) if k == key]
    assert len(values) == 1, f"[{section}] {key}= appears {len(values)} times"
    return values[0]


def systemd_words(value):
    """Split like extract_first_word(EXTRACT_UNQUOTE|EXTRACT_CUNESCAPE): quotes, C escapes."""
    escapes = {"n": "\n", "t": "\t", "r": "\r", "s": " "}
    words, cur, quote, have, i = [], [], None, False, 0
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            nxt = value[i + 1]
            cur.append(escapes.get(nxt, nxt))
            have, i = True, i + 2
            continue
        if quote:
            if c == quote:
                quote = None
            else:
                cur.append(c)
        elif c in "\"'":
            quote, have = c, True
        elif c.isspace():
            if have:
                words.append("".join(cur))
                cur, have = [], False
        else:
            cur.append(c)
            have = True
        i += 1
    assert quote is None, f"unterminated quote in {value!r}"
    if have:
        words.append("".join(cur))
    return words


def systemd_specifiers(word, dollars):
    """Resolve ``%%`` (every setting) and ``$$`` (ExecStart only); anything else that systemd
    would expand (``%h``, ``$VAR``, ``${VAR}``) must not be there."""
    out, i = [], 0
    while i < len(word):
        c, nxt = word[i], word[i + 1 : i + 2]
        if c == "%":
            assert nxt == "%", f"unescaped specifier %{nxt} in {word!r}"
            out.append("%")
            i += 2
            continue
        if c == "$" and dollars:
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            assert not (nxt == "{" or nxt.isalnum() or nxt == "_"), f"unescaped variable in {word!r}"
        out.append(c)
        i += 1
    return "".join(out)


def exec_start(sections):
    words = systemd_words(unit_value(sections, "Service", "ExecStart"))
    return [systemd_specifiers(w, dollars=True) for w in words]


def unit_environment(sections):
    env = {}
    for key, value in sections.get("Service", []):
        if key == "Environment":
            for word in systemd_words(value):
                name, _, val = systemd_specifiers(word, dollars=False).partition("=")
                env[name] = val
    return env


def working_directory(sections):
    # A path setting is taken verbatim (no unquoting), with specifiers resolved.
    return systemd_specifiers(unit_value(sections, "Service", "WorkingDirectory"), dollars=False)


def test_service_launchd_plist_runs_the_foreground_host(h):
    h.cfg = h.tmp / "my proj" / "mcporter.json"
    h.cfg.parent.mkdir()
    h.write_config()
    r = h.run("service", "launchd", "--label", "com.example.mcpd-test", env=h.env())
    plist = plistlib.loads(r.ok().encode())
    assert plist["Label"] == "com.example.mcpd-test"
    argv = plist["ProgramArguments"]
    assert argv[0] == sys.executable, argv
    assert os.path.isabs(argv[1]) and Path(argv[1]).resolve() == MODULE_PATH, argv
    assert flag_value(argv, "--config") == str(h.cfg)
    assert "--root" not in argv
    assert has_run(argv, ["start", "--foreground"]), argv
    assert plist["KeepAlive"] == {"SuccessfulExit": False, "Crashed": True}
    assert type(plist["ThrottleInterval"]) is int and plist["ThrottleInterval"] > 0
    assert plist["RunAtLoad"] is True
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert os.path.isabs(plist[key]) and Path(plist[key]).parent.is_dir(), (key, plist[key])
    env = plist["EnvironmentVariables"]
    assert env["MCPORTER_DAEMON_DIR"] == str(h.state_dir)

    # The default label is per config, so two configs can both be installed.
    default = plistlib.loads(h.run("service", "launchd", env=h.env()).ok().encode())["Label"]
    other_cfg = h.tmp / "other.json"
    other_cfg.write_text(h.cfg.read_text())
    other = plistlib.loads(
        h.run("--config", other_cfg, "service", "launchd", config=False, env=h.env()).ok().encode()
    )["Label"]
    assert default and other and default != other and " " not in default

    # Run it as launchd would: exactly ProgramArguments, EnvironmentVariables, WorkingDirectory.
    run_env = dict(env, **{MARKER_VAR: h.tag})
    first = h.popen_argv(argv, run_env, plist["WorkingDirectory"])
    h.wait_serving(first)
    assert call_ok(h, "demo.counter") == "1"
    # A second instance while the first runs exits 0 at once: KeepAlive SuccessfulExit=false
    # then leaves it down instead of respawning it every ThrottleInterval.
    second = h.popen_argv(argv, run_env, plist["WorkingDirectory"])
    assert wait_exit(second, 15) == 0, Path(second.err_path).read_text()
    assert first.poll() is None
    log = log_lines(flag_value(argv, "--log-file"))
    assert (second.pid, f"daemon already running (pid {first.pid}); not starting another") in log_events(log)
    assert call_ok(h, "demo.counter") == "2"
    assert_one_daemon_tree(h, first.pid)
    # `stop` is a deliberate outcome: exit 0, so launchd does not respawn it.
    h.run("stop").ok()
    assert wait_exit(first, 10) == 0
    wait_until(lambda: not h.server_pids(), 5, message="MCP server to exit")
    h.expect_no_leftovers = True


def test_service_files_name_the_root_or_the_config(h):
    root = h.root_project()
    elsewhere = h.tmp / "elsewhere"
    elsewhere.mkdir()
    # Discovered config: the service must rediscover the same layers, so it names the root.
    r = h.run("--root", root, "service", "launchd", config=False, cwd=elsewhere, env=h.env())
    plist = plistlib.loads(r.ok().encode())
    argv = plist["ProgramArguments"]
    assert flag_value(argv, "--root") == str(root)
    assert "--config" not in argv
    assert has_run(argv, ["start", "--foreground"])
    assert plist["WorkingDirectory"] == str(root)
    r = h.run("--root", root, "service", "systemd", config=False, cwd=elsewhere, env=h.env())
    unit = parse_unit(r.ok())
    words = exec_start(unit)
    assert flag_value(words, "--root") == str(root)
    assert "--config" not in words
    # MCPORTER_CONFIG is an explicit config: the service file must carry it as --config.
    env = h.env(MCPORTER_CONFIG=h.cfg)
    plist = plistlib.loads(h.run("service", "launchd", env=env, config=False).ok().encode())
    assert flag_value(plist["ProgramArguments"], "--config") == str(h.cfg)
    assert "MCPORTER_CONFIG" not in plist["EnvironmentVariables"]


def test_service_systemd_unit_runs_the_foreground_host(h):
    root = h.root_project()
    env = h.env()
    prefix = ("--root", root)
    r = h.run(*prefix, "service", "systemd", env=env, config=False, cwd=h.tmp)
    unit = parse_unit(r.ok())
    words = exec_start(unit)
    assert words[0] == sys.executable, words
    assert os.path.isabs(words[1]) and Path(words[1]).resolve() == MODULE_PATH, words
    assert flag_value(words, "--root") == str(root)
    assert has_run(words, ["start", "--foreground"]), words
    assert unit_value(unit, "Service", "Restart") == "on-failure"
    assert unit_value(unit, "Service", "Type") in ("simple", "exec")
    unit_env = unit_environment(unit)
    assert unit_env["MCPORTER_DAEMON_DIR"] == str(h.state_dir)
    assert unit_env["HOME"] == env["HOME"]
    cwd = working_directory(unit)
    assert cwd == str(root)

    # Run ExecStart as systemd would: only the unit's Environment=, in WorkingDirectory=.
    run_env = dict(unit_env, **{MARKER_VAR: h.tag})
    first = h.popen_argv(words, run_env, cwd)
    h.wait_serving(first, *prefix, env=env)
    assert h.run(*prefix, "call", "demo.counter", env=env, config=False).ok() == "1"
    second = h.popen_argv(words, run_env, cwd)
    assert wait_exit(second, 15) == 0, Path(second.err_path).read_text()
    assert first.poll() is None
    assert h.run(*prefix, "call", "demo.counter", env=env, config=False).ok() == "2"
    server = server_pid(h.status(*prefix, env=env), "demo")
    assert server and pid_alive(server)
    # `systemctl stop` sends SIGTERM: a clean exit 0 with its MCP server and files gone.
    first.send_signal(signal.SIGTERM)
    assert wait_exit(first, 10) == 0, Path(first.err_path).read_text()
    wait_until(lambda: not pid_alive(server), 5, message="MCP server to exit")
    assert not h.socket_path.exists() and not h.meta_path.exists()
    h.expect_no_leftovers = True


def test_service_daemon_is_found_under_xdg_locations(h):
    """A user whose shell sets XDG_STATE_HOME and XDG_CONFIG_HOME: the service manager's daemon
    must use the same state dir and config layers as the CLI, or the CLI never finds it."""
    xdg_config = h.tmp / "xdg-config"
    (xdg_config / "mcporter").mkdir(parents=True)
    (xdg_config / "mcporter" / "mcporter.json").write_text(json.dumps({"mcpServers": {}}))
    root = h.root_project()
    env = h.env(XDG_STATE_HOME=h.state_dir / "xdg", XDG_CONFIG_HOME=xdg_config)
    env.pop("MCPORTER_DAEMON_DIR")
    prefix = ("--root", root)
    unit = parse_unit(h.run(*prefix, "service", "systemd", env=env, config=False).ok())
    words = exec_start(unit)
    run_env = dict(unit_environment(unit), **{MARKER_VAR: h.tag})
    daemon = h.popen_argv(words, run_env, working_directory(unit))
    h.wait_serving(daemon, *prefix, env=env)
    assert h.status(*prefix, env=env)["fresh"] is True
    assert h.run(*prefix, "call", "demo.counter", env=env, config=False).ok() == "1"
    assert daemon.poll() is None and h.status(*prefix, env=env)["pid"] == daemon.pid


def test_service_systemd_exec_start_quotes_special_paths(h):
    root = h.root_project(name="my proj 100% $HOME")
    r = h.run("--root", root, "service", "systemd", config=False, env=h.env())
    words = exec_start(parse_unit(r.ok()))
    assert words[0] == sys.executable
    assert flag_value(words, "--root") == str(root)
    assert has_run(words, ["start", "--foreground"])


def test_service_systemd_working_directory_with_a_space(h):
    # systemd takes path settings verbatim: quotes become part of the path (not absolute).
    root = h.root_project(name="My Projects")
    r = h.run("--root", root, "service", "systemd", config=False, env=h.env())
    cwd = working_directory(parse_unit(r.ok()))
    assert cwd == str(root), f"WorkingDirectory= reads as {cwd!r} under systemd, not {str(root)!r}"


def test_service_systemd_environment_values_survive_systemd(h):
    # Environment= is unquoted and %-resolved, but never $-expanded: "$$" would stay "$$".
    state = h.state_dir / "state 100% $x"
    r = h.run("service", "systemd", env=h.env(MCPORTER_DAEMON_DIR=state))
    env = unit_environment(parse_unit(r.ok()))
    assert env["MCPORTER_DAEMON_DIR"] == str(state)


# ##########################################################################################
# CLI: argument parsing, the commands, output formatting and main().
# ##########################################################################################


def test_call_tool_error_exits_1(h):
    r = h.run("call", "demo.fail")
    assert r.rc == 1, r
    assert "Traceback" not in r.err, r
    # The daemon is still healthy after a tool error.
    assert call_ok(h, "demo.counter") == "1"


def readme_test_command():
    """The one command in the first ```sh block of the README's "Tests" section."""
    section = (HERE / "README.md").read_text().split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "README's Tests section has no sh block"
    lines = [ln for ln in match.group(1).splitlines() if ln.strip()]
    assert len(lines) == 1, f"the test command should be one line: {lines}"
    return lines[0]


def test_ci_runs_the_readme_test_command():
    """A fresh machine runs exactly what the README tells a new user, and that line installs
    what the suite needs (a bare venv has no pytest)."""
    command = readme_test_command()
    assert "pip install" in command and "pytest" in command.split("&&")[0], command
    ci_lines = [ln.strip() for ln in (HERE / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f".ci/run does not run the README's command: {command}"


def readme_section(heading):
    """The text under the README's ``## heading``, up to the next ``## `` heading."""
    return (HERE / "README.md").read_text().split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]


def readme_quick_start():
    """The quick start as a user follows it: the ```sh block that writes the config, and the
    ```console block's commands, each with the lines the README shows it printing."""
    section = readme_section("Quick start")
    setup = re.search(r"```sh\n(.*?)```", section, re.S)
    console = re.search(r"```console\n(.*?)```", section, re.S)
    assert setup and console, "the quick start has a ```sh block and then a ```console block"
    steps = []
    for line in console.group(1).splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            steps[-1][1].append(line)
    return setup.group(1), steps


def quick_start_shape(line):
    """A printed line with what differs between runs (pids, times, paths) blanked out."""
    line = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "TIME", line)
    line = re.sub(r"/.*$", "PATH", line)  # a path ends its line (and may hold spaces)
    return re.sub(r"pid \d+", "pid N", line)


def test_readme_quick_start_runs_as_written(h, tmp_path):
    """The quick start needs nothing but Python, and what it shows is what a user sees: the
    demo server's count rises across separate CLI processes, `status` shows the same server
    pid, and after `stop` the count starts over (the state lived only in that process).

    Every pid the README shows must stand for one real pid throughout, and different ones for
    different pids: so the server's pid really stayed the same, and the second daemon is new."""
    setup, steps = readme_quick_start()
    work = tmp_path / "my project"
    work.mkdir()
    shutil.copy(str(MODULE_PATH), str(work / "mcporter_daemon.py"))
    bin_dir = tmp_path / "bin"  # `python3` in the README is the interpreter running the tests
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    env = h.env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    r = h.run(argv=["bash", "-euc", setup], env=env, cwd=work)
    assert r.rc == 0, r
    assert len(steps) >= 6, steps
    real_of = {}
    for command, shown in steps:
        r = h.run(argv=["bash", "-c", command], env=env, cwd=work)
        assert r.rc == 0, (command, r)
        printed = (r.out + r.err).rstrip("\n").splitlines()
        assert [quick_start_shape(x) for x in printed] == [quick_start_shape(x) for x in shown], (command, r)
        for shown_line, line in zip(shown, printed):
            for readme_pid, pid in zip(re.findall(r"pid (\d+)", shown_line), re.findall(r"pid (\d+)", line)):
                assert real_of.setdefault(readme_pid, pid) == pid, (
                    f"{command}: the README shows pid {readme_pid} again, but it is {pid} now, "
                    f"not {real_of[readme_pid]}"
                )
    assert len(set(real_of.values())) == len(real_of), f"README pids stand for the same pid: {real_of}"


def help_text(*words):
    r = subprocess.run(
        [sys.executable, str(MODULE_PATH), *words, "--help"],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env=dict(os.environ, COLUMNS="100"),
    )
    assert r.returncode == 0, r
    return r.stdout


def help_subcommands(text):
    """The subcommands a top-level ``--help`` lists: indented lines of a name, then (after two
    or more spaces) what it does."""
    return re.findall(r"^ {2,}([a-z][\w-]*)(?: \([\w, -]+\))? {2,}\S", text, re.M)


def help_flags(text):
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", text)) - {"-h", "--help"}


def readme_command_rows(commands, name):
    """The Commands table's rows for subcommand ``name``: its first cell names it."""
    rows = [ln for ln in commands.splitlines() if ln.startswith("| `")]
    return [
        row for row in rows if re.search(rf"(^\| |/ )`{re.escape(name)}[ `]", row.split("` |", 1)[0] + "`")
    ]


def test_readme_commands_name_every_subcommand_and_flag_help_shows():
    """Every subcommand `--help` lists has a row in the README's Commands table, and that row
    names every flag the subcommand's own `--help` shows; the top-level flags are in the
    section too (a user reading it sees all there is)."""
    commands = readme_section("Commands")
    top = help_text()
    subcommands = help_subcommands(top)
    assert {"start", "stop", "call", "list", "doctor"} <= set(subcommands), top
    missing = []
    for flag in sorted(help_flags(top)):
        if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", commands):
            missing.append(flag)
    for name in subcommands:
        rows = "\n".join(readme_command_rows(commands, name))
        if not rows:
            missing.append(f"a row for `{name}`")
            continue
        text = help_text(name)
        if text == top:  # `daemon --help`: the commands it aliases, already checked above
            continue
        for flag in sorted(help_flags(text)):
            if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", rows):
                missing.append(f"{name} {flag}")
    assert not missing, f"--help shows these, the README's Commands table does not: {missing}"


@pytest.mark.parametrize(
    "args, named",
    [
        (("call", "nodot"), "'nodot' is not SERVER.TOOL"),
        (("call", "demo.echo", "--timeout", "5", "text=x"), "--timeout 5: write 5s or 5000"),
        (("call", "demo.echo", "--args", "{bad"), "--args is not valid JSON"),
        (("call", "nope.echo"), "unknown server 'nope'"),
        (("frobnicate",), "frobnicate"),
    ],
    ids=["no-dot", "ambiguous-duration", "bad-args-json", "unknown-server", "unknown-command"],
)
def test_usage_errors_are_one_line_exit_2(h, args, named):
    r = h.run(*args)
    assert_prompt_error(r, 2, named)
    assert "_demo-server" not in r.err, "the internal command is offered to users"
    assert h.daemon_pids() == set()


def test_doctor_healthy_setup(h):
    r, found = h.doctor()
    assert r.rc == 0, r
    assert r.out.rstrip().endswith("All checks passed.")
    assert not [ln for ln in found if not ln.startswith("ok")], r
    finding(found, "ok", "Python {}.{}.{}".format(*sys.version_info[:3]))
    finding(found, "ok", str(h.state_dir))
    finding(found, "ok", "socket path", f"{len(str(h.socket_path))} bytes", "limit 107")
    finding(found, "ok", "config layer", str(h.cfg), "read")
    finding(found, "ok", "server 'demo'", "keep-alive", "lifecycle in config", sys.executable)
    finding(found, "ok", "no daemon running")
    assert h.daemon_pids() == set(), "doctor must not start a daemon"

    assert call_ok(h, "demo.counter") == "1"
    daemon = running_status(h)["pid"]
    r, found = h.doctor()
    assert r.rc == 0, r
    finding(found, "ok", f"daemon running (pid {daemon})", "fresh")


def test_doctor_explains_discovery_and_keep_alive_reasons(h):
    home = h.home
    (home / ".mcporter").mkdir()
    home_cfg = home / ".mcporter" / "mcporter.json"
    home_cfg.write_text(json.dumps({"mcpServers": {"homeonly": h.demo_server_entry(None)}}))
    servers = {
        "demo": h.demo_server_entry(),
        "eph": h.demo_server_entry("ephemeral"),
        "plain": h.demo_server_entry(None),
        "playwright": h.demo_server_entry(None),
        "forced": h.demo_server_entry(None),
        "web": {"url": "http://127.0.0.1:9/mcp"},
    }
    root = h.root_project(data={"mcpServers": servers})
    env = h.env(MCPORTER_KEEPALIVE="forced")
    r, found = h.doctor("--root", root, env=env, config=False)
    assert r.rc == 0, r
    finding(found, "ok", "config layer", str(home_cfg), "read")
    finding(found, "ok", "config layer", str(h.cfg), "read")
    finding(found, "ok", "daemon named by", str(h.cfg))
    finding(found, "ok", "server 'demo'", "keep-alive", "lifecycle in config")
    finding(found, "ok", "server 'eph'", "ephemeral", "lifecycle in config")
    finding(found, "ok", "server 'plain'", "ephemeral", "by default")
    finding(found, "ok", "server 'homeonly'", "ephemeral")
    finding(found, "ok", "server 'playwright'", "keep-alive", "known stateful server")
    finding(found, "ok", "server 'forced'", "keep-alive", "MCPORTER_KEEPALIVE")
    finding(found, "warn", "server 'web'", "HTTP")


def test_doctor_unsafe_state_dir(h):
    os.chmod(str(h.state_dir), 0o777)
    r, found = h.doctor()
    assert r.rc == 1, r
    line = finding(found, "FAIL", str(h.state_dir))
    assert "0777" in line and "chmod 700" in line, line
    assert r.out.rstrip().endswith("1 problem(s) found.")


def test_doctor_invalid_config_json(h):
    h.cfg.write_text('{\n  "mcpServers": {\n    "demo": {"command": }\n  }\n}\n')
    r, found = h.doctor()
    assert r.rc == 1, r
    line = finding(found, "FAIL", str(h.cfg), "line 3")
    assert "column" in line, line
    finding(found, "ok", "Python")


def test_doctor_missing_keep_alive_command(h):
    h.configure(
        {
            "ghost": {"command": "mcporter-ops-no-such-command-9f2c", "lifecycle": "keep-alive"},
            "gone": {"command": str(h.tmp / "no" / "such" / "server"), "lifecycle": "keep-alive"},
        },
    )
    r, found = h.doctor()
    assert r.rc == 1, r
    finding(found, "FAIL", "server 'ghost'", "mcporter-ops-no-such-command-9f2c", "not found")
    finding(found, "FAIL", "server 'gone'", str(h.tmp / "no" / "such" / "server"), "not found")
    finding(found, "ok", "server 'demo'", "keep-alive")
    assert r.out.rstrip().endswith("2 problem(s) found.")


def test_doctor_stale_daemon(h):
    assert call_ok(h, "demo.counter") == "1"
    daemon = running_status(h)["pid"]
    data = h.config_data()
    data["mcpServers"]["demo"]["env"] = {"MD_OPS_EDIT": "1"}
    h.write_config(data)
    r, found = h.doctor()
    line = finding(found, "warn", f"pid {daemon}", "stale")
    assert "restart" in line, line
    assert r.rc == 0, r
    # Doctor only looks: the stale daemon is still the one running.
    assert h.daemon_pids() == {daemon}
    assert running_status(h)["fresh"] is False


def test_doctor_unresponsive_daemon(h):
    assert call_ok(h, "demo.counter") == "1"
    daemon = running_status(h)["pid"]
    h.sigstop(daemon)
    r, found = h.doctor()
    assert r.rc == 1, r
    line = finding(found, "FAIL", f"pid {daemon}", "does not answer")
    assert "stop" in line
    # The advice works: stop ends it, and doctor is happy again.
    out = h.run("stop").ok()
    assert str(daemon) in out, out
    wait_until(lambda: not pid_alive(daemon), 5, message="hung daemon to be terminated")
    r, found = h.doctor()
    assert r.rc == 0, r


def test_doctor_reports_leftovers_of_a_killed_daemon(h):
    h.use_stubborn_server()
    assert call_ok(h, "demo.counter") == "1"
    daemon = running_status(h)["pid"]
    server = server_pid(h.status())
    os.kill(daemon, signal.SIGKILL)
    wait_until(lambda: not pid_alive(daemon), 5, message="SIGKILLed daemon to die")
    assert pid_alive(server)
    r, found = h.doctor()
    finding(found, "ok", "no daemon running")
    finding(found, "warn", "leftovers", str(h.meta_path), str(h.socket_path), f"pid {server}")
    h.run("stop").ok()
    wait_until(lambda: not pid_alive(server), 5, message="leftover MCP server to be ended")
    r, found = h.doctor()
    assert r.rc == 0 and not [ln for ln in found if not ln.startswith("ok")], r
    assert not h.meta_path.exists() and not h.socket_path.exists()


def test_doctor_too_long_state_dir_uses_fallback(h):
    long_dir = h.state_dir / ("d" * 110)
    env = h.env(MCPORTER_DAEMON_DIR=long_dir)
    preferred = long_dir / f"daemon-{h.key}.sock"
    fallback = fallback_socket_path(long_dir, h.key)
    assert len(os.fsencode(str(preferred))) > 107
    r, found = h.doctor(env=env)
    assert r.rc == 0, r
    finding(found, "ok", f"{len(os.fsencode(str(preferred)))} bytes", "limit 107", fallback)
    try:
        assert h.run("call", "demo.counter", env=env).ok() == "1"
        st = h.status(env=env)
        assert st["socketPath"] == fallback
        r, found = h.doctor(env=env)
        finding(found, "ok", f"daemon running (pid {st['pid']})")
        h.run("stop", env=env).ok()
        assert not os.path.exists(fallback)
    finally:
        if h.daemon_pids():
            h.run("stop", env=env)
        if os.path.exists(fallback):
            os.unlink(fallback)


def test_list_servers_with_keep_alive_and_why(h):
    def entry(lifecycle=None):
        e = {"command": sys.executable, "args": [str(MODULE_PATH), "_demo-server"]}
        return dict(e, lifecycle=lifecycle) if lifecycle else e

    servers = {
        "demo": entry("keep-alive"),
        "eph": entry("ephemeral"),
        "plain": entry(),
        "playwright": entry(),
        "web": {"url": "http://127.0.0.1:9/mcp"},
    }
    h.write_config({"mcpServers": servers})
    lines = h.run("list", env=h.env()).ok().splitlines()
    by_name = {ln.split(":", 1)[0]: ln for ln in lines}
    assert sorted(by_name) == ["demo", "eph", "plain", "playwright", "web"], lines
    assert "keep-alive (lifecycle in config)" in by_name["demo"]
    assert "ephemeral (lifecycle in config)" in by_name["eph"]
    assert "ephemeral (ephemeral by default)" in by_name["plain"]
    assert "keep-alive (known stateful server)" in by_name["playwright"]
    assert "http" in by_name["web"] and "unsupported" in by_name["web"]
    rows = {row["name"]: row for row in json.loads(h.run("list", "--json", env=h.env()).ok())}
    assert rows["demo"]["keepAlive"] is True and rows["eph"]["keepAlive"] is False
    assert rows["playwright"]["why"] == "known stateful server"
    assert h.daemon_pids() == set(), "listing servers must not start a daemon"
    assert not h.meta_path.exists()


@pytest.mark.parametrize("lifecycle", ["keep-alive", "ephemeral"])
def test_list_server_tools(h, lifecycle):
    h.write_config({"mcpServers": {"demo": h.demo_server_entry(lifecycle)}})
    lines = h.run("list", "demo", env=h.env()).ok().splitlines()
    assert lines == [
        "Instructions: A demo server: counter counts calls in this process.",
        "demo.counter() — Add one to a counter kept in this server process.",
        "demo.pid() — Return this server's process id.",
        "demo.echo(text: string) — Return the given text.",
        "demo.sleep(seconds: number) — Sleep for the given seconds, then answer.",
        "demo.fail() — Return a tool error (isError).",
        "demo.typed(text?: string, count?: number, ratio?: number, flag?: boolean, tags?: string[],"
        ' meta?: object, mode?: "fast" | "slow", note?: string | null) — Return the arguments as JSON,'
        " to show how each was typed.",
        "demo.media() — Return text, an image and an audio clip.",
        "demo.links() — Return resource links and embedded resources (text and blob).",
        "demo.structured() — Return structuredContent and no text.",
        "demo.progress(steps?: number, delay?: number) — Take steps of delay seconds each, reporting progress"
        " when asked for it.",
    ], lines
    schema_out = h.run("list", "demo", "--schema", env=h.env()).ok()
    assert schema_out.splitlines()[:2] == lines[:2]
    assert '"required": [' in schema_out and '"seconds"' in schema_out, schema_out
    # mcporter's object: the server, its status, and each tool with its schemas.
    data = json.loads(h.run("list", "demo", "--json", env=h.env()).ok())
    assert {k: data[k] for k in ("mode", "name", "status")} == {
        "mode": "server",
        "name": "demo",
        "status": "ok",
    }
    assert data["instructions"] == "A demo server: counter counts calls in this process."
    assert data["source"] == {"kind": "local", "path": str(h.cfg)} and data["transport"].startswith("STDIO ")
    assert isinstance(data["durationMs"], int)
    echo = [t for t in data["tools"] if t["name"] == "echo"][0]
    assert echo == {
        "name": "echo",
        "description": "Return the given text.",
        "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
    }, echo


@pytest.mark.parametrize(
    "prop, text",
    [
        ({"type": "string"}, "string"),
        ({"type": "integer"}, "number"),
        ({"type": "number"}, "number"),
        ({"type": "boolean"}, "boolean"),
        ({"type": "array", "items": {"type": "string"}}, "string[]"),
        ({"type": "array", "items": {"type": "object", "properties": {}}}, "object[]"),
        ({"type": "array"}, "unknown[]"),
        ({"type": "array", "items": {"enum": ["a", "b"]}}, '("a" | "b")[]'),
        ({"type": "string", "enum": ["a", "b"]}, '"a" | "b"'),
        ({"type": ["string", "null"]}, "string | null"),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, "number | null"),
        ({"anyOf": [{"type": "integer"}, {"type": "number"}]}, "number"),
        ({"const": "x"}, '"x"'),
        ({"type": "object"}, "object"),
        ({"properties": {"a": {}}}, "object"),
        ({}, "unknown"),
        ({"type": "weird"}, "unknown"),
        ("not a schema", "unknown"),
    ],
)
def test_schema_type_text_table(prop, text):
    assert _import_module().schema_type_text(prop) == text


def test_list_status_probes_every_server(h):
    broken = {"command": sys.executable, "args": ["-c", "import sys; sys.exit(3)"]}
    servers = {
        "demo": h.demo_server_entry(),
        "eph": dict(h.demo_server_entry("ephemeral"), blockedTools=["fail"]),
        "broken": broken,
        "web": {"url": "http://127.0.0.1:9/mcp"},
    }
    h.write_config({"mcpServers": servers})
    r = h.run("list", "--status", env=h.env())
    assert r.rc == 0, r
    rows = {ln.split(" ")[1]: ln for ln in r.out.splitlines() if ln.startswith("- ")}
    assert "(10 tools, " in rows["demo"] and "keep-alive" in rows["demo"], rows
    assert "(9 tools, " in rows["eph"], "a blocked tool is not counted"
    assert "offline: " in rows["broken"] and "exit" in rows["broken"], rows
    assert "unsupported" in rows["web"], rows
    assert r.out.splitlines()[-1].startswith("Listed 4 servers ("), r
    assert h.status()["running"], "kept servers are probed through the daemon"
    r = h.run("list", "--status", "--exit-code", "--json", env=h.env())
    assert r.rc == 1, "--exit-code fails when a server is down"
    data = json.loads(r.out)
    assert data["mode"] == "list" and data["counts"] == {"ok": 2, "offline": 1, "unsupported": 1}, data
    by_name = {row["name"]: row for row in data["servers"]}
    assert by_name["demo"]["status"] == "ok" and len(by_name["demo"]["tools"]) == 10
    assert isinstance(by_name["broken"]["durationMs"], int) and by_name["broken"]["error"]
    del servers["broken"]
    h.write_config({"mcpServers": servers})
    assert h.run("list", "--status", "--exit-code", env=h.env()).rc == 0, "all up (HTTP is not run here)"
    r = h.run("list", "eph", "--status", "--exit-code", env=h.env())
    assert r.rc == 0 and "(9 tools, " in r.out, r


@pytest.mark.parametrize(
    "statuses, exit_code, expected",
    [
        (["ok", "ok"], True, 0),
        (["ok", "offline"], True, 1),
        (["ok", "error"], True, 1),
        (["ok", "unsupported"], True, 0),
        (["offline"], False, 0),
    ],
)
def test_list_status_exit_table(statuses, exit_code, expected):
    rows = [{"status": s} for s in statuses]
    assert _import_module().list_status_exit(rows, exit_code) == expected


def test_call_ephemeral_server_starts_no_daemon(h):
    h.write_config({"mcpServers": {"eph": h.demo_server_entry("ephemeral")}})
    assert call_ok(h, "eph.counter") == "1"
    assert call_ok(h, "eph.counter") == "1", "an ephemeral server must not keep state"
    pid = int(call_ok(h, "eph.pid"))
    assert not pid_alive(pid), f"ephemeral server {pid} outlived its call"
    assert h.server_pids() == set()
    assert h.daemon_pids() == set()
    assert not h.meta_path.exists() and not h.socket_path.exists()
    assert h.status()["running"] is False
    h.expect_no_leftovers = True


def test_start_with_no_keep_alive_server_says_why_and_exits_0(h):
    h.write_config({"mcpServers": {"demo": h.demo_server_entry(lifecycle="ephemeral")}})
    r = h.run("start")
    assert r.rc == 0 and "no keep-alive servers" in r.out, r
    r = h.run("start", "--foreground")
    assert r.rc == 0 and "no keep-alive servers" in r.err, r
    r = h.run("restart")
    assert r.rc == 0 and "no keep-alive servers" in r.out, r
    assert h.daemon_pids() == set() and not h.socket_path.exists()


def test_call_prints_every_content_type(h):
    md = _import_module()
    assert call_ok(h, "demo.media").splitlines() == [
        "a pixel and a beep:",
        "[image image/png, 70 bytes]",
        "[audio audio/wav, 52 bytes]",
    ]
    assert call_ok(h, "demo.links").splitlines() == [
        "demo://counter (counter)",
        "demo://unnamed",
        "a note",
        "[blob demo://pixel image/png, 70 bytes]",
    ]
    assert json.loads(call_ok(h, "demo.structured")) == {"answer": 42, "items": ["a", "b"]}
    for tool in ("media", "links", "structured"):
        assert json.loads(call_ok(h, f"demo.{tool}", "--json")) == md._DEMO_CONTENT[tool]


def test_save_images_writes_new_files_and_prints_their_paths(h):
    md = _import_module()
    out_dir = h.tmp / "shots"
    out_dir.mkdir()
    (out_dir / "media-1.png").write_bytes(b"not to be overwritten")
    first = call_ok(h, "demo.media", "--save-images", out_dir).splitlines()
    second = call_ok(h, "demo.media", "--save-images", out_dir).splitlines()
    assert first[0] == second[0] == "a pixel and a beep:"
    paths = [Path(p) for p in first[1:] + second[1:]]
    assert [p.suffix for p in paths] == [".png", ".wav", ".png", ".wav"], paths
    assert len(set(paths)) == 4 and all(p.parent == out_dir for p in paths), paths
    assert all(p.name.startswith("media-") for p in paths), paths
    png, wav = base64.b64decode(md._DEMO_PNG), base64.b64decode(md._DEMO_WAV)
    assert [p.read_bytes() for p in paths] == [png, wav, png, wav]
    assert (out_dir / "media-1.png").read_bytes() == b"not to be overwritten"
    # A new directory is made; --json prints the result unchanged and names the files on stderr.
    r = h.run("call", "demo.media", "--json", "--save-images", h.tmp / "new" / "dir")
    assert r.rc == 0 and json.loads(r.out) == md._DEMO_CONTENT["media"], r
    assert sorted(p.name for p in (h.tmp / "new" / "dir").iterdir()) == ["media-1.png", "media-2.wav"]


def test_resources_output_file_writes_text_or_decoded_blob(h):
    md = _import_module()
    assert call_ok(h, "demo.counter") == "1"
    r = h.run("resources", "demo", "demo://pixel", "-o", h.tmp / "pixel.png")
    assert r.rc == 0 and "70 bytes" in r.out, r
    assert (h.tmp / "pixel.png").read_bytes() == base64.b64decode(md._DEMO_PNG)
    r = h.run("resources", "demo", "demo://counter", "-o", h.tmp / "counter.txt")
    assert r.rc == 0 and (h.tmp / "counter.txt").read_text() == "1", r
    r = h.run("resources", "demo", "demo://pixel")
    assert r.rc == 0 and r.out.strip() == "[blob demo://pixel image/png, 70 bytes]", r
    one_error_line(h.run("resources", "demo", "-o", h.tmp / "x"), 2, "URI")


@pytest.mark.parametrize(
    "args",
    [
        ("list",),
        ("list", "demo"),
        ("call", "demo.echo", "text=" + "x" * 100000),
        ("call", "demo.media", "--json"),
    ],
    ids=["list", "list-tools", "call-big", "call-json"],
)
def test_output_into_a_closed_pipe_ends_quietly(h, args):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte, as `| head -c 0` would be
    try:
        p = spawn(h.argv(*args), h.env(), h.tmp, write_end, subprocess.PIPE)
    finally:
        os.close(write_end)
    h.popens.append(p)
    h.track(p.pid)
    _, err = p.communicate(timeout=CLI_TIMEOUT)
    assert p.returncode in (0, 141, -signal.SIGPIPE), (p.returncode, err)
    assert err == b"", err


def _console_script_target():
    """The installed command's ``module:function``, as pyproject.toml declares it."""
    text = (HERE / "pyproject.toml").read_text()
    found = re.search(r'^mcporter-daemon = "(\w+):(\w+)"$', text, re.M)
    assert found, "pyproject.toml declares no mcporter-daemon command"
    return found.groups()


@pytest.mark.parametrize("form", ["-m", "installed command"])
def test_quick_exit_keeps_output_exit_code_and_atexit_callbacks(h, form):
    """The command ends without the interpreter's teardown, yet as an ordinary exit would:
    all of a big result on stdout, its exit code, and atexit callbacks run once (what they
    print, unflushed, included). Both entries: ``python3 -m`` and the installed command,
    run through a wrapper like the one pip writes."""
    module, function = _console_script_target()
    hook = (
        f"import atexit, sys; sys.path.insert(0, {str(HERE)!r}); "
        "atexit.register(lambda: print('atexit ran', end='')); "
        "atexit.register(lambda: print('atexit ran too', file=sys.stderr, end=''))\n"
    )
    if form == "-m":
        code = hook + f"import runpy; runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    else:
        code = hook + f"from {module} import {function}\nsys.exit({function}())"
    argv = [sys.executable, "-c", code, "--config", h.cfg]
    env = {k: v for k, v in h.env().items() if k != "PYTHONUNBUFFERED"}  # stdout a buffered pipe
    text = "x" * 100000
    r = h.run("call", "demo.echo", f"text={text}", argv=argv, env=env)
    assert r.rc == 0 and r.out == text + "\natexit ran" and r.err == "atexit ran too", (r.rc, r.err)
    r = h.run("call", "nope.tool", argv=argv, env=env)
    assert r.rc == 2 and r.out == "atexit ran" and r.err.count("atexit ran too") == 1, r
    r = h.run("call", "demo.fail", argv=argv, env=env)
    assert r.rc == 1 and r.out.endswith("atexit ran") and r.err.endswith("atexit ran too"), r


@pytest.mark.parametrize("lifecycle", ["keep-alive", "ephemeral"])
def test_call_shows_progress_as_one_erased_line_on_a_tty(h, lifecycle):
    h.write_config({"mcpServers": {"demo": dict(h.demo_server_entry(), lifecycle=lifecycle)}})
    rc, out, term = run_with_pty_stderr(h, "call", "demo.progress", "steps=4", "delay=0.4")
    assert rc == 0 and out.strip() == "done 4 steps", (rc, out, term)
    drawn = progress_lines(term)
    assert "1/4 (25%) step 1 of 4" in drawn and "3/4 (75%) step 3 of 4" in drawn, repr(term)
    assert term.endswith(CLEAR_LINE), f"the progress line was not erased: {term!r}"
    assert "\n" not in term, f"progress must stay on one line: {term!r}"
    # Piped stderr shows nothing unless asked with --progress.
    r = h.run("call", "demo.progress", "steps=3", "delay=0.4")
    assert r.rc == 0 and r.err == "", r
    r = h.run("call", "demo.progress", "steps=3", "delay=0.4", "--progress")
    assert r.rc == 0 and "1/3 (33%) step 1 of 3" in progress_lines(r.err) and r.err.endswith(CLEAR_LINE), r


@pytest.mark.parametrize(
    "update, width, expected",
    [
        ({"progress": 3, "total": 5, "message": "copying"}, 80, "3/5 (60%) copying"),
        ({"progress": 3}, 80, "3"),
        ({"progress": 2.5, "total": 10.0}, 80, "2.5/10 (25%)"),
        ({"progress": 7, "total": 0}, 80, "7/0"),  # no percentage of nothing
        ({"progress": 12, "total": 10}, 80, "12/10 (100%)"),  # a server overshooting its total
        ({"progress": 1, "message": "a\nb\x1b[2Jc\t"}, 80, "1 a b [2Jc"),  # no line breaks or escapes
        ({"progress": 1, "total": 4, "message": "x" * 100}, 20, "1/4 (25%) xxxxxxxxx"),  # fits width - 1
        ({"progress": 1, "message": "  "}, 80, "1"),
    ],
)
def test_progress_text_table(update, width, expected):
    assert _import_module().progress_text(update, width) == expected


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("1.5s", 1.5),
        ("60000", 60.0),  # a bare number is milliseconds, as in mcporter
        ("100", 0.1),
        ("0", 0.0),
        (" 5S ", 5.0),
    ],
)
def test_parse_duration_table(text, seconds):
    assert _import_module().parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text, message",
    [
        ("5", "--timeout 5: write 5s or 5000"),  # it meant seconds before: refused, not 5 ms
        ("99", "write 99s or 99000"),
        ("2.5", "write 2.5s or 2500"),
        ("abc", "not a duration"),
        ("-5s", "not a duration"),
        ("5x", "not a duration"),
        ("nan", "not a duration"),
        ("inf", "not a duration"),
        ("ms", "not a duration"),
    ],
)
def test_parse_duration_errors_table(text, message):
    md = _import_module()
    with pytest.raises(md.UsageError) as info:
        md.parse_duration(text, "--timeout")
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "words, target, pairs, flags, positional, options",
    [
        (["s.t", "k=v"], "s.t", {"k": "v"}, {}, [], {}),
        (["s.t", "--json", "k=v"], "s.t", {"k": "v"}, {}, [], {"json": True}),
        (["--timeout", "5s", "s.t", "k=v"], "s.t", {"k": "v"}, {}, [], {"timeout": 5.0}),
        (["s.t", "k=v", "--timeout=2m", "--output", "json"], "s.t", {"k": "v"}, {}, [], {"timeout": 120.0}),
        (
            ["s.t", "a:1", "b: two words", "c:", "3"],
            "s.t",
            {"a": "1", "b": "two words", "c": "3"},
            {},
            [],
            {},
        ),
        (["s.t", "k=a:b", "u:x=y"], "s.t", {"k": "a:b", "u": "x=y"}, {}, [], {}),  # first separator
        (["s.t", "--first-name", "Ada", "--n=1"], "s.t", {}, {"first-name": "Ada", "n": "1"}, [], {}),
        (["s.t", "--n", "-5"], "s.t", {}, {"n": "-5"}, [], {}),  # a flag's value may start with -
        (["s.t", "x", "http://h/p", "2"], "s.t", {}, {}, ["x", "http://h/p", "2"], {}),
        (["s.t", "--", "--json", "a=b"], "s.t", {"a": "b"}, {}, ["--json"], {"json": False}),
        (['s.t(a: 1, b: "x, y", 3)'], "s.t", {"a": "1", "b": "x, y"}, {}, ["3"], {}),
        (["s.t(a:", "1,", "b=[1,", "2])"], "s.t", {"a": "1", "b": "[1, 2]"}, {}, [], {}),  # shell-split
        (["s.t(\"it's\", 'say \\'hi\\'')"], "s.t", {}, {}, ["it's", "say 'hi'"], {}),
        (["my.srv.t()", "--progress"], "my.srv.t", {}, {}, [], {"progress": True}),
    ],
)
def test_parse_call_line_table(words, target, pairs, flags, positional, options):
    args = _import_module().parse_call_line(words)
    assert args.target == target
    assert args.forms.as_tuple() == (pairs, flags, positional)
    for name, value in options.items():
        assert getattr(args, name) == value, name


@pytest.mark.parametrize(
    "words, message",
    [
        ([], "call needs SERVER.TOOL"),
        (["s.t", "--timeout"], "--timeout needs a value"),
        (["s.t", "--count"], "--count needs a value"),
        (["s.t", "--json=yes"], "--json takes no value"),
        (["s.t", "--output", "yaml"], "choose one of text, markdown, json, raw"),
        (["s.t(a: 1"], "closing ')'"),
        (["s.t(a: 'x)"], "unbalanced quote"),
        (["s.t(a: [1)"], "unbalanced brackets"),
        (["s.t(a: 1,, b: 2)"], "empty argument"),
        (["s.t", "--stall-timeout", "3"], "--stall-timeout 3: write 3s or 3000"),
    ],
)
def test_parse_call_line_errors_table(words, message):
    md = _import_module()
    with pytest.raises(md.UsageError) as info:
        md.parse_call_line(words)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "target, servers, expected",
    [
        ("demo.echo", ["demo"], ("demo", "echo")),
        ("my.srv.tool", ["my.srv", "other"], ("my.srv", "tool")),
        ("my.srv.tool", ["other"], ("my", "srv.tool")),  # no configured name fits: first dot
        ("a.b.c.d", ["a.b.c"], ("a.b.c", "d")),
        ("demo.x.y", ["demo"], ("demo", "x.y")),  # a tool name may hold dots too
    ],
)
def test_resolve_target_table(target, servers, expected):
    assert _import_module().resolve_target(target, servers) == expected


@pytest.mark.parametrize(
    "target, servers, message",
    [
        ("my.srv.tool", ["my", "my.srv"], "server 'my.srv' tool 'tool', or server 'my' tool 'srv.tool'"),
        ("nodot", ["nodot"], "'nodot' is not SERVER.TOOL"),
        ("demo.", ["demo"], "'demo.' is not SERVER.TOOL"),
    ],
)
def test_resolve_target_errors_table(target, servers, message):
    md = _import_module()
    with pytest.raises(md.UsageError) as info:
        md.resolve_target(target, servers)
    assert message in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "result, expected",
    [
        ({"content": [{"type": "text", "text": "{}"}], "structuredContent": {"a": 1}}, {"a": 1}),
        ({"content": [{"type": "text", "text": '{"b": [1]}'}]}, {"b": [1]}),
        ({"content": [{"type": "text", "text": "1"}, {"type": "text", "text": "[2]"}]}, [1, [2]]),
        ({"content": [{"type": "text", "text": "not json"}]}, "ENVELOPE"),
        ({"content": [{"type": "image", "data": "", "mimeType": "image/png"}]}, "ENVELOPE"),
        ({"content": [], "isError": True}, "ENVELOPE"),
    ],
)
def test_json_view_table(result, expected):
    view = _import_module().json_view(result)
    assert view == (result if expected == "ENVELOPE" else expected)


def test_durations_are_written_as_mcporter_writes_them(h):
    h.configure({"eph": h.demo_server_entry("ephemeral")})
    for server in ("demo", "eph"):
        # 500 ms, not the 500 s the old reading gave: the call fails fast.
        r = h.run("call", f"{server}.sleep", "seconds=5", "--timeout", "500ms", timeout=20)
        assert r.rc == 1 and "timed out" in r.err and r.elapsed < 4.0, r
        r = h.run("call", f"{server}.sleep", "seconds=5", MCPORTER_CALL_TIMEOUT="700", timeout=20)
        assert r.rc == 1 and "timed out" in r.err and r.elapsed < 4.0, r
        # A bare number is milliseconds: 60000 is a minute, plenty for a short sleep.
        assert call_ok(h, f"{server}.sleep", "seconds=0.2", "--timeout", "60000") == "slept 0.2"
    # The flag wins over the environment.
    r = h.run("call", "demo.sleep", "seconds=0.2", "--timeout", "1m", MCPORTER_CALL_TIMEOUT="100", timeout=20)
    assert r.rc == 0, r
    for words in (("call", "demo.counter", "--timeout", "5"), ("stop", "--timeout", "20")):
        assert_prompt_error(h.run(*words), 2, f"--timeout {words[-1]}: write {words[-1]}s or")
    assert_prompt_error(h.run("call", "demo.counter", "--stall-timeout", "2"), 2, "write 2s or 2000")
    daemon = running_status(h)["pid"]
    r = h.run("stop", "--timeout", "2s")
    assert r.rc == 0 and f"stopped (pid {daemon})" in r.out, r


def test_unknown_names_say_did_you_mean_and_never_run_another(h):
    h.configure({"demo2": h.demo_server_entry()})
    assert call_ok(h, "demo.counter") == "1"
    line = one_error_line(h.run("call", "demo.countr"), 2, "unknown tool 'countr'", "did you mean: counter")
    assert "\n" not in line
    one_error_line(h.run("call", "dmeo.counter"), 2, "unknown server 'dmeo'", "did you mean: demo, demo2?")
    one_error_line(h.run("call", "zzz.counter"), 2, "unknown server 'zzz'", "configured: demo, demo2")
    one_error_line(h.run("call", "demo.zzzzzz"), 2, "unknown tool 'zzzzzz'")
    one_error_line(h.run("frobnicat"), 2, "unknown command 'frobnicat'")
    one_error_line(h.run("stauts"), 2, "did you mean: status")
    assert call_ok(h, "demo.counter") == "2", "a misspelt tool must never run another one"


def test_dotted_server_names_resolve_against_the_config(h):
    data = h.config_data()
    data["mcpServers"]["my.srv"] = data["mcpServers"].pop("demo")
    h.write_config(data)
    assert call_ok(h, "my.srv.counter") == "1"
    assert call_ok(h, "my.srv.echo", "text=dotted") == "dotted"
    assert "my.srv.counter()" in h.run("list", "my.srv").ok().splitlines()[1], "tools listed by full name"
    data["mcpServers"]["my"] = h.demo_server_entry()
    h.write_config(data)
    one_error_line(h.run("call", "my.srv.counter"), 2, "ambiguous", "server 'my.srv' tool 'counter'")


def test_output_modes(h):
    md = _import_module()
    assert json.loads(call_ok(h, "demo.structured", "--output", "json")) == {
        "answer": 42,
        "items": ["a", "b"],
    }
    assert json.loads(call_ok(h, "demo.typed", "count=3", "--output", "json")) == {"count": 3}
    echo = json.loads(call_ok(h, "demo.echo", "text=plain words", "--output", "json"))
    assert echo == {"content": [{"type": "text", "text": "plain words"}], "isError": False}, echo
    for flag in (("--output", "raw"), ("--json",)):
        assert json.loads(call_ok(h, "demo.media", *flag)) == md._DEMO_CONTENT["media"]
    assert call_ok(h, "demo.echo", "text=hi", "--output", "text") == "hi"
    markdown = call_ok(h, "demo.links", "--output", "markdown")
    assert "[counter](demo://counter)" in markdown and "```\na note\n```" in markdown, markdown
    assert call_ok(h, "demo.structured", "--output", "markdown").startswith("```json\n{")
    r = h.run("call", "demo.fail", "--output", "json")
    assert r.rc == 1 and json.loads(r.out)["isError"] is True, r

    # list and resources take --output too: json and raw are their --json.
    def steady(value):  # without the timings, which differ from run to run
        if isinstance(value, dict):
            return {k: steady(v) for k, v in value.items() if k != "durationMs"}
        return [steady(v) for v in value] if isinstance(value, list) else value

    for words in (("list",), ("list", "demo"), ("resources", "demo")):
        as_output = steady(json.loads(h.run(*words, "--output", "json").ok()))
        assert as_output == steady(json.loads(h.run(*words, "--json").ok())), words
    assert h.run("list", "demo", "--output", "text").ok() == h.run("list", "demo").ok()
    r = h.run("resources", "demo", "demo://counter", "-o", h.tmp / "c.txt")
    assert r.rc == 0 and (h.tmp / "c.txt").exists(), r


def test_aliases_as_mcporter_spells_them(h):
    assert call_ok(h, "demo.counter") == "1"
    assert h.run("resource", "demo").ok() == h.run("resources", "demo").ok()
    st = json.loads(h.run("daemon", "status", "--json").ok())
    assert st["running"] is True
    r = h.run("daemon", "stop")
    assert r.rc == 0 and f"stopped (pid {st['pid']})" in r.out, r
    r = h.run("daemon", "status")
    assert r.rc == 3 and r.out.startswith("not running"), r
    r = h.run("daemon", "start")
    assert r.rc == 0 and r.out.startswith("started (pid"), r
    r = h.run("daemon", "restart")
    assert r.rc == 0 and "started (pid" in r.out, r
    one_error_line(h.run("daemon", "frob"), 2, "daemon takes one of: start, stop, status, restart")
    help_text = h.run("--help").ok()
    for word in ("start", "stop", "status", "call", "list", "resources", "prompts", "doctor", "daemon"):
        assert f"    {word}" in help_text, word


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_ephemeral_call_ended_by_a_signal_ends_its_server(h, sig):
    """``timeout 5 call …`` or a closed terminal: the server's group goes too, and the exit
    status is the signal's (128 + N), as for Ctrl-C. The server ignores stdin EOF, as some do:
    only ending its group ends it."""
    h.use_stubborn_server()
    h.configure({"eph": h.demo_server_entry("ephemeral")})
    p = h.popen("call", "eph.sleep", "seconds=60")
    server = wait_until(lambda: next(iter(h.server_pids()), None), 20, message="the ephemeral server")
    # A second thread in the demo server is the tool call: the signal lands mid-call.
    wait_until(lambda: thread_count(server) >= 2, 20, message="the server to run the call")
    p.send_signal(sig)
    wait_until(lambda: not pid_alive(server), 10, message=f"ephemeral server {server} to be ended")
    assert wait_exit(p, 15) == 128 + sig, read_file(p.err_path)
    assert f"terminated by signal {int(sig)}" in read_file(p.err_path)
    h.expect_no_leftovers = True


FOREIGN_DAEMON = """
import json, os, socket, sys
path, config = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen(8)
print("ready", flush=True)
while True:
    conn, _ = s.accept()
    data = b""
    while not data.endswith(b"\\n") and b"}" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    req = json.loads(data.decode().splitlines()[0])
    # mcporter 0.12's status: no fingerprint, no metadata of ours.
    result = {"pid": os.getpid(), "protocolVersion": 2, "startedAt": 0, "configPath": config,
              "socketPath": path, "servers": []}
    conn.sendall((json.dumps({"id": req.get("id"), "ok": True, "result": result}) + "\\n").encode())
    conn.close()
"""


def test_status_exits_3_when_not_running_and_names_a_foreign_daemon(h):
    assert h.run("status").rc == 3
    assert call_ok(h, "demo.counter") == "1"
    r = h.run("status")
    assert r.rc == 0 and r.out.startswith("running (pid"), r
    h.run("stop").ok()
    assert h.run("status", "--json").rc == 3
    script = h.tmp / "foreign.py"
    script.write_text(FOREIGN_DAEMON)
    foreign = h.popen_argv([sys.executable, script, h.socket_path, h.cfg], h.env())
    wait_until(lambda: "ready" in read_file(foreign.out_path), 10, message="the foreign daemon to listen")
    r = h.run("status")
    assert r.rc == 3, r
    assert "a daemon that is not ours (mcporter's daemon, pid" in r.out and str(foreign.pid) in r.out, r
    data = json.loads(h.run("status", "--json").out)
    assert data["running"] is False and str(foreign.pid) in data["foreignDaemon"], data
    foreign.kill()


# ##########################################################################################
# Real MCP servers and the real mcporter CLI (installed once, cached).
# ##########################################################################################


#
# The servers people actually run (npm's server-memory and server-everything,
# FastMCP servers of the `mcp` package's 1.x and 2.x lines) and mcporter itself
# are installed once into a cache directory and reused by later runs. They run
# as external processes; nothing from them is imported here. Where the machine
# cannot install them (no node/npm, no venv/pip, no registry) the tests skip
# with the reason, unless MCPORTER_DAEMON_TEST_REAL_SERVERS=require (CI), where
# that is a failure; MCPORTER_DAEMON_TEST_REAL_SERVERS=off skips them without a try.
REAL_SERVERS_VAR = "MCPORTER_DAEMON_TEST_REAL_SERVERS"


REAL_CACHE_VAR = "MCPORTER_DAEMON_TEST_CACHE"


INSTALL_TIMEOUT = 600.0


MCPORTER_VERSION = "0.12.3"  # the mcporter release the tests compare against


# Runs a command in a session of its own, so a timed-out install can be ended
# with everything it started (one process group), not just its first process.
_SETSID_EXEC = "import os, sys; os.setsid(); os.execvp(sys.argv[1], sys.argv[1:])"


# A stdio server that writes a line of junk on stdout before the handshake,
# then becomes the real server (same pid) — as servers that print a banner do.
JUNK_STDOUT_WRAPPER = (
    "import os, sys\n"
    "sys.stdout.write('server banner on stdout, not JSON\\n')\n"
    "sys.stdout.flush()\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


JUNK_LINE = "server banner on stdout, not JSON"


# A FastMCP server for either SDK line: state in the process, server-to-client
# requests mid-call (elicitation, sampling, roots), a junk stdout line at
# start-up with --junk, and a tool list longer than one would page (FastMCP
# itself never paginates; see PAGED_SERVER for an SDK server that does).
FASTMCP_SERVER = '''\
import json
import os
import sys
from typing import List, Literal, Optional

try:  # mcp 1.x
    from mcp.server.fastmcp import Context, FastMCP
except ImportError:  # mcp 2.x renamed FastMCP to MCPServer
    from mcp.server.mcpserver import Context
    from mcp.server.mcpserver import MCPServer as FastMCP
from mcp.types import SamplingMessage, TextContent
from pydantic import BaseModel

if "--junk" in sys.argv:
    print("fastmcp junk: not JSON, printed before the handshake", flush=True)

mcp = FastMCP("fastmcp-test")
state = {"n": 0}


@mcp.tool()
def counter() -> str:
    """Count calls: the state lives in this process."""
    state["n"] += 1
    return str(state["n"])


@mcp.tool()
def pid() -> str:
    """This server's process id."""
    return str(os.getpid())


class Colour(BaseModel):
    colour: str


@mcp.tool()
def typed(
    text: str,
    count: int,
    ratio: float,
    flag: bool,
    tags: List[str],
    mode: Literal["fast", "slow"],
    note: Optional[str] = None,
) -> str:
    """Echo each argument with the Python type it arrived as (typed schema from pydantic)."""
    got = dict(text=text, count=count, ratio=ratio, flag=flag, tags=tags, mode=mode, note=note)
    return json.dumps({k: [type(v).__name__, v] for k, v in got.items()})


@mcp.tool()
async def ask(ctx: Context) -> str:
    """Ask the client for input mid-call (elicitation/create)."""
    result = await ctx.elicit(message="Pick a colour", schema=Colour)
    return "elicitation: " + result.action


@mcp.tool()
async def sample(ctx: Context) -> str:
    """Ask the client's model mid-call (sampling/createMessage)."""
    try:
        await ctx.session.create_message(
            messages=[SamplingMessage(role="user", content=TextContent(type="text", text="hi"))],
            max_tokens=5,
        )
    except Exception as exc:
        return "sampling refused: " + str(exc)
    return "sampling answered"


@mcp.tool()
async def roots(ctx: Context) -> str:
    """Ask the client for its roots mid-call (roots/list)."""
    try:
        await ctx.session.list_roots()
    except Exception as exc:
        return "roots refused: " + str(exc)
    return "roots answered"


def _filler(i):
    def tool() -> str:
        return str(i)

    return tool


for i in range(60):
    mcp.add_tool(_filler(i), name="filler_%02d" % i, description="filler tool %d" % i)

mcp.run()
'''


FASTMCP_TOOLS = ["counter", "pid", "ask", "sample", "roots", "typed"] + [f"filler_{i:02d}" for i in range(60)]


# An SDK low-level server that pages tools/list and resources/list (3 a page),
# written against each line's public low-level API.
PAGED_SERVER = """\
import anyio
import mcp.types as types
from mcp.server.lowlevel import Server
from mcp.server.stdio import stdio_server

PAGE = 3
NAMES = ["paged_%02d" % i for i in range(10)]
SCHEMA = {"type": "object", "properties": {}}


def page(cursor):
    start = int(cursor or 0)
    end = start + PAGE
    return NAMES[start:end], (str(end) if end < len(NAMES) else None)


def tools_page(cursor):
    names, nxt = page(cursor)
    tools = [types.Tool(name=n, description="paged tool " + n, inputSchema=SCHEMA) for n in names]
    return types.ListToolsResult(tools=tools, nextCursor=nxt)


def resources_page(cursor):
    names, nxt = page(cursor)
    resources = [types.Resource(uri="paged://item/" + n, name=n) for n in names]
    return types.ListResourcesResult(resources=resources, nextCursor=nxt)


def called(name):
    return [types.TextContent(type="text", text="called " + name)]


if hasattr(Server, "list_tools"):  # mcp 1.x: handlers by decorator
    server = Server("paged")

    @server.list_tools()
    async def list_tools(req: types.ListToolsRequest) -> types.ListToolsResult:
        return tools_page(req.params.cursor if req.params else None)

    @server.list_resources()
    async def list_resources(req: types.ListResourcesRequest) -> types.ListResourcesResult:
        return resources_page(req.params.cursor if req.params else None)

    @server.call_tool()
    async def call_tool(name, arguments):
        return called(name)

else:  # mcp 2.x: handlers passed to the constructor

    async def on_list_tools(ctx, params):
        return tools_page(params.cursor if params else None)

    async def on_list_resources(ctx, params):
        return resources_page(params.cursor if params else None)

    async def on_call_tool(ctx, params):
        return types.CallToolResult(content=called(params.name))

    server = Server(
        "paged", on_list_tools=on_list_tools, on_list_resources=on_list_resources, on_call_tool=on_call_tool
    )


async def main():
    async with stdio_server() as (read, write):
        await server.run(read, write, server.create_initialization_options())


anyio.run(main)
"""


PAGED_NAMES = [f"paged_{i:02d}" for i in range(10)]


def real_cache_dir():
    configured = os.environ.get(REAL_CACHE_VAR)
    if configured:
        return Path(configured).expanduser().resolve()
    return Path.home() / ".cache" / "mcporter-daemon-tests"


def real_unavailable(reason):
    """Skip with ``reason``, or fail when the real servers are required (CI)."""
    if os.environ.get(REAL_SERVERS_VAR) == "require":
        pytest.fail(f"{REAL_SERVERS_VAR}=require, but: {reason}", pytrace=False)
    pytest.skip(reason)


def run_install(what, argv, cwd, timeout=INSTALL_TIMEOUT):
    """Run one install step in a session of its own; None on success, else one line saying why."""
    env = dict(os.environ, npm_config_update_notifier="false", PIP_DISABLE_PIP_VERSION_CHECK="1")
    args = [sys.executable, "-c", _SETSID_EXEC] + [str(a) for a in argv]
    p = spawn(args, env, cwd, subprocess.PIPE, subprocess.STDOUT)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        return f"{what} did not finish within {timeout:g}s"
    if p.returncode != 0:
        lines = out.decode("utf-8", "replace").strip().splitlines()
        return f"{what} failed (exit {p.returncode}): {' | '.join(lines[-4:])}"
    return None


def npm_installer(npm, packages):
    """How ``cached_install`` puts npm ``packages`` (name@version specs) into its folder."""

    def install(dest):
        return run_install(
            "npm install " + " ".join(packages),
            [npm, "install", "--prefix", dest, "--no-audit", "--no-fund", "--loglevel=error", *packages],
            dest,
        )

    return install


def cached_install(name, install, check):
    """Install into ``<cache>/<name>`` once, under a lock shared by concurrent test runs.

    ``install(dest)`` returns None or an error line; ``check(dest)`` returns the
    installed versions (a dict) or None when the install is unusable. A folder
    without its completion marker (an interrupted install) is redone.
    ``MCPORTER_DAEMON_TEST_REAL_SERVERS=off`` skips these tests without fetching anything.
    """
    if os.environ.get(REAL_SERVERS_VAR) == "off":
        pytest.skip(f"{REAL_SERVERS_VAR}=off: real servers and mcporter are not fetched")
    cache = real_cache_dir()
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        real_unavailable(f"cannot create the test cache {cache}: {exc}")
    dest = cache / name
    marker = dest / ".mcporter-daemon-tests-installed.json"
    with open(str(cache / f".{name}.lock"), "a+") as lock:
        deadline = time.monotonic() + 2 * INSTALL_TIMEOUT
        while True:
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    real_unavailable(f"another run kept {cache / name} locked too long")
                time.sleep(0.2)
        if marker.exists():
            versions = check(dest)
            if versions:
                return versions
        shutil.rmtree(str(dest), ignore_errors=True)
        dest.mkdir(parents=True)
        error = install(dest)
        if error:
            real_unavailable(error)
        versions = check(dest)
        if not versions:
            real_unavailable(f"{name}: installed into {dest}, but it does not run")
        marker.write_text(json.dumps(versions))
        return versions


def npm_package_version(prefix, package):
    try:
        data = json.loads((prefix / "node_modules" / package / "package.json").read_text())
    except (OSError, ValueError):
        return None
    return data.get("version")


def require_node():
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        real_unavailable("node and npm are needed for the npm MCP servers and mcporter (not on PATH)")
    return node, npm


@pytest.fixture(scope="session")
def npm_servers():
    """@modelcontextprotocol/server-memory and server-everything, from npm."""
    node, npm = require_node()
    packages = ["@modelcontextprotocol/server-memory", "@modelcontextprotocol/server-everything"]

    def check(dest):
        versions = {p: npm_package_version(dest, p) for p in packages}
        return versions if all(versions.values()) else None

    versions = cached_install("npm", npm_installer(npm, packages), check)
    prefix = real_cache_dir() / "npm"
    pkg = prefix / "node_modules" / "@modelcontextprotocol"
    return types.SimpleNamespace(
        node=node,
        npx=shutil.which("npx") or "npx",
        prefix=prefix,
        everything_js=pkg / "server-everything" / "dist" / "index.js",
        everything_docs=pkg / "server-everything" / "dist" / "docs",
        versions=versions,
    )


@pytest.fixture(scope="session")
def mcporter_cli():
    """The mcporter CLI from npm (the TypeScript original), run with node; pinned, so a new
    release cannot change what these tests compare against."""
    node, npm = require_node()
    package = f"mcporter@{MCPORTER_VERSION}"

    def check(dest):
        cli = dest / "node_modules" / "mcporter" / "dist" / "cli.js"
        version = npm_package_version(dest, "mcporter")
        try:
            out = subprocess.run([node, str(cli), "--version"], capture_output=True, text=True, timeout=60)
            node_version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if version != MCPORTER_VERSION or version not in out.stdout:
            return None  # a cache of another release is installed again
        return {"mcporter": version, "node": node_version.stdout.strip()}

    versions = cached_install("mcporter", npm_installer(npm, [package]), check)
    cli = real_cache_dir() / "mcporter" / "node_modules" / "mcporter" / "dist" / "cli.js"
    return types.SimpleNamespace(argv=[node, str(cli)], versions=versions)


def venv_base_python():
    """An interpreter for the SDK venvs: `mcp` needs Python 3.10+, while this suite also runs on 3.9."""
    names = ("python3", "python3.13", "python3.12", "python3.11", "python3.10")
    for candidate in [sys.executable] + [shutil.which(n) for n in names]:
        if not candidate:
            continue
        try:
            out = subprocess.run(
                [candidate, "-c", "import sys, venv; print(sys.version_info >= (3, 10))"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.stdout.strip() == "True":
            return candidate
    return None


@pytest.fixture(scope="session", params=["1", "2"], ids=["mcp1", "mcp2"])
def mcp_sdk(request):
    """A venv holding the newest `mcp` of one major line (1.x or 2.x), from PyPI."""
    line = request.param
    spec = "mcp<2" if line == "1" else "mcp>=2,<3"

    base = venv_base_python()
    if base is None:
        real_unavailable("the mcp SDK needs Python 3.10+ with venv; none found (sys.executable, python3)")

    def install(dest):
        error = run_install(f"{base} -m venv", [base, "-m", "venv", dest], dest, timeout=120)
        if error:
            return error
        return run_install(
            f"pip install '{spec}'", [dest / "bin" / "python", "-m", "pip", "install", "-q", spec], dest
        )

    def check(dest):
        code = "import importlib.metadata as m, mcp.server; print(m.version('mcp'))"
        try:
            out = subprocess.run(
                [str(dest / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=60
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        version = out.stdout.strip()
        return {"mcp": version} if out.returncode == 0 and version.startswith(line + ".") else None

    versions = cached_install(f"mcp{line}", install, check)
    return types.SimpleNamespace(
        line=line, python=str(real_cache_dir() / f"mcp{line}" / "bin" / "python"), versions=versions
    )


# -- helpers for real servers --


def real_call(h, *args, **kw):
    """`call` that must succeed quickly: a server request left unanswered would hang it."""
    r = h.run("call", *args, timeout=kw.pop("timeout", 60))
    assert r.rc == 0, r
    return r


def list_json(h, server, schema=False):
    """The tools of ``list SERVER --json`` (mcporter's object, schemas always included)."""
    r = h.run("list", server, "--json", *(["--schema"] if schema else []))
    assert r.rc == 0, r
    data = json.loads(r.out)
    assert data["mode"] == "server" and data["name"] == server and data["status"] == "ok", data
    assert all("inputSchema" in t for t in data["tools"]), data
    return data["tools"]


def daemon_log_text(h):
    try:
        return h.path("log").read_text(errors="replace")
    except OSError:
        return ""


def processes_of_test(h):
    """Every live process that inherited this test's environment marker:
    daemons, MCP servers and whatever they spawned (npx's sh and node, say)."""
    found = procs_with_env_marker(h.tag)
    for pid in found:
        h.track(pid)
    return found


def describe_pids(pids):
    return [f"{pid} {' '.join(proc_cmdline(pid))[:160]}" for pid in sorted(pids)]


def wait_no_processes_left(h, timeout):
    try:
        wait_until(lambda: not processes_of_test(h), timeout, message="this test's processes to exit")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; still running: {describe_pids(processes_of_test(h))}") from None


def assert_stop_leaves_nothing(h):
    """`stop` ends the daemon and every process under it, and removes its socket and metadata."""
    st = running_status(h)
    daemon = st["pid"]
    servers = [s["pid"] for s in st["servers"] if s.get("pid")]
    before = processes_of_test(h)
    assert daemon in before, describe_pids(before)
    r = h.run("stop")
    assert r.rc == 0, r
    assert not pid_alive(daemon), f"daemon {daemon} still running after stop"
    for pid in servers:
        assert not pid_alive(pid), f"MCP server {pid} still running after stop: {describe_pids([pid])}"
    # Grandchildren (npx's sh and node) go with their parents, a moment later at most.
    wait_no_processes_left(h, 5)
    assert not Path(st["socketPath"]).exists()
    assert not Path(st["metadataPath"]).exists()
    assert h.status()["running"] is False
    h.expect_no_leftovers = True


def fastmcp_entry(h, sdk, script_text, *args):
    name = f"server_mcp{sdk.line}_{uuid.uuid4().hex[:6]}"
    return h.script_server(script_text, *args, python=sdk.python, name=name)


# -- npm: @modelcontextprotocol/server-memory --


def test_real_memory_server_keeps_its_graph_across_cli_calls(h, npm_servers):
    # Launched the way configs usually do it: npx, which runs npm → sh → node.
    memory = {
        "command": npm_servers.npx,
        "args": ["--prefix", str(npm_servers.prefix), "--no", "mcp-server-memory", h.tag],
        "env": {"MEMORY_FILE_PATH": str(h.tmp / "memory.jsonl")},
        "lifecycle": "keep-alive",
    }
    h.write_config({"mcpServers": {"memory": memory}})

    r = h.run("list", "memory")
    assert r.rc == 0, r
    assert "memory.create_entities(entities: object[])" in r.out, r
    assert "memory.read_graph()" in r.out, r
    tools = list_json(h, "memory")
    names = [t["name"] for t in tools]
    assert {"create_entities", "read_graph", "search_nodes"} <= set(names), names
    schemas = {t["name"]: t for t in list_json(h, "memory", schema=True)}
    assert "entities" in schemas["create_entities"]["inputSchema"]["properties"], schemas["create_entities"]

    entity = "Entity-" + uuid.uuid4().hex[:8]
    args = {"entities": [{"name": entity, "entityType": "test", "observations": ["kept warm"]}]}
    real_call(h, "memory.create_entities", "--args", json.dumps(args))
    first = running_status(h)
    server = server_pid(first, "memory")
    assert server and pid_alive(server), first

    # Another CLI process sees the entity, served by the same daemon and server process.
    r = real_call(h, "memory.read_graph")
    assert entity in r.out and "kept warm" in r.out, r
    r = real_call(h, "memory.search_nodes", f"query={entity}", "--json")
    assert entity in json.dumps(json.loads(r.out)), r
    second = running_status(h)
    assert second["pid"] == first["pid"]
    assert server_pid(second, "memory") == server
    # Its stderr chatter is drained into the daemon log.
    assert "Knowledge Graph MCP Server running on stdio" in daemon_log_text(h)

    assert_stop_leaves_nothing(h)


# -- npm: @modelcontextprotocol/server-everything --


def test_real_everything_server_tools_resources_and_junk_stdout(h, npm_servers):
    everything = {
        "command": sys.executable,
        "args": ["-c", JUNK_STDOUT_WRAPPER, npm_servers.node, str(npm_servers.everything_js), "stdio", h.tag],
        "lifecycle": "keep-alive",
    }
    h.write_config({"mcpServers": {"everything": everything}})

    r = real_call(h, "everything.echo", "message=hello real server")
    assert r.out.strip() == "Echo: hello real server", r
    server = server_pid(running_status(h), "everything")
    assert server and pid_alive(server)
    # The junk line came first on stdout and was skipped; the handshake went on.
    assert JUNK_LINE in daemon_log_text(h)

    tools = {t["name"]: t for t in list_json(h, "everything", schema=True)}
    assert "echo" in tools, sorted(tools)
    assert tools["echo"]["inputSchema"]["required"] == ["message"], tools["echo"]
    add = "get-sum" if "get-sum" in tools else "add"  # renamed in 2026 releases
    assert add in tools, sorted(tools)
    r = real_call(h, f"everything.{add}", "a=2", "b=3")
    assert "5" in r.out, r
    r = h.run("list", "everything")
    assert r.rc == 0 and "everything.echo(message: string)" in r.out, r

    # Every resource it has (one per file in its docs folder), across however many pages.
    r = h.run("resources", "everything", "--json")
    assert r.rc == 0, r
    uris = sorted(res["uri"] for res in json.loads(r.out))
    docs = sorted(
        f"demo://resource/static/document/{p.name}"
        for p in npm_servers.everything_docs.iterdir()
        if p.is_file()
    )
    assert docs and uris == docs
    r = h.run("resources", "everything", docs[0])
    assert r.rc == 0 and r.out.strip(), r

    # Still the same server process: state kept across all those CLI processes.
    assert server_pid(running_status(h), "everything") == server
    assert_stop_leaves_nothing(h)


def everything_entry(h, npm_servers):
    """server-everything run by node directly (tagged), kept alive."""
    return {
        "command": npm_servers.node,
        "args": [str(npm_servers.everything_js), "stdio", h.tag],
        "lifecycle": "keep-alive",
    }


def test_real_everything_server_typed_arguments_links_and_images(h, npm_servers):
    h.write_config({"mcpServers": {"everything": everything_entry(h, npm_servers)}})
    # `message` is a string: 123 goes as written, as mcporter sends it.
    assert real_call(h, "everything.echo", "message=123").out.strip() == "Echo: 123"
    # `count` is a number: parsed. Each link prints as its URI (with its name).
    result = json.loads(real_call(h, "everything.get-resource-links", "count=3", "--json").out)
    links = [b for b in result["content"] if b["type"] == "resource_link"]
    assert len(links) == 3, result
    lines = real_call(h, "everything.get-resource-links", "count=3").out.splitlines()
    for link in links:
        assert f"{link['uri']} ({link['name']})" in lines, (link, lines)
    r = h.run("call", "everything.get-resource-links", "count=many")
    assert r.rc == 2 and "'count'" in r.err and "number" in r.err, r
    # The image is written to a file whose path is printed; its bytes are the decoded data.
    blocks = json.loads(real_call(h, "everything.get-tiny-image", "--json").out)["content"]
    data = base64.b64decode([b for b in blocks if b["type"] == "image"][0]["data"])
    shots = h.tmp / "shots"
    lines = real_call(h, "everything.get-tiny-image", "--save-images", shots).out.splitlines()
    saved = [Path(ln) for ln in lines if ln.startswith(str(shots))]
    assert [p.name for p in saved] == ["get-tiny-image-1.png"], lines
    assert saved[0].read_bytes() == data and data.startswith(PNG_MAGIC)
    assert "[image image/png, " not in "\n".join(lines)
    r = real_call(h, "everything.get-tiny-image")
    assert f"[image image/png, {len(data)} bytes]" in r.out.splitlines(), r
    assert_stop_leaves_nothing(h)


def test_real_everything_long_running_operation_shows_progress_on_a_tty(h, npm_servers):
    h.write_config({"mcpServers": {"everything": everything_entry(h, npm_servers)}})
    tools = {t["name"]: t for t in list_json(h, "everything", schema=True)}
    assert "trigger-long-running-operation" in tools, sorted(tools)
    assert {"duration", "steps"} <= set(tools["trigger-long-running-operation"]["inputSchema"]["properties"])
    rc, out, term = run_with_pty_stderr(
        h, "call", "everything.trigger-long-running-operation", "duration=2", "steps=4"
    )
    assert rc == 0 and "Long running operation completed" in out, (rc, out, term)
    drawn = progress_lines(term)
    # It reports each step only for a request that carries a progressToken.
    assert "1/4 (25%)" in drawn and "2/4 (50%)" in drawn, repr(term)
    assert term.endswith(CLEAR_LINE) and "\n" not in term, repr(term)
    assert_stop_leaves_nothing(h)


def test_real_everything_server_prompts_templates_and_pings(h, npm_servers):
    everything = dict(
        everything_entry(h, npm_servers), lifecycle={"mode": "keep-alive", "healthCheckMs": 300}
    )
    h.write_config({"mcpServers": {"everything": everything}})
    r = h.run("prompts", "everything", timeout=60)
    assert r.rc == 0, r
    lines = r.out.splitlines()
    assert "simple-prompt() — A prompt with no arguments" in lines, lines
    args_prompt = [ln for ln in lines if ln.startswith("args-prompt(")]
    assert args_prompt and args_prompt[0].startswith("args-prompt(city, state?)"), lines
    assert "    city (required): Name of the city" in lines, lines
    r = h.run("prompts", "everything", "args-prompt", "city=Paris", "state=Texas")
    assert r.rc == 0 and r.out.strip() == "user: What's weather in Paris, Texas?", r
    # A blob resource in a message is named, not dumped.
    r = h.run("prompts", "everything", "resource-prompt", "resourceType=Blob", "resourceId=2")
    assert r.rc == 0, r
    out = r.out.strip().splitlines()
    assert re.fullmatch(r"user: \[blob demo://resource/dynamic/blob/2 \S+, \d+ bytes\]", out[-1]), out
    got = json.loads(h.run("prompts", "everything", "simple-prompt", "--json").out)
    assert got["messages"][0]["content"]["text"] == "This is a simple prompt without arguments.", got

    r = h.run("resources", "everything", "--templates", "--json")
    assert r.rc == 0, r
    uris = {t["uriTemplate"] for t in json.loads(r.out)}
    assert {
        "demo://resource/dynamic/text/{resourceId}",
        "demo://resource/dynamic/blob/{resourceId}",
    } <= uris, uris
    r = h.run("resources", "everything", "--templates")
    assert (
        r.rc == 0 and "demo://resource/dynamic/text/{resourceId}  Dynamic Text Resource (text/plain)" in r.out
    ), r
    r = h.run("resources", "everything", "demo://resource/dynamic/text/3")
    assert r.rc == 0 and r.out.strip(), r

    server = server_pid(running_status(h), "everything")
    used = server_status(h, "everything")["lastUsedAt"]
    wait_until(
        lambda: (server_status(h, "everything")["health"]["lastPingAt"] or 0) > used,
        10,
        interval=0.05,
        message="a ping of the idle real server",
    )
    health = server_status(h, "everything")["health"]
    assert health["lastPingOk"] is True and health["restarts"] == 0, health
    assert server_pid(running_status(h), "everything") == server
    assert_stop_leaves_nothing(h)


# -- PyPI: FastMCP servers of mcp 1.x and 2.x --


def test_real_fastmcp_server_state_requests_and_junk(h, mcp_sdk):
    h.write_config({"mcpServers": {"fast": fastmcp_entry(h, mcp_sdk, FASTMCP_SERVER, "--junk")}})

    assert real_call(h, "fast.counter").out.strip() == "1"
    assert real_call(h, "fast.counter").out.strip() == "2"
    pid = int(real_call(h, "fast.pid").out)
    assert server_pid(running_status(h), "fast") == pid
    assert "fastmcp junk: not JSON" in daemon_log_text(h)

    # Server-to-client requests mid-call are answered at once, so calls never hang.
    r = real_call(h, "fast.ask", timeout=30)
    assert r.out.strip() == "elicitation: decline", r
    assert "[mcporter]" in r.err and "declined" in r.err, r
    assert r.elapsed < 10, r
    r = real_call(h, "fast.sample", timeout=30)
    assert r.out.startswith("sampling refused:"), r
    assert r.elapsed < 10, r
    r = real_call(h, "fast.roots", timeout=30)
    assert r.out.startswith("roots refused:"), r
    assert r.elapsed < 10, r
    # ... and the server carried on with its state.
    assert real_call(h, "fast.counter").out.strip() == "3"

    r = h.run("list", "fast")
    assert r.rc == 0, r
    assert sorted(ln.split("(")[0] for ln in r.out.splitlines()) == sorted(f"fast.{n}" for n in FASTMCP_TOOLS)
    tools = list_json(h, "fast", schema=True)
    assert sorted(t["name"] for t in tools) == sorted(FASTMCP_TOOLS)
    assert all(t["inputSchema"]["type"] == "object" for t in tools), tools

    # Arguments typed by the pydantic schema: a str property takes "123" as written, the others
    # are parsed; an enum value outside its list and an unparsable number are usage errors.
    r = real_call(h, "fast.typed", "text=123", "count=7", "ratio=0.5", "flag=true", 'tags=["a"]', "mode=fast")
    got = json.loads(r.out)
    assert got["text"] == ["str", "123"] and got["count"] == ["int", 7] and got["ratio"] == ["float", 0.5], (
        got
    )
    assert (
        got["flag"] == ["bool", True] and got["tags"] == ["list", ["a"]] and got["mode"] == ["str", "fast"]
    ), got
    assert json.loads(
        real_call(
            h, "fast.typed", "text=x", "count=1", "ratio=1", "flag=false", "tags=[]", "mode=slow", "note=007"
        ).out
    )["note"] == ["str", "007"]
    for bad, named in (("mode=medium", "fast"), ("count=seven", "count")):
        args = {
            "text": "text=x",
            "count": "count=1",
            "ratio": "ratio=1",
            "flag": "flag=true",
            "tags": "tags=[]",
        }
        args["mode"] = "mode=slow"
        args[bad.split("=")[0]] = bad
        r = h.run("call", "fast.typed", *args.values())
        assert r.rc == 2 and named in r.err and len(r.err.strip().splitlines()) == 1, r

    st = running_status(h)
    assert server_pid(st, "fast") == pid
    assert_stop_leaves_nothing(h)


def test_real_sdk_server_paginated_lists_are_followed(h, mcp_sdk):
    h.write_config({"mcpServers": {"paged": fastmcp_entry(h, mcp_sdk, PAGED_SERVER)}})

    # The server sends 3 a page with nextCursor; all 10 arrive, in order.
    assert [t["name"] for t in list_json(h, "paged")] == PAGED_NAMES
    r = h.run("resources", "paged", "--json")
    assert r.rc == 0, r
    assert [res["uri"] for res in json.loads(r.out)] == [f"paged://item/{n}" for n in PAGED_NAMES]
    assert real_call(h, "paged.paged_09").out.strip() == "called paged_09"
    assert_stop_leaves_nothing(h)


# -- interop with mcporter itself --


def mcporter_style_request(path, request, timeout=15.0):
    """Send ``request`` as mcporter 0.12's client does: compact JSON, no newline, no
    half-close, then read until the daemon closes. Returns (seconds, raw bytes)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(str(path))
        started = time.monotonic()
        s.sendall(json.dumps(request, separators=(",", ":")).encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return time.monotonic() - started, data
            data += chunk
    finally:
        s.close()


def test_mcporter_style_request_is_answered_at_once(h):
    """Runs without node: the framing of mcporter's client, against our daemon."""
    assert call_ok(h, "demo.counter") == "1"
    st = running_status(h)
    elapsed, data = mcporter_style_request(h.socket_path, {"id": "m-1", "method": "status", "params": {}})
    response = json.loads(data)  # exactly one JSON object, nothing else before the close
    assert response["id"] == "m-1" and response["ok"] is True, response
    assert response["result"]["pid"] == st["pid"]
    assert response["result"]["socketPath"] == str(h.socket_path)
    # No protocolVersion: no progress frames even for a call, just the one answer.
    params = {"server": "demo", "tool": "counter", "args": {}}
    call_elapsed, data = mcporter_style_request(
        h.socket_path, {"id": "m-2", "method": "callTool", "params": params}
    )
    response = json.loads(data)
    assert response["ok"] is True and response["result"]["content"][0]["text"] == "2", response
    assert elapsed < 2 and call_elapsed < 2, (
        f"answers took {elapsed:.1f}s and {call_elapsed:.1f}s: the daemon waited for a newline "
        "or half-close that mcporter's client never sends"
    )


@pytest.fixture
def hx(tmp_path):
    """A harness whose daemon directory X/daemon is shared with mcporter.

    mcporter puts its files in ``$MCPORTER_DAEMON_DIR/daemon/``; this module in
    ``$MCPORTER_DAEMON_DIR`` itself. So with ours at X/daemon and mcporter at X,
    both use the same socket and metadata paths for one config file.
    """
    harness = Harness(tmp_path)
    shared = harness.state_dir
    harness.state_dir = shared / "daemon"
    harness.shared_dir = shared
    (harness.tmp / "home").mkdir(exist_ok=True)
    try:
        yield harness
    finally:
        try:
            harness.cleanup()
        finally:
            shutil.rmtree(str(shared), ignore_errors=True)


def mcporter_argv(h, cli):
    """mcporter with this test's config (its global --config first)."""
    return cli.argv + ["--config", str(h.cfg)]


def mcporter_env(h):
    """The harness environment with mcporter's daemon directory the shared one."""
    return h.env(MCPORTER_DAEMON_DIR=str(h.shared_dir), HOME=str(h.tmp / "home"))


def test_mcporter_cli_sees_and_stops_our_daemon(hx, mcporter_cli):
    h = hx
    assert call_ok(h, "demo.counter") == "1"
    st = running_status(h)
    daemon, server = st["pid"], server_pid(st, "demo")
    assert Path(st["socketPath"]) == h.socket_path  # X/daemon/daemon-<key>.sock, mcporter's path too

    status = h.run("daemon", "status", argv=mcporter_argv(h, mcporter_cli), env=mcporter_env(h), timeout=60)
    assert status.rc == 0, status
    assert f"Daemon pid {daemon} — socket: {h.socket_path}" in status.out, status
    assert "- demo: connected" in status.out, status

    stop = h.run("daemon", "stop", argv=mcporter_argv(h, mcporter_cli), env=mcporter_env(h), timeout=60)
    assert stop.rc == 0, stop
    assert "Daemon stopped" in stop.out, stop
    # mcporter does not wait; the daemon goes by itself, with its MCP server.
    wait_until(lambda: not pid_alive(daemon), 10, message=f"daemon {daemon} to exit")
    wait_until(lambda: not pid_alive(server), 5, message=f"MCP server {server} to exit")
    wait_no_processes_left(h, 5)
    assert not h.socket_path.exists()
    assert not h.meta_path.exists()
    assert h.status()["running"] is False
    r = h.run("daemon", "status", argv=mcporter_argv(h, mcporter_cli), env=mcporter_env(h), timeout=60)
    assert r.rc == 0 and "Daemon is not running." in r.out, r
    h.expect_no_leftovers = True
    # Each answer comes at once, not when the daemon's request-read deadline (10 s) runs out:
    # mcporter's client sends its request without a newline and never half-closes.
    for r in (status, stop):
        assert r.elapsed < 5, f"mcporter waited {r.elapsed:.1f}s for our daemon's answer: {r!r}"


def test_status_names_mcporters_own_daemon_and_exits_3(hx, mcporter_cli):
    """mcporter's daemon serving our socket is not ours: `status` says so, and exits 3."""
    h = hx
    r = h.run("daemon", "start", argv=mcporter_argv(h, mcporter_cli), env=mcporter_env(h), timeout=60)
    assert r.rc == 0 and "Daemon started" in r.out, r
    theirs = json.loads(h.meta_path.read_text())["pid"]
    h.track(theirs)
    try:
        r = h.run("status")
        assert r.rc == 3, r
        assert f"a daemon that is not ours (mcporter's daemon, pid {theirs}" in r.out, r
        data = json.loads(h.run("status", "--json").out)
        assert data["running"] is False and f"pid {theirs}" in data["foreignDaemon"], data
    finally:
        h.run("daemon", "stop", argv=mcporter_argv(h, mcporter_cli), env=mcporter_env(h), timeout=60)
    wait_until(lambda: not pid_alive(theirs), 10, message=f"mcporter's daemon {theirs} to exit")


def test_our_foreground_daemon_replaces_live_mcporter_daemon(hx, mcporter_cli):
    h = hx
    r = h.run("daemon", "start", argv=mcporter_argv(h, mcporter_cli), env=mcporter_env(h), timeout=60)
    assert r.rc == 0, r
    assert "Daemon started" in r.out, r
    theirs = json.loads(h.meta_path.read_text())["pid"]
    h.track(theirs)
    assert pid_alive(theirs)
    r = h.run("call", "demo.counter", argv=mcporter_argv(h, mcporter_cli), env=mcporter_env(h), timeout=60)
    assert r.rc == 0 and r.out.strip() == "1", r
    their_servers = h.server_pids()  # the demo server mcporter's daemon spawned
    assert their_servers and all(proc_stat(p).ppid == theirs for p in their_servers), describe_pids(
        their_servers
    )

    fg = h.popen("start", "--foreground")

    def ours_bound():
        meta = h.meta()
        return meta is not None and meta.get("pid") == fg.pid

    try:
        wait_until(ours_bound, 30, message=f"our daemon {fg.pid} to bind")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; its stderr: {read_file(fg.err_path)!r}") from None
    # Stop-before-rebind: the live mcporter daemon was stopped, not orphaned beside ours.
    assert not pid_alive(theirs), (
        f"mcporter daemon {theirs} left running beside ours: {describe_pids([theirs])}; "
        f"our daemon's log: {read_file(fg.err_path)!r}"
    )
    wait_until(
        lambda: not any(pid_alive(p) for p in their_servers),
        5,
        message=f"mcporter's MCP server {describe_pids(their_servers)} to exit",
    )
    assert call_ok(h, "demo.counter") == "1"
    assert running_status(h)["pid"] == fg.pid
    assert_one_daemon_tree(h, fg.pid)

    r = h.run("stop")
    assert r.rc == 0, r
    assert fg.wait(timeout=10) == 0, read_file(fg.err_path)
    wait_no_processes_left(h, 5)
    assert not h.socket_path.exists()
    assert not h.meta_path.exists()
    h.expect_no_leftovers = True


# ##########################################################################################
# Hostile peers: the worst process on the other side of each pipe, socket, file, clock and
# directory, played for real. Each test names the promise it defends.
# ##########################################################################################


# -- hostile MCP servers: nesting, closed stdout, stderr floods, batches, ignored pings --


def hostile_entry(h, name, mode="normal", **lifecycle):
    """The misbehaving server as a kept server ``name`` (``lifecycle`` keys: idleTimeoutMs,
    healthCheckMs); returns the file where it notes what it saw."""
    runs = h.tmp / f"runs-{name}"
    entry = misbehaving_entry(h, mode, runs=runs)
    if lifecycle:
        entry["lifecycle"] = dict(lifecycle, mode="keep-alive")
    return entry, Path(f"{runs}.events")


def noted(events, what):
    """How often the misbehaving server noted ``what`` (one event a line)."""
    try:
        return events.read_text().splitlines().count(what)
    except FileNotFoundError:
        return 0


def server_log_lines(h, name):
    return [ln for ln in log_lines(h.path("log")) if f"[{name}] " in ln]


def test_deeply_nested_stdout_line_is_skipped_and_the_reader_lives_on(h):
    """A line nested past the JSON parser's recursion limit raises RecursionError, not
    ValueError: it is logged and skipped like any junk, and the call is answered."""
    entry, _ = hostile_entry(h, "deep")
    h.configure({"deep": entry})
    server = int(call_ok(h, "deep.pid"))
    depths = {"depths": [100_000, 900]}
    r = h.run("call", "--timeout", "5s", "deep.nest", "--args", json.dumps(depths), timeout=30)
    assert r.rc == 0 and json.loads(r.out) == depths, r
    assert int(call_ok(h, "deep.pid")) == server, "the server was replaced"
    assert server_status(h, "deep")["connected"] is True
    skipped = [ln for ln in server_log_lines(h, "deep") if "skipped" in ln]
    assert skipped and len(skipped[0]) < 1000, server_log_lines(h, "deep")[-5:]


@pytest.mark.parametrize("when", ["during a call", "while idle"])
def test_server_that_closes_stdout_and_lives_on_is_ended_and_replaced(h, when):
    entry, events = hostile_entry(h, "mute")
    h.configure({"mute": entry})
    first = int(call_ok(h, "mute.pid"))
    if when == "during a call":
        r = h.run("call", "--timeout", "20s", "mute.close_stdout", timeout=40)
        one_error_line(r, 1, "server 'mute'", "closed its stdout")
        assert r.elapsed < 5, f"the call waited {r.elapsed:.1f}s for a server without stdout"
    else:
        assert call_ok(h, "mute.close_stdout_soon") == "{}"
    # It closes stdout after its answer is on the way: the caller may hear it first.
    wait_until(lambda: noted(events, "stdout closed") == 1, 5, message="the server to close its stdout")
    wait_until(lambda: not pid_alive(first), 5, message=f"server {first} without stdout to be ended")
    assert server_status(h, "mute")["connected"] is False
    second = int(call_ok(h, "mute.pid"))
    assert second != first
    assert call_ok(h, "demo.counter") == "1"


def test_stderr_without_newlines_is_split_capped_and_stamped(h):
    entry, _ = hostile_entry(h, "loud")
    h.configure({"loud": entry})
    call_ok(h, "loud.pid")
    daemon = running_status(h)["pid"]
    rss_before = vm_rss_kib(daemon)
    # A progress bar as tqdm draws it, then 32 MiB with no line break at all, then one line.
    for flood in ({"mib": 0.01, "piece": "progress 50%\r"}, {"mib": 32}, {"mib": 0, "piece": "\ndone\n"}):
        r = h.run("call", "loud.flood", "--args", json.dumps(flood), timeout=60)
        assert r.rc == 0, r

    def flood_logged():
        lines = server_log_lines(h, "loud")
        return any(ln.endswith("[loud] done") for ln in lines) and lines

    lines = wait_until(flood_logged, 10, message="the line after the flood in the log")
    grown = vm_rss_kib(daemon) - rss_before
    print(f"\ndaemon RSS {rss_before} KiB before, grew {grown} KiB over 32 MiB of newline-free stderr")
    for line in lines:
        m = LOG_STAMP.match(line)
        assert m and int(m.group(2)) == daemon, f"server stderr line without time and pid: {line[:200]}"
    assert sum(ln.endswith("[loud] progress 50%") for ln in lines) > 100, lines[:3]
    assert max(len(ln) for ln in lines) < 64 * 1024 + 200, "a stderr line was not capped"
    truncated = [ln for ln in lines if "truncated" in ln]
    assert len(truncated) == 1 and "x" * 60_000 in truncated[0], [ln[:200] for ln in lines[-4:]]
    assert grown < 16 * 1024, f"daemon RSS grew {grown} KiB over 32 MiB of stderr"
    assert pid_alive(daemon) and running_status(h)["pid"] == daemon


@pytest.mark.bench
def test_bench_daemon_rss_under_a_newline_free_stderr_flood(h):
    entry, _ = hostile_entry(h, "loud")
    h.configure({"loud": entry})
    call_ok(h, "loud.pid")
    daemon = running_status(h)["pid"]
    before = vm_rss_kib(daemon)
    t0 = time.monotonic()
    r = h.run("call", "--timeout", "120s", "loud.flood", "--args", json.dumps({"mib": 150}), timeout=150)
    assert r.rc == 0, r
    after = vm_rss_kib(daemon)
    print(
        f"\ndaemon RSS after 150 MiB of newline-free stderr: {before} KiB before, {after} KiB after "
        f"(+{after - before} KiB), {time.monotonic() - t0:.1f} s"
    )


def test_batched_answers_are_dispatched_element_by_element(h):
    entry, events = hostile_entry(h, "batch", "batch")
    h.configure({"batch": entry})
    r = h.run("call", "--timeout", "5s", "batch.echo", "text=in a batch", timeout=30)
    assert r.rc == 0 and json.loads(r.out) == {"text": "in a batch"}, r
    # The server's own ping inside a batch is answered, and its log notification logged.
    wait_until(lambda: noted(events, "pong") >= 2, 5, message="the server's batched ping answered")
    assert any(ln.endswith("[batch] (info) batched") for ln in server_log_lines(h, "batch"))
    assert call_ok(h, "batch.echo", "n=2") == '{"n": 2}'


def test_ping_is_evidence_only_for_a_server_that_has_answered_one(h):
    """A server that never answers ping is not restarted (its state would be lost every 40 s):
    status says ``ping unsupported`` and it is pinged no more. One whose answers come late is
    alive: a late answer breaks the run of misses."""
    timeout = _import_module()._PING_TIMEOUT
    mute, mute_events = hostile_entry(h, "mute", "ignore-ping", healthCheckMs=200)
    late, late_events = hostile_entry(h, "late", "late-ping", healthCheckMs=200)
    late["env"] = {"LATE_PING_S": str(timeout * 1.4)}
    h.configure({"mute": mute, "late": late})
    pids = {name: int(call_ok(h, f"{name}.pid")) for name in ("mute", "late")}

    def unsupported():
        s = server_status(h, "mute")
        return s["health"].get("pingUnsupported") and s

    s = wait_until(unsupported, timeout + 10, interval=0.1, message="mute to be marked ping unsupported")
    assert s["connected"] and s["pid"] == pids["mute"], s
    # Two late pings in a row would have restarted it by the time its fourth goes out.
    wait_until(lambda: noted(late_events, "ping") >= 4, 4 * timeout + 10, message="a fourth ping of late")
    for name in ("mute", "late"):
        s = server_status(h, name)
        assert s["pid"] == pids[name] and s["health"]["restarts"] == 0, s
        assert int(call_ok(h, f"{name}.pid")) == pids[name]
    assert noted(mute_events, "ping") == 1, "a server that never answered a ping was pinged again"
    line = [ln for ln in h.run("status", env=h.env()).ok().splitlines() if ln.startswith("  - mute:")]
    assert line and "ping unsupported" in line[0], line


def test_elicitation_notice_reaches_only_the_caller_it_belongs_to(h):
    entry, events = hostile_entry(h, "ask")
    h.configure({"ask": entry})
    # One call in flight: the question can only be its.
    r = h.run("call", "ask.ask", "question=Which branch?")
    assert r.rc == 0 and "asked for input (Which branch?)" in r.err, r

    def ask_beside_a_held_call(*pairs):
        held = noted(events, "held")
        holder = h.popen("call", "ask.hold")
        wait_until(lambda: noted(events, "held") > held, 10, message="the held call to reach the server")
        r = h.run("call", "ask.ask", *pairs)
        assert r.rc == 0, r
        assert holder.wait(timeout=20) == 0, read_file(holder.err_path)
        return r.err, read_file(holder.err_path)

    # Two in flight and nothing says whose question it is: nobody's; the log has it.
    asker, holder = ask_beside_a_held_call("question=What is your password?")
    assert "asked for input" not in asker and "asked for input" not in holder, (asker, holder)
    assert any("What is your password?" in ln for ln in log_lines(h.path("log")))
    # Two in flight, and the question names its request: only that caller sees it.
    for ref in ("token", "id"):
        asker, holder = ask_beside_a_held_call(f"ref={ref}", "question=Deploy now?")
        assert "asked for input (Deploy now?)" in asker and "Deploy" not in holder, (ref, asker, holder)


def test_result_whose_content_is_not_a_list_prints_something(h):
    entry, _ = hostile_entry(h, "odd")
    h.configure({"odd": entry})
    for result, shown in (
        ({"content": {"type": "text", "text": "one bare block"}}, "one bare block"),
        ({"content": "a bare string"}, "a bare string"),
        ({"content": {"rows": 3}}, '"rows": 3'),
        ({"content": 42}, "42"),
        ({"content": ["before", {"type": "text", "text": "after"}]}, ("before", "after")),
        ({"answer": "no content at all"}, '"answer": "no content at all"'),
    ):
        for output in ("text", "markdown"):
            r = h.run("call", "odd.raw", "--output", output, "--args", json.dumps({"result": result}))
            needles = shown if isinstance(shown, tuple) else (shown,)
            assert r.rc == 0 and all(n in r.out for n in needles) and r.err == "", (result, r)


# -- hostile clients and load: connection floods, the caps, slow readers --


class ConnectionFlood:
    """``n`` idle connections to a daemon, held open (as a crowd of stalled callers would),
    counted in the daemon's own fds so a test knows they are all accepted."""

    def __init__(self, sock, daemon, n):
        self.sock, self.daemon, self.n = sock, daemon, n
        self.conns = []

    def __enter__(self):
        for _ in range(self.n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(self.sock))
            self.conns.append(s)
        wait_until(
            lambda: len(socket_inodes(self.daemon)) > self.n,  # ours and its listener
            10,
            message=f"daemon {self.daemon} to accept all {self.n} flood connections",
        )
        return self

    def __exit__(self, *exc):
        for s in self.conns:
            s.close()
        self.conns = []
        # Until the daemon has let them go, the next flood could not count its own.
        wait_until(
            lambda: len(socket_inodes(self.daemon)) < self.n // 2 or not pid_alive(self.daemon),
            10,
            message=f"daemon {self.daemon} to let the flood connections go",
        )


def busy_error(frame):
    err = frame.get("error") or {}
    return frame.get("ok") is False and err.get("code") == "busy" and isinstance(err.get("message"), str)


def test_connection_flood_to_the_cap_never_kills_a_busy_daemon(h):
    """Busy is not hung: at its connection cap the daemon still answers `status` and `stop`,
    answers other work `busy` (never a silent close), and no caller's probe takes it for dead."""
    md = _import_module()
    daemon, server = warm_daemon(h)
    sock, ino = h.socket_path, socket_ino(h.socket_path)
    # A fresh flood for each check: the daemon drops an idle connection once its request-line
    # deadline passes, and the checks must each find it at the cap.
    with ConnectionFlood(sock, daemon, md._MAX_CONNECTIONS):
        fg = h.run("start", "--foreground", timeout=20)  # its probe must not take the busy daemon for dead
    with ConnectionFlood(sock, daemon, md._MAX_CONNECTIONS):
        resp, _, _ = raw_request(sock, "status", {}, idle=5.0)
        listing = {"id": "w1", "method": "listTools", "params": {"server": "demo"}}
        frames = send_raw_bytes(sock, (json.dumps(listing) + "\n").encode())
    assert resp.get("ok") is True and resp["result"]["pid"] == daemon, resp
    assert len(frames) == 1 and busy_error(frames[0]) and frames[0]["id"] == "w1", frames
    assert frames[0]["error"]["pid"] == daemon, frames
    with ConnectionFlood(sock, daemon, md._MAX_CONNECTIONS):
        st = h.status()
    assert st.get("running") is True and st["pid"] == daemon, st
    # Past the cap and the room kept for control requests too: `busy` at once, still never silence.
    with ConnectionFlood(sock, daemon, md._MAX_CONNECTIONS + md._MAX_OVERFLOW):
        status_request = {"id": "s", "method": "status", "params": {}, "protocolVersion": 2}
        beyond = md.exchange(str(sock), status_request, 5.0)  # its send may fail: answered first
    assert busy_error(beyond) and beyond["error"]["pid"] == daemon, beyond
    assert fg.rc == 0, fg
    assert f"daemon already running (pid {daemon}); not starting another" in fg.err, fg
    assert call_ok(h, "demo.counter") == "2", "the warm server lost its state"
    assert socket_ino(sock) == ino and server_pid(h.status()) == server
    assert_one_daemon_tree(h, daemon)


def test_call_during_a_flood_waits_for_room_and_stop_is_answered_at_the_cap(h):
    md = _import_module()
    daemon, server = warm_daemon(h)
    sock = h.socket_path
    flood = ConnectionFlood(sock, daemon, md._MAX_CONNECTIONS).__enter__()
    try:
        call = h.popen("call", "demo.counter")
        # The call is answered `busy` and tries again; it must still be waiting, not failed.
        time.sleep(0.5)  # the flood's duration: how long the crowd stalls, not a settle wait
        assert call.poll() is None, read_file(call.err_path)
    finally:
        flood.__exit__()
    wait_until(lambda: call.poll() is not None, 30, message="the call to finish once there is room")
    assert call.returncode == 0, read_file(call.err_path)
    assert read_file(call.out_path).strip() == "2"
    with ConnectionFlood(sock, daemon, md._MAX_CONNECTIONS):
        r = h.run("stop")
    assert r.rc == 0 and r.out.strip() == f"stopped (pid {daemon})", r
    assert not pid_alive(daemon) and not pid_alive(server)
    assert "shutting down: stop request" in h.path("log").read_text()


def test_memory_cap_answers_busy_and_still_reads_control_requests(h):
    """The half-read-request memory cap: past it, a large request gets `busy` (with the pid,
    so no prober takes it for a stranger or a hang); a small one — every `status` and `stop`,
    mcporter's newline-less framing included — is still read and answered."""
    md = _import_module()
    daemon, server = warm_daemon(h)
    sock = h.socket_path
    each = md._MAX_PENDING_BYTES // 3 + (1 << 20)  # three of them pass the cap; each under 32 MiB
    held, busy = [], []
    try:
        for i in range(3):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(sock))
            held.append(s)
            try:
                s.sendall(b'{"id": "big%d", "method": "status", "params": {"pad": "' % i + b"a" * each)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the daemon answered busy and stopped reading
        for s in held:
            s.settimeout(0.5)
            try:
                data = s.recv(65536)
            except socket.timeout:
                continue
            busy += [json.loads(line) for line in data.split(b"\n") if line.strip()]
        assert len(busy) == 1 and busy_error(busy[0]) and busy[0]["error"]["pid"] == daemon, busy
        took, raw = mcporter_style_request(sock, {"id": "m1", "method": "status", "params": {}})
        answer = json.loads(raw)
        assert answer.get("ok") is True and answer["result"]["pid"] == daemon, raw[:300]
    finally:
        for s in held:
            s.close()
    print(
        f"\n  past the {md._MAX_PENDING_BYTES >> 20} MiB cap: one busy answer; a newline-less status in {took:.3f}s"
    )
    assert call_ok(h, "demo.counter") == "2"
    assert server_pid(h.status()) == server
    assert_one_daemon_tree(h, daemon)


# -- hostile paths and users: other spellings, umask 000, another user's files --


def test_state_dir_spelled_through_a_symlink_is_one_daemon(h):
    """Warm state survives a path spelling: callers reaching the state dir through a symlink
    and directly, at once, share one daemon; none takes the other's for a stranger's."""
    holder = Path(tempfile.mkdtemp(prefix="mdl", dir="/tmp"))  # short: the socket path fits
    try:
        link = holder / "s"
        link.symlink_to(h.state_dir)
        envs = [h.env(), h.env(MCPORTER_DAEMON_DIR=str(link))]
        assert call_ok(h, "demo.counter") == "1"
        first = running_status(h)
        h.track(server_pid(first))

        def calls(i):
            return [h.run("call", "demo.counter", env=envs[(i + n) % 2]) for n in range(3)]

        with ThreadPoolExecutor(4) as pool:
            results = [r for batch in pool.map(calls, range(4)) for r in batch]
        for r in results:
            assert r.rc == 0, r
        counts = sorted(int(r.out.strip()) for r in results)
        assert counts == list(range(2, 14)), f"the counter restarted: {counts}"
        for env in envs:
            st = json.loads(h.run("status", "--json", env=env).ok())
            assert st["running"] and st["fresh"], st
            assert (st["pid"], server_pid(st)) == (first["pid"], server_pid(first)), st
            assert st["socketPath"] == first["socketPath"], st
        assert h.daemon_pids() == {first["pid"]}
        assert "stopped" in h.run("stop", env=envs[1]).ok()
        assert not pid_alive(first["pid"])
    finally:
        shutil.rmtree(str(holder), ignore_errors=True)


def test_directories_made_under_umask_000_are_private(h):
    """Every directory the tool creates is 0700 whatever the umask: here the default state dir
    and its parent ~/.mcporter (which also holds the home config, so a world-writable one
    would let any user plant a server command)."""
    home = Path(tempfile.mkdtemp(prefix="mdh", dir="/tmp"))  # short: the socket path fits
    try:
        env = h.env(HOME=str(home))
        env.pop("MCPORTER_DAEMON_DIR")
        env.pop("XDG_STATE_HOME", None)
        with _SPAWN_LOCK:
            p = subprocess.Popen(
                h.argv("call", "demo.counter"),
                env=env,
                cwd=str(h.tmp),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                preexec_fn=lambda: os.umask(0),
            )
            _POPENS.append(p)
        h.popens.append(p)
        h.track(p.pid)
        r = communicate_text(p, h.argv("call", "demo.counter"), CLI_TIMEOUT)
        assert r.rc == 0 and r.out.strip() == "1", r
        made = [home / ".mcporter", home / ".mcporter" / "pydaemon"]
        modes = {str(d): f"{stat.S_IMODE(d.stat().st_mode):04o}" for d in made}
        assert modes == {str(d): "0700" for d in made}, modes
        key_files = list((home / ".mcporter" / "pydaemon").glob("daemon-*.json"))
        assert len(key_files) == 1, key_files
        meta = json.loads(key_files[0].read_text())
        h.track(meta["pid"])
        assert "stopped" in h.run("stop", env=env).ok()
    finally:
        shutil.rmtree(str(home), ignore_errors=True)


@pytest.mark.parametrize("unsafe", ["other-owner", "mode-0777"])
def test_stop_and_status_refuse_an_unsafe_state_dir_before_reading_its_record(h, unsafe):
    """A record planted in a state dir that `call` refuses (another user's, or writable by
    others) names a bystander of ours with its true start time: `stop` and `status` refuse
    the directory in one line and the bystander is never signalled."""
    if unsafe == "other-owner":
        if os.getuid() != 0:
            pytest.skip("giving the state dir another owner needs root")
        os.chown(str(h.state_dir), NOBODY_UID, NOBODY_UID)
        needle = f"owned by uid {NOBODY_UID}"
    else:
        os.chmod(str(h.state_dir), 0o777)
        needle = "0777"
    bystander, sig_log, start = start_bystander(h)
    record = bystander_record(h, {"pid": bystander.pid, "pidStartTime": str(start)})
    h.meta_path.write_text(json.dumps(record))
    for words in (["stop"], ["status"], ["status", "--json"]):
        r = h.run(*words)
        assert_prompt_error(r, 2, str(h.state_dir), needle)
    assert bystander.poll() is None
    assert_bystander_untouched(bystander, sig_log, start)
    assert json.loads(h.meta_path.read_text()) == record, "the planted record was changed"


# -- hostile clocks and signals: clock steps, hangups, nohup --


def test_wall_clock_steps_neither_close_a_server_early_nor_stop_its_pings(h):
    """Idle close and pings measure with a monotonic clock: a +2 h step of the daemon's wall
    clock closes no server used a moment ago, and a -1 h step stops neither."""
    offset = h.tmp / "clock-offset"
    write_flag(offset, "0")
    idle_ms = 5000
    entry, events = hostile_entry(h, "s", idleTimeoutMs=idle_ms, healthCheckMs=200)
    h.configure({"s": entry})
    env = h.env(MCPORTER_DAEMON_TEST_CLOCK_FILE=offset)
    server = int(h.run("call", "s.pid", env=env).ok())

    write_flag(offset, str(2 * 3600))
    pings = noted(events, "ping")
    wait_until(
        lambda: noted(events, "ping") >= pings + 2 or not pid_alive(server),
        10,
        message="two pings after +2 h",
    )
    assert pid_alive(server), "a +2 h clock step closed a server used a moment ago"
    assert int(h.run("call", "s.pid", env=env).ok()) == server
    used = time.monotonic()

    write_flag(offset, str(-3600))
    pings = noted(events, "ping")
    wait_until(lambda: noted(events, "ping") > pings, 10, message="a ping after a -1 h step")
    wait_until(lambda: not pid_alive(server), idle_ms / 1000 + 5, message="the idle close after a -1 h step")
    closed_after = time.monotonic() - used
    assert closed_after > idle_ms / 1000 - 0.5, f"closed {closed_after:.1f}s after its last use"
    assert f"closing server 's' (pid {server}): idle" in read_file(h.path("log"))


# ##########################################################################################
# Chaos soak (python3 -m pytest -m chaos -s).
# ##########################################################################################


#
# K worker threads, each with its own seeded random stream, run random steps against one
# config and one state dir while a monitor thread samples /proc. Parameters:
#   MCPORTER_CHAOS_SEED          the seed (default: a new one, printed)
#   MCPORTER_CHAOS_STEPS         steps in all, shared among the workers (default 60)
#   MCPORTER_CHAOS_WORKERS       K (default 3)
#   MCPORTER_CHAOS_SETTLE_EVERY  steps between settle points (default 20)
#   MCPORTER_CHAOS_KINDS         comma-separated step kinds to draw from (default all), to
#                                minimise a failing run
#
# Each worker draws exactly two numbers per step (its kind and one parameter u in [0, 1)),
# so its sequence of steps replays exactly from the seed; the interleaving of the workers'
# steps, and so what a step finds (which pid it kills), does not.
#
# Invariants (README, "Invariants"), from /proc and sock_diag, checked after every step and every
# 0.1 s by a monitor thread; each is a violation once seen continuously for longer than its tolerance:
#   two-servers           two live copies of the MCP server (one copy)  > 0.5 s (7 s *)
#   two-serving-daemons   two daemons of this config listening on the path name > 7 s
#   unreachable-daemon    the one listening daemon is not where the path leads  > 7 s
#   orphan-server         an MCP server whose parent is no daemon of this config > 3 s
#   daemon-not-serving    a daemon process that neither serves nor exits        > 30 s
#   (* when one copy is run by a daemon that a step cut off from its path or SIGSTOPped: a
#   successor that cannot see it, its metadata damaged too, binds beside it, and it ends its
#   servers only when it notices: no socket, no daemon)
# A daemon *serves* while it holds a listening socket bound to the path's name; one that has
# closed its listener to stop does not. Per step: no stuck caller (a CLI step over 30 s), no
# crash (an "unexpected error" or traceback), `status` exits 0, `start`/`stop`/`restart` exit
# 0 unless a signal ended the daemon they launched or another step's `stop` stopped it first
# (calls may fail: a step may kill their server or daemon, or stop it, under them), `stop`
# is a barrier (the daemon it stopped is gone when it returns), a
# `start --foreground` exits 0 unless a signal ended it, a process that damaged metadata
# names with a wrong start time is never signalled, and per MCP server lifetime (pid + start
# time) the demo counter rises: a call that began after another ended sees a larger value,
# and no two calls see the same one. Settle points (every MCPORTER_CHAOS_SETTLE_EVERY steps
# the workers pause) are strict once a quiet system had up to 30 s: no stopped daemon, no
# daemon but the one serving where the path leads, at most one MCP server and it that
# daemon's child, the metadata naming that daemon (a torn record is no record), and
# `status --json` agreeing.
# At the end, `stop` must leave no daemon, no MCP server, no socket and no metadata.
# After a violation the soak ends the offending orphan or stray, so later checks stay
# meaningful, and goes on; the test fails at the end with every violation found.
CHAOS_STEP_TIMEOUT = 30.0  # any CLI step that takes longer is a stuck caller


CHAOS_SETTLE_TIMEOUT = 30.0  # a quiet system must satisfy the strict invariants within this


CHAOS_MONITOR_INTERVAL = 0.1


# Tolerances while steps run (a violation is an anomaly seen continuously for longer):
CHAOS_TWO_SERVERS_S = 0.5  # two live copies of the MCP server: only while one is being killed


#                            (the demo server exits within milliseconds of a signal or stdin EOF);
#                            but CHAOS_UNREACHABLE_S when one is run by a daemon that a step made
#                            unreachable (socket file removed) or SIGSTOPped: a successor that
#                            cannot verify it (metadata damaged too) binds beside it, and it
#                            ends its servers when it notices (no socket, no daemon)
CHAOS_TWO_SERVING_S = 7.0  # a second listening daemon: only while it notices that it lost


#                            its socket path (no socket, no daemon: 5 s) or while it is closing to stop
CHAOS_UNREACHABLE_S = 7.0  # the one listening daemon is not the one at the path (same bound)


CHAOS_ORPHAN_S = 3.0  # an MCP server whose parent is no daemon of this config


CHAOS_IDLE_DAEMON_S = 30.0  # a daemon process that is not serving: starting, stopping or stuck


CHAOS_KINDS = {  # kind: weight
    "call": 6,
    "burst": 1,
    "status": 2,
    "start": 2,
    "start-fg": 1,
    "stop": 2,
    "restart": 1,
    "sigkill-daemon": 1,
    "sigstop-daemon": 1,
    "kill-server": 1,
    "remove-socket": 1,
    "damage-metadata": 1,
    "edit-config": 1,
    "touch-config": 1,
    "flood": 1,
    "alt-spelling": 1,
}


# Steps that may rightly fail a call running at the same time: they end, stop, cut off or
# change the daemon or its server. Not among them: a connection flood (busy is not hung), a
# damaged record (the daemon still serves), another spelling of the state dir.
CHAOS_DISRUPTIVE = {
    "stop",
    "restart",
    "sigkill-daemon",
    "sigstop-daemon",
    "kill-server",
    "remove-socket",
    "edit-config",
}


CHAOS_METADATA_DAMAGE = [
    "garbage",
    "truncated",
    "empty",
    "no-pidStartTime",
    "servers-as-list",
    "pid-as-string",
    "foreign-pid",
]


_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY = 4, 20


_UDIAG_SHOW_NAME, _UDIAG_SHOW_VFS = 1, 2


_UNIX_DIAG_NAME, _UNIX_DIAG_VFS = 0, 1


_TCP_LISTEN = 10


def unix_listeners(path, aliases=()):
    """Listening AF_UNIX sockets bound to the name ``path`` (or one of ``aliases``, other
    spellings of it): {socket inode: inode of its file}.

    From the kernel's sock_diag (netlink). A socket keeps the name it was bound to after its
    file is removed or replaced, so the name alone does not say which socket the path leads
    to now; the file's inode (UNIX_DIAG_VFS) does.
    """
    want = {os.fsencode(str(p)) for p in [path, *aliases]}
    req = struct.pack(
        "=BBHIIIII", socket.AF_UNIX, 0, 0, 1 << _TCP_LISTEN, 0, _UDIAG_SHOW_NAME | _UDIAG_SHOW_VFS, 0, 0
    )
    nlmsg = struct.pack("=IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, 0x301, 1, 0) + req  # REQUEST|DUMP
    found = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(5)
        nl.sendto(nlmsg, (0, 0))
        while True:
            data = nl.recv(1 << 16)
            off = 0
            while off + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if kind == 3:  # NLMSG_DONE
                    return found
                if kind == 2 or length < 16:  # NLMSG_ERROR
                    raise OSError("sock_diag refused the dump")
                body = data[off + 16 : off + length]
                ino = struct.unpack_from("=I", body, 4)[0]  # struct unix_diag_msg: 16 bytes
                attrs, a = {}, 16
                while a + 4 <= len(body):
                    alen, atype = struct.unpack_from("=HH", body, a)
                    if alen < 4:
                        break
                    attrs[atype] = body[a + 4 : a + alen]
                    a += (alen + 3) & ~3
                if attrs.get(_UNIX_DIAG_NAME, b"").rstrip(b"\0") in want and _UNIX_DIAG_VFS in attrs:
                    found[ino] = struct.unpack_from("=I", attrs[_UNIX_DIAG_VFS])[0]
                off += (length + 3) & ~3


def socket_inodes(pid):
    """Inodes of the sockets ``pid`` holds open."""
    found = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for name in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if link.startswith("socket:["):
            found.add(int(link[8:-1]))
    return found


class ChaosSnapshot:
    """One look at /proc: this config's daemons and MCP servers, and which daemons serve.

    A daemon *serves* while it holds a listening socket bound to the socket path's name (it
    accepts connections; a daemon that closed its listener to shut down does not). It is
    *reachable* when that socket is the file now at the path, i.e. a new client reaches it.
    """

    def __init__(self, h):
        self.at = time.monotonic()
        self.daemons, self.servers = {}, {}
        cfg = str(h.cfg)
        for pid in all_pids():
            argv = proc_cmdline(pid)
            if not argv:
                continue
            st = proc_stat(pid)
            if st is None or st.state in ("Z", "X"):
                continue
            if h.tag in argv:
                self.servers[pid] = st
            elif "--foreground" in argv and any(cfg in a for a in argv):
                self.daemons[pid] = st
        for pid in list(self.daemons) + list(self.servers):
            h.track(pid)
        try:
            path_ino = os.lstat(str(h.socket_path)).st_ino
        except OSError:
            path_ino = None
        listeners = unix_listeners(h.socket_path, getattr(h, "socket_aliases", ()))
        self.serving = {}  # pid -> reachable
        for pid in self.daemons:
            held = socket_inodes(pid) & set(listeners)
            if held:
                self.serving[pid] = any(listeners[i] == path_ino for i in held)
        self.reachable = sorted(pid for pid, at_path in self.serving.items() if at_path)

    def describe(self, pids):
        out = []
        for pid in sorted(pids):
            st = self.daemons.get(pid) or self.servers.get(pid)
            role = "daemon" if pid in self.daemons else "server"
            if pid in self.serving:
                role += " serving" + ("" if self.serving[pid] else " (unreachable)")
            out.append(f"{pid} ({role}, ppid {st.ppid if st else '?'}, state {st.state if st else '?'})")
        return ", ".join(out) or "none"


class ChaosViolation:
    def __init__(self, kind, detail, where, log):
        self.kind, self.detail, self.where, self.log = kind, detail, where, log
        self.again = []  # where the same violation was seen again

    def render(self):
        again = ""
        if self.again:
            more = ", ".join(self.again[:5]) + (", ..." if len(self.again) > 5 else "")
            again = f"\n    seen {len(self.again)} more time(s): {more}"
        return f"{self.kind} at {self.where}: {self.detail}{again}\n    recent steps:\n" + "\n".join(
            "      " + line for line in self.log
        )


class Chaos:
    """The soak's state: workers' random streams, the step log, anomalies and violations."""

    def __init__(self, h, seed, steps, workers, kinds):
        self.h, self.seed, self.steps, self.workers = h, seed, steps, workers
        self.kinds = kinds
        self.weights = [CHAOS_KINDS[k] for k in kinds]
        self.rngs = [random.Random(f"{seed}/{w}") for w in range(workers)]
        self.lock = threading.Lock()
        self.step_no = 0
        self.log = collections.deque(maxlen=40)
        self.full_log = []  # written to chaos-steps.log in the test's tmp dir
        self.in_flight = {}  # worker -> label of its running step
        self.pending = {}  # anomaly key -> (first seen, steps in flight then, kind)
        self.transients = {}  # anomaly kind -> [times seen and gone within tolerance, longest s]
        self.reported = {}  # violation key -> the violation first seen with it
        self.violations = []
        self.counters = {}  # (server pid, start time) -> [(value, t0, t1, label)]
        self.foreground = []  # [Popen, label, judged]
        self.held = set()  # pids a step holds stopped (SIGSTOP) on purpose
        self.stopping = {}  # label of a step running `stop` or `restart` -> its start time
        self.stops = []  # (start, end) of every `stop` and `restart` that returned
        self.disrupting = {}  # worker -> (kind, start) of its running disruptive step
        self.disruptions = []  # (kind, start, end) of every disruptive step that ended
        self.excused = set()  # (pid, start) of daemons a step cut off from the path or stopped
        self.config_generation = 0
        self.done = threading.Event()
        self.stats = collections.Counter()
        self.decoy = None
        self.alt_state_dir = h.tmp / "state-link"  # a second spelling of the state dir
        if not os.path.lexists(str(self.alt_state_dir)):
            os.symlink(str(h.state_dir), str(self.alt_state_dir))
        h.socket_aliases = [self.alt_state_dir / h.socket_path.name]

    # -- bookkeeping --

    def note(self, line):
        line = f"{time.monotonic() - self.t0:7.2f}s {' | '.join(str(line).splitlines())}"
        with self.lock:
            self.log.append(line)
            self.full_log.append(line)

    def violation(self, kind, detail, where, key=None):
        """Record a violation; one with the same ``key`` as an earlier one only counts again."""
        with self.lock:
            if key is not None and key in self.reported:
                self.reported[key].again.append(where)
                return
            self.log.append(f"{time.monotonic() - self.t0:7.2f}s !! {kind} at {where}")
            self.full_log.append(f"{time.monotonic() - self.t0:7.2f}s !! {kind} at {where}: {detail}")
            v = ChaosViolation(kind, detail, where, list(self.log)[-15:])
            self.violations.append(v)
            if key is not None:
                self.reported[key] = v

    def bump(self, key):
        with self.lock:
            self.stats[key] += 1

    # -- invariants checked continuously (after every step, and by the monitor) --

    def observe(self, where, snap=None):
        snap = snap or ChaosSnapshot(self.h)
        now = snap.at
        current = {}  # key -> (kind, tolerance, detail)
        if len(snap.servers) > 1:
            # A successor may not see a daemon a step cut off or stopped: see CHAOS_TWO_SERVERS_S.
            cut_off = [pid for pid, st in snap.servers.items() if self.is_excused(st.ppid)]
            current[("two-servers",)] = (
                "two-servers",
                CHAOS_UNREACHABLE_S if cut_off else CHAOS_TWO_SERVERS_S,
                f"{len(snap.servers)} live copies of the MCP server: {snap.describe(snap.servers)}"
                + (f" ({cut_off} run by a daemon a step cut off or stopped)" if cut_off else ""),
            )
        if len(snap.serving) > 1:
            current[("two-serving",)] = (
                "two-serving-daemons",
                CHAOS_TWO_SERVING_S,
                f"{len(snap.serving)} daemons listening on the socket path: {snap.describe(snap.serving)}",
            )
        elif snap.serving and not snap.reachable:
            (pid,) = snap.serving
            current[("unreachable", pid, snap.daemons[pid].start)] = (
                "unreachable-daemon",
                CHAOS_UNREACHABLE_S,
                f"daemon {pid} listens but the socket path no longer leads to it, and it lives on",
            )
        for pid, st in snap.servers.items():
            if st.ppid not in snap.daemons:
                current[("orphan", pid, st.start)] = (
                    "orphan-server",
                    CHAOS_ORPHAN_S,
                    f"MCP server {pid} has parent {st.ppid} {proc_cmdline(st.ppid)[:3]}, no daemon of this config",
                )
        for pid, st in snap.daemons.items():
            if pid not in snap.serving and pid not in self.held:
                current[("idle-daemon", pid, st.start)] = (
                    "daemon-not-serving",
                    CHAOS_IDLE_DAEMON_S,
                    f"daemon process {pid} neither serves nor exits: {' '.join(proc_cmdline(pid))[-120:]}",
                )
        due = []
        with self.lock:
            for key in list(self.pending):
                if key not in current:  # gone within its tolerance: note how long it lasted
                    first, flying_then, kind = self.pending.pop(key)
                    seen = self.transients.setdefault(kind, [0, 0.0])
                    seen[0] += 1
                    seen[1] = max(seen[1], now - first)
                    if kind in ("two-servers", "two-serving-daemons", "orphan-server"):
                        line = f"~ {kind} for {now - first:.2f}s, within tolerance, first seen during {flying_then}"
                        self.full_log.append(f"{now - self.t0:7.2f}s {line}")
            for key, (kind, tolerance, detail) in current.items():
                first, flying_then, _ = self.pending.setdefault(
                    key, (now, ", ".join(self.in_flight.values()) or "no step", kind)
                )
                if now - first > tolerance and key not in self.reported:
                    due.append((key, kind, f"{detail}; for {now - first:.1f}s since during: {flying_then}"))
        for key, kind, detail in due:
            self.violation(kind, detail, where, key=key)
            if kind in ("orphan-server", "daemon-not-serving"):
                self.kill(key[1], key[2])  # so that later checks stay meaningful
        self.judge_foreground(where)
        with self.lock:
            decoy = self.decoy
            if decoy is not None and decoy.poll() is not None:
                self.decoy = None
            else:
                decoy = None
        if decoy is not None:
            self.violation(
                "foreign-pid-signalled",
                f"process {decoy.pid}, named in damaged metadata with a wrong start time, "
                f"was ended by signal {-decoy.returncode}",
                where,
            )
        return snap

    def judge_foreground(self, where):
        """A ``start --foreground`` exits 0 when another daemon serves, or serves until stopped."""
        for entry in list(self.foreground):
            p, label, _ = entry
            with self.lock:
                if entry[2] or p.poll() is None:
                    continue
                entry[2] = True
            if p.returncode not in (0, -signal.SIGKILL, -signal.SIGTERM):
                err = read_file(p.err_path).strip().splitlines()[-3:]
                self.violation(
                    "foreground-start-failed",
                    f"`start --foreground` of {label} (pid {p.pid}) exited {p.returncode}: {err}",
                    where,
                )

    def kill(self, pid, start):
        st = proc_stat(pid)
        if st is not None and st.start == start:
            self.h.track(pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def monitor(self):
        while not self.done.is_set():
            try:
                with self.lock:
                    flying = ", ".join(self.in_flight.values()) or "no step"
                self.observe(f"monitor, during {flying}")
            except Exception as exc:  # a broken check must show, not silently stop checking
                self.violation("monitor-error", repr(exc), "monitor")
                return
            self.done.wait(CHAOS_MONITOR_INTERVAL)

    # -- strict invariants at settle points --

    def settle_problems(self, snap):
        problems = []
        stopped = [pid for pid, st in snap.daemons.items() if st.state in ("T", "t")]
        if stopped:
            problems.append(("stopped-daemon", f"daemon {stopped} still stopped"))
        serving = snap.reachable[0] if len(snap.reachable) == 1 else None
        if set(snap.daemons) - {serving}:
            problems.append(
                (
                    "one-daemon",
                    f"daemons {snap.describe(snap.daemons)}; only the one serving may remain (one daemon)",
                )
            )
        if len(snap.servers) > 1:
            problems.append(("two-servers", f"MCP servers {snap.describe(snap.servers)}"))
        strays = [pid for pid, st in snap.servers.items() if serving is None or st.ppid != serving]
        if strays:
            problems.append(
                ("orphan-server", f"MCP servers {snap.describe(strays)} not run by the serving daemon")
            )
        if serving is not None:
            try:  # not h.meta(): that expects a well-formed record, and this one may be damaged
                meta = json.loads(self.h.meta_path.read_text())
            except (OSError, ValueError):
                meta = None
            if meta is None:
                wrong = ["no readable record"]
            elif not isinstance(meta, dict):
                wrong = [f"not a JSON object: {str(meta)[:80]!r}"]
            else:
                wrong = [
                    f"{name}={meta.get(name)!r}"
                    for name, ok in (
                        ("pid", meta.get("pid") == serving),
                        (
                            "pidStartTime",
                            isinstance(meta.get("pidStartTime"), str) and meta.get("pidStartTime"),
                        ),
                        ("socketPath", meta.get("socketPath") in self.socket_spellings()),
                        ("servers", isinstance(meta.get("servers"), dict)),
                    )
                    if not ok
                ]
            if wrong:
                problems.append(
                    (
                        "metadata-not-repaired",
                        f"daemon {serving} serves but the metadata has {', '.join(wrong)}",
                    )
                )
        return problems, serving

    def settle(self, where):
        """Wait (bounded) for a quiet system to satisfy the strict invariants; report the rest."""
        seen = {}

        def quiet():
            seen["snap"] = self.observe(where)
            seen["problems"], seen["serving"] = self.settle_problems(seen["snap"])
            return not seen["problems"]

        try:
            wait_until(quiet, CHAOS_SETTLE_TIMEOUT, interval=0.05)
        except AssertionError:
            pass
        snap, problems, serving = seen["snap"], seen["problems"], seen["serving"]
        for kind, detail in problems:
            self.violation(kind, f"after {CHAOS_SETTLE_TIMEOUT:g}s of quiet: {detail}", where)
        if problems:  # clear the way so that later checks stay meaningful
            for pid, st in list(snap.daemons.items()) + list(snap.servers.items()):
                if pid != serving and (pid in snap.daemons or st.ppid != serving):
                    self.kill(pid, st.start)
            return
        r = self.cli(where, "status", "--json")
        if r is None:
            return
        if r.rc not in (0, 3):  # 3: not running (LSB)
            self.violation("status-failed", f"`status --json` exited {r.rc}: {r.err.strip()[-200:]}", where)
            return
        st = self.status_json(r, where)
        disagrees = bool(st.get("running")) != (serving is not None) or (serving and st.get("pid") != serving)
        if st and disagrees:
            self.violation(
                "status-disagrees",
                f"daemon {serving} serves, but `status --json` says running={st.get('running')} pid={st.get('pid')}",
                where,
            )
        self.note(f"settled at {where}: daemon {serving}, servers {sorted(snap.servers)}")

    # -- running things --

    def cli(self, label, *args, **env):
        """Run the CLI with the step timeout; a crash or a stuck caller is a violation."""
        command = " ".join(args)
        try:
            r = self.h.run(*args, timeout=CHAOS_STEP_TIMEOUT, **env)
        except AssertionError as exc:
            err = str(exc).rsplit("--- stderr ---", 1)[-1].strip().splitlines()[-1:]
            self.violation(
                "stuck-caller",
                f"`{command}` did not finish within {CHAOS_STEP_TIMEOUT:g}s (stderr: {err})",
                label,
                key=("stuck-caller", args[0]),
            )
            return None
        r.crashed = "Traceback" in r.err or "unexpected error" in r.err
        if r.crashed:
            last = (r.err.strip().splitlines() or [""])[-1]
            self.violation(
                "crash",
                f"`{command}` exited {r.rc}: {last[-300:]}",
                label,
                key=("crash", args[0], re.sub(r"\d+", "N", last)),
            )
        return r

    def server_identity(self, label=None):
        """(pid, start time) of the MCP server that answers the ``pid`` tool now, or None.

        With ``label``, asked through the CLI (which starts a daemon when none runs, as the
        counter call after it would); without, over the socket to whatever daemon the path
        leads to, never starting one.
        """
        try:
            if label is not None:
                r = self.cli(label, "call", "demo.pid")
                pid = int(r.out.strip()) if r is not None and r.rc == 0 else 0
            else:
                params = {"server": "demo", "tool": "pid", "args": {}, "timeoutMs": 3000}
                resp, _, _ = raw_request(self.h.socket_path, "callTool", params, idle=2.0, overall=4.0)
                pid = int(resp["result"]["content"][0]["text"])
        except Exception:
            return None
        st = proc_stat(pid) if pid > 0 else None
        return (pid, st.start) if st is not None and st.state not in ("Z", "X") else None

    def counter_calls(self, label, n, **env):
        """``n`` parallel ``call demo.counter``, between two asks of the server's pid.

        A value is attributed to a server lifetime (pid + start time) only when that same
        process served the pid asks before and after: a daemon's socket path, once it leads
        elsewhere, never leads back to it, so every call in between reached that daemon, which
        had that one server throughout.

        A call that fails while one live, fresh daemon serves at the path from before it began
        to after it ended, with no disruptive step (CHAOS_DISRUPTIVE) running meanwhile, is
        refused service: a violation (busy is not hung; a child's "already running" is no
        failure). ``env``: extra environment for the calls (another spelling of the state dir).
        """
        before = self.server_identity(label)
        serving_before = self.serving_daemon()
        generation = self.config_generation

        def one(_):
            t0 = time.monotonic()
            r = self.cli(label, "call", "demo.counter", **env)
            return r, t0, time.monotonic()

        if n == 1:
            results = [one(0)]
        else:
            with ThreadPoolExecutor(n) as pool:
                results = list(pool.map(one, range(n)))
        after = self.server_identity()
        served_throughout = (
            serving_before is not None
            and self.serving_daemon() == serving_before
            and self.config_generation == generation
        )
        values = []
        for r, t0, t1 in results:
            if r is None:
                continue
            self.bump("call ok" if r.rc == 0 else "call failed")
            if r.rc != 0:
                values.append(f"rc {r.rc}: {r.err.strip()[-100:]}")
                disrupted = self.disrupted(t0, t1)
                if served_throughout and not disrupted and not r.crashed:
                    last = (r.err.strip().splitlines() or [""])[-1]
                    self.violation(
                        "call-refused",
                        f"`call demo.counter` exited {r.rc} ({last[-200:]}) while daemon {serving_before[0]} "
                        "served, live and fresh, from before it began to after it ended",
                        label,
                    )
                continue
            try:
                value = int(r.out.strip())
            except ValueError:
                self.violation("bad-answer", f"demo.counter answered {r.out!r}", label)
                continue
            values.append(value)
            if before is not None and before == after:
                self.count(before, value, t0, t1, label)
        who = f"server {before[0]}" if before is not None and before == after else "server unknown"
        return f"{values} ({who})"

    def count(self, server, value, t0, t1, label):
        """Per server lifetime, a call that began after another ended must see a larger value,
        and two calls never see the same one (each adds one)."""
        conflicts = []
        with self.lock:
            seen = self.counters.setdefault(server, [])
            for v, a0, a1, lab in seen:
                if a1 < t0 and v >= value:
                    conflicts.append(f"{lab}, which ended before it began, got {v}")
                elif t1 < a0 and v <= value:
                    conflicts.append(f"{lab}, which began after it ended, got {v}")
                elif v == value:
                    conflicts.append(f"{lab}, at the same time, got {v} too")
            seen.append((value, t0, t1, label))
        for conflict in conflicts:
            self.violation(
                "counter-not-rising", f"server {server[0]} answered {value} to {label}, but {conflict}", label
            )

    def socket_spellings(self):
        return {str(self.h.socket_path), *(str(p) for p in self.h.socket_aliases)}

    def serving_daemon(self):
        """(pid, start) of the one daemon the socket path leads to now, or None."""
        snap = ChaosSnapshot(self.h)
        if len(snap.reachable) != 1:
            return None
        pid = snap.reachable[0]
        return pid, snap.daemons[pid].start

    def disrupted(self, t0, t1):
        """The disruptive steps that ran at some time in [t0, t1]."""
        with self.lock:
            running = [kind for kind, s in self.disrupting.values() if s <= t1]
            done = [kind for kind, a, b in self.disruptions if a <= t1 and b >= t0]
        return running + done

    def pick_daemon(self, u):
        snap = ChaosSnapshot(self.h)
        pool = snap.reachable or sorted(snap.serving) or sorted(snap.daemons)
        if not pool:
            return None
        pid = pool[int(u * len(pool))]
        return pid, snap.daemons[pid].start

    def signal(self, target, sig):
        pid, start = target
        st = proc_stat(pid)
        if st is None or st.start != start:
            return False
        try:
            os.kill(pid, sig)
        except OSError:
            return False
        return True

    # -- the steps: each returns a short description of what it did and saw --

    def step_call(self, label, u):
        return self.counter_calls(label, 1)

    def step_burst(self, label, u):
        return self.counter_calls(label, 3 + int(u * 4))

    def step_status(self, label, u):
        r = self.cli(label, "status", "--json")
        if r is None:
            return "stuck"
        if r.rc not in (0, 3):  # 3: not running (LSB)
            self.violation("status-failed", f"`status --json` exited {r.rc}: {r.err.strip()[-200:]}", label)
            return f"rc {r.rc}"
        st = self.status_json(r, label)
        return f"running={st.get('running')} pid={st.get('pid')}"

    def status_json(self, r, where):
        try:
            st = json.loads(r.out)
        except ValueError:
            st = None
        if not isinstance(st, dict):
            self.violation("bad-answer", f"`status --json` printed {r.out[:200]!r}", where)
            return {}
        return st

    def _command(self, label, *args):
        return self._command_outcome(label, args, *self.timed(label, *args))

    def timed(self, label, *args):
        """Run the CLI; a `stop` (also the one in `restart`) is remembered with its interval."""
        stops = args[0] in ("stop", "restart")
        t0 = time.monotonic()
        if stops:
            with self.lock:
                self.stopping[label] = t0
        try:
            r = self.cli(label, *args)
        finally:
            if stops:
                with self.lock:
                    self.stops.append((self.stopping.pop(label), time.monotonic()))
        return r, t0, time.monotonic()

    def stop_overlapped(self, t0, t1, label):
        """Did another step's `stop` run during [t0, t1]?"""
        with self.lock:
            running = [s for lab, s in self.stopping.items() if lab != label and s <= t1]
            done = [a for a, b in self.stops if a <= t1 and b >= t0]
        return bool(running or done)

    def _command_outcome(self, label, args, r, t0, t1):
        """`start`, `stop` and `restart` succeed, unless a step stopped or killed the daemon
        under them."""
        if r is None:
            return "stuck"
        last = (r.err.strip().splitlines() or [""])[-1]
        # A daemon that a signal ended before it was ready (a sigkill-daemon step, or a takeover
        # of a stopped one) fails its `start`; that is the step's doing, not a fault. So is a
        # launched daemon that another step's `stop` stopped before it was ready.
        killed = r.rc != 0 and re.search(r"killed by signal (9|15)\b", last)
        stopped = (
            r.rc != 0
            and args[0] != "stop"
            and "daemon exited" in last
            and self.stop_overlapped(t0, t1, label)
        )
        why = "daemon killed" if killed else "stopped meanwhile" if stopped else ""
        self.bump(f"{args[0]} {'ok' if r.rc == 0 else 'failed, ' + why if why else 'failed'}")
        if r.rc != 0 and not r.crashed and not why:
            self.violation(
                "command-failed",
                f"`{' '.join(args)}` exited {r.rc}: {last[-200:]}",
                label,
                key=("command-failed", args[0], re.sub(r"\d+", "N", last)),
            )
        return f"rc {r.rc}: {(r.out.strip() or r.err.strip())[-100:]}"

    def step_start(self, label, u):
        return self._command(label, "start")

    def step_stop(self, label, u):
        """Stop is a barrier (one copy of a server): it returns once the daemon is gone, and it
        never says that no daemon runs while one serves at the path from before it began to
        after it returned."""
        before = ChaosSnapshot(self.h)
        serving_before = {pid: before.daemons[pid].start for pid in before.reachable}
        r, t0, t1 = self.timed(label, "stop")
        outcome = self._command_outcome(label, ("stop",), r, t0, t1)
        if r is None or r.rc != 0:
            return outcome
        m = re.search(r"stopped \(pid (\d+)\)", r.out)
        if m and pid_alive(int(m.group(1))):
            self.violation(
                "stop-not-barrier",
                f"`stop` said {r.out.strip()!r} and returned, but daemon {m.group(1)} still lives",
                label,
            )
        elif "no daemon running" in r.out:
            after = ChaosSnapshot(self.h)
            missed = [pid for pid in after.reachable if serving_before.get(pid) == after.daemons[pid].start]
            if missed:
                self.violation(
                    "stop-not-barrier",
                    f"`stop` said {r.out.strip()!r} while daemon {missed} served at the socket path "
                    "from before it began until after it returned",
                    label,
                )
        return outcome

    def step_restart(self, label, u):
        return self._command(label, "restart")

    def step_start_fg(self, label, u):
        with self.lock:  # the harness numbers output files by the count of processes so far
            p = self.h.popen("start", "--foreground")
        self.foreground.append([p, label, False])
        return f"pid {p.pid} in the background"

    def step_sigkill_daemon(self, label, u):
        target = self.pick_daemon(u)
        if target is None:
            return "no daemon"
        return f"SIGKILL {target[0]}: {'sent' if self.signal(target, signal.SIGKILL) else 'gone'}"

    def step_sigstop_daemon(self, label, u):
        target = self.pick_daemon(u)
        if target is None:
            return "no daemon"
        hold = 0.2 + 2.8 * u  # the fault's duration, not a wait for anything to settle
        self.held.add(target[0])
        self.excuse(target[0])
        try:
            if not self.signal(target, signal.SIGSTOP):
                return f"{target[0]} gone"
            self.done.wait(hold)
        finally:
            self.signal(target, signal.SIGCONT)
            self.held.discard(target[0])
        return f"SIGSTOP {target[0]} for {hold:.1f}s, then SIGCONT"

    def step_kill_server(self, label, u):
        servers = sorted(self.h.server_pids())
        if not servers:
            return "no server"
        pid = servers[int(u * len(servers))]
        st = proc_stat(pid)
        sent = st is not None and self.signal((pid, st.start), signal.SIGKILL)
        return f"SIGKILL server {pid}: {'sent' if sent else 'gone'}"

    def excuse(self, pid):
        """Mark a daemon that a step cut off from its socket path, or stopped (see
        CHAOS_TWO_SERVERS_S)."""
        st = proc_stat(pid)
        if st is not None:
            with self.lock:
                self.excused.add((pid, st.start))

    def is_excused(self, pid):
        st = proc_stat(pid)
        with self.lock:
            return st is not None and (pid, st.start) in self.excused

    def step_remove_socket(self, label, u):
        for pid in ChaosSnapshot(self.h).reachable:
            self.excuse(pid)
        try:
            os.unlink(str(self.h.socket_path))
        except FileNotFoundError:
            return "no socket file"
        return "removed"

    def step_damage_metadata(self, label, u):
        how = CHAOS_METADATA_DAMAGE[int(u * len(CHAOS_METADATA_DAMAGE))]
        try:
            raw = self.h.meta_path.read_text()
            data = json.loads(raw)
        except (OSError, ValueError):
            raw, data = "", None
        if not isinstance(data, dict):
            data = {"pid": 1, "pidStartTime": "1", "servers": {}}
        if how == "garbage":
            text = "\x00{not json"
        elif how == "truncated":
            text = (raw or json.dumps(data))[: max(1, len(raw) // 2)]
        elif how == "empty":
            text = ""
        elif how == "no-pidStartTime":
            data.pop("pidStartTime", None)
            text = json.dumps(data)
        elif how == "servers-as-list":
            data["servers"] = [dict(v, name=k) for k, v in (data.get("servers") or {}).items()] or [{}]
            text = json.dumps(data)
        elif how == "pid-as-string":
            data["pid"] = str(data.get("pid"))
            text = json.dumps(data)
        else:  # foreign-pid: a live process that is not the daemon, with a start time not its own
            with self.lock:
                if self.decoy is None:
                    self.decoy = self.h.popen_argv(
                        [sys.executable, "-c", "import time; time.sleep(3600)", "chaos-decoy"], self.h.env()
                    )
                decoy = self.decoy
            data["pid"], data["pidStartTime"] = decoy.pid, "1"
            text = json.dumps(data)
        self.h.meta_path.write_text(text)  # in place: a reader may see it torn, as after a crash
        return how

    def step_edit_config(self, label, u):
        with self.lock:
            self.config_generation += 1
            data = self.h.config_data()
            data["chaosGeneration"] = self.config_generation
            tmp = self.h.cfg.with_name(f"{self.h.cfg.name}.{self.config_generation}.tmp")
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(str(tmp), str(self.h.cfg))  # as editors save: never a half-written config
        return f"generation {self.config_generation}"

    def step_touch_config(self, label, u):
        os.utime(str(self.h.cfg))
        return "touched"

    def step_flood(self, label, u):
        """Idle connections up to the daemon's cap, held briefly (a crowd of stalled callers)."""
        cap = _import_module()._MAX_CONNECTIONS
        hold = 0.2 + 1.3 * u  # the fault's duration, not a wait for anything to settle
        conns, opened = [], 0
        try:
            for _ in range(cap):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conns.append(s)
                s.settimeout(2)
                try:
                    s.connect(str(self.h.socket_path))
                except OSError:
                    break
                opened += 1
            self.done.wait(hold)
        finally:
            for s in conns:
                s.close()
        return f"{opened} connections held {hold:.1f}s"

    def step_alt_spelling(self, label, u):
        """A call through a second spelling of the state dir (a symlink to it): one daemon."""
        return self.counter_calls(label, 1, MCPORTER_DAEMON_DIR=str(self.alt_state_dir))

    # -- workers --

    def worker(self, w, count):
        rng = self.rngs[w]
        for _ in range(count):
            kind = rng.choices(self.kinds, self.weights)[0]
            u = rng.random()
            with self.lock:
                self.step_no += 1
                label = f"w{w} step {self.step_no} {kind}"
                self.in_flight[w] = label
            self.bump(kind)
            t0 = time.monotonic()
            disruptive = kind in CHAOS_DISRUPTIVE
            if disruptive:
                with self.lock:
                    self.disrupting[w] = (kind, t0)
            try:
                outcome = getattr(self, "step_" + kind.replace("-", "_"))(label, u)
            finally:
                with self.lock:
                    self.in_flight.pop(w, None)
                    if disruptive:
                        self.disrupting.pop(w, None)
                        self.disruptions.append((kind, t0, time.monotonic()))
            self.note(f"{label} (u={u:.3f}) -> {outcome} [{time.monotonic() - t0:.2f}s]")
            self.observe(f"after {label}")

    def _work(self, w, count, errors):
        try:
            self.worker(w, count)
        except BaseException as exc:  # a harness bug: fail loudly, after cleanup
            errors.append((w, exc))

    def run(self):
        self.t0 = time.monotonic()
        monitor = threading.Thread(target=self.monitor, name="chaos-monitor", daemon=True)
        monitor.start()
        try:
            done = 0
            every = _chaos_env_int("MCPORTER_CHAOS_SETTLE_EVERY", 20)
            while done < self.steps:
                n = min(every, self.steps - done)
                share = [n // self.workers + (1 if w < n % self.workers else 0) for w in range(self.workers)]
                errors = []
                threads = [
                    threading.Thread(target=self._work, args=(w, share[w], errors))
                    for w in range(self.workers)
                ]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if errors:
                    raise errors[0][1]
                done += n
                self.settle(f"settle point after step {self.step_no}")
            self.final_stop()
        finally:
            self.done.set()
            monitor.join(10)
            for pid in list(self.held):
                try:
                    os.kill(pid, signal.SIGCONT)
                except OSError:
                    pass
        return time.monotonic() - self.t0

    def final_stop(self):
        """A final ``stop`` leaves nothing behind: no daemon, no MCP server, no socket or metadata.

        ``stop`` returns once the daemon's pid is gone, and the daemon ends its MCP servers and
        removes its files before that, so this is checked the moment ``stop`` returns.
        """
        where = "final stop"
        self.note(f"{where} -> {self._command(where, 'stop')}")

        def leftovers():
            snap = ChaosSnapshot(self.h)
            files = [p.name for p in (self.h.socket_path, self.h.meta_path) if os.path.lexists(str(p))]
            pids = list(snap.daemons) + list(snap.servers)
            return (snap.describe(pids) if pids else "") + (f"; files {files}" if files else "")

        left = leftovers()
        if left:
            try:
                wait_until(lambda: not leftovers(), 5)
                later = "all gone within 5s after"
            except AssertionError:
                later = f"still there 5s later: {leftovers()}"
            self.violation("left-behind", f"when `stop` returned: {left} ({later})", where)
        self.judge_foreground(where)

    def report(self, elapsed):
        kinds = collections.Counter(v.kind for v in self.violations)
        return (
            f"chaos soak seed {self.seed}: {self.step_no} steps, {self.workers} workers, {elapsed:.1f}s; "
            f"violations: {dict(kinds) or 'none'}; steps and outcomes: {dict(sorted(self.stats.items()))}; "
            "anomalies gone within tolerance (count, longest s): "
            + (", ".join(f"{k} ({n}, {t:.2f})" for k, (n, t) in sorted(self.transients.items())) or "none")
        )


def _chaos_env_int(name, default):
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        pytest.fail(f"{name}={raw!r} is not an integer")


@pytest.mark.chaos
def test_chaos_soak(h):
    try:
        unix_listeners(h.socket_path)
    except OSError as exc:
        pytest.skip(f"sock_diag (netlink) is not available here to see who listens: {exc}")
    seed = _chaos_env_int("MCPORTER_CHAOS_SEED", random.SystemRandom().randrange(1, 10**6))
    steps = _chaos_env_int("MCPORTER_CHAOS_STEPS", 60)
    workers = max(1, _chaos_env_int("MCPORTER_CHAOS_WORKERS", 3))
    wanted = os.environ.get("MCPORTER_CHAOS_KINDS", "").strip()
    kinds = [k.strip() for k in wanted.split(",") if k.strip()] if wanted else list(CHAOS_KINDS)
    unknown = set(kinds) - set(CHAOS_KINDS)
    assert not unknown, f"MCPORTER_CHAOS_KINDS: unknown {sorted(unknown)}; known {sorted(CHAOS_KINDS)}"
    chaos = Chaos(h, seed, steps, workers, kinds)
    elapsed = chaos.run()
    summary = chaos.report(elapsed)
    log_path = h.tmp / "chaos-steps.log"
    log_path.write_text("\n".join(chaos.full_log) + "\n")
    for daemon_log in h.state_dir.glob("*.log*"):  # the state dir goes at teardown; keep its logs
        shutil.copy(str(daemon_log), str(h.tmp / f"chaos-{daemon_log.name}"))
    print(f"\n{summary}\nstep log: {log_path} (daemon logs beside it)")
    if chaos.violations:
        settle = os.environ.get("MCPORTER_CHAOS_SETTLE_EVERY", "").strip()
        replay = (
            f"MCPORTER_CHAOS_SEED={seed} MCPORTER_CHAOS_STEPS={steps} MCPORTER_CHAOS_WORKERS={workers}"
            + (f" MCPORTER_CHAOS_SETTLE_EVERY={settle}" if settle else "")
            + (f" MCPORTER_CHAOS_KINDS={','.join(kinds)}" if wanted else "")
            + " python3 -m pytest -m chaos -s -k test_chaos_soak"
        )
        pytest.fail(
            f"{summary}\nreplay: {replay}\n(each worker's steps replay exactly, their interleaving only "
            "approximately; to minimise, lower MCPORTER_CHAOS_STEPS to just past the step named, or narrow "
            f"MCPORTER_CHAOS_KINDS; every step: {log_path})\n"
            + "".join(f"\n  [{i}] {v.kind} at {v.where}" for i, v in enumerate(chaos.violations, 1))
            + "\n\n"
            + "\n\n".join(f"[{i}] {v.render()}" for i, v in enumerate(chaos.violations, 1)),
            pytrace=False,
        )


# ##########################################################################################
# Benchmark (python3 -m pytest -m bench -s).
# ##########################################################################################


# One demo.counter call over the raw protocol, as the parallel and RSS measurements send it.
BENCH_COUNTER_REQUEST = {
    "id": "bench",
    "method": "callTool",
    "params": {"server": "demo", "tool": "counter"},
    "protocolVersion": 2,
}


def bench_times(run, n):
    """Run ``run`` n times; seconds of each run."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        run()
        out.append(time.perf_counter() - t0)
    return out


def bench_pct(values, pct):
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


def bench_ms(values):
    return f"median {statistics.median(values) * 1000:.1f} ms, p90 {bench_pct(values, 90) * 1000:.1f} ms"


def bench_run_ok(argv, env, cwd):
    done = subprocess.run(argv, env=env, cwd=str(cwd), capture_output=True, timeout=60)
    assert done.returncode == 0, done


def bench_stop(h, md):
    """Stop this test's daemon in-process and wait until it and its servers are gone."""
    md.DaemonClient(md.DaemonPaths(str(h.state_dir), h.key), "", []).stop(5.0)
    wait_until(lambda: not h.daemon_pids() and not h.server_pids(), 10, message="daemon to stop")


def bench_server_startup(h, md):
    """The MCP server's own start-up (spawn + initialize), which a cold call cannot avoid."""
    entry = h.demo_server_entry()

    def once():
        c = md.McpStdioClient("demo", [entry["command"], *entry["args"]]).start()
        c.close(grace=0.5)

    return bench_times(once, 5)


def bench_cli_calls(h, md):
    env = h.env()
    argv_script = [sys.executable, str(MODULE_PATH), "--config", str(h.cfg), "call", "demo.counter"]
    argv_module = [sys.executable, "-m", "mcporter_daemon", "--config", str(h.cfg), "call", "demo.counter"]
    bare = [sys.executable, "-c", "import mcporter_daemon"]
    bench_run_ok(bare, env, HERE)  # warm the bytecode cache first
    rows = {"bare": bench_times(lambda: bench_run_ok(bare, env, HERE), 30)}

    def cold(argv):
        bench_stop(h, md)
        t0 = time.perf_counter()
        bench_run_ok(argv, env, HERE)
        return time.perf_counter() - t0

    rows["cold"] = [cold(argv_script) for _ in range(30)]
    rows["cold_module"] = [cold(argv_module) for _ in range(30)]
    rows["warm_script"] = bench_times(lambda: bench_run_ok(argv_script, env, HERE), 30)
    # The call and its floor in turn, so a machine that speeds up or slows down during the run
    # moves both alike: the row over the floor is the median of the pairs' differences.
    # Then both without site-packages (-S), as in a venv whose site imports nothing: there the
    # floor is far lower and ``-m``'s own runpy (and the modules it imports) weighs more.
    floor = [sys.executable, "-c", "pass"]
    bare_runpy = [sys.executable, "-S", "-c", "import runpy"]
    for name, call, base in [
        ("", argv_module, floor),
        ("_no_site", [sys.executable, "-S", *argv_module[1:]], [sys.executable, "-S", *floor[1:]]),
        ("_runpy", bare_runpy, [sys.executable, "-S", *floor[1:]]),
    ]:
        rows["warm_module" + name], rows["floor" + name] = [], []
        for _ in range(40):
            rows["warm_module" + name] += bench_times(lambda c=call: bench_run_ok(c, env, HERE), 1)
            rows["floor" + name] += bench_times(lambda b=base: bench_run_ok(b, env, HERE), 1)
    return rows


def bench_over_floor(cli, name=""):
    """The median of the pairs' differences and ratios: a call over its floor, run in turn."""
    pairs = list(zip(cli["warm_module" + name], cli["floor" + name]))
    over = statistics.median(a - b for a, b in pairs) * 1000
    return f"{over:+.1f} ms ({statistics.median(a / b for a, b in pairs):.2f}×, pairs)"


def bench_first_launch_rss(h):
    """The daemon's RSS with two servers when launched from a fresh copy of the script (no
    bytecode cache: the compile included), then once more after a stop (the cache written)."""
    fresh = h.tmp / "fresh-copy"
    fresh.mkdir()
    script = fresh / "mcporter_daemon.py"
    shutil.copy(str(MODULE_PATH), str(script))
    cfg = fresh / "mcporter.json"
    entry = {
        "command": sys.executable,
        "args": [str(script), "_demo-server", h.tag],
        "lifecycle": "keep-alive",
    }
    cfg.write_text(json.dumps({"mcpServers": {"a": entry, "b": entry}}))
    cli, env = [sys.executable, str(script), "--config", str(cfg)], h.env()
    rss = []
    for _ in ("first launch", "steady"):
        for name in ("a", "b"):
            bench_run_ok(cli + ["call", f"{name}.counter"], env, fresh)
        done = subprocess.run(cli + ["status", "--json"], env=env, capture_output=True, timeout=60)
        pid = json.loads(done.stdout)["pid"]
        h.track(pid)
        rss.append(vm_rss_kib(pid))
        bench_run_ok(cli + ["stop"], env, fresh)
        wait_until(lambda pid=pid: not pid_alive(pid), 10, message="the fresh copy's daemon to stop")
    return rss


def bench_status_round_trips(h, md):
    sock = str(h.socket_path)
    req = {"id": "b", "method": "status", "params": {}, "protocolVersion": 2}
    for _ in range(50):
        md.exchange(sock, req, 2.0)
    return bench_times(lambda: md.exchange(sock, req, 2.0), 1000)


def bench_parallel_clients(h, md, clients=16, per_client=50):
    sock = str(h.socket_path)
    req = BENCH_COUNTER_REQUEST

    def worker(_):
        errors = 0
        for _ in range(per_client):
            try:
                if not md.exchange(sock, req, 10.0).get("ok"):
                    errors += 1
            except Exception:
                errors += 1
        return errors

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        errors = sum(pool.map(worker, range(clients)))
    return clients * per_client / (time.perf_counter() - t0), errors


def bench_race(h, md, n):
    """Seconds from launching n ``start --foreground`` at once to one verified survivor."""
    bench_stop(h, md)
    t0 = time.perf_counter()
    procs = [h.popen("start", "--foreground") for _ in range(n)]

    def settled():
        running = [p for p in procs if p.poll() is None]
        if len(running) != 1:
            return False
        meta = h.meta()
        return meta is not None and meta.get("pid") == running[0].pid and h.socket_path.exists()

    wait_until(settled, 30, interval=0.005, message=f"{n}-way race to settle")
    elapsed = time.perf_counter() - t0
    assert all(p.returncode == 0 for p in procs if p.poll() is not None)
    return elapsed


def bench_sigstop_replacement(h, md):
    call_ok(h, "demo.counter")
    old = h.meta()["pid"]
    h.sigstop(old)
    t0 = time.perf_counter()
    call_ok(h, "demo.counter")
    elapsed = time.perf_counter() - t0
    wait_until(lambda: not pid_alive(old), 10, message="stopped daemon to be terminated")
    return elapsed


def bench_rss(h, md):
    call_ok(h, "demo.counter")
    pid = h.meta()["pid"]
    sock = str(h.socket_path)
    req = BENCH_COUNTER_REQUEST
    idle = vm_rss_kib(pid)
    for _ in range(1000):
        assert md.exchange(sock, req, 10.0)["ok"]
    after_1k = vm_rss_kib(pid)
    for _ in range(1000):
        assert md.exchange(sock, req, 10.0)["ok"]
    return idle, after_1k, vm_rss_kib(pid)


def vm_status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for pid {pid}")


def bench_large_results(h, md, sizes_mib=(1, 10, 50)):
    """End-to-end CLI call returning an image of each size (the size of the image; its base64
    is 4/3 of that) through the daemon, the server answering each size from its cache after an
    untimed first call; the daemon's peak RSS (VmHWM, sizes rising so each peak is that
    size's) and its RSS after small calls."""
    h.configure({"big": diag_entry(h, "blob")})
    call_ok(h, "big.blob", "kib=1")
    pid = h.meta()["pid"]
    idle = vm_status_kib(pid, "VmRSS")
    out = []
    for mib in sizes_mib:
        argv = [
            sys.executable,
            str(MODULE_PATH),
            "--config",
            str(h.cfg),
            "call",
            "big.blob",
            f"kib={mib * 1024}",
        ]
        bench_run_ok(argv, h.env(), h.tmp)  # the server makes this size once
        times = bench_times(lambda argv=argv: bench_run_ok(argv, h.env(), h.tmp), 3 if mib < 50 else 2)
        out.append((mib, statistics.median(times), vm_status_kib(pid, "VmHWM")))
    for _ in range(3):
        call_ok(h, "big.blob", "kib=1")
    after = vm_status_kib(pid, "VmRSS")
    h.write_config()
    return idle, out, after


@pytest.mark.bench
def test_benchmark(h, monkeypatch):
    md = _import_module()
    monkeypatch.setenv("MCPORTER_DAEMON_DIR", str(h.state_dir))
    # Measure what users have: the bytecode cache on (some sandboxes turn it off), beside the file.
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    monkeypatch.delenv("PYTHONPYCACHEPREFIX", raising=False)
    monkeypatch.delenv("DAEMON_TEST_WAIT_SCALE", raising=False)  # production waits
    py_compile.compile(str(MODULE_PATH), doraise=True)  # as after any first run on a user's machine
    first_rss, steady_rss = bench_first_launch_rss(h)
    server = bench_server_startup(h, md)
    cli = bench_cli_calls(h, md)
    call_ok(h, "demo.counter")
    status = bench_status_round_trips(h, md)
    rps, errors = bench_parallel_clients(h, md)
    races = {n: bench_race(h, md, n) for n in (2, 4, 8)}
    bench_stop(h, md)
    sigstop = bench_sigstop_replacement(h, md)
    bench_stop(h, md)
    idle, after_1k, after_2k = bench_rss(h, md)
    bench_stop(h, md)
    large_idle, large, large_after = bench_large_results(h, md)
    bench_stop(h, md)

    source = MODULE_PATH.read_text()
    compile_s = bench_times(lambda: compile(source, str(MODULE_PATH), "exec"), 10)
    bare = statistics.median(cli["bare"])
    warm_s, warm_m = statistics.median(cli["warm_script"]), statistics.median(cli["warm_module"])
    rows = [
        ("MCP server start-up alone (spawn + initialize)", bench_ms(server), "(not ours)"),
        ("cold call, CLI process, no daemon running", bench_ms(cli["cold"]), "≤ 300 ms + server start-up"),
        (
            "the same cold call through `python3 -m`",
            bench_ms(cli["cold_module"]),
            "(no compile: cached bytecode)",
        ),
        ("warm call, `python3 mcporter_daemon.py call`", bench_ms(cli["warm_script"]), ""),
        ("warm call, `python3 -m mcporter_daemon call`", bench_ms(cli["warm_module"]), ""),
        ('bare `python3 -c "import mcporter_daemon"`', bench_ms(cli["bare"]), ""),
        ("warm call ÷ bare import (-m / script)", f"{warm_m / bare:.2f}× / {warm_s / bare:.2f}×", "≤ 1.5×"),
        ("bare `python3 -c pass` (the floor)", bench_ms(cli["floor"]), ""),
        ("warm call (-m) over `python3 -c pass`", bench_over_floor(cli), "≤ +8 ms"),
        ("bare `python3 -S -c pass` (no site)", bench_ms(cli["floor_no_site"]), ""),
        ("the same call and floor, both -S", bench_over_floor(cli, "_no_site"), "(-m's runpy below)"),
        ("of which `-S -c 'import runpy'` over -S", bench_over_floor(cli, "_runpy"), "(not ours)"),
        (
            "compiling the module (a script run pays it)",
            bench_ms(compile_s),
            "(why the script form is slower)",
        ),
        (
            "status round trip in one process (1,000)",
            f"p50 {statistics.median(status) * 1e6:.0f} µs, p99 {bench_pct(status, 99) * 1e6:.0f} µs",
            "p50 ≤ 200 µs",
        ),
        ("16 parallel clients × 50 calls", f"{rps:.0f} req/s, {errors} errors", "0 errors"),
        *[
            (f"{n}-way start --foreground race settled", f"{races[n] * 1000:.0f} ms", "≤ 1 s (8-way)")
            for n in races
        ],
        ("SIGSTOP'd daemon replaced (next call done)", f"{sigstop * 1000:.0f} ms", "≤ probe 2 s + 0.5 s"),
        (
            "daemon RSS, two servers: first launch / steady",
            f"{first_rss / 1024:.1f} / {steady_rss / 1024:.1f} MiB",
            "≤ 16 MiB first launch (fresh copy, compile included)",
        ),
        (
            "daemon RSS idle / after 1,000 / 2,000 calls",
            f"{idle / 1024:.1f} / {after_1k / 1024:.1f} / {after_2k / 1024:.1f} MiB",
            "≤ 15 MB, no growth",
        ),
        *[
            (
                f"{mib} MiB image result, CLI call end to end",
                f"{secs:.2f} s, daemon peak {hwm / 1024:.0f} MiB ({(hwm - large_idle) / 1024 / mib:.1f}× payload)",
                "≤ 1.5 s and ≤ 3× (50 MiB)" if mib == 50 else "linear in size",
            )
            for mib, secs, hwm in large
        ],
        (
            "daemon RSS before / after large results",
            f"{large_idle / 1024:.1f} / {large_after / 1024:.1f} MiB",
            "back near idle",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(
        f"\n\nmcporter_daemon benchmark, {time.strftime('%Y-%m-%d')}: {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}\n"
    )
    print(f"{'measurement'.ljust(width)}  {'result'.ljust(34)}  target")
    for name, result, target in rows:
        print(f"{name.ljust(width)}  {result.ljust(34)}  {target}")
    assert errors == 0


def bench_serve(h, md, n=300):
    """A warm tools/call through a running bridge against the same call sent straight to the
    daemon by one process (DaemonClient.request: verify, then one request); tools/list over
    three kept servers from the daemon's cache; a 50 MiB structuredContent result through
    the bridge; the bridge's RSS after all that."""
    h.configure({"two": h.demo_server_entry(), "big": serve_test_entry(h)})
    client = md._client(md.load_config(str(h.cfg)), types.SimpleNamespace())
    s = ServeSession(h)
    s.initialize()
    assert len(s.tool_names()) > 20  # every server started, lists cached
    for _ in range(20):
        s.call("demo__counter")
        client.request("callTool", {"server": "demo", "tool": "counter"})
    direct, bridged = [], []
    for _ in range(n):  # interleaved: the machine's noise falls on both alike
        direct += bench_times(lambda: client.request("callTool", {"server": "demo", "tool": "counter"}), 1)
        bridged += bench_times(lambda: s.call("demo__counter"), 1)
    listed = bench_times(lambda: s.request("tools/list"), 100)
    rss_before = vm_status_kib(s.p.pid, "VmRSS")
    s.call("big__blob", {"kib": 50 * 1024}, timeout=120)  # the server makes it once, untimed
    large = bench_times(lambda: s.call("big__blob", {"kib": 50 * 1024}, timeout=120), 2)
    rss, hwm = vm_status_kib(s.p.pid, "VmRSS"), vm_status_kib(s.p.pid, "VmHWM")
    s.call("demo__counter")
    rss_after = vm_status_kib(s.p.pid, "VmRSS")
    assert s.close() == 0
    h.write_config()
    return direct, bridged, listed, large, (rss_before, rss, hwm, rss_after)


@pytest.mark.bench
def test_benchmark_serve(h, monkeypatch):
    md = _import_module()
    monkeypatch.setenv("MCPORTER_DAEMON_DIR", str(h.state_dir))
    # As after any first run on a user's machine: a bridge runs from cached bytecode.
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    py_compile.compile(str(MODULE_PATH), doraise=True)
    direct, bridged, listed, large, (rss_before, rss, hwm, rss_after) = bench_serve(h, md)
    added = statistics.median(bridged) - statistics.median(direct)
    rows = [
        ("warm call straight to the daemon (one process)", bench_ms(direct), ""),
        ("warm tools/call through the serve bridge", bench_ms(bridged), ""),
        ("added by the bridge (median)", f"{added * 1000:.2f} ms", "≤ 2 ms"),
        ("tools/list, 3 kept servers, from the cache", bench_ms(listed), "≤ 20 ms"),
        ("50 MiB structuredContent through the bridge", f"{statistics.median(large):.2f} s", "whole"),
        (
            "bridge RSS warm / peak (50 MiB) / after it",
            f"{rss_before / 1024:.1f} / {hwm / 1024:.0f} / {rss_after / 1024:.1f} MiB",
            "",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\n\nmcporter_daemon serve benchmark, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores\n")
    print(f"{'measurement'.ljust(width)}  {'result'.ljust(34)}  target")
    for name, result, target in rows:
        print(f"{name.ljust(width)}  {result.ljust(34)}  {target}")
