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


# FakeBackend and frontend lifecycle tests ############################################################
#
# FakeBackend: a real vhost-user back-end in a thread (written from the spec with struct, not with the
# module's encoders), which records every message and can act as the device on its rings.

import collections  # noqa: E402
import mmap  # noqa: E402
import select  # noqa: E402
import struct  # noqa: E402

_HDR = struct.Struct("<III")
_U64 = struct.Struct("<Q")
_STATE = struct.Struct("<II")

# Request codes, from the spec's table (independent of the module's enums).
FRONTEND_REQ_NAMES = {
    1: "GET_FEATURES", 2: "SET_FEATURES", 3: "SET_OWNER", 4: "RESET_OWNER", 5: "SET_MEM_TABLE",
    8: "SET_VRING_NUM", 9: "SET_VRING_ADDR", 10: "SET_VRING_BASE", 11: "GET_VRING_BASE",
    12: "SET_VRING_KICK", 13: "SET_VRING_CALL", 14: "SET_VRING_ERR", 15: "GET_PROTOCOL_FEATURES",
    16: "SET_PROTOCOL_FEATURES", 17: "GET_QUEUE_NUM", 18: "SET_VRING_ENABLE",
    21: "SET_BACKEND_REQ_FD", 24: "GET_CONFIG", 25: "SET_CONFIG", 42: "SET_DEVICE_STATE_FD",
    43: "CHECK_DEVICE_STATE", 44: "GET_SHMEM_CONFIG",
}
_CODES = {name: code for code, name in FRONTEND_REQ_NAMES.items()}

P_MQ, P_REPLY_ACK, P_BACKEND_REQ, P_CONFIG = 1 << 0, 1 << 3, 1 << 5, 1 << 9
P_DEVICE_STATE, P_SHMEM = 1 << 19, 1 << 22
FAKE_PROTOCOL = P_MQ | P_REPLY_ACK | P_BACKEND_REQ | P_CONFIG | P_DEVICE_STATE | P_SHMEM
F_PROTOCOL, F_VERSION_1, F_EVENT_IDX = 1 << 30, 1 << 32, 1 << 29
FAKE_FEATURES = F_PROTOCOL | F_VERSION_1 | F_EVENT_IDX | (1 << 9) | (1 << 6)  # + BLK_FLUSH, BLK_SIZE
PAGE = mmap.PAGESIZE

Msg = collections.namedtuple("Msg", "name flags body nfds")


def wait_for(predicate, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.001)


