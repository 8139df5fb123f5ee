"""Tests for vhost_user_frontend.py.

Run with:  python3 -m unittest -v test_vhost_user_frontend
Set VHOST_USER_REQUIRE_BACKENDS=1 to turn "backend not installed" skips into failures (CI does).
"""

import atexit
import errno
import os
import random
import shutil
import signal
import socket
import stat
import struct
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


# Driver: Queue, BlockDevice, NetDevice ###############################################################
#
# The split-ring driver against a device simulated in the test (it reads the avail ring and writes
# the used ring through guest memory), and BlockDevice / NetDevice / the generic Queue against the
# real daemons of the "Test support" section.

_DESC = struct.Struct("<QIHH")
_F = vu.VirtioFeature if vu is not None else None


class _RingDevice(object):
    """The device end of a Queue, done by hand in guest memory (test-side, trusts nothing)."""

    def __init__(self, queue):
        self.q = queue
        self.mem = queue.mem
        self.seen = 0   # avail entries taken
        self.used = self.u16(queue.used_ring + 2)

    def u16(self, gpa):
        return struct.unpack("<H", self.mem.read(gpa, 2))[0]

    def put16(self, gpa, value):
        self.mem.write(gpa, struct.pack("<H", value & 0xFFFF))

    def avail_idx(self):
        return self.u16(self.q.avail_ring + 2)

    def used_event(self):
        return self.u16(self.q.avail_ring + 4 + 2 * self.q.size)

    def take(self):
        """Heads posted since the last call."""
        heads = []
        while self.seen != self.avail_idx():
            heads.append(self.u16(self.q.avail_ring + 4 + 2 * (self.seen % self.q.size)))
            self.seen = (self.seen + 1) & 0xFFFF
        return heads

    def chain(self, head):
        """[(addr, len, flags)] of the chain at head, indirect tables resolved; and the ring descs."""
        table, index, ring_descs, out = self.q.desc_table, head, [], []
        while True:
            addr, length, flags, nxt = _DESC.unpack(self.mem.read(table + 16 * index, 16))
            if table == self.q.desc_table:
                ring_descs.append(index)
            if flags & 4:  # INDIRECT: follow the table from its entry 0
                table, index = addr, 0
                continue
            out.append((addr, length, flags))
            if not flags & 1:
                return out, ring_descs
            index = nxt

    def complete(self, head, length, signal=True):
        slot = self.q.used_ring + 4 + 8 * (self.used % self.q.size)
        self.mem.write(slot, struct.pack("<II", head, length))
        self.used = (self.used + 1) & 0xFFFF
        self.put16(self.q.used_ring + 2, self.used)
        if signal:
            self.q.call.signal()


