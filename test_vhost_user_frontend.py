"""Tests for vhost_user_frontend.py.

Run with:  python3 -m unittest -v test_vhost_user_frontend
Set VHOST_USER_REQUIRE_BACKENDS=1 to turn "backend not installed" skips into failures (CI does).
"""

import atexit
import errno
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest

try:
    import vhost_user_frontend as vu
except ImportError as e:  # TODO: make this a hard import once the module exists in main.
    if getattr(e, "name", None) != "vhost_user_frontend":
        raise
    vu = None


# Test support ########################################################################################
#
# Shared infrastructure for all tests: fd/thread leak checks and launchers for the real backends of
# /work/shared/BACKENDS.md (qemu-storage-daemon, virtiofsd, DPDK testpmd). Nothing here uses `vu`.

REQUIRE_BACKENDS = os.environ.get("VHOST_USER_REQUIRE_BACKENDS") == "1"

LEAK_GRACE = 1.0  # seconds to wait for fds to close and "vhost-user*" threads to finish
THREAD_PREFIX = "vhost-user"


def open_fds():
    """Return the set of fd numbers open in this process (without the one used to list them)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:  # the directory fd of listdir(), closed by now
            continue
        fds.add(fd)
    return fds


def _describe_fds(fds):
    out = []
    for fd in sorted(fds):
        try:
            target = os.readlink("/proc/self/fd/%d" % fd)
        except OSError:
            target = "?"
        out.append("%d -> %s" % (fd, target))
    return ", ".join(out)


def _leaked_threads(before):
    return [t for t in threading.enumerate()
            if t not in before and t.is_alive() and t.name.startswith(THREAD_PREFIX)]


class FdLeakCheck(unittest.TestCase):
    """Base class: fail a test that leaves new fds or "vhost-user*" threads behind.

    Subclasses that override setUp() must call super().setUp() first. The check is registered as the
    first cleanup, so it runs after tearDown() and after every later addCleanup() (e.g. daemon stops).
    """

    def setUp(self):
        super(FdLeakCheck, self).setUp()
        self._fds_before = open_fds()
        self._threads_before = set(threading.enumerate())
        self.addCleanup(self._check_leaks)

    def _check_leaks(self):
        deadline = time.monotonic() + LEAK_GRACE
        threads = _leaked_threads(self._threads_before)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        threads = _leaked_threads(self._threads_before)
        while True:
            new = open_fds() - self._fds_before
            if not new or time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        problems = []
        if threads:
            problems.append("threads still alive: %s" % ", ".join(
                "%s%s" % (t.name, " (daemon)" if t.daemon else "") for t in threads))
        if new:
            problems.append("fds leaked: %s" % _describe_fds(new))
        if problems:
            self.fail("; ".join(problems))


# Backends ------------------------------------------------------------------------------------------

# binary -> Debian package that ships it
PACKAGES = {
    "qemu-storage-daemon": "qemu-system-common",
    "qemu-img": "qemu-utils",
    "/usr/lib/qemu/virtiofsd": "qemu-system-common",
    "dpdk-testpmd": "dpdk-dev",
}


class BackendError(Exception):
    """A backend daemon could not be started (the message includes the tail of its log)."""


def find_binary(path_or_name):
    """Return the absolute path of an executable, or None."""
    if os.sep in path_or_name:
        return path_or_name if os.access(path_or_name, os.X_OK) else None
    return shutil.which(path_or_name)


def require_binary(testcase, path_or_name, package=None):
    """Return the path of `path_or_name`; skip `testcase` if missing (fail if REQUIRE_BACKENDS)."""
    path = find_binary(path_or_name)
    if path is not None:
        return path
    package = package or PACKAGES.get(path_or_name, "?")
    msg = "%s not installed: apt-get install %s" % (path_or_name, package)
    if REQUIRE_BACKENDS:
        testcase.fail(msg + " (VHOST_USER_REQUIRE_BACKENDS=1)")
    testcase.skipTest(msg)


def require_root(testcase, what):
    if os.geteuid() == 0:
        return
    msg = "%s needs root here (see BACKENDS.md for the rootless recipe)" % what
    if REQUIRE_BACKENDS:
        testcase.fail(msg + " (VHOST_USER_REQUIRE_BACKENDS=1)")
    testcase.skipTest(msg)


_live_daemons = set()


@atexit.register
def _stop_all_daemons():
    for d in list(_live_daemons):
        d.stop()


def _kill_with_parent():
    """preexec_fn: the daemon gets SIGKILL when the thread that started it dies (PR_SET_PDEATHSIG),
    so even a test run killed by `timeout` leaves no daemon behind (they run in their own session)."""
    import ctypes  # loaded in the parent: no dlopen after fork
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec():
        prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl()
            os._exit(1)
    return preexec


def _is_listening(path):
    """True if a listening AF_UNIX socket is bound at `path` (per /proc/net/unix; True if unknown)."""
    try:
        with open("/proc/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return True
    for line in lines:
        parts = line.split(None, 7)
        # Num RefCount Protocol Flags Type St Inode Path; Flags 0x10000 = __SO_ACCEPTCON
        if len(parts) == 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
            return True
    return False


class _Daemon(object):
    """A backend process in a private temp dir: start(), stop(), or use as a context manager.

    The process runs in its own session (process group); stop() sends SIGTERM to the group, waits,
    then SIGKILLs it, reaps it and removes the temp dir. stop() is idempotent and also runs at exit.
    The daemon is SIGKILLed if the thread that called start() exits (PR_SET_PDEATHSIG): start
    daemons from the main thread (setUp or the test method).
    """

    name = "daemon"
    socket_name = "vhost.sock"
    requires = ()          # ((binary, package), ...)
    needs_root = False
    start_timeout = 10.0
    stop_timeout = 10.0
    listens = True         # False: the daemon connects to us (client mode)

    def __init__(self, tmp=None):
        self.tmpdir = tempfile.mkdtemp(prefix="vhu-%s-" % self.name, dir=tmp)
        self.socket_path = os.path.join(self.tmpdir, self.socket_name)
        self.log_path = os.path.join(self.tmpdir, "daemon.log")
        self.proc = None
        self.argv = None

    # subclasses
    def _prepare(self):
        """Create files in self.tmpdir; return argv."""
        raise NotImplementedError

    def _cleanup_extra(self):
        pass

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self):
        return self.proc.poll() if self.proc is not None else None

    def log_tail(self, nbytes=4000):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - nbytes))
                return f.read().decode("utf-8", "replace")
        except OSError as e:
            return "<no log: %s>" % e

    def _error(self, what):
        return BackendError("%s %s\n  argv: %s\n  log tail (%s):\n%s" % (
            self.name, what, " ".join(self.argv or ()), self.log_path, self.log_tail()))

    def start(self):
        if self.proc is not None:
            raise RuntimeError("%s already started" % self.name)
        if self.tmpdir is None:
            raise RuntimeError("%s was stopped; create a new one" % self.name)
        for binary, package in self.requires:
            if find_binary(binary) is None:
                raise BackendError("%s not installed: apt-get install %s" % (binary, package))
        _live_daemons.add(self)
        try:
            self.argv = self._prepare()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=self.tmpdir, close_fds=True, start_new_session=True,
                    preexec_fn=_kill_with_parent())
            if self.listens:
                self.wait_for_socket()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_for_socket(self, timeout=None):
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise self._error("exited with status %s before creating %s" % (rc, self.socket_path))
            try:
                st = os.stat(self.socket_path)
            except OSError:
                st = None
            if st is not None and stat.S_ISSOCK(st.st_mode) and _is_listening(self.socket_path):
                return
            if time.monotonic() >= deadline:
                raise self._error("did not listen on %s within %.1f s" % (self.socket_path, self.start_timeout))
            time.sleep(0.005)

    def wait(self, timeout):
        """Wait for the daemon to exit by itself; return its status, or None on timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _signal_group(self, sig):
        try:
            os.killpg(self.proc.pid, sig)
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise

    def stop(self):
        """Stop the daemon (SIGTERM, then SIGKILL) and remove the temp dir. Returns the exit status."""
        try:
            if self.proc is not None:
                # Signal the whole group: also catches children (virtiofsd forks a sandbox child).
                # Only while the leader is unreaped, so its pid/pgid cannot have been reused.
                if self.proc.poll() is None:
                    self._signal_group(signal.SIGTERM)
                    try:
                        self.proc.wait(self.stop_timeout)
                    except subprocess.TimeoutExpired:
                        self._signal_group(signal.SIGKILL)
                        self.proc.wait()
        finally:
            _live_daemons.discard(self)
            self._cleanup_extra()
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None
        return self.returncode

    def __enter__(self):
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return "<%s pid=%s socket=%s>" % (type(self).__name__, self.pid, self.socket_path)