def _recv_message(sock):
    """(code, flags, body, fds) of one message; fds ride on the header."""
    data, anc, _, _ = sock.recvmsg(_HDR.size, socket.CMSG_SPACE(32 * 4))
    fds = []
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.extend(struct.unpack("%di" % (len(payload) // 4), payload[:len(payload) // 4 * 4]))
    if not data:
        raise EOFError
    while len(data) < _HDR.size:
        more = sock.recv(_HDR.size - len(data))
        if not more:
            raise EOFError
        data += more
    code, flags, size = _HDR.unpack(data)
    body = b""
    while len(body) < size:
        more = sock.recv(size - len(body))
        if not more:
            raise EOFError
        body += more
    return code, flags, body, fds


def _send_message(sock, code, flags, body=b"", fds=()):
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("%di" % len(fds), *fds))] if fds else []
    sock.sendmsg([_HDR.pack(code, flags, len(body)) + body], anc)


class _Ring(object):
    def __init__(self):
        self.num = 0
        self.desc = self.used = self.avail = 0
        self.base = 0
        self.last_avail = 0
        self.kick = None
        self.call = None
        self.started = False
        self.enabled = False


class FakeBackend(object):
    """A vhost-user back-end in a thread, on a socketpair (``.frontend_sock``) or a unix ``path``.

    Records every message in ``.messages`` (Msg(name, flags, body, nfds)); serves CONFIG, MQ,
    REPLY_ACK, BACKEND_REQ (``send_backend_request``), DEVICE_STATE (streams ``state`` from a thread
    on SAVE, stores ``loaded_state`` on LOAD; ``return_state_fd`` answers with its own pipe end) and
    GET_SHMEM_CONFIG (``shmem_sizes``). As a device: ``device(backend, ring_index)`` runs on the
    backend thread at every kick, and may use ``pop_avail``, ``push_used``, ``read``/``write`` (GPAs).
    """

    def __init__(self, features=FAKE_FEATURES, protocol_features=FAKE_PROTOCOL, queue_num=2,
                 config=bytes(range(60)), state=b"fake device state " * 5000, shmem_sizes=(),
                 device=None, return_state_fd=False):
        self.features = features
        self.protocol_features = protocol_features
        self.queue_num = queue_num
        self.config = bytearray(config)
        self.state = state
        self.shmem_sizes = list(shmem_sizes)
        self.device = device
        self.return_state_fd = return_state_fd
        self.messages = []
        self.kicks = collections.Counter()
        self.rings = collections.defaultdict(_Ring)
        self.regions = []          # (gpa, size, uaddr, mmap)
        self.acked_features = None
        self.acked_protocol = 0
        self.loaded_state = None
        self.channel = None        # the back-end request socket
        self.error = None
        self._transfer = None
        self._transfer_ok = True
        self.sock, self.frontend_sock = socket.socketpair()
        self._stop_r, self._stop_w = os.pipe()
        self.thread = threading.Thread(target=self._run, name="vhost-user-fake-backend", daemon=True)
        self.thread.start()

    # -- lifecycle of the fake itself -------------------------------------------------------------

    def close(self):
        if self._stop_w is not None:
            os.write(self._stop_w, b"x")
            self.thread.join(5)
            assert not self.thread.is_alive(), "fake backend thread did not stop"
            for fd in (self._stop_r, self._stop_w):
                os.close(fd)
            self._stop_w = None
        if self._transfer is not None:
            self._transfer.join(5)
        for ring in self.rings.values():
            for fd in (ring.kick, ring.call):
                if fd is not None:
                    os.close(fd)
            ring.kick = ring.call = None
        self._unmap()
        for s in (self.sock, self.frontend_sock, self.channel):
            if s is not None:
                s.close()
        if self.error is not None:
            raise self.error

    def hang_up(self):
        """Close the main socket as a crashing back-end would (the thread stops serving)."""
        os.write(self._stop_w, b"x")
        self.thread.join(5)
        self.sock.close()

    def _unmap(self):
        for region in self.regions:
            region[3].close()
        self.regions = []

    # -- what the tests look at -------------------------------------------------------------------

    def names(self, count=None):
        """Names of the requests received, after waiting for at least ``count`` of them."""
        if count is not None:
            wait_for(lambda: len(self.messages) >= count, what="%d requests, got %r" % (
                count, [m.name for m in self.messages]))
        return [m.name for m in self.messages]

    def take(self, count):
        """The next ``count`` messages (waits for them) and forget them."""
        self.names(count)
        taken, self.messages[:count] = self.messages[:count], []
        return taken

    # -- the device side --------------------------------------------------------------------------

    def _locate(self, addr, length, key):
        for gpa, size, uaddr, mapped in self.regions:
            start = gpa if key == "gpa" else uaddr
            if start <= addr and addr + length <= start + size:
                return mapped, addr - start
        raise ValueError("address %#x+%d outside guest memory" % (addr, length))

    def read(self, gpa, length, key="gpa"):
        mapped, offset = self._locate(gpa, length, key)
        return bytes(mapped[offset:offset + length])

    def write(self, gpa, data, key="gpa"):
        mapped, offset = self._locate(gpa, len(data), key)
        mapped[offset:offset + len(data)] = data

    def pop_avail(self, index):
        """(head, [(addr, len, flags), ...]) of the next available chain, or None."""
        ring = self.rings[index]
        avail_idx = struct.unpack("<H", self.read(ring.avail + 2, 2, "uaddr"))[0]
        if avail_idx == ring.last_avail & 0xFFFF:
            return None
        slot = ring.last_avail % ring.num
        head = struct.unpack("<H", self.read(ring.avail + 4 + 2 * slot, 2, "uaddr"))[0]
        ring.last_avail = (ring.last_avail + 1) & 0xFFFF
        chain, i = [], head
        while True:
            addr, length, flags, nxt = struct.unpack("<QIHH", self.read(ring.desc + 16 * i, 16, "uaddr"))
            chain.append((addr, length, flags))
            if not flags & 1:
                return head, chain
            i = nxt

    def push_used(self, index, head, length):
        ring = self.rings[index]
        used_idx = struct.unpack("<H", self.read(ring.used + 2, 2, "uaddr"))[0]
        self.write(ring.used + 4 + 8 * (used_idx % ring.num), struct.pack("<II", head, length), "uaddr")
        self.write(ring.used + 2, struct.pack("<H", (used_idx + 1) & 0xFFFF), "uaddr")
        self.signal_call(index)

    def signal_call(self, index):
        os.write(self.rings[index].call, _U64.pack(1))

    # -- back-end requests ------------------------------------------------------------------------

    def send_backend_request(self, code, body=b"", fds=(), need_reply=True, flags=None):
        """Send a back-end request; returns the reply's u64, or None when none is expected."""
        if flags is None:
            flags = 1 | (8 if need_reply else 0)
        self.channel.settimeout(5)
        _send_message(self.channel, code, flags, body, fds)
        if not need_reply:
            return None
        rcode, rflags, rbody, rfds = _recv_message(self.channel)
        for fd in rfds:
            os.close(fd)
        assert (rcode, rflags, len(rbody)) == (code, 5, 8), (rcode, rflags, rbody)
        return _U64.unpack(rbody)[0]

    def shmem_map(self, fd, fd_offset, shm_offset, length, writable=False, shmid=0):
        body = struct.pack("<B7xQQQQ", shmid, fd_offset, shm_offset, length, 1 if writable else 0)
        return self.send_backend_request(9, body, (fd,))

    def shmem_unmap(self, shm_offset, length, shmid=0):
        return self.send_backend_request(10, struct.pack("<B7xQQQQ", shmid, 0, shm_offset, length, 0))

    # -- serving ----------------------------------------------------------------------------------

    def _run(self):
        try:
            while True:
                watched = [self._stop_r, self.sock.fileno()]
                kicks = {r.kick: i for i, r in self.rings.items() if r.kick is not None and r.started}
                readable, _, _ = select.select(watched + list(kicks), [], [])
                if self._stop_r in readable:
                    return
                # Kicks first: a kick written before a message is counted before that message.
                for fd in readable:
                    if fd in kicks:
                        try:
                            os.read(fd, 8)
                        except BlockingIOError:
                            continue
                        self.kicks[kicks[fd]] += 1
                        if self.device is not None:
                            self.device(self, kicks[fd])
                if self.sock.fileno() in readable:
                    try:
                        code, flags, body, fds = _recv_message(self.sock)
                    except (EOFError, ConnectionError):
                        return
                    self._handle(code, flags, body, fds)
        except BaseException as exc:  # reported by close()
            self.error = exc

    def _reply(self, code, body, fds=()):
        _send_message(self.sock, code, 5, body, fds)

    def _handle(self, code, flags, body, fds):
        name = FRONTEND_REQ_NAMES.get(code, "request %d" % code)
        self.messages.append(Msg(name, flags, body, len(fds)))
        replied = True
        if name == "GET_FEATURES":
            self._reply(code, _U64.pack(self.features))
        elif name == "GET_PROTOCOL_FEATURES":
            self._reply(code, _U64.pack(self.protocol_features))
        elif name == "GET_QUEUE_NUM":
            self._reply(code, _U64.pack(self.queue_num))
        elif name == "GET_CONFIG":
            offset, size, cflags = struct.unpack_from("<III", body)
            self._reply(code, struct.pack("<III", offset, size, cflags) + bytes(self.config[offset:offset + size]))
        elif name == "GET_VRING_BASE":
            index = _STATE.unpack(body)[0]
            ring = self.rings[index]
            ring.started = False
            if ring.kick is not None:
                os.close(ring.kick)
                ring.kick = None
            self._reply(code, _STATE.pack(index, ring.last_avail))
        elif name == "SET_DEVICE_STATE_FD":
            direction, phase = _STATE.unpack(body)
            self._start_transfer(code, direction, fds[0])
            fds = []
        elif name == "CHECK_DEVICE_STATE":
            self._transfer.join(5)
            self._transfer = None
            self._reply(code, _U64.pack(0 if self._transfer_ok else 1))
        elif name == "GET_SHMEM_CONFIG":
            sizes = self.shmem_sizes + [0] * (256 - len(self.shmem_sizes))
            self._reply(code, struct.pack("<II256Q", len(self.shmem_sizes), 0, *sizes))
        else:
            replied = False
            fds = self._set(name, body, fds)
        for fd in fds:
            os.close(fd)
        if not replied and flags & 8 and self.acked_protocol & P_REPLY_ACK:
            self._reply(code, _U64.pack(0))

    def _set(self, name, body, fds):
        """Requests without a mandatory reply; returns the fds not kept."""
        if name == "SET_FEATURES":
            self.acked_features = _U64.unpack(body)[0]
        elif name == "SET_PROTOCOL_FEATURES":
            self.acked_protocol = _U64.unpack(body)[0]
        elif name == "SET_BACKEND_REQ_FD":
            self.channel = socket.socket(fileno=fds.pop())
        elif name == "SET_CONFIG":
            offset, size, _ = struct.unpack_from("<III", body)
            self.config[offset:offset + size] = body[12:12 + size]
        elif name == "SET_MEM_TABLE":
            self._unmap()
            count = struct.unpack_from("<I", body)[0]
            for i in range(count):
                gpa, size, uaddr, offset = struct.unpack_from("<QQQQ", body, 8 + 32 * i)
                self.regions.append((gpa, size, uaddr, mmap.mmap(fds[i], size, offset=offset)))
        elif name in ("SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ENABLE"):
            index, num = _STATE.unpack(body)
            ring = self.rings[index]
            if name == "SET_VRING_NUM":
                ring.num = num
            elif name == "SET_VRING_BASE":
                ring.base = ring.last_avail = num
            else:
                ring.enabled = bool(num)
        elif name == "SET_VRING_ADDR":
            index, _, ring_desc, ring_used, ring_avail, _ = struct.unpack("<IIQQQQ", body)
            ring = self.rings[index]
            ring.desc, ring.used, ring.avail = ring_desc, ring_used, ring_avail
        elif name in ("SET_VRING_KICK", "SET_VRING_CALL"):
            value = _U64.unpack(body)[0]
            ring = self.rings[value & 0xFF]
            attr = "kick" if name == "SET_VRING_KICK" else "call"
            if getattr(ring, attr) is not None:
                os.close(getattr(ring, attr))
            setattr(ring, attr, fds.pop() if fds else None)
            if attr == "kick":
                ring.started = True
        return fds

    def _start_transfer(self, code, direction, fd):
        """Stream the state from a thread, as real back-ends must (the front-end reads after the reply)."""
        own = None
        if self.return_state_fd:
            r, w = os.pipe()
            os.close(fd)
            fd, own = (w, r) if direction == 0 else (r, w)

        def transfer():
            try:
                if direction == 0:
                    with open(fd, "wb") as f:
                        f.write(self.state)
                else:
                    with open(fd, "rb") as f:
                        self.loaded_state = f.read()
            except OSError:
                self._transfer_ok = False

        self._transfer = threading.Thread(target=transfer, name="vhost-user-fake-transfer", daemon=True)
        self._transfer.start()
        if own is None:
            self._reply(code, _U64.pack(0x100))
        else:
            self._reply(code, _U64.pack(0), [own])
            os.close(own)


def post_buffer(mem, queue, addr, length, write=False):
    """Driver side, by hand (the Queue driver API lives elsewhere): descriptor 0 -> avail ring."""
    mem.write(queue.desc_table, struct.pack("<QIHH", addr, length, 2 if write else 0, 0))
    avail_idx = queue.next_avail
    mem.write(queue.avail_ring + 4 + 2 * (avail_idx % queue.size), struct.pack("<H", 0))
    mem.write(queue.avail_ring + 2, struct.pack("<H", (avail_idx + 1) & 0xFFFF))
    queue.next_avail = (avail_idx + 1) & 0xFFFF


def echo_device(backend, index):
    """A device that completes every chain with its total length."""
    while True:
        popped = backend.pop_avail(index)
        if popped is None:
            return
        head, chain = popped
        backend.push_used(index, head, sum(length for _, length, _ in chain))


def ring_requests():
    return ["SET_VRING_NUM", "SET_VRING_ADDR", "SET_VRING_BASE", "SET_VRING_CALL", "SET_VRING_KICK",
            "SET_VRING_ENABLE"]


CONSTRUCT = ["SET_OWNER", "GET_FEATURES", "GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES",
             "SET_BACKEND_REQ_FD", "GET_QUEUE_NUM"]
STOP_TWO = ["SET_VRING_ENABLE", "GET_VRING_BASE"] * 2
ACKED = {"SET_MEM_TABLE", "SET_VRING_CALL", "SET_VRING_KICK", "SET_VRING_ENABLE", "SET_BACKEND_REQ_FD"}


class FrontendTestBase(FdLeakCheck):
    """Fixtures: a FakeBackend, a frontend on it, guest memory and two queues; all closed after."""

    def backend(self, **kwargs):
        backend = FakeBackend(**kwargs)
        self.addCleanup(backend.close)
        return backend

    def frontend(self, backend, device_type=None, **kwargs):
        sock = backend.frontend_sock
        backend.frontend_sock = None
        fe = vu.VhostUserFrontend(device_type or vu.DeviceType.BLOCK,
                                  vu.VirtioFeature.VERSION_1 | vu.VirtioFeature.RING_EVENT_IDX,
                                  sock, **kwargs)
        self.addCleanup(fe.close)
        return fe

    def memory(self, nqueues=2, size=64):
        mem = vu.GuestMemory([(0, 1 << 20)])
        self.addCleanup(mem.close)
        queues = [vu.Queue(mem, size, index=i) for i in range(nqueues)]
        for q in queues:
            self.addCleanup(q.close)
        return mem, queues


class TestFrontendLifecycle(FrontendTestBase):
    """crosvm's test_vhost_user_lifecycle, in Python: the exact request order, message by message."""

    def _lifecycle(self, reply_ack):
        protocol = FAKE_PROTOCOL if reply_ack else FAKE_PROTOCOL & ~P_REPLY_ACK
        backend = self.backend(protocol_features=protocol, device=echo_device)
        fe = self.frontend(backend)
        self.assertEqual([m.name for m in backend.take(len(CONSTRUCT))], CONSTRUCT)
        self.assertEqual(fe.queue_max_sizes(), [32768, 32768])
        self.assertEqual(fe.features(), FAKE_FEATURES)
        self.assertEqual(int(fe.protocol_features), protocol)
        self.assertEqual(fe.read_config(4, 8), bytes(range(4, 12)))
        mem, queues = self.memory()

        def activation(with_features):
            msgs = backend.take((2 if with_features else 1) + 12)
            self.assertEqual([m.name for m in msgs],
                             (["SET_FEATURES"] if with_features else []) + ["SET_MEM_TABLE"]
                             + ring_requests() * 2)
            for m in msgs:
                self.assertEqual(bool(m.flags & 8), reply_ack and m.name in ACKED, m)
            return msgs

        self.assertEqual(backend.take(1)[0].name, "GET_CONFIG")
        fe.activate(mem, None, queues)
        msgs = activation(True)
        self.assertEqual(_U64.unpack(msgs[0].body)[0], F_PROTOCOL)
        self.assertEqual(struct.unpack("<IIQQQQ", msgs[3].body)[2:5],
                         (mem.host_address(queues[0].desc_table), mem.host_address(queues[0].used_ring),
                          mem.host_address(queues[0].avail_ring)))
        self.assertEqual(msgs[2].body, struct.pack("<II", 0, 64))
        wait_for(lambda: backend.kicks[0] and backend.kicks[1], what="the start kick")
        fe.reset()
        self.assertEqual([m.name for m in backend.take(4)], STOP_TWO)
        fe.ack_features(fe.features())
        self.assertEqual(backend.take(1)[0].body, _U64.pack(FAKE_FEATURES))
        fe.activate(mem, None, {0: queues[0], 1: queues[1]})
        activation(False)  # features already sent since the reset
        # The device consumes one chain on queue 1, so the base moves.
        post_buffer(mem, queues[1], 0x80000, 512)
        queues[1].kick.signal()
        wait_for(lambda: queues[1].used_index() == 1, what="the device to complete")
        slept = fe.virtio_sleep()
        self.assertEqual([m.name for m in backend.take(4)], STOP_TWO)
        self.assertEqual(sorted(slept), [0, 1])
        self.assertEqual((slept[1].next_avail, slept[1].next_used), (1, 1))
        state = fe.virtio_snapshot()
        self.assertEqual([m.name for m in backend.take(2)], ["SET_DEVICE_STATE_FD", "CHECK_DEVICE_STATE"])
        self.assertEqual(state.backend_state, backend.state)
        self.assertEqual(state.acked_features, FAKE_FEATURES)
        fe.virtio_wake()
        msgs = activation(False)
        self.assertEqual([m.body for m in msgs if m.name == "SET_VRING_BASE"],
                         [struct.pack("<II", 0, 0), struct.pack("<II", 1, 1)])
        fe.virtio_sleep()
        backend.take(4)
        fe.close()
        fe.close()  # idempotent
        self.assertEqual(backend.names(), [])

        # Restore into a fresh back-end, from the bytes, then wake with the slept queues.
        fresh = self.backend(protocol_features=protocol)
        fe2 = self.frontend(fresh)
        fe2.virtio_restore(state.to_bytes())
        self.assertEqual([m.name for m in fresh.take(len(CONSTRUCT) + 3)],
                         CONSTRUCT + ["SET_FEATURES", "SET_DEVICE_STATE_FD", "CHECK_DEVICE_STATE"])
        self.assertEqual(fresh.acked_features, FAKE_FEATURES)
        self.assertEqual(fresh.loaded_state, backend.state)
        fe2.virtio_wake(queues=slept, mem=mem)
        msgs = fresh.take(13)
        self.assertEqual([m.name for m in msgs], ["SET_MEM_TABLE"] + ring_requests() * 2)
        self.assertEqual(msgs[1 + 6 + 2].body, struct.pack("<II", 1, 1))

    def test_lifecycle_with_reply_ack(self):
        self._lifecycle(reply_ack=True)

    def test_lifecycle_without_reply_ack(self):
        self._lifecycle(reply_ack=False)


def _memfd(data, size, seal=False):
    """A memfd of ``size`` bytes starting with ``data`` (a back-end's shared buffer)."""
    if hasattr(os, "memfd_create"):  # 3.8+
        fd = os.memfd_create("fake-shmem", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seal else 0))
    else:
        fd = vu.memfd_create("fake-shmem", size)  # sealed against shrinking already
        seal = None
    os.ftruncate(fd, size)
    os.pwrite(fd, data, 0)
    if seal:
        import fcntl
        fcntl.fcntl(fd, 1024 + 9, 0x2)  # F_ADD_SEALS, F_SEAL_SHRINK (fcntl names are 3.8+)
    return fd