class TestQueueDriver(FdLeakCheck):
    """Queue's driver side against a device simulated through guest memory."""

    def make(self, size=8, features=0):
        mem = vu.GuestMemory([(0, 1 << 20)])
        self.addCleanup(mem.close)
        q = vu.Queue(mem, size, features=features)
        self.addCleanup(q.close)
        return q, _RingDevice(q)

    def test_chain_layout_copy_in_and_copy_back(self):
        q, dev = self.make()
        out1, out2 = bytearray(4), bytearray(3)
        token = q.add([b"head", b"payload"], [out1, out2], token="t1")
        self.assertEqual(token, "t1")
        self.assertEqual((q.num_free, q.in_flight), (4, 1))
        (head,) = dev.take()
        chain, ring = dev.chain(head)
        self.assertEqual(len(ring), 4)  # direct: one ring descriptor per buffer
        self.assertEqual([(n, f) for _, n, f in chain], [(4, 1), (7, 1), (4, 3), (3, 2)])
        self.assertEqual(self_read(dev, chain[0]) + self_read(dev, chain[1]), b"headpayload")
        dev.mem.write(chain[2][0], b"WXYZ")
        dev.mem.write(chain[3][0], b"abc")
        dev.complete(head, 7)
        self.assertEqual(q.get_used(), [("t1", 7)])
        self.assertEqual((out1, out2), (bytearray(b"WXYZ"), bytearray(b"abc")))
        self.assertEqual((q.num_free, q.in_flight), (8, 0))
        self.assertEqual(q.get_used(), [])

    def test_zero_copy_guest_buffers(self):
        q, dev = self.make()
        buf = q.mem.allocate(64)
        q.mem.write(buf, b"in-place")
        token = q.add([(buf, 8)], [(buf + 32, 16)])
        (head,) = dev.take()
        chain, _ = dev.chain(head)
        self.assertEqual(chain, [(buf, 8, 1), (buf + 32, 16, 2)])
        dev.mem.write(buf + 32, b"reply")
        dev.complete(head, 5)
        self.assertEqual(q.get_used(), [(token, 5)])
        self.assertEqual(q.mem.read(buf + 32, 5), b"reply")

    def test_indirect_only_when_negotiated_and_long(self):
        q, dev = self.make(features=_F.RING_INDIRECT_DESC)
        q.add([b"a", b"b", b"c"], [bytearray(1)])          # 4 buffers: indirect
        q.add([b"a"], [bytearray(1)])                      # short: direct
        heads = dev.take()
        chain, ring = dev.chain(heads[0])
        self.assertEqual((len(chain), len(ring)), (4, 1))
        self.assertEqual(self_read(dev, chain[2]), b"c")
        chain, ring = dev.chain(heads[1])
        self.assertEqual((len(chain), len(ring)), (2, 2))
        self.assertEqual(q.num_free, 5)
        # A chain longer than the free descriptors still fits through one indirect table.
        q.add([b"x"] * 5, [])
        self.assertEqual(q.num_free, 4)
        q2, _ = self.make(size=4)                          # no indirect: 3 descriptors needed
        q2.add([b"x"])
        q2.add([b"x"])
        with self.assertRaises(vu.Queue.Full):
            q2.add([b"x"] * 2, [bytearray(1)])

    def test_full_queue_is_an_error_to_wait_on(self):
        q, dev = self.make(size=4)
        for i in range(2):
            q.add([b"r"], [bytearray(1)], token=i)
        with self.assertRaises(vu.Queue.Full) as cm:
            q.add([b"r"])
        self.assertIsInstance(cm.exception, vu.VhostUserError)
        self.assertEqual(q.num_free, 0)
        heads = dev.take()
        threading.Timer(0.05, dev.complete, (heads[1], 1)).start()
        self.assertEqual(q.wait_used(5.0), [(1, 1)])
        q.add([b"r"], token=2)   # room again
        self.assertEqual(q.in_flight, 2)

    def test_chain_refused_before_posting(self):
        q, dev = self.make(size=4)
        for readable, writable in (([], []), ([b""], []), ([b"x"], [b"read-only"]),
                                   ([(1 << 20, 4)], []), ([(0, 1 << 21)], []),
                                   ([b"x"] * 5, []), ([(0, 1, 2)], [])):
            with self.subTest(readable=readable, writable=writable):
                with self.assertRaises(ValueError):
                    q.add(readable, writable)
        self.assertEqual((q.num_free, q.in_flight, dev.avail_idx()), (4, 0, 0))

    def test_notify_honours_no_notify(self):
        q, dev = self.make()
        self.assertFalse(q.notify())                 # nothing new
        q.add([b"x"])
        q.add([b"y"])
        self.assertTrue(q.notify())                  # one kick for the batch
        self.assertEqual(q.kick.read(), 1)
        dev.put16(q.used_ring, 1)                    # VRING_USED_F_NO_NOTIFY
        q.add([b"z"])
        self.assertFalse(q.notify())
        self.assertEqual(q.kick.read(), 0)
        self.assertTrue(q.notify(force=True))
        self.assertEqual(q.kick.read(), 1)

    def test_notify_honours_avail_event(self):
        q, dev = self.make(features=_F.RING_EVENT_IDX)
        avail_event = q.used_ring + 4 + 8 * q.size
        dev.put16(q.used_ring, 1)                    # NO_NOTIFY is ignored with EVENT_IDX
        dev.put16(avail_event, 0)                    # kick when idx passes 0
        q.add([b"a"])
        self.assertTrue(q.notify())
        dev.put16(avail_event, 3)                    # device wants a kick after entry 3 only
        q.add([b"b"])                                # idx 1 -> 2: not yet
        self.assertFalse(q.notify())
        q.add([b"c"])
        q.add([b"d"])                                # idx 2 -> 4 crosses 3
        self.assertTrue(q.notify())
        self.assertEqual(q.kick.read(), 2)

    def test_wait_survives_spurious_calls_and_times_out(self):
        q, dev = self.make()
        q.call.signal()                              # libvhost-user's call at SET_VRING_CALL
        self.assertEqual(q.wait_used(0.05), [])
        q.add([b"x"], token="late")
        (head,) = dev.take()
        timer = threading.Timer(0.05, dev.complete, (head, 0))
        timer.start()
        q.call.signal()                              # another spurious one before the completion
        self.assertEqual(q.wait_used(5.0), [("late", 0)])
        timer.join()

    def test_event_idx_used_event_rearmed(self):
        q, dev = self.make(features=_F.RING_EVENT_IDX)
        for i in range(3):
            q.add([b"x"], token=i)
        heads = dev.take()
        # Nothing used: waiting for 2 asks to be woken once 2 entries are used (used_event = 1).
        self.assertEqual(q.wait_used(0.01, count=2), [])
        self.assertEqual(dev.used_event(), 1)
        # Completion without a call (the device saw an older used_event): the re-check finds it.
        dev.complete(heads[0], 0, signal=False)
        self.assertEqual(q.wait_used(1.0, spin=0), [(0, 0)])
        self.assertEqual(q.wait_used(0.01), [])
        self.assertEqual(dev.used_event(), 1)        # next_used, count 1

    def test_indices_wrap_at_65536(self):
        q, dev = self.make(size=4, features=_F.RING_EVENT_IDX)
        dev.put16(q.used_ring + 2, 0xFFFE)
        dev.used = dev.seen = 0xFFFE
        dev.put16(q.avail_ring + 2, 0xFFFE)
        q.reclaim(0xFFFE)
        for _ in range(3):
            dev.put16(q.used_ring + 4 + 8 * q.size, dev.seen)   # avail_event: kick me at the next one
            tokens = [q.add([b"%d" % i], [bytearray(2)]) for i in range(2)]
            self.assertTrue(q.notify())
            for head in dev.take():
                dev.complete(head, 2)
            self.assertEqual([t for t, _ in q.get_used()], tokens)
        self.assertEqual((q.next_avail, q.next_used, q.num_free), (4, 4, 4))

    def test_bad_used_entries_refused(self):
        cases = (("out of range", lambda head: (8, 1), "names descriptor 8, the ring has 8"),
                 ("not in flight", lambda head: (head + 1, 1), "not the head of a chain in flight"),
                 ("too long", lambda head: (head, 6), "claims 6 bytes written, the chain has 5"))
        for name, entry, message in cases:
            with self.subTest(name):
                q, dev = self.make()
                q.add([b"cmd"], [bytearray(4), bytearray(1)])
                (head,) = dev.take()
                free = q.num_free
                dev.complete(*entry(head))
                with self.assertRaises(vu.ProtocolError) as cm:
                    q.wait_used(1.0)
                self.assertIn(message, str(cm.exception))
                self.assertEqual((q.num_free, q.in_flight), (free, 1))   # free list untouched
                with self.assertRaises(vu.ProtocolError):                # and it stays broken
                    q.add([b"x"])
        with self.subTest("used->idx ahead of what is in flight"):
            q, dev = self.make()
            q.add([b"cmd"])
            dev.put16(q.used_ring + 2, 5)
            with self.assertRaises(vu.ProtocolError) as cm:
                q.get_used()
            self.assertIn("only 1 chain(s) are in flight", str(cm.exception))

    def test_close_returns_all_guest_memory(self):
        mem = vu.GuestMemory([(0, 1 << 16)])
        self.addCleanup(mem.close)
        q = vu.Queue(mem, 8, features=_F.RING_INDIRECT_DESC)
        q.add([b"x" * 1000] * 4, [bytearray(1000)])
        q.close()
        q.close()
        mem.free(mem.allocate(1 << 16))              # the whole region is free again

    def test_threads_share_a_queue(self):
        q, dev = self.make(size=16, features=_F.RING_EVENT_IDX | _F.RING_INDIRECT_DESC)
        stop = threading.Event()

        def device():
            while not stop.is_set():
                for head in dev.take():
                    chain, _ = dev.chain(head)
                    dev.mem.write(chain[-1][0], self_read(dev, chain[0])[:chain[-1][1]])
                    dev.complete(head, chain[-1][1])
                time.sleep(0.0005)

        results = {}

        def driver(n):
            got = []
            for i in range(50):
                out = bytearray(6)
                while True:
                    try:
                        token = q.add([b"%02d-%03d" % (n, i)], [out], token=(n, i, out))
                        break
                    except vu.Queue.Full:
                        time.sleep(0.001)
                q.notify()
                got.append(token)
            results[n] = got

        dthread = threading.Thread(target=device)
        dthread.start()
        try:
            threads = [threading.Thread(target=driver, args=(n,)) for n in range(3)]
            for t in threads:
                t.start()
            reaped = []
            deadline = time.monotonic() + 10
            while len(reaped) < 150 and time.monotonic() < deadline:
                reaped.extend(q.wait_used(1.0))
            for t in threads:
                t.join(10)
        finally:
            stop.set()
            dthread.join(10)
        self.assertEqual(len(reaped), 150)
        for (n, i, out), length in reaped:
            self.assertEqual((bytes(out), length), (b"%02d-%03d" % (n, i), 6))