class QemuStorageDaemon(_Daemon):
    """qemu-storage-daemon exporting one vhost-user-blk device (BACKENDS.md 3a).

    kind: "null" (null-co, read-zeroes=on), "raw" or "qcow2" (a file of `size` bytes at .image_path).
    Serves one client at a time and survives client disconnects.
    """

    name = "qsd"
    socket_name = "blk.sock"
    requires = (("qemu-storage-daemon", "qemu-system-common"),)

    def __init__(self, tmp=None, kind="null", size=64 << 20, aio="threads", num_queues=1,
                 writable=True, logical_block_size=None):
        if kind not in ("null", "raw", "qcow2"):
            raise ValueError("kind must be 'null', 'raw' or 'qcow2', not %r" % (kind,))
        if aio not in ("threads", "io_uring", "native"):
            raise ValueError("bad aio %r" % (aio,))
        if kind == "qcow2":
            self.requires = self.requires + (("qemu-img", "qemu-utils"),)
        super(QemuStorageDaemon, self).__init__(tmp)
        self.kind = kind
        self.size = int(size)
        self.aio = aio
        self.num_queues = num_queues
        self.writable = writable
        self.logical_block_size = logical_block_size
        self.image_path = None if kind == "null" else os.path.join(self.tmpdir, "disk." + kind)

    def _prepare(self):
        if self.kind == "null":
            blockdev = "driver=null-co,node-name=disk0,size=%d,read-zeroes=on" % self.size
        elif self.kind == "raw":
            with open(self.image_path, "wb") as f:
                f.truncate(self.size)
            blockdev = "driver=file,node-name=disk0,filename=%s,aio=%s" % (self.image_path, self.aio)
            blockdev += ",cache.direct=on" if self.aio == "native" else ",cache.direct=off"
        else:
            with open(self.log_path, "ab") as log:
                subprocess.check_call(
                    [find_binary("qemu-img"), "create", "-q", "-f", "qcow2", self.image_path, str(self.size)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, timeout=30)
            blockdev = ("driver=qcow2,node-name=disk0,file.driver=file,file.filename=%s,file.aio=%s"
                        % (self.image_path, self.aio))
            if self.aio == "native":
                blockdev += ",file.cache.direct=on"
        export = ("type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=%s,"
                  "writable=%s,num-queues=%d" % (self.socket_path, "on" if self.writable else "off",
                                                 self.num_queues))
        if self.logical_block_size is not None:
            export += ",logical-block-size=%d" % self.logical_block_size
        return [find_binary("qemu-storage-daemon"), "--blockdev", blockdev, "--export", export]


VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


class Virtiofsd(_Daemon):
    """C virtiofsd from QEMU 7.2 (BACKENDS.md 3b). Needs root (namespace sandbox).

    It serves exactly ONE vhost-user connection and then exits by itself (0 on a clean disconnect,
    1 after a protocol panic): start a new one per test. If shared_dir is None, an empty dir inside
    the temp dir is shared (.shared_dir).
    """

    name = "virtiofsd"
    socket_name = "fs.sock"
    requires = ((VIRTIOFSD, "qemu-system-common"),)
    needs_root = True

    def __init__(self, tmp=None, shared_dir=None):
        super(Virtiofsd, self).__init__(tmp)
        self._own_share = shared_dir is None
        self.shared_dir = os.path.join(self.tmpdir, "share") if shared_dir is None else shared_dir

    def _prepare(self):
        if self._own_share:
            os.mkdir(self.shared_dir)
        return [VIRTIOFSD, "--socket-path=%s" % self.socket_path, "-o", "source=%s" % self.shared_dir,
                "-o", "cache=auto", "-o", "sandbox=namespace"]

    def _cleanup_extra(self):
        # virtiofsd leaves its lock file behind: /var/run/virtiofsd/<socket path with / -> .>.pid
        lock = os.path.join("/var/run/virtiofsd", self.socket_path.replace("/", ".") + ".pid")
        try:
            os.unlink(lock)
        except OSError:
            pass


_testpmd_counter = [0]


class Testpmd(_Daemon):
    """DPDK dpdk-testpmd with one net_vhost port, --no-huge, io forwarding (BACKENDS.md 3c).

    Server mode (default): testpmd listens on .socket_path. client=True: testpmd connects to
    .socket_path, so bind+listen there *before* start() (start() does not wait in that mode);
    it reconnects in a loop after we close. It busy-polls one CPU while running.
    """

    __test__ = False  # not a test class (for pytest)
    name = "testpmd"
    socket_name = "net.sock"
    requires = (("dpdk-testpmd", "dpdk-dev"),)

    def __init__(self, tmp=None, queues=1, client=False):
        super(Testpmd, self).__init__(tmp)
        self.queues = queues
        self.client = client
        self.listens = not client
        _testpmd_counter[0] += 1
        self.file_prefix = "vhu%d_%d" % (os.getpid(), _testpmd_counter[0])

    def _cpus(self):
        try:
            cpus = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cpus = list(range(os.cpu_count() or 1))
        if len(cpus) < 2:
            return str(cpus[0])  # one lcore: main only; testpmd then forwards on the main lcore
        return "%d,%d" % (cpus[0], cpus[1]) if cpus[:2] != [0, 1] else "0-1"

    def _prepare(self):
        vdev = "net_vhost0,iface=%s,queues=%d" % (self.socket_path, self.queues)
        if self.client:
            vdev += ",client=1"
        return [find_binary("dpdk-testpmd"), "--no-huge", "--no-pci", "--no-shconf", "-m", "128",
                "-l", self._cpus(), "--file-prefix=%s" % self.file_prefix, "--vdev", vdev,
                "--", "--total-num-mbufs=2048", "--auto-start", "--stats-period=3600",
                "--no-mlockall", "--forward-mode=io", "--nb-cores=1"]

    def _cleanup_extra(self):
        # EAL runtime dir (telemetry sockets) survives even --no-shconf.
        if os.geteuid() == 0:
            base = "/var/run/dpdk"
        else:
            base = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or "/tmp", "dpdk")
        shutil.rmtree(os.path.join(base, self.file_prefix), ignore_errors=True)