class TestFrontendBackendRequests(FrontendTestBase):
    """The worker serves the back-end request channel; results reach the Interrupt."""

    def active(self, interrupt=None, **backend_kwargs):
        backend = self.backend(**backend_kwargs)
        fe = self.frontend(backend)
        mem, queues = self.memory()
        fe.activate(mem, interrupt, queues)
        return backend, fe, queues

    def test_shmem_map_unmap_round_trip(self):
        with self.assertLogs("vhost_user_frontend", "WARNING") as logs:
            backend = self.backend(shmem_sizes=[16 * PAGE])
            fe = self.frontend(backend)
            self.assertEqual(fe.get_shared_memory_region(), vu.SharedMemoryRegion(0, 16 * PAGE))
            shm = fe.set_shared_memory_mapper()
            self.assertIs(fe.shared_memory, shm)
            mem, queues = self.memory()
            fe.activate(mem, None, queues)
            for seal in (False, True):
                with self.subTest(sealed=seal):
                    fd = _memfd(b"hello from the back-end", 4 * PAGE, seal)
                    self.addCleanup(os.close, fd)
                    self.assertEqual(backend.shmem_map(fd, PAGE, 2 * PAGE, 2 * PAGE), 0)
                    os.pwrite(fd, b"page one", PAGE)
                    self.assertEqual(shm.read(2 * PAGE, 8), b"page one")  # live, shared pages
                    os.pwrite(fd, b"PAGE ONE", PAGE)
                    self.assertEqual(shm.read(2 * PAGE, 8), b"PAGE ONE")
                    self.assertEqual(shm.mappings(), [(2 * PAGE, 2 * PAGE, False)])
                    with self.assertRaises(ValueError):
                        shm.write(2 * PAGE, b"x")  # mapped read-only, as asked
                    with self.assertRaises(ValueError):
                        shm.read(0, 1)  # nothing mapped there: refused, never dereferenced
                    # Refused with an error reply: overlap, out of bounds, past the file's end, misaligned.
                    einval = (-errno.EINVAL) & (2 ** 64 - 1)
                    self.assertEqual(backend.shmem_map(fd, 0, 3 * PAGE, PAGE), einval)
                    self.assertEqual(backend.shmem_map(fd, 0, 15 * PAGE, 2 * PAGE), einval)
                    self.assertEqual(backend.shmem_map(fd, 2 * PAGE, 8 * PAGE, 4 * PAGE), einval)
                    self.assertEqual(backend.shmem_map(fd, 1, 8 * PAGE, PAGE), einval)
                    self.assertEqual(backend.shmem_map(fd, 0, 0, PAGE, shmid=1), einval)
                    self.assertEqual(backend.shmem_unmap(2 * PAGE, PAGE), einval)  # not an exact match
                    self.assertEqual(backend.shmem_unmap(2 * PAGE, 2 * PAGE), 0)
                    self.assertEqual(shm.mappings(), [])
                    with self.assertRaises(ValueError):
                        shm.read(2 * PAGE, 8)
            # Writable mapping; then the back-end shrinks its (unsealed) file: reads fail, never SIGBUS.
            fd = _memfd(b"", 2 * PAGE)
            self.addCleanup(os.close, fd)
            self.assertEqual(backend.shmem_map(fd, 0, 0, 2 * PAGE, writable=True), 0)
            shm.write(PAGE + 5, b"from the front-end")
            self.assertEqual(os.pread(fd, 18, PAGE + 5), b"from the front-end")
            if hasattr(os, "memfd_create"):  # the ctypes fallback seals it: cannot shrink
                os.ftruncate(fd, 0)
                with self.assertRaises(vu.ProtocolError):
                    shm.read(PAGE, 8)
                with self.assertRaises(vu.ProtocolError):
                    shm.write(PAGE, b"x")
            # reset drops every mapping (the spec; crosvm's TODO) and the device re-activates.
            fe.reset()
            self.assertEqual(shm.mappings(), [])
            fe.activate(mem, None, queues)
            fd = _memfd(b"again", PAGE)
            self.addCleanup(os.close, fd)
            self.assertEqual(backend.shmem_map(fd, 0, 0, PAGE), 0)
            self.assertEqual(shm.read(0, 5), b"again")
        self.assertIn('overlaps the mapping', "\n".join(logs.output))

    def test_config_change_reaches_interrupt(self):
        seen = []
        interrupt = vu.Interrupt(on_config_changed=lambda: seen.append(threading.current_thread().name))
        self.addCleanup(interrupt.close)
        backend, fe, _ = self.active(interrupt)
        self.assertEqual(backend.send_backend_request(2), 0)  # CONFIG_CHANGE_MSG, NEED_REPLY
        self.assertEqual(interrupt.config_changed.wait(5), 1)
        self.assertEqual(len(seen), 1)
        self.assertTrue(seen[0].startswith("vhost-user"), seen)
        backend.send_backend_request(2, need_reply=False)
        self.assertEqual(interrupt.config_changed.wait(5), 1)

    def test_hang_up_reported_as_crash(self):
        with self.assertLogs("vhost_user_frontend", "WARNING") as logs:
            crashes = []
            interrupt = vu.Interrupt(on_crashed=crashes.append)
            self.addCleanup(interrupt.close)
            backend, fe, _ = self.active(interrupt)
            backend.hang_up()
            self.assertEqual(interrupt.crashed.wait(5), 1)
            self.assertIsInstance(interrupt.crash_error, vu.Disconnected)
            self.assertEqual(crashes, [interrupt.crash_error])
            with self.assertRaises(vu.Disconnected):
                fe.reset()  # the rings cannot be stopped: said so, and the object stays closable
            fe.close()
        self.assertIn('hung up', "\n".join(logs.output))

    def test_unsupported_requests_answered_worker_alive(self):
        with self.assertLogs("vhost_user_frontend", "WARNING") as logs:
            backend, fe, _ = self.active()
            interrupt = fe.interrupt

            def err(code):
                return (-code) & (2 ** 64 - 1)
            cases = [
                ("IOTLB_MSG", 1, b"\0" * 32, (), err(errno.ENOTSUP)),
                ("HOST_NOTIFIER with fd", 3, struct.pack("<QQQ", 0, PAGE, 0), "fd", err(errno.ENOTSUP)),
                ("HOST_NOTIFIER deregister", 3, struct.pack("<QQQ", 0x100, PAGE, 0), (), 0),
                ("VRING_CALL", 4, struct.pack("<II", 1, 0), (), 0),
                ("VRING_CALL bad ring", 4, struct.pack("<II", 7, 0), (), err(errno.EINVAL)),
                ("VRING_ERR", 5, struct.pack("<II", 0, 0), (), 0),
                ("SHARED_OBJECT_ADD", 6, b"u" * 16, (), 0),
                ("SHARED_OBJECT_LOOKUP", 8, b"u" * 16, (), err(errno.ENOENT)),
                ("SHARED_OBJECT_REMOVE", 7, b"u" * 16, (), 0),
                ("SHARED_OBJECT_REMOVE again", 7, b"u" * 16, (), err(errno.ENOENT)),
                ("SHMEM_MAP without mapper", 9, b"\0" * 40, "fd", err(errno.EINVAL)),
                ("SHMEM_MAP without fd", 9, b"\0" * 40, (), err(errno.EINVAL)),
                ("GPU_MAP", 1006, b"\0" * 64, "fd", err(errno.ENOTSUP)),
                ("EXTERNAL_MAP", 1007, b"\0" * 32, (), err(errno.EPERM)),
                ("CONFIG_CHANGE_MSG with payload", 2, b"\0" * 8, (), err(errno.EINVAL)),
                ("bad payload size", 4, b"\0" * 3, (), err(errno.EINVAL)),
                ("unknown code", 99, b"", (), err(errno.ENOSYS)),
            ]
            for name, code, body, fds, expected in cases:
                with self.subTest(name):
                    if fds == "fd":
                        r, w = os.pipe()
                        self.addCleanup(os.close, r)
                        self.addCleanup(os.close, w)
                        fds = (r,)
                    self.assertEqual(backend.send_backend_request(code, body, fds), expected)
            self.assertEqual(fe.queue_max_sizes(), [32768, 32768])
            # Replied even without NEED_REPLY: EXTERNAL_MAP always is (crosvm).
            _send_message(backend.channel, 1007, 1, b"\0" * 32)
            self.assertEqual(_recv_message(backend.channel)[2], _U64.pack(err(errno.EPERM)))
            self.assertIsNone(interrupt.crash_error)
            self.assertEqual(backend.send_backend_request(2), 0)
            self.assertEqual(interrupt.config_changed.wait(5), 1)
        self.assertIn('ENOSYS', "\n".join(logs.output))

    def test_worker_failure_reported_and_reraised(self):
        with self.assertLogs("vhost_user_frontend", "WARNING") as logs:
            backend, fe, queues = self.active()
            interrupt = fe.interrupt
            _send_message(backend.channel, 2, 0x2)  # version 2: the stream cannot be trusted
            self.assertEqual(interrupt.crashed.wait(5), 1)
            self.assertIsInstance(interrupt.crash_error, vu.ProtocolError)
            with self.assertRaises(vu.ProtocolError):
                fe.reset()  # the rings were stopped, then the worker's error comes out
            self.assertEqual(backend.names()[-4:], STOP_TWO)
            fe.activate(queues[0].mem, None, queues)  # usable again, with a new worker
            self.assertEqual(backend.send_backend_request(2), 0)
            self.assertEqual(fe.interrupt.config_changed.wait(5), 1)
        self.assertIn('worker failed', "\n".join(logs.output))

    def test_backend_hangs_up_request_channel(self):
        backend, fe, queues = self.active()
        backend.channel.close()
        backend.channel = None
        wait_for(lambda: fe._worker.handler_closed, what="the worker to see EOF")
        self.assertIsNone(fe.interrupt.crash_error)  # crosvm: info, not a crash
        fe.reset()
        self.assertIsNone(fe._handler)

    def test_interrupt_modes(self):
        for mode in ("queue", "shared", "callback"):
            with self.subTest(mode=mode):
                used = []
                interrupt = vu.Interrupt(mode, on_used=used.append)
                self.addCleanup(interrupt.close)
                backend, fe, queues = self.active(interrupt)
                call_fd = backend.rings[1].call
                self.assertEqual(call_fd is not None, True)
                backend.signal_call(1)
                self.assertGreaterEqual(queues[1].call.wait(5), 1)
                if mode == "queue":
                    self.assertEqual(used, [])  # the worker does not watch per-queue events
                else:
                    wait_for(lambda: used, what="on_used")
                    self.assertEqual(used, [None] if mode == "shared" else [1])
                    self.assertGreaterEqual(queues[0].call.read(), 1 if mode == "shared" else 0)
                fe.close()

    def test_start_kick_option(self):
        for start_kick in (True, False):
            with self.subTest(start_kick=start_kick):
                backend = self.backend()
                fe = self.frontend(backend, start_kick=start_kick)
                mem, queues = self.memory()
                fe.activate(mem, None, queues[:1])
                fe.reset()
                backend.names(len(CONSTRUCT) + 2 + 6 + 2)
                self.assertEqual(backend.kicks[0], 1 if start_kick else 0)
                fe.close()

    def test_misuse(self):
        backend = self.backend(protocol_features=P_MQ | P_REPLY_ACK)
        fe = self.frontend(backend, max_queue_size=1000)
        self.assertEqual(fe.queue_max_sizes(), [512, 512])
        self.assertEqual(fe.debug_label(), "vu-block")
        mem, queues = self.memory()
        with self.assertRaises(ValueError):
            fe.activate(mem, None, {5: queues[0]})
        fe.activate(mem, None, queues)
        with self.assertRaises(RuntimeError):
            fe.activate(mem, None, queues)
        with self.assertRaises(vu.FeatureNotNegotiated):
            fe.virtio_snapshot()
        with self.assertRaises(vu.FeatureNotNegotiated):
            fe.set_shared_memory_mapper()
        self.assertIsNone(fe.get_shared_memory_region())
        fe.close()
        with self.assertRaises(ValueError):
            fe.reset()


