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


if __name__ == "__main__":
    unittest.main()