class BackendTestMixin(object):
    """Mixin for TestCase: start real backends with skip/fail-on-missing and guaranteed cleanup."""

    def require_binary(self, path_or_name, package=None):
        return require_binary(self, path_or_name, package)

    def start_backend(self, cls, *args, **kwargs):
        """Check prerequisites, create cls(*args, **kwargs), register its stop(), start it.

        Pass start=False to get the daemon unstarted (e.g. Testpmd(client=True): listen first).
        """
        start = kwargs.pop("start", True)
        for binary, package in cls.requires:
            self.require_binary(binary, package)
        if cls.needs_root:
            require_root(self, cls.name)
        daemon = cls(*args, **kwargs)
        for binary, package in daemon.requires:  # instance may add some (qcow2 -> qemu-img)
            self.require_binary(binary, package)
        self.addCleanup(daemon.stop)
        if start:
            daemon.start()
        return daemon


def unix_connect(path, timeout=5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(path)
    except BaseException:
        s.close()
        raise
    return s


# End of test support #################################################################################


class TestDaemonHarness(BackendTestMixin, FdLeakCheck):
    """The test support itself: daemons start, accept a connection, stop, and leave nothing behind."""

    def _check_stopped(self, d):
        tmpdir = d.tmpdir
        d.stop()
        self.assertIsNotNone(d.returncode)
        self.assertFalse(os.path.exists(tmpdir))
        self.assertNotIn(d, _live_daemons)
        with self.assertRaises(OSError):
            os.kill(d.pid, 0)  # reaped, nothing left with that pid
        self.assertEqual(d.stop(), d.returncode)  # idempotent

    def _check_connect(self, d):
        s = unix_connect(d.socket_path)
        s.close()

    def test_qsd(self):
        for kind in ("null", "raw", "qcow2"):
            with self.subTest(kind=kind):
                d = self.start_backend(QemuStorageDaemon, kind=kind, size=1 << 20)
                self.assertIsNone(d.returncode)
                if d.image_path:
                    self.assertTrue(os.path.isfile(d.image_path))
                self._check_connect(d)
                self._check_connect(d)  # qsd serves the next client after a disconnect
                self.assertIsNone(d.returncode)
                self._check_stopped(d)
                self.assertEqual(d.returncode, 0)  # SIGTERM exits 0

    def test_qsd_options(self):
        d = self.start_backend(QemuStorageDaemon, kind="raw", aio="io_uring", num_queues=2,
                               writable=False, logical_block_size=4096)
        self._check_connect(d)
        self._check_stopped(d)

    def test_qsd_start_failure_reports_log(self):
        self.require_binary("qemu-storage-daemon")
        d = QemuStorageDaemon(logical_block_size=3)  # invalid: not a power of 2
        tmpdir = d.tmpdir
        with self.assertRaises(BackendError) as cm:
            d.start()
        msg = str(cm.exception)
        self.assertIn("exited with status 1", msg)
        self.assertIn("qemu-storage-daemon: --export", msg.split("log tail", 1)[1])  # qsd's own error
        self.assertIsNotNone(d.returncode)
        self.assertFalse(os.path.exists(tmpdir))

    def test_virtiofsd(self):
        d = self.start_backend(Virtiofsd)
        self.assertTrue(os.path.isdir(d.shared_dir))
        self._check_connect(d)
        # One connection, then it exits by itself.
        self.assertEqual(d.wait(10), 0, d.log_tail())
        self._check_stopped(d)

    def test_virtiofsd_stop_unused(self):
        d = self.start_backend(Virtiofsd, shared_dir=tempfile.mkdtemp(prefix="vhu-share-"))
        self.addCleanup(os.rmdir, d.shared_dir)
        self._check_stopped(d)
        self.assertTrue(os.path.isdir(d.shared_dir))  # not ours: kept

    def test_testpmd(self):
        d = self.start_backend(Testpmd, queues=2)
        self._check_connect(d)
        t0 = time.monotonic()
        self._check_stopped(d)
        self.assertLess(time.monotonic() - t0, d.stop_timeout)  # SIGTERM worked, no SIGKILL
        self.assertEqual(d.returncode, 0, d.log_tail())
        self.assertFalse(os.path.exists("/var/run/dpdk/" + d.file_prefix))

    def test_testpmd_client(self):
        d = self.start_backend(Testpmd, client=True, start=False)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(d.socket_path)
        listener.listen(1)
        listener.settimeout(10)
        d.start()
        conn, _ = listener.accept()
        conn.close()
        self._check_stopped(d)

    def test_context_manager(self):
        self.require_binary("qemu-storage-daemon")
        with QemuStorageDaemon() as d:
            self._check_connect(d)
        self.assertIsNotNone(d.returncode)

    def test_leak_check_detects_leaks(self):
        class Leaky(FdLeakCheck):
            def test_fd(self):
                self.r, self.w = os.pipe()

            def test_thread(self):
                ev = threading.Event()
                self.ev = ev
                threading.Thread(target=ev.wait, args=(10,), name="vhost-user-test", daemon=True).start()

            def test_clean(self):
                r, w = os.pipe()
                os.close(r)
                os.close(w)

        result = unittest.TestResult()
        for name in ("test_fd", "test_thread", "test_clean"):
            case = Leaky(name)
            case.run(result)
            if name == "test_fd":
                os.close(case.r)
                os.close(case.w)
            elif name == "test_thread":
                case.ev.set()
        self.assertEqual(result.testsRun, 3)
        msgs = [tb for _, tb in result.failures + result.errors]
        self.assertEqual(len(msgs), 2, msgs)
        self.assertIn("fds leaked", msgs[0])
        self.assertIn("vhost-user-test", msgs[1])


# CLI ################################################################################################
#
# The command line (`main(argv)` and `python -m vhost_user_frontend`) against real daemons, and its
# error cases against a scripted peer (_ScriptedBackend) that answers only the requests probe sends.

import contextlib
import io
import json
import re
import struct
from unittest import mock

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))