class TestDeviceState(FrontendTestBase):
    """DeviceState's byte encoding and restore's refusals."""

    def test_encoding(self):
        state = vu.DeviceState(vu.DeviceType.NET, 0x1_4000_0021, b"\x00\x01state")
        data = state.to_bytes()
        self.assertEqual(data[:8], b"VHUSTATE")
        self.assertEqual(struct.unpack_from("<HHIQQ", data, 8), (1, 0, 1, 0x1_4000_0021, 7))
        self.assertEqual(vu.DeviceState.from_bytes(data), state)
        for bad in (data[:-1], data + b"\0", b"VHUSTATX" + data[8:], data[:8] + b"\x02" + data[9:],
                    data[:33] + b"X" + data[34:], b""):
            with self.assertRaises(ValueError):
                vu.DeviceState.from_bytes(bad)

    def test_restore_refusals(self):
        backend = self.backend(features=F_PROTOCOL | F_VERSION_1)
        fe = self.frontend(backend)
        with self.assertRaises(vu.FeatureNotNegotiated) as cm:
            fe.virtio_restore(vu.DeviceState(vu.DeviceType.BLOCK, F_PROTOCOL | F_VERSION_1 | (1 << 9), b""))
        self.assertIn("BLK_FLUSH", str(cm.exception))
        with self.assertRaises(ValueError):
            fe.virtio_restore(vu.DeviceState(vu.DeviceType.NET, F_PROTOCOL, b""))
        mem, queues = self.memory()
        fe.activate(mem, None, queues)
        with self.assertRaises(RuntimeError):
            fe.virtio_restore(vu.DeviceState(vu.DeviceType.BLOCK, F_PROTOCOL, b""))
        self.assertNotIn("SET_DEVICE_STATE_FD", backend.names())

    def test_backend_supplied_fd(self):
        backend = self.backend(return_state_fd=True)
        fe = self.frontend(backend)
        state = fe.virtio_snapshot()
        self.assertEqual(state.backend_state, backend.state)
        fe.virtio_restore(vu.DeviceState(vu.DeviceType.BLOCK, F_PROTOCOL, b"new state" * 30000))
        self.assertEqual(backend.loaded_state, b"new state" * 30000)