def self_read(dev, desc):
    return dev.mem.read(desc[0], desc[1])


def _activate_by_hand(client, mem, queues, features):
    """BACKENDS.md 5: the handshake from SET_FEATURES to SET_VRING_ENABLE, with BackendClient."""
    client.set_features(features)
    client.set_mem_table(mem.regions())
    for q in queues:
        client.set_vring_num(q.index, q.size)
        client.set_vring_base(q.index, q.next_avail)
        client.set_vring_addr(q.index, mem.host_address(q.desc_table),
                              mem.host_address(q.used_ring), mem.host_address(q.avail_ring))
        client.set_vring_call(q.index, q.call)
        client.set_vring_kick(q.index, q.kick)
        client.set_vring_enable(q.index, True)


class TestBlockDevice(BackendTestMixin, FdLeakCheck):
    """BlockDevice against qemu-storage-daemon, every byte checked in the image file."""

    def connect(self, daemon, **kwargs):
        dev = vu.BlockDevice.connect(daemon.socket_path, **kwargs)
        self.addCleanup(dev.close)
        return dev

    def file_bytes(self, daemon, offset, length):
        with open(daemon.image_path, "rb") as f:
            f.seek(offset)
            return f.read(length)

    def random_io(self, daemon, dev, rnd, count):
        size = daemon.size
        shadow = bytearray(size)
        for _ in range(count):
            length = rnd.choice((512, 4096, rnd.randrange(1, 64) * 512, rnd.randrange(1, 5000) * 512))
            offset = rnd.randrange(0, size // 512) * 512
            data = os.urandom(length)
            if offset + length > size:
                with self.assertRaises(ValueError) as cm:      # crosses the end: refused
                    dev.write(offset, data)
                self.assertIn("past the capacity", str(cm.exception))
                continue
            dev.write(offset, data)
            shadow[offset:offset + length] = data
            self.assertEqual(self.file_bytes(daemon, offset, length), data)
        self.assertEqual(self.file_bytes(daemon, 0, size), bytes(shadow))
        for _ in range(20):
            offset = rnd.randrange(0, size // 512) * 512
            length = min(size - offset, rnd.randrange(1, 3000) * 512)
            self.assertEqual(dev.read(offset, length), bytes(shadow[offset:offset + length]))
        return shadow

    def check_raw(self, aio):
        qsd = self.start_backend(QemuStorageDaemon, kind="raw", size=4 << 20, aio=aio)
        # Page-sized data descriptors, as a guest kernel would use: 126 (seg_max) of them per
        # request, through indirect tables, and writes over 504 KiB split into several requests.
        dev = self.connect(qsd, max_segment_size=4096)
        self.assertEqual((dev.capacity, dev.block_size, dev.read_only, dev.num_queues),
                         (4 << 20, 512, False, 1))
        self.assertEqual(dev.config.seg_max, 126)
        self.assertEqual(dev.max_transfer, 126 * 4096)
        self.assertEqual(dev.topology, (0, 0, 1, 1))
        self.assertEqual(dev.get_id(), b"vhost_user_blk")
        shadow = self.random_io(qsd, dev, random.Random(aio), 60)
        dev.flush()
        for bad in ((1, 512), (512, 100), (-512, 512)):
            with self.assertRaises(ValueError):
                dev.read(*bad)
        # WRITE_ZEROES and DISCARD, checked in the file.
        dev.write_zeroes(8192, 3 << 20)
        shadow[8192:8192 + (3 << 20)] = bytes(3 << 20)
        dev.discard(0, 4096)
        self.assertEqual(self.file_bytes(qsd, 0, 4 << 20)[4096:], bytes(shadow[4096:]))
        self.assertEqual(dev.read(0, 4096), self.file_bytes(qsd, 0, 4096))

    def test_raw_threads(self):
        self.check_raw("threads")

    def test_raw_io_uring(self):
        self.check_raw("io_uring")

    def test_async_requests_in_flight(self):
        qsd = self.start_backend(QemuStorageDaemon, kind="raw", size=1 << 20)
        dev = self.connect(qsd, queue_size=32)
        blocks = [os.urandom(4096) for _ in range(100)]
        inflight = []
        for i, data in enumerate(blocks):     # 100 writes through a 32-entry ring: waits for room
            inflight.append(dev.submit_write(4096 * i, data))
        done = []
        while len(done) < len(inflight):
            done.extend(dev.complete(count=len(inflight) - len(done)))
        self.assertEqual(sorted(id(r) for r in done), sorted(id(r) for r in inflight))
        for request in done:
            self.assertEqual((request.status, request.result()), (0, None))
        reads = [dev.submit_read(4096 * i, 4096) for i in range(100)]
        reads.append(dev.submit_flush())
        while not all(r.done for r in reads):
            dev.complete()
        self.assertEqual([bytes(r.result()) for r in reads[:-1]], blocks)
        self.assertEqual(self.file_bytes(qsd, 0, 409600), b"".join(blocks))

    def test_qcow2_checked_with_qemu_io(self):
        qemu_io = self.require_binary("qemu-io", "qemu-utils")
        qsd = self.start_backend(QemuStorageDaemon, kind="qcow2", size=8 << 20)
        dev = self.connect(qsd)
        pattern = bytes(range(256)) * 16
        dev.write(12288, pattern * 3)
        dev.write((8 << 20) - 4096, b"\xab" * 4096)
        dev.flush()
        self.assertEqual(dev.read(12288, 4096), pattern)
        dev.close()
        out = subprocess.check_output(
            [qemu_io, "-f", "qcow2", "-r", "-U", "-c", "read -P 0xab %d 4096" % ((8 << 20) - 4096),
             "-c", "read -v 12288 16", qsd.image_path], stderr=subprocess.STDOUT, timeout=30)
        self.assertIn(b"read 4096/4096 bytes at offset 8384512", out)
        self.assertIn(b"00003000:  00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f", out)
        self.assertNotIn(b"Pattern verification failed", out)

    def test_read_only_export(self):
        qsd = self.start_backend(QemuStorageDaemon, kind="raw", size=1 << 20, writable=False)
        with open(qsd.image_path, "r+b") as f:
            f.write(b"R" * 512)
        dev = self.connect(qsd)
        self.assertTrue(dev.read_only)
        self.assertEqual(dev.read(0, 512), b"R" * 512)
        for call in (lambda: dev.write(0, bytes(512)), lambda: dev.discard(0, 512),
                     lambda: dev.write_zeroes(0, 512), lambda: dev.submit_write(0, bytes(512))):
            with self.assertRaises(OSError) as cm:
                call()
            self.assertEqual(cm.exception.errno, errno.EROFS)
            self.assertIn("read-only", str(cm.exception))
        # Past our own check, the device's refusal surfaces with its virtio-blk status.
        dev.read_only = False
        with self.assertRaises(vu.BackendError) as cm:
            dev.write(0, bytes(512))
        self.assertIn(cm.exception.value, (1, 2))
        self.assertTrue(str(cm.exception).startswith("WRITE: virtio-blk status"))
        self.assertEqual(self.file_bytes(qsd, 0, 512), b"R" * 512)

    def test_two_queues_two_threads(self):
        qsd = self.start_backend(QemuStorageDaemon, kind="raw", size=2 << 20, num_queues=2)
        dev = self.connect(qsd, queue_size=16)
        self.assertEqual(dev.num_queues, 2)
        errors = []
        halves = {}

        def worker(queue):
            try:
                rnd = random.Random(queue)
                base = queue << 20
                for _ in range(40):
                    offset = base + rnd.randrange(0, 1024) * 512
                    length = min(base + (1 << 20) - offset, rnd.randrange(1, 300) * 512)
                    data = os.urandom(length)
                    dev.write(offset, data, queue=queue)
                    if dev.read(offset, length, queue=queue) != data:
                        raise AssertionError("queue %d: read back differs at %d" % (queue, offset))
                halves[queue] = dev.read(base, 1 << 20, queue=queue)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(q,)) for q in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        self.assertEqual(errors, [])
        self.assertEqual(halves[0] + halves[1], self.file_bytes(qsd, 0, 2 << 20))


class TestNetDevice(BackendTestMixin, FdLeakCheck):
    """NetDevice against DPDK testpmd in io-forward mode: what we send comes back."""

    def exchange(self, dev, count, rnd):
        sent = 0
        window = 32   # frames in flight: fewer than the posted receive buffers can hold
        while sent < count:
            frames = []
            for i in range(min(window, count - sent)):
                size = rnd.choice((60, 64, 1514, rnd.randrange(14, 1515)))
                head = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5"
                body = struct.pack("<I", sent + i) + os.urandom(size)
                frames.append((head + body)[:max(size, 18)])
            dev.send_many(frames)
            for frame in frames:
                got = dev.recv(5.0)
                self.assertIsNotNone(got, "frame %d of %d never came back" % (sent, count))
                self.assertEqual(got, frame)
            sent += len(frames)
        self.assertIsNone(dev.recv(0))

    def test_io_forward_10000_frames(self):
        pmd = self.start_backend(Testpmd)
        rnd = random.Random(7)
        for mrg in (False, True):
            with self.subTest(mrg_rxbuf=mrg):
                # Small receive buffers with MRG_RXBUF, so most frames span several of them.
                kwargs = {"rx_buffer_size": 256} if mrg else {}
                with vu.NetDevice.connect(pmd.socket_path, mrg_rxbuf=mrg, **kwargs) as dev:
                    self.assertEqual(bool(dev.features & (1 << 15)), mrg)
                    self.assertTrue(dev.features & _F.VERSION_1)
                    self.assertFalse(dev.features & _F.RING_PACKED)
                    self.exchange(dev, 10000, rnd)
                    with self.assertRaises(ValueError):
                        dev.send(b"short")


_FUSE_IN = struct.Struct("<IIQQIIII")   # len, opcode, unique, nodeid, uid, gid, pid, padding
_FUSE_OUT = struct.Struct("<IiQ")       # len, error, unique


class _Fuse(object):
    """Just enough FUSE over a virtio-fs request queue (test-side, through the generic Queue)."""

    def __init__(self, queue):
        self.q = queue
        self.unique = 0

    def call(self, opcode, nodeid, body, reply_size):
        self.unique += 1
        out = bytearray(_FUSE_OUT.size + reply_size)
        header = _FUSE_IN.pack(_FUSE_IN.size + len(body), opcode, self.unique, nodeid, 0, 0, 0, 0)
        token = self.q.add([header, body], [out])
        self.q.notify()
        ((got, written),) = self.q.wait_used(5.0)
        length, error, unique = _FUSE_OUT.unpack_from(out)
        assert (got, unique, length) == (token, self.unique, written), (got, unique, length, written)
        if error:
            raise OSError(-error, "FUSE opcode %d: %s" % (opcode, os.strerror(-error)))
        return bytes(out[_FUSE_OUT.size:written])


class TestVirtiofsQueue(BackendTestMixin, FdLeakCheck):
    """virtiofsd through the generic Queue API: FUSE_INIT, LOOKUP, OPEN, READ."""

    def test_read_a_file(self):
        fsd = self.start_backend(Virtiofsd)
        content = b"written by the test, read through virtio-fs\n" * 3
        with open(os.path.join(fsd.shared_dir, "hello.txt"), "wb") as f:
            f.write(content)
        mem = vu.GuestMemory([(0, 1 << 20)])
        self.addCleanup(mem.close)
        client = vu.BackendClient.connect(fsd.socket_path)
        self.addCleanup(client.close)
        client.set_owner()
        offered = client.get_features()
        protocol = client.get_protocol_features()
        client.set_protocol_features(protocol & (vu.ProtocolFeature.MQ | vu.ProtocolFeature.REPLY_ACK))
        self.assertEqual(client.get_queue_num(), 2)   # hiprio + one request queue
        features = offered & (_F.VERSION_1 | _F.PROTOCOL_FEATURES | _F.RING_EVENT_IDX)
        queues = [vu.Queue(mem, 16, i, features=features) for i in range(2)]
        for q in queues:
            self.addCleanup(q.close)
        _activate_by_hand(client, mem, queues, features)
        fuse = _Fuse(queues[1])
        major, minor = struct.unpack_from("<II", fuse.call(26, 0, struct.pack("<IIII", 7, 31, 0, 0), 256))
        self.assertEqual(major, 7)
        self.assertGreaterEqual(minor, 31)
        entry = fuse.call(1, 1, b"hello.txt\0", 128)                      # LOOKUP
        nodeid, = struct.unpack_from("<Q", entry)
        self.assertEqual(struct.unpack_from("<Q", entry, 48)[0], len(content))  # attr.size
        with self.assertRaises(OSError) as cm:
            fuse.call(1, 1, b"missing.txt\0", 128)
        self.assertEqual(cm.exception.errno, errno.ENOENT)
        fh, = struct.unpack_from("<Q", fuse.call(14, nodeid, struct.pack("<II", os.O_RDONLY, 0), 16))
        data = fuse.call(15, nodeid, struct.pack("<QQIIQII", fh, 0, 4096, 0, 0, 0, 0), 4096)  # READ
        self.assertEqual(data, content)
        client.close()
        self.assertEqual(fsd.wait(10), 0, fsd.log_tail())


if __name__ == "__main__":
    unittest.main()