def run_cli(*argv):
    """Run main(argv) in-process; return (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = vu.main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


def run_cli_process(*argv, timeout=60):
    """Run `python -m vhost_user_frontend ARGV` (what users type); return (status, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "vhost_user_frontend"] + [str(a) for a in argv],
                            cwd=MODULE_DIR, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out.decode(), err.decode()


class _ScriptedBackend(object):
    """A back-end on a unix socket that answers probe's GET_* requests from a script.

    replies: {request code: reply body bytes}; GET_CONFIG is answered from `config` (size 0 when
    the window lies outside it). After `hang_up_after` requests it closes the connection; with
    `silent` it accepts and never answers. Requests seen go to `.requests` as (code, body).
    """

    def __init__(self, tmpdir, replies, config=b"", hang_up_after=None, silent=False):
        self.path = os.path.join(tmpdir, "scripted.sock")
        self.replies = replies
        self.config = config
        self.hang_up_after = hang_up_after
        self.silent = silent
        self.requests = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(10)
        self.thread = threading.Thread(target=self._serve, name="cli-scripted-backend")
        self.thread.start()

    def _recv(self, conn, size):
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def _serve(self):
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            try:
                while True:
                    code, flags, size = struct.unpack("<III", self._recv(conn, 12))
                    body = self._recv(conn, size)
                    self.requests.append((code, body))
                    if self.silent:
                        continue
                    if self.hang_up_after is not None and len(self.requests) > self.hang_up_after:
                        return
                    reply = self.replies.get(code)
                    if code == 24:  # GET_CONFIG
                        offset, length, _ = struct.unpack_from("<III", body)
                        data = self.config[offset:offset + length]
                        reply = struct.pack("<III", offset, length, 0) + data \
                            if len(data) == length else b""
                    if reply is not None:
                        conn.sendall(struct.pack("<III", code, 0x5, len(reply)) + reply)
            except (EOFError, OSError):
                return

    def close(self):
        self.listener.close()
        self.thread.join(10)