class TestFrontendRealBackends(BackendTestMixin, FdLeakCheck):
    """crosvm's lifecycle against qemu-storage-daemon and DPDK testpmd."""

    def _cycle(self, daemon, device_type, sizes=(128, 128)):
        fe = vu.VhostUserFrontend(device_type, vu.VirtioFeature.VERSION_1, daemon.socket_path,
                                  max_queue_size=256)
        self.addCleanup(fe.close)
        mem = vu.GuestMemory([(0, 1 << 20)])
        self.addCleanup(mem.close)
        queues = [vu.Queue(mem, size, index=i) for i, size in enumerate(sizes)]
        for q in queues:
            self.addCleanup(q.close)
        fe.ack_features(fe.features())
        fe.activate(mem, None, queues)
        fe.reset()
        fe.activate(mem, None, queues)
        slept = fe.virtio_sleep()
        self.assertEqual(sorted(slept), [0, 1])
        self.assertEqual([q.next_avail for q in slept.values()], [0, 0])
        fe.virtio_wake()
        return fe, mem, queues

    def _crash(self, daemon, device_type):
        fe, mem, queues = self._cycle(daemon, device_type)
        os.kill(daemon.pid, signal.SIGKILL)
        self.assertEqual(fe.interrupt.crashed.wait(10), 1, daemon.log_tail())
        self.assertIsInstance(fe.interrupt.crash_error, vu.Disconnected)
        with self.assertRaises(vu.VhostUserError):
            fe.reset()
        fe.close()

    def test_qsd(self):
        daemon = self.start_backend(QemuStorageDaemon, num_queues=2)
        fe, _, _ = self._cycle(daemon, vu.DeviceType.BLOCK)
        self.assertEqual(fe.queue_max_sizes(), [256, 256])
        fe.close()
        fe.close()
        self.assertIsNone(daemon.returncode)

    def test_qsd_killed_while_active(self):
        with self.assertLogs("vhost_user_frontend", "WARNING") as logs:
            self._crash(self.start_backend(QemuStorageDaemon, num_queues=2), vu.DeviceType.BLOCK)
        self.assertIn('hung up', "\n".join(logs.output))

    def test_testpmd(self):
        daemon = self.start_backend(Testpmd)
        fe, _, _ = self._cycle(daemon, vu.DeviceType.NET)
        self.assertEqual(len(fe.queue_max_sizes()), 128)  # GET_QUEUE_NUM says 128 whatever queues= is
        fe.close()

    def test_testpmd_killed_while_active(self):
        with self.assertLogs("vhost_user_frontend", "WARNING") as logs:
            self._crash(self.start_backend(Testpmd), vu.DeviceType.NET)
        self.assertIn('hung up', "\n".join(logs.output))


if __name__ == "__main__":
    unittest.main()