def u64(value):
    return struct.pack("<Q", value)


@unittest.skipIf(vu is None, "vhost_user_frontend.py is not importable")
class TestCliProbe(BackendTestMixin, FdLeakCheck):
    """`probe` against each real daemon: values match BACKENDS.md, and nothing is left behind."""

    def test_probe_qsd_json(self):
        d = self.start_backend(QemuStorageDaemon, size=64 << 20, num_queues=2)
        status, out, err = run_cli("probe", d.socket_path, "--json")
        self.assertEqual((status, err), (0, ""))
        info = json.loads(out)
        self.assertEqual(sorted(info), sorted([
            "device_type", "device_type_source", "features", "feature_names", "protocol_features",
            "protocol_feature_names", "queue_num", "max_mem_slots", "shared_memory", "config",
            "config_fields", "config_error"]))
        self.assertEqual(info["features"], 0x175007e46)
        self.assertEqual(info["protocol_features"], 0x8f2b)
        self.assertEqual(info["queue_num"], 2)
        self.assertEqual(info["max_mem_slots"], 32)
        self.assertEqual(info["device_type"], "block")
        self.assertTrue(info["device_type_source"].startswith("guessed"))
        self.assertEqual(info["feature_names"], [
            "BLK_SIZE_MAX", "BLK_SEG_MAX", "BLK_BLK_SIZE", "BLK_FLUSH", "BLK_TOPOLOGY",
            "BLK_CONFIG_WCE", "BLK_MQ", "BLK_DISCARD", "BLK_WRITE_ZEROES", "NOTIFY_ON_EMPTY",
            "LOG_ALL", "RING_INDIRECT_DESC", "RING_EVENT_IDX", "PROTOCOL_FEATURES", "VERSION_1"])
        self.assertEqual(info["protocol_feature_names"], [
            "MQ", "LOG_SHMFD", "REPLY_ACK", "BACKEND_REQ", "PAGEFAULT", "CONFIG", "BACKEND_SEND_FD",
            "HOST_NOTIFIER", "CONFIGURE_MEM_SLOTS"])
        self.assertEqual(len(bytes.fromhex(info["config"])), 60)
        fields = info["config_fields"]
        self.assertEqual(fields["capacity"], (64 << 20) // 512)
        self.assertEqual((fields["blk_size"], fields["seg_max"], fields["num_queues"]), (512, 126, 2))
        self.assertEqual((fields["max_discard_sectors"], fields["max_write_zeroes_sectors"]),
                         (32768, 32768))
        self.assertNotIn("cylinders", fields)  # BLK_GEOMETRY is not offered
        self.assertIsNone(info["config_error"])
        self.assertIsNone(info["shared_memory"])
        # qsd serves the next client: probe disconnected cleanly.
        self.assertEqual(run_cli("probe", d.socket_path, "--json")[:2], (0, out))
        self.assertIsNone(d.returncode)

    def test_probe_qsd_read_only_text_and_module_run(self):
        d = self.start_backend(QemuStorageDaemon, size=1 << 30, writable=False,
                               logical_block_size=4096)
        status, out, err = run_cli_process("probe", d.socket_path)
        self.assertEqual((status, err), (0, ""))
        self.assertIn("0x175007e66", out)
        self.assertIn("BLK_RO", out.split())
        self.assertRegex(out, r"capacity +2097152 sectors \(1 GiB\)")
        self.assertRegex(out, r"blk_size +4096\n")
        self.assertRegex(out, r"queues +1\n")
        self.assertRegex(out, r"max memory slots +32\n")
        self.assertIn("device type          block (guessed", out)

    def test_probe_testpmd(self):
        d = self.start_backend(Testpmd)
        status, out, err = run_cli("probe", d.socket_path, "--json", "--type", "net")
        self.assertEqual((status, err), (0, ""))
        info = json.loads(out)
        self.assertEqual(info["features"], 0xd7c66e7cb)
        self.assertEqual(info["protocol_features"], 0x10cbf)
        self.assertEqual(info["queue_num"], 128)
        self.assertIsNone(info["max_mem_slots"])
        self.assertIsNone(info["config"])
        self.assertEqual(info["config_fields"], {})
        self.assertEqual(info["config_error"], "CONFIG not offered")
        self.assertEqual(info["device_type_source"], "given")
        self.assertIn("NET_MRG_RXBUF", info["feature_names"])
        self.assertIn("RING_PACKED", info["feature_names"])
        self.assertIn("RARP", info["protocol_feature_names"])
        # The wrong type is refused in one line, before any config is read.
        status, out, err = run_cli("probe", d.socket_path, "--type", "blk")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("wrong device type: the back-end is a net device", err)
        # Text output names the device bits by the guessed type.
        status, out, err = run_cli("probe", d.socket_path)
        self.assertEqual((status, err), (0, ""))
        self.assertIn("net (guessed", out)
        self.assertRegex(out, r"queues +128\n")
        self.assertIn("CONFIGURE_MEM_SLOTS not offered", out)
        if hasattr(vu, "BlockDevice"):
            status, out, err = run_cli("blk", d.socket_path, "info")
            self.assertEqual((status, out), (1, ""))
            self.assertIn("wrong device type: the back-end is a net device", err)
        self.assertIsNone(d.returncode)

    def test_probe_virtiofsd(self):
        d = self.start_backend(Virtiofsd)
        status, out, err = run_cli("probe", d.socket_path, "--json", "-v")
        self.assertEqual(status, 0, err)
        info = json.loads(out)
        self.assertEqual((info["features"], info["protocol_features"]), (0x175000000, 0x8c2b))
        self.assertEqual((info["queue_num"], info["max_mem_slots"]), (2, 32))
        self.assertEqual(info["device_type"], "fs")
        self.assertIsNone(info["config"])
        # -v logs every message both ways, by name; probe negotiated only what it needed.
        for line in ("-> GET_FEATURES", "<- GET_FEATURES", "-> SET_PROTOCOL_FEATURES",
                     "-> GET_QUEUE_NUM", "<- GET_QUEUE_NUM", "<- GET_MAX_MEM_SLOTS"):
            self.assertIn(line, err)
        for absent in ("SET_OWNER", "SET_FEATURES ", "SET_MEM_TABLE", "GET_CONFIG"):
            self.assertNotIn(absent, err)
        # virtiofsd exits by itself after its one connection: 0 means a clean disconnect.
        self.assertEqual(d.wait(10), 0, d.log_tail())


@unittest.skipIf(vu is None, "vhost_user_frontend.py is not importable")
class TestCliErrors(FdLeakCheck):
    """Each failure is one line on stderr, nothing on stdout, and exit status 1 (2 for usage)."""

    def setUp(self):
        super(TestCliErrors, self).setUp()
        self.tmpdir = tempfile.mkdtemp(prefix="vhu-cli-")
        self.addCleanup(shutil.rmtree, self.tmpdir, True)

    def scripted(self, **kwargs):
        replies = kwargs.pop("replies", {
            1: u64(vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.PROTOCOL_FEATURES),
            15: u64(vu.ProtocolFeature.MQ), 17: u64(1)})
        backend = _ScriptedBackend(self.tmpdir, replies, **kwargs)
        self.addCleanup(backend.close)
        return backend

    def assertFails(self, argv, *fragments):
        status, out, err = run_cli(*argv)
        self.assertEqual((status, out), (1, ""), err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.startswith("vhost_user_frontend: error: "), err)
        self.assertNotIn("Traceback", err)
        for fragment in fragments:
            self.assertIn(fragment, err)
        return err

    def test_missing_socket(self):
        path = os.path.join(self.tmpdir, "absent.sock")
        self.assertFails(["probe", path], path + ": no such socket")

    def test_not_a_socket(self):
        path = os.path.join(self.tmpdir, "file")
        open(path, "w").close()
        self.assertFails(["probe", path], "not a unix socket")

    def test_connection_refused(self):
        path = os.path.join(self.tmpdir, "stale.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.close()  # the file stays, nobody listens
        self.assertFails(["probe", path], "connection refused")

    def test_timeout(self):
        backend = self.scripted(silent=True)
        t0 = time.monotonic()
        self.assertFails(["probe", backend.path, "--timeout", "0.2"],
                         "timeout: GET_FEATURES", "0.2 s")
        self.assertLess(time.monotonic() - t0, 5)

    def test_backend_disconnects(self):
        for after in (0, 2):
            with self.subTest(hang_up_after=after):
                backend = self.scripted(hang_up_after=after)
                name = "GET_FEATURES" if after == 0 else "GET_QUEUE_NUM"
                self.assertFails(["probe", backend.path], "back-end disconnected", name)
                backend.close()
                os.unlink(backend.path)

    def test_malformed_reply(self):
        backend = self.scripted(replies={1: b"\0" * 4})
        self.assertFails(["probe", backend.path], "GET_FEATURES: reply size 4, expected 8")

    def test_usage_errors(self):
        for argv in ([], ["probe"], ["probe", "x", "--type", "floppy"], ["probe", "x", "--timeout", "0"],
                     ["frobnicate"]):
            with self.subTest(argv=argv):
                status, out, err = run_cli(*argv)
                self.assertEqual((status, out), (2, ""))
                self.assertIn("usage: vhost_user_frontend", err)

    def test_version_and_help(self):
        status, out, err = run_cli("--version")
        self.assertEqual((status, out.strip()), (0, "vhost_user_frontend " + vu.__version__))
        status, out, err = run_cli("probe", "--help")
        self.assertEqual(status, 0)
        self.assertIn("--json", out)

    def test_unknown_bits_are_kept(self):
        features = vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.PROTOCOL_FEATURES | 1 << 45 | 1 << 4 | 1
        protocol = vu.ProtocolFeature.MQ | vu.ProtocolFeature.SHMEM | 1 << 40
        shmem = struct.pack("<II256Q", 2, 0, *([1 << 20, 0, 4096] + [0] * 253))
        backend = self.scripted(replies={1: u64(features), 15: u64(protocol), 17: u64(3),
                                         44: shmem})
        status, out, err = run_cli("probe", backend.path, "--json", "--type", "vsock")
        self.assertEqual(status, 0, err)
        info = json.loads(out)
        self.assertEqual(info["features"], features)
        self.assertEqual(info["feature_names"][:2], ["VSOCK_STREAM", "bit 4"])  # vsock names 0-2
        self.assertIn("bit 45", info["feature_names"])
        self.assertEqual(info["protocol_features"], protocol)
        self.assertEqual(info["protocol_feature_names"], ["MQ", "SHMEM", "bit 40"])
        self.assertEqual(info["shared_memory"], [{"shmid": 0, "size": 1 << 20},
                                                 {"shmid": 2, "size": 4096}])
        self.assertEqual(info["queue_num"], 3)
        # Only the bits probe needs were negotiated (MQ, SHMEM), never the unknown one.
        backend.close()
        self.assertIn((16, u64(vu.ProtocolFeature.MQ | vu.ProtocolFeature.SHMEM)), backend.requests)

    def test_config_decoding(self):
        proto = u64(vu.ProtocolFeature.CONFIG)
        base = vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.PROTOCOL_FEATURES
        cases = [
            ("vsock", base, struct.pack("<Q", 42), {"guest_cid": 42}),
            ("fs", base, b"myfs".ljust(36, b"\0") + struct.pack("<I", 1),
             {"tag": "myfs", "num_request_queues": 1}),
            ("gpu", base, struct.pack("<4I", 0, 0, 1, 2),
             {"events_read": 0, "events_clear": 0, "num_scanouts": 1, "num_capsets": 2}),
            ("net", base | 1 << 5 | 1 << 3 | 1 << 16, bytes.fromhex("525400123456") +
             struct.pack("<HHH", 1, 0, 1500), {"mac": "52:54:00:12:34:56", "status": 1,
                                               "mtu": 1500}),
        ]
        for kind, features, config, expected in cases:
            with self.subTest(kind=kind):
                backend = self.scripted(replies={1: u64(features), 15: proto}, config=config)
                status, out, err = run_cli("probe", backend.path, "--json", "--type", kind)
                self.assertEqual(status, 0, err)
                info = json.loads(out)
                self.assertEqual(info["config_fields"], expected)
                self.assertEqual(info["config"], config.hex())
                backend.close()
                os.unlink(backend.path)
        # A back-end that refuses the read is reported, not fatal.
        backend = self.scripted(replies={1: u64(base), 15: proto}, config=b"")
        status, out, err = run_cli("probe", backend.path, "--type", "vsock")
        self.assertEqual(status, 0, err)
        self.assertIn("not read: GET_CONFIG: back-end refused to read 8 bytes", out)


def needs_device(name):
    return unittest.skipUnless(vu is not None and hasattr(vu, name), "%s is not in the module yet" % name)


@needs_device("BlockDevice")
class TestCliBlock(BackendTestMixin, FdLeakCheck):
    """`blk`, `bench` and `demo` against qemu-storage-daemon, data checked in the raw file."""

    def test_blk_commands(self):
        d = self.start_backend(QemuStorageDaemon, kind="raw", size=4 << 20)
        sock = d.socket_path
        status, out, err = run_cli("blk", sock, "info", "--json")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(json.loads(out), {"capacity": 4 << 20, "block_size": 512, "read_only": False,
                                           "num_queues": 1, "id": "vhost_user_blk"})
        data = os.urandom(1024)
        src, dst = os.path.join(d.tmpdir, "in"), os.path.join(d.tmpdir, "out")
        with open(src, "wb") as f:
            f.write(data)
        self.assertEqual(run_cli("blk", sock, "write", "4k", "-i", src),
                         (0, "wrote 1024 bytes at offset 4096\n", ""))
        self.assertEqual(run_cli("blk", sock, "flush"), (0, "", ""))
        with open(d.image_path, "rb") as f:
            f.seek(4096)
            self.assertEqual(f.read(1024), data)
        self.assertEqual(run_cli("blk", sock, "read", "0x1000", "1024", "-o", dst)[0], 0)
        with open(dst, "rb") as f:
            self.assertEqual(f.read(), data)
        # Raw bytes on a piped stdout, from a real `python -m` run.
        proc = subprocess.Popen([sys.executable, "-m", "vhost_user_frontend", "blk", sock, "read", "4096",
                                 "1024"], cwd=MODULE_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = proc.communicate(timeout=60)
        self.assertEqual((proc.returncode, out, err), (0, data, b""))
        self.assertEqual(run_cli("blk", sock, "write-zeroes", "4096", "512"), (0, "", ""))
        self.assertEqual(run_cli("blk", sock, "discard", "1M", "1M"), (0, "", ""))
        with open(d.image_path, "rb") as f:
            f.seek(4096)
            self.assertEqual(f.read(1024), bytes(512) + data[512:])
        # Bad ranges: one line, status 1, nothing sent that could hurt the disk.
        for argv, fragment in ((["read", "1", "512"], "multiples of the block size 512"),
                               (["read", "4M", "512"], "past the capacity"),
                               (["write", "0", "-i", os.path.join(d.tmpdir, "absent")], "No such file")):
            with self.subTest(argv=argv):
                status, out, err = run_cli("blk", sock, *argv)
                self.assertEqual((status, out), (1, ""), err)
                self.assertEqual(err.count("\n"), 1, err)
                self.assertIn(fragment, err)
        self.assertIsNone(d.returncode)

    def test_blk_read_only(self):
        d = self.start_backend(QemuStorageDaemon, writable=False)
        status, out, err = run_cli("blk", d.socket_path, "write", "0", "-i", os.devnull)
        self.assertEqual((status, out), (1, ""))
        self.assertIn("read-only", err)
        status, out, err = run_cli("bench", d.socket_path, "--rw", "randwrite", "--seconds", "0.1")
        self.assertEqual(status, 1)
        self.assertIn("read-only", err)
        status, out, err = run_cli("blk", d.socket_path, "info")
        self.assertEqual(status, 0, err)
        self.assertRegex(out, r"read only +True\n")

    def test_bench(self):
        d = self.start_backend(QemuStorageDaemon, num_queues=2)
        status, out, err = run_cli("bench", d.socket_path, "--seconds", "0.5", "--depth", "4", "--json",
                                   "--backend-pid", d.pid)
        self.assertEqual((status, err), (0, ""))  # stderr is no tty: no progress line
        report = json.loads(out)
        self.assertEqual((report["type"], report["rw"], report["size"], report["depth"], report["queues"]),
                         ("blk", "randread", 4096, 4, 1))
        self.assertGreater(report["requests"], 0)
        self.assertGreaterEqual(report["seconds"], 0.5)
        self.assertAlmostEqual(report["iops"], report["requests"] / report["seconds"], delta=report["iops"] / 1000)
        self.assertAlmostEqual(report["mib_per_s"], report["iops"] * 4096 / 2**20, delta=0.1)
        lat = report["latency_us"]
        self.assertTrue(0 < lat["min"] <= lat["p50"] <= lat["p99"] <= lat["p999"] <= lat["max"], lat)
        self.assertGreater(report["frontend_cpu_us_per_request"], 0)
        self.assertGreaterEqual(report["backend_cpu_us_per_request"], 0)
        status, out, err = run_cli("bench", d.socket_path, "--seconds", "0.3", "--queues", "2",
                                   "--rw", "write", "--size", "8k", "--depth", "2")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("blk write, 8192 bytes, depth 2, 2 queue(s)", out)
        self.assertIn("n/a (give --backend-pid)", out)
        status, out, err = run_cli("bench", d.socket_path, "--size", "1000", "--seconds", "0.1")
        self.assertEqual(status, 1)
        self.assertIn("--size 1000 must be a positive multiple of the block size 512", err)

    def test_demo(self):
        self.require_binary("qemu-storage-daemon")
        status, out, err = run_cli("demo", "--seconds", "0.3")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("identical, and the raw file holds the same bytes", out)
        self.assertIn("0x175007e46", out)
        self.assertIn("IOPS", out)
        pid = int(re.search(r"qemu-storage-daemon \(pid (\d+)\)", out).group(1))
        tmpdir = re.search(r"removed (\S+)", out).group(1)
        self.assertFalse(os.path.exists(tmpdir))
        with self.assertRaises(OSError):
            os.kill(pid, 0)  # stopped and reaped

    def test_demo_without_daemon(self):
        empty = tempfile.mkdtemp(prefix="vhu-cli-path-")
        self.addCleanup(os.rmdir, empty)
        with mock.patch.dict(os.environ, {"PATH": empty}):
            status, out, err = run_cli("demo")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("qemu-storage-daemon, which is not installed", err)
        self.assertIn("apt-get install qemu-system-common", err)
        self.assertEqual(err.count("\n"), 1, err)


if __name__ == "__main__":
    unittest.main()
